"""What every coupling's call shares, whatever the coupling: the process group, the scope and its partition,
the agreement of ranks, the solve and the cost model; and the scope steps of minibatch OT and Sinkhorn
(LOOM's steps are ``loom/steps.py``, over its seed table).

- ``group.py``: ``Group`` (the process group as one call sees it: gathers, all-to-alls, all-reduces, the
  global batch's cost), ``count_bytes``, ``check_whole_world``, ``to_device``;
- ``partition.py``: ``SCOPES`` (``"global"``, ``"local"``, ``"grouped"``), ``Partition`` and ``Route`` (the
  grouped scope's random groups and the all-to-alls to their owner ranks);
- ``agree.py``: ``agree`` (one small all-gather: every rank raises when the ranks' calls differ),
  ``float_bits``, ``generator_hash``;
- ``solve.py``: the cost dtype, the label-aware exact solve, the condition penalty, the pair statistics;
- ``cost_model.py``: the predicted seconds of a call per scope (docs/scaling.md, LOOM's budget warning);
- ``minibatch_steps.py``, ``sinkhorn_steps.py``: ``step_for(scope)`` -> the step a coupling's call ends in.

A new scope is a name in ``SCOPES`` and one step function per coupling.
"""
