"""``python -m loom_kernels.study``: the study lives in :mod:`loom_kernels.experiments.study`; this module
keeps the command and the old import path."""

import sys

from .couplings.fixed import FixedNoiseCoupling  # noqa: F401  (the old import path)
from .experiments.study import (  # noqa: F401
    ALL_VARIANTS,
    DATASETS,
    VARIANTS,
    converge,
    main,
    markdown,
    run,
    run_one,
    summarize,
    versus_ot,
    write_outputs,
)

if __name__ == "__main__":
    sys.exit(main())
