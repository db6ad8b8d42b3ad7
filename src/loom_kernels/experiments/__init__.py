"""Experiments built on the library (not part of its API): the demo and the ablation study.

- ``common``: run sizes, ``fit``, sample ``quality`` (W2 at several NFEs, dopri5), ``spread`` over
  seeds and ``ranking`` (an order only where every seed agrees);
- ``variants``: the couplings and study variants compared, their ``LABELS``, the study's grid settings;
- ``plots``: their figures (images tiled by ``loom_kernels.visual.image_grid``);
- ``demo``: ``python -m loom_kernels.demo`` (independent vs minibatch OT vs LOOM-CFM);
- ``study``: ``python -m loom_kernels.study`` (the paper's ablations): the runner; ``report`` its
  outputs (CSV, markdown tables, figure);
- ``images``: ``python -m loom_kernels.experiments.images`` (MNIST and silhouettes: coupling cost vs the
  exact optimum, training, reflow, conditional).

The dataset-wide cost of a seed table and its global optimum are metrics (``loom_kernels.metrics``).
"""
