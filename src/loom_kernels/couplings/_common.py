"""Old private names of :mod:`.common`, kept only so code written against them (compat/torchcfm.py) still
imports; new code imports the public names from :mod:`loom_kernels.couplings.common`."""

from .common import check_labels as _check_labels  # noqa: F401
from .common import cost_dtype as _cost_dtype  # noqa: F401
from .common import solve as _solve  # noqa: F401
