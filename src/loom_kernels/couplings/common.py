"""The old import path of the couplings' shared helpers: the argument checks live in ``base.py``, the solve
and the condition penalty in ``scopes/solve.py``, devices in ``scopes/group.py``, ``float_bits`` in
``scopes/agree.py``."""

from .base import (
    METRICS,
    check_cond,
    check_cond_weight,
    check_flag,
    check_indices,
    check_labels,
    check_metric,
    check_x1,
)
from .scopes.agree import float_bits
from .scopes.group import to_device
from .scopes.solve import COND_PENALTY_CAP, add_cond_cost, cond_cost, cost_dtype, pair_stats, raise_bad_data, solve

__all__ = [
    "METRICS",
    "COND_PENALTY_CAP",
    "add_cond_cost",
    "check_cond",
    "check_cond_weight",
    "check_flag",
    "check_indices",
    "check_labels",
    "check_metric",
    "check_x1",
    "cond_cost",
    "cost_dtype",
    "float_bits",
    "pair_stats",
    "raise_bad_data",
    "solve",
    "to_device",
]
