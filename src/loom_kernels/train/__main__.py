"""``python -m loom_kernels.train``: the command line lives in :mod:`loom_kernels.cli.train`."""

import sys

from ..cli.train import main

sys.exit(main())
