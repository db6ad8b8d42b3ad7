"""The trainer's non-finite guard (#23 item 2): a finite loss with a NaN gradient stops (or skips) before
the optimizer step, nothing non-finite reaches Adam, the weights, the EMA or a checkpoint, and the stop
message names a checkpoint that is finite."""
import os

import pytest
import torch

from loom_kernels import data
from loom_kernels.couplings import IndependentCoupling
from loom_kernels.models import MLPVelocity
from loom_kernels.train import TrainConfig, load_checkpoint, train


class SqrtAtZero(torch.nn.Module):
    """An MLP plus ``0 * sqrt(p * alive)``: the loss stays finite, but from call ``dies_at`` on p's
    gradient is 0 * inf = NaN (the derivative of sqrt at 0), and every weight's after clipping."""

    def __init__(self, dies_at: int):
        super().__init__()
        torch.manual_seed(0)
        self.net = MLPVelocity((2,), hidden=16, depth=2, time_dim=8)
        self.p = torch.nn.Parameter(torch.ones(()))
        self.calls, self.dies_at = 0, dies_at

    def forward(self, x, t):
        self.calls += 1
        alive = 0.0 if self.calls >= self.dies_at else 1.0
        return self.net(x, t) + 0.0 * torch.sqrt(self.p * alive)


def _ds():
    return data.IndexedDataset(data.load("8gaussians", n=96, seed=0))


def _cfg(**kw):
    base = dict(steps=8, batch_size=16, lr=3e-3, warmup=0, progress=False, log_every=1, seed=5)
    base.update(kw)
    return TrainConfig(**base)


def _finite(state: dict) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


@pytest.mark.parametrize("grad_clip", [1.0, None])
def test_nan_gradient_with_finite_loss_stops_before_the_step(tmp_path, grad_clip):
    out = str(tmp_path)
    model = SqrtAtZero(dies_at=5)
    with pytest.raises(FloatingPointError, match=r"non-finite gradient norm .*loss .*at step 5: training stopped "
                                                 r"before the optimizer step.*last good one is .*checkpoint\.pt"):
        train(model, _ds(), IndependentCoupling(), _cfg(out_dir=out, ckpt_every=2, grad_clip=grad_clip))
    # the weights, the optimizer state and the checkpoint the message names are all finite
    assert _finite(model.state_dict())
    ck = load_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert ck["step"] == 4 and _finite(ck["model"]) and _finite(ck["ema"])
    assert all(_finite(s) for s in ck["optimizer"]["state"].values())
    assert _finite(load_checkpoint(os.path.join(out, "model.pt"))["model"])


def test_nan_gradient_is_skipped_and_nothing_spreads(tmp_path):
    model = SqrtAtZero(dies_at=5)
    with pytest.warns(RuntimeWarning, match="4 of the steps had a non-finite loss or gradient"):
        res = train(model, _ds(), IndependentCoupling(), _cfg(out_dir=str(tmp_path), nonfinite="skip"))
    assert res.skipped == 4 and res.step == 8
    assert _finite(res.model.state_dict()) and _finite(res.ema.state_dict())
    ck = load_checkpoint(os.path.join(str(tmp_path), "checkpoint.pt"))
    assert _finite(ck["model"]) and _finite(ck["ema"]) and all(_finite(s) for s in ck["optimizer"]["state"].values())


def test_checkpoint_is_never_written_from_nonfinite_weights(tmp_path):
    # Weights that turn non-finite by another route (here: a callback on the EMA) are refused at the checkpoint:
    # the file on disk stays the last finite one, and the error names it.
    out = str(tmp_path)
    torch.manual_seed(0)
    model = MLPVelocity((2,), hidden=16, depth=2, time_dim=8)

    def poison(step, model, ema, coupling):
        if step == 3:
            with torch.no_grad():
                next(ema.parameters()).fill_(float("nan"))  # the loss stays finite: only the save sees it

    with pytest.raises(FloatingPointError, match=r"not finite at step 4: checkpoint not written; the last good "
                                                 r"checkpoint is .*checkpoint\.pt"):
        train(model, _ds(), IndependentCoupling(), _cfg(out_dir=out, ckpt_every=2), callback=poison,
              callback_every=1)
    ck = load_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert ck["step"] == 2 and _finite(ck["model"]) and _finite(ck["ema"])
