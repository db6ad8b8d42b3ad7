"""``python -m loom_kernels.demo``: the demo lives in :mod:`loom_kernels.experiments.demo`, its building
blocks in :mod:`loom_kernels.experiments.common`; this module keeps the command and the old import path."""

import sys

from .experiments.common import (  # noqa: F401  (the old import path)
    COLORS,
    COLUMNS,
    DOPRI5_TOL,
    EVALS,
    STRAIGHTNESS_NFE,
    column_label,
    dopri5_sample,
    fit,
    fmt,
    quality,
    ranking,
    spread,
)
from .experiments.demo import main, run  # noqa: F401
from .experiments.variants import COUPLINGS, LABELS  # noqa: F401
from .metrics import dataset_cost, global_optimum  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
