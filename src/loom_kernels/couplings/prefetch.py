"""Overlap the coupling with training: couple batch t+1 on a host thread (and a CUDA side stream) during step t.

Invariants:

- one worker thread runs the submitted calls in submission order, so the coupling sees exactly the calls
  of the synchronous loop in the same order: same tables, generator states and noise, bit for bit;
- on CUDA the call runs on a side stream that first waits for the work queued on the submitting stream
  (``x1`` may still be in flight), and ``result()`` makes the caller's stream wait for the call's work, so
  no tensor is read early and none is freed while the other stream still uses it;
- the coupling must draw its randomness from its own generators (LoomCoupling does; give
  ``MinibatchOTCoupling`` a ``generator=``): draws from torch's global generator on the worker thread would
  interleave with the main thread's (dropout, augmentation) and differ from the synchronous loop;
- an error raised by the call (bad indices, NaN data) is raised by ``result()``, with the coupling's state
  what a synchronous call leaves after that error; later submissions still run.

Under DDP the coupling's collectives run on the worker thread while the model's all-reduces run on the
main thread: on one process group they could be issued in different orders on different ranks (a hang
or a mismatch), so a distributed coupling must have its own group spanning the whole world
(``process_group=torch.distributed.new_group()``), which ``PrefetchCoupling`` checks.
"""

from __future__ import annotations

import concurrent.futures

import torch

from .base import Coupling


class CouplingFuture:
    """The pending result of ``PrefetchCoupling.submit``: ``result()`` -> ``(x0, x1)`` (``(x0, x1, perm)`` when
    submitted with ``return_indices=True``); then ``stats``."""

    def __init__(self, future: concurrent.futures.Future):
        self._future = future
        self.stats: dict = {}

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> tuple:
        """Wait for the call and return its ``(x0, x1)`` (raises the call's error, if any)."""
        out, stats, event = self._future.result(timeout)
        if event is not None:  # the caller's stream waits for the side stream's work on these tensors
            stream = torch.cuda.current_stream(out[0].device)
            stream.wait_event(event)
            for t in out[:1] + out[2:]:  # x0 (and perm) were made on the side stream
                t.record_stream(stream)
        self.stats = stats
        return out


class PrefetchCoupling(Coupling):
    """Run ``coupling`` calls on a background thread (a CUDA side stream on a GPU), in submission order.

    Shapes as the wrapped coupling: ``submit(x1 (b, *shape), indices (b,), labels=(b,), ...)`` -> a
    :class:`CouplingFuture` whose ``result()`` is ``(x0, x1)``. Do not modify ``x1``, ``indices`` or
    ``labels`` in place before ``result()`` returns. Under DDP give the coupling its own process group
    (all ranks, e.g. ``torch.distributed.new_group()``), so its collectives never interleave with the
    model's. ``close()`` (or a ``with`` block) waits for the pending calls and stops the thread.

    It is a :class:`Coupling` itself: ``pre(x1, idx)`` (the protocol's call) submits and waits, with the
    wrapped coupling's results and ``stats``; ``state_dict``/``load_state_dict`` run after the pending calls.

    Example (the trainer's loop: couple batch t+1 while the model trains on batch t)::

        pre = PrefetchCoupling(LoomCoupling(len(ds), (3, 32, 32), device="cuda"))
        batches = iter(loader)                      # yields (x1, idx) on the GPU
        x1, idx = next(batches)
        pending = pre.submit(x1, idx)
        for x1_next, idx_next in batches:
            x0, x1 = pending.result()
            pending = pre.submit(x1_next, idx_next)  # runs during the step below
            train_step(x0, x1)
        train_step(*pending.result())
        pre.close()
    """

    def __init__(self, coupling: Coupling):
        if not callable(coupling):
            raise TypeError(f"coupling must be a Coupling (callable), got {type(coupling).__name__}")
        _check_own_group(coupling)
        self.coupling = coupling
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="loom-prefetch")
        self._streams: dict = {}
        self.stats = {}

    def __call__(
        self, x1: torch.Tensor, indices=None, *, x0=None, labels=None, cond=None, return_indices: bool = False
    ) -> tuple:
        """``coupling(x1, indices, x0=x0, labels=labels, cond=cond, ...)`` through the worker (after the
        pending calls); ``return_indices=True`` returns the wrapped coupling's ``(x0, x1, perm)``."""
        kwargs = {k: v for k, v in (("x0", x0), ("labels", labels), ("cond", cond)) if v is not None}
        if return_indices is not False:  # passed on as given: the wrapped coupling checks it
            kwargs["return_indices"] = return_indices
        pending = self.submit(x1, indices, **kwargs)
        out = pending.result()
        self.stats = pending.stats
        return out

    def state_dict(self) -> dict:
        """The wrapped coupling's state once the pending calls have run."""
        return self._after_pending(self.coupling.state_dict)

    def load_state_dict(self, state: dict) -> None:
        """Restore the wrapped coupling's state once the pending calls have run."""
        self._after_pending(self.coupling.load_state_dict, state)

    def _after_pending(self, fn, *args):
        try:
            pending = self._pool.submit(fn, *args)
        except RuntimeError:  # closed: nothing is pending any more
            return fn(*args)
        return pending.result()

    def submit(self, x1: torch.Tensor, indices=None, **kwargs) -> CouplingFuture:
        """Queue ``coupling(x1, indices=indices, **kwargs)`` (``labels=``, ``x0=``, ``cond=``,
        ``return_indices=``...); returns at once."""
        ready = None
        if isinstance(x1, torch.Tensor) and x1.is_cuda:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(x1.device))
        return CouplingFuture(self._pool.submit(self._run, x1, dict(kwargs, indices=indices), ready))

    def _run(self, x1, kwargs, ready):
        if ready is None:
            out = tuple(self.coupling(x1, **kwargs))
            return out, dict(self.coupling.stats), None
        side = self._side_stream(x1.device)
        with torch.cuda.device(x1.device), torch.cuda.stream(side):
            side.wait_event(ready)
            out = tuple(self.coupling(x1, **kwargs))
            done = torch.cuda.Event()
            done.record(side)
        return out, dict(self.coupling.stats), done

    def _side_stream(self, device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def close(self) -> None:
        """Wait for the pending calls, then stop the worker thread."""
        self._pool.shutdown(wait=True)

    def __enter__(self) -> PrefetchCoupling:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_own_group(coupling) -> None:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    # couplings with a process_group make collectives; the others (independent) never communicate
    communicates = hasattr(coupling, "process_group")
    if communicates and coupling.process_group is None and torch.distributed.get_world_size() > 1:
        raise ValueError(
            "PrefetchCoupling runs the coupling's collectives on a background thread: under torch.distributed "
            "give the coupling its own process group spanning every rank (process_group="
            "torch.distributed.new_group()), so they never interleave with the model's all-reduces"
        )
