"""The old import path of the grouped scope and the cost model: ``scopes/partition.py``, ``scopes/cost_model.py``
and the grouped solves of ``scopes/minibatch_steps.py`` and ``loom/steps.py``."""

from .loom.steps import solve_groups as solve_loom_groups
from .scopes.cost_model import TYPICAL_STEP_S_PER_ITEM, WARN_FRACTION, budget_warning, predicted_coupling_seconds
from .scopes.minibatch_steps import solve_groups as solve_minibatch_groups
from .scopes.partition import DEFAULT_GROUP_SIZE, Partition, Route, check_group_size

__all__ = [
    "DEFAULT_GROUP_SIZE",
    "TYPICAL_STEP_S_PER_ITEM",
    "WARN_FRACTION",
    "Partition",
    "Route",
    "budget_warning",
    "check_group_size",
    "predicted_coupling_seconds",
    "solve_loom_groups",
    "solve_minibatch_groups",
]
