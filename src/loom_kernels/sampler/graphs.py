"""CUDA graphs of the fixed-step loop: capture on the second call with the same key, replay after.

A graph reads its inputs by address, so each one owns static copies of x0 and the kwargs tensors,
refreshed before each replay; parameters changed in place are seen, rebound ones change the key.
"""

from __future__ import annotations

import collections
import warnings
import weakref
from dataclasses import dataclass

import torch

from .field import Field
from .fixed import Buffers, alloc, loop

__all__ = ["GraphCache", "DEFAULT_CACHE", "clear_graph_cache", "run_graphed"]


@dataclass
class _Graphed:
    graph: object  # torch.cuda.CUDAGraph
    bufs: Buffers
    model_ref: object  # weakref to the model: a recycled id() must not hit the cache


class GraphCache:
    """The CUDA graphs ``sample`` captured, with the keys it has seen once and those that failed.

    ``sample`` uses one default cache (``clear_graph_cache()`` empties it); pass your own as
    ``sample(..., graph_cache=GraphCache())`` to tie the graphs, and the GPU memory each one pins,
    to a component's lifetime. Each graph is dropped when its model is garbage-collected; at most
    ``max_graphs`` are kept (least recently used first out).

    Example::

        cache = GraphCache(max_graphs=2)
        x1 = sample(model, x0, 8, graph_cache=cache)
        cache.clear()
    """

    def __init__(self, max_graphs: int = 4, max_keys: int = 256):
        self.max_graphs = max_graphs  # each graph pins its memory pool (the loop's peak activations)
        self.max_keys = max_keys
        self.graphs: collections.OrderedDict[tuple, _Graphed] = collections.OrderedDict()
        self.seen: collections.OrderedDict[tuple, None] = collections.OrderedDict()
        self.failed: collections.OrderedDict[tuple, None] = collections.OrderedDict()
        self.warned = False  # the capture-failure warning is given once per cache

    def __len__(self) -> int:
        return len(self.graphs)

    def clear(self) -> None:
        """Drops every captured graph (and the GPU memory it holds)."""
        self.graphs.clear()
        self.seen.clear()
        self.failed.clear()

    def lookup(self, key, model):
        """The live graph for ``key`` captured for ``model``, or None (a stale one is dropped)."""
        entry = self.graphs.get(key)
        if entry is None:
            return None
        if entry.model_ref() is not model:  # the model it was captured for is gone
            del self.graphs[key]
            return None
        self.graphs.move_to_end(key)
        return entry

    def store(self, key, entry: _Graphed, model) -> None:
        # Free the graph's memory pool as soon as its model is garbage-collected.
        entry.model_ref = weakref.ref(model, lambda ref, k=key: self._drop(k, ref))
        self.graphs[key] = entry
        self.graphs.move_to_end(key)
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)

    def first_sight(self, key) -> bool:
        """True the first time ``key`` is seen (``cuda_graph="auto"`` captures on the second call)."""
        if key in self.seen:
            return False
        self._remember(self.seen, key)
        return True

    def mark_failed(self, key) -> None:
        self._remember(self.failed, key)

    def _drop(self, key, ref) -> None:
        entry = self.graphs.get(key)
        if entry is not None and entry.model_ref is ref:
            del self.graphs[key]

    def _remember(self, table, key) -> None:
        table[key] = None
        table.move_to_end(key)
        while len(table) > self.max_keys:
            table.popitem(last=False)


DEFAULT_CACHE = GraphCache()


def clear_graph_cache() -> None:
    """Drops every CUDA graph in the default cache (and the GPU memory it holds).

    Call it after rebinding tensors that a plain-function model closes over; ``nn.Module``
    parameters changed in place (optimizer steps, ``load_state_dict``, EMA ``copy_``) need nothing.

    Example::

        loom_kernels.sampler.clear_graph_cache()
    """
    DEFAULT_CACHE.clear()


