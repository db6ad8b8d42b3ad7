"""The velocity field as the sampler sees it: the model's calling convention, its keyword inputs and
classifier-free guidance (Ho & Salimans 2022), with their checks, in one place.

Every convention is one row of ``CONVENTIONS``: its documented form, the call itself, and the
keywords it passes on its own (which ``model_kwargs`` must not hold).
"""

from __future__ import annotations

import math

import torch

__all__ = ["CONVENTIONS", "SIGNATURES", "Field", "check_kwargs", "check_real"]

#: signature -> (how the model is called, the call, keywords the convention passes itself);
#: t_B: the time as a (B,) tensor; t_0d: as a 0-dim tensor
CONVENTIONS = {
    "xt": ("model(x, t_B, **kw)", lambda m, x, tb, t0, kw: m(x, tb, **kw), ()),  # ours
    # TorchCFM's UNet: forward(t, x, y=None)
    "torchcfm": ("model(t_B, x, **kw)", lambda m, x, tb, t0, kw: m(tb, x, **kw), ()),
    # torchdiffeq's func(t, y)
    "torchdiffeq": ("model(t_0d, x, **kw)", lambda m, x, tb, t0, kw: m(t0, x, **kw), ()),
    # flow_matching's ModelWrapper
    "flow_matching": ("model(x=x, t=t_0d, **kw)", lambda m, x, tb, t0, kw: m(x=x, t=t0, **kw), ("x", "t")),
}

#: how the model is called, per signature (the first column of ``CONVENTIONS``)
SIGNATURES = {name: row[0] for name, row in CONVENTIONS.items()}


def check_real(name, value) -> float:
    if isinstance(value, (bool, str, bytes)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        value = float(value)  # ints, numpy scalars, 1-element tensors
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


class Field:
    """One model evaluation as the sampler sees it: ``field(x, k) -> v`` at the k-th evaluation time.

    Holds the calling convention, the keyword inputs and classifier-free guidance, so that eager
    runs, graph capture and dopri5 share one code path. With guidance the batch is doubled once per
    evaluation, ``[x; x]`` with labels ``[y; null]``, and the two halves are combined as
    ``v_null + w (v_cond - v_null)``: one batched call, counted as one NFE.
    """

    def __init__(self, model, signature, kwargs, guidance, label_key, null_label, batch, hook=None):
        self.model = model
        self.signature = signature
        self.call = CONVENTIONS[signature][1]  # looked up once: the loop calls it every evaluation
        self.kwargs = kwargs  # the caller's tensors (eager) or the graph's static copies
        self.guidance = guidance
        self.label_key = label_key
        self.null_label = null_label
        self.batch = batch
        self.call_kwargs = kwargs
        self.hook = hook  # sample(velocity_hook=): sees every raw model output

    @property
    def width(self) -> int:
        """Rows per model call: the batch, doubled under guidance."""
        return 2 * self.batch if self.guidance is not None else self.batch

    def prepare(self) -> None:
        """Builds the kwargs of every call once (inside a graph capture: captured with the loop)."""
        if self.guidance is None:
            self.call_kwargs = self.kwargs
            return
        out = {}
        for k, v in self.kwargs.items():
            if k == self.label_key:
                v = torch.cat([v, torch.full_like(v, self.null_label)])
            elif isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == self.batch:
                v = torch.cat([v, v])  # per-sample inputs go with both halves
            out[k] = v
        self.call_kwargs = out

    def __call__(self, x, t_b, t_0d):
        if self.guidance is not None:
            x = torch.cat([x, x])
        sig, kw, m = self.signature, self.call_kwargs, self.model
        try:
            v = self.call(m, x, t_b, t_0d, kw)
        except TypeError as exc:  # most often a convention or keyword the model does not take
            raise TypeError(
                f"calling the model as {SIGNATURES[sig]} with model_kwargs {sorted(kw)} raised TypeError: "
                f"{exc} (signature= picks the convention, one of {sorted(SIGNATURES)}; model_kwargs "
                "must be keywords the model accepts)"
            ) from exc
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"the model ({SIGNATURES[sig]}) must return a torch.Tensor, got {type(v).__name__}")
        if v.shape != x.shape or v.device != x.device or not v.is_floating_point():
            raise ValueError(
                f"the model ({SIGNATURES[sig]}) must return a floating velocity shaped like x "
                f"{tuple(x.shape)} on {x.device}, got {tuple(v.shape)} {v.dtype} on {v.device}"
            )
        if self.hook is not None:
            self.hook(v)
        if self.guidance is not None:
            cond, null = v.chunk(2)
            v = torch.lerp(null, cond, self.guidance)
        return v


def check_kwargs(model, x0, signature, model_kwargs, guidance, null_label, label_key) -> dict:
    """Validates the calling convention, the keyword inputs and guidance; returns the kwargs dict."""
    if not isinstance(signature, str) or signature not in SIGNATURES:
        raise ValueError(f"signature must be one of {sorted(SIGNATURES)}, got {signature!r}")
    if model_kwargs is None:
        model_kwargs = {}
    if not isinstance(model_kwargs, dict) or not all(isinstance(k, str) for k in model_kwargs):
        raise TypeError(f"model_kwargs must be a dict with str keys, got {type(model_kwargs).__name__}")
    for k, v in model_kwargs.items():
        if isinstance(v, torch.Tensor) and v.device != x0.device:
            raise ValueError(f"model_kwargs[{k!r}] must be on x0's device {x0.device}, got {v.device}")
    clash = [k for k in CONVENTIONS[signature][2] if k in model_kwargs]
    if clash:
        raise ValueError(f"model_kwargs must not contain {clash}: signature={signature!r} passes them itself")
    # Labels are only labels when guidance needs them: without guidance model_kwargs[label_key] is
    # any input of the model (a float condition, an embedding, ...) and is passed through unchecked.
    if guidance is not None:
        check_real("guidance", guidance)
        labels = model_kwargs.get(label_key)
        if not isinstance(labels, torch.Tensor):
            raise ValueError(
                f"guidance needs the class labels as model_kwargs[{label_key!r}] (a (B,) integer tensor; "
                f"label_key= names another key), got model_kwargs keys {sorted(model_kwargs)}"
            )
        _check_labels(model, labels, x0.shape[0], label_key)
        if null_label is None:
            null_label = getattr(model, "null_label", None)
        if isinstance(null_label, bool) or not isinstance(null_label, int):
            raise ValueError(
                "guidance needs null_label= (the label the model was trained with for 'no class'; "
                f"models.UNet exposes it as .null_label), got {null_label!r}"
            )
    return model_kwargs


def _check_labels(model, labels, batch, label_key) -> None:
    if labels.dtype in (torch.bool,) or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"model_kwargs[{label_key!r}] (class labels) must be an integer tensor, got {labels.dtype}")
    if labels.ndim != 1 or labels.shape[0] != batch:
        raise ValueError(
            f"model_kwargs[{label_key!r}] (class labels) must have shape ({batch},) like x0's "
            f"batch, got {tuple(labels.shape)}"
        )
    n = getattr(model, "num_classes", None)
    if isinstance(n, int) and not isinstance(n, bool) and labels.numel():
        lo, hi = int(labels.min()), int(labels.max())  # one host read per call, before the loop
        if lo < 0 or hi >= n:
            raise ValueError(
                f"model_kwargs[{label_key!r}] holds labels in [{lo}, {hi}], outside the model's "
                f"{n} classes [0, {n - 1}]"
            )
