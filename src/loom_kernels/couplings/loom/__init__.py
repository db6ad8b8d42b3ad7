"""LOOM-CFM (``LoomCoupling``): the conductor, its steps, its persistence and its seed tables.

- ``coupling.py``: ``LoomCoupling``: checks, slot draw, agreement of ranks, then one step;
- ``steps.py``: the global, local and grouped steps as functions over (table, group, batch);
- ``persistence.py``: the argument and checkpoint checks, state_dict contents, the reading of checkpoints;
- ``indices.py``: the call's input and index checks, ``resample``'s rows;
- ``seed_stream.py``: the stream of distinct seeds the tables are filled from;
- ``tables/``: one class per table kind (``replicated.py``, ``sharded.py``) over ``tables/base.LoomTable``.
"""

from .coupling import LoomCoupling

__all__ = ["LoomCoupling"]