def _kwargs_key(kwargs: dict):
    """What a graph depends on in the kwargs: tensors by (shape, dtype, device) (their values are
    static inputs, copied in before each replay), anything else by value; None when a value is not
    hashable (never cached)."""
    items = []
    for k in sorted(kwargs):
        v = kwargs[k]
        if isinstance(v, torch.Tensor):
            items.append((k, "tensor", tuple(v.shape), v.dtype, v.device))
        else:
            try:
                hash(v)
            except TypeError:
                return None
            items.append((k, "value", type(v), v))
    return tuple(items)


def _graph_key(field: Field, x0, plan, return_trajectory):
    model = field.model
    try:
        weakref.ref(model)
    except TypeError:
        return None  # cannot tell a recycled id() from the same model: never cache
    kw = _kwargs_key(field.kwargs)
    if kw is None:
        return None
    tensors = ()
    if isinstance(model, torch.nn.Module):
        # Rebinding a parameter/buffer to a new tensor moves its address: a graph would read the old one.
        tensors = tuple(
            (p.data_ptr(), p.dtype, tuple(p.shape)) for p in list(model.parameters()) + list(model.buffers())
        )
    autocast = torch.is_autocast_enabled()
    call = (field.signature, kw, field.guidance, field.label_key, field.null_label)
    return (id(model), tensors, tuple(x0.shape), x0.dtype, x0.device, plan, return_trajectory, autocast, call)


def _load_inputs(bufs: Buffers, x0, kwargs) -> None:
    """Copies this call's inputs into a graph's static buffers (x0 and every kwargs tensor)."""
    bufs.input.copy_(x0)
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            bufs.kwargs[k].copy_(v)


def _capture(field, x0, plan, return_trajectory):
    """Warms up on a side stream (its result answers this call), then captures the loop.

    Returns (result, _Graphed or None, exception or None).
    """
    device = x0.device
    kwargs = field.kwargs
    bufs = alloc(x0, plan, return_trajectory, kwargs, field.width, static=True)
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device=device)
    side.wait_stream(current)
    with torch.cuda.stream(side):  # warm-up off the default stream, as the CUDA-graph docs ask
        _load_inputs(bufs, x0, kwargs)
        loop(field, bufs, plan)
    current.wait_stream(side)
    result = bufs.output.clone()  # on the current stream: the capture below overwrites nothing
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            loop(field, bufs, plan)
    except Exception as exc:  # the model is not capturable (host syncs, CPU tensors, ...)
        # torch.cuda.graph leaves the capture stream current when capture_end raises.
        torch.cuda.set_stream(current)
        try:
            graph.reset()
        except Exception:
            pass
        return result, None, exc
    return result, _Graphed(graph, bufs, weakref.ref(field.model)), None


def run_graphed(field, x0, plan, return_trajectory, cuda_graph, cache: GraphCache):
    """CUDA-graph path; returns None when the caller should run eagerly instead."""
    model = field.model
    key = _graph_key(field, x0, plan, return_trajectory)
    if key is not None:
        entry = cache.lookup(key, model)
        if entry is not None:
            _load_inputs(entry.bufs, x0, field.kwargs)
            entry.graph.replay()
            return entry.bufs.output.clone()
    if cuda_graph == "auto":
        if key is None or key in cache.failed:
            return None
        if cache.first_sight(key):  # capture on the second call with the same key: one-off calls stay eager
            return None
    result, entry, exc = _capture(field, x0, plan, return_trajectory)
    if exc is not None:
        if cuda_graph is True:
            raise RuntimeError(
                "cuda_graph=True but the sampling loop could not be captured as a CUDA graph "
                f"(the model is not capturable: {type(exc).__name__}: {exc}); pass cuda_graph='auto' "
                "or False to run eagerly"
            ) from exc
        if key is not None:
            cache.mark_failed(key)
        if not cache.warned:
            cache.warned = True
            warnings.warn(
                f"loom_kernels.sampler: CUDA-graph capture failed ({type(exc).__name__}: {exc}); "
                "sampling eagerly for this model (warned once)",
                RuntimeWarning,
                stacklevel=3,
            )
        return result
    if key is not None:
        cache.store(key, entry, model)
    return result
