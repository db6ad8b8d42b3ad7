"""The command lines, one module each: ``python -m loom_kernels.train`` and ``python -m loom_kernels.sample``
run :func:`loom_kernels.cli.train.main` and :func:`loom_kernels.cli.sample.main`. The libraries they drive
are :mod:`loom_kernels.train` and :mod:`loom_kernels.sampler`. (``python -m loom_kernels.demo`` and
``.study`` run the experiments of :mod:`loom_kernels.experiments`.)"""
