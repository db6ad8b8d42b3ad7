"""The command lines, one module each: ``python -m loom_kernels.train`` and ``python -m loom_kernels.sample``
run :func:`loom_kernels.cli.train.main` and :func:`loom_kernels.cli.sample.main`. The libraries they drive
are :mod:`loom_kernels.train` and :mod:`loom_kernels.sampler`. (``demo`` and ``study`` are entry points
with library functions of their own, kept as modules.)"""
