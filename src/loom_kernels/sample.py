"""``python -m loom_kernels.sample``: the sampling command line; its code is :mod:`loom_kernels.cli.sample`."""

import sys

from .cli.sample import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
