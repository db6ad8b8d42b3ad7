"""One optimizer step (loom_kernels.train.step): the EMA follows its documented warm-up."""

import torch

from loom_kernels.couplings import IndependentCoupling
from loom_kernels.train import train

from train_common import param_copy, setup_run, small_config


def test_ema_follows_the_warm_up_ramp_then_the_decay():
    """``ema_s = d_s ema_{s-1} + (1 - d_s) model_s`` with ``d_s = min(decay, (1+s)/(10+s))`` (TrainConfig's
    docs), recomputed in float64 from the raw weights after every step: the ramp is below 0.5 for s < 8."""
    model, ds, _ = setup_run()
    decay, steps = 0.5, 10
    start = param_copy(model)
    seen = []
    train(
        model,
        ds,
        IndependentCoupling(),
        small_config(steps=steps, ema_decay=decay),
        callback=lambda s, model, ema, coupling: seen.append((s, param_copy(model), param_copy(ema))),
        callback_every=1,
    )
    assert [s for s, _, _ in seen] == list(range(1, steps + 1))
    ema = {k: v.double() for k, v in start.items()}
    ramped = 0
    for s, raw, got in seen:
        d = min(decay, (1 + s) / (10 + s))
        ramped += d < decay
        ema = {k: d * ema[k] + (1 - d) * raw[k].double() for k in ema}
        for k in ema:
            torch.testing.assert_close(got[k].double(), ema[k], rtol=1e-5, atol=1e-6, msg=f"step {s}, {k}")
    assert ramped == 7
    # the test can fail: the weights moved, and a fixed decay would give another EMA
    assert any(not torch.equal(start[k], seen[-1][1][k]) for k in start)
