"""What every rank of a ``LoomCoupling`` must agree on before a call, and the check (``scopes.agree.agree``)."""

from __future__ import annotations

from ..base import METRICS
from ..scopes.agree import agree, generator_hash
from ..scopes.partition import SCOPES
from .tables import TABLES


def fingerprint(coupling, generator, table) -> dict:
    """Config, condition term (its frozen adaptive weight too), slot-generator state, a checksum of the table's
    head (``generator``, ``table``: the coupling's slot generator and ``LoomTable``)."""
    return {
        "seed": coupling.seed,
        "num_points": coupling.num_points,
        "num_caches": coupling.num_caches,
        "scope": SCOPES.index(coupling.scope),
        "metric": METRICS.index(coupling.metric),
        "group_size": coupling.group_size,
        **coupling.cond_term.fingerprint(),
        "table": TABLES.index(coupling.table),
        "slot generator": generator_hash(generator),
        "seed table": table.fingerprint(),
    }


def agree_call(grp, b, x1, labels, cond, return_indices, fingerprint_fn) -> None:
    """Every rank checks the others' call (``b=None``: this rank's inputs were refused, so all raise);
    ``fingerprint_fn()`` is read only under a group of several ranks (it reads the table)."""
    if grp.world == 1:
        return
    given = {"labels": labels is not None, "cond": cond is not None, "return_indices": return_indices}
    sizes = {"batch size": -1 if b is None else b, "cond columns": -1 if b is None else 0}
    if cond is not None:
        sizes["cond columns"] = cond.shape[1]
    specs = {"x1": x1, "labels": labels}
    agree(grp, "LoomCoupling", sizes, given, fingerprint_fn(), failed=b is None, specs=specs)
