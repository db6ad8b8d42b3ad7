"""``python -m loom_kernels.reflow``: see :mod:`loom_kernels.reflow.cli`."""

import sys

from .cli import main

sys.exit(main())
