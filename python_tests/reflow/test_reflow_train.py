"""Reflow end to end at tiny size (issue 31): a LOOM run, its pairs, a reflow run on them, from Python and the
CLI; ``init_from`` (weights, EMA, optimizer, a layer mismatch named); ``t_dist`` and ``t=`` in the trainer."""

import numpy as np
import pytest
import torch
from scipy import stats

from loom_kernels import data, models
from loom_kernels.checkpoint import load_checkpoint, load_model
from loom_kernels.cli import train as train_cli
from loom_kernels.couplings import Coupling, IndependentCoupling
from loom_kernels.couplings.reflow import ReflowCoupling
from loom_kernels.reflow import generate_pairs, pairs_dataset
from loom_kernels.reflow.cli import main as reflow_cli
from loom_kernels.train import TrainConfig, make_coupling, train
from loom_kernels.train.init import check_same_layers


def _cfg(out=None, **kw):
    base = {"steps": 20, "batch_size": 32, "lr": 1e-2, "warmup": 2, "device": "cpu", "progress": False}
    return TrainConfig(**{**base, "out_dir": out, **kw})


def _mlp():
    return models.MLPVelocity((2,), hidden=16, depth=1)


def _params(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_loom_run_pairs_and_reflow_run_from_python(tmp_path):
    ds = data.IndexedDataset(data.load("moons", n=128))
    torch.manual_seed(0)
    first = train(
        _mlp(),
        ds,
        make_coupling("loom", len(ds), ds.shape, seed=0),
        _cfg(str(tmp_path / "a")),
        metadata={"model": _mlp().spec},
    )
    pf = generate_pairs(
        str(tmp_path / "a" / "model.pt"), 128, "euler", 4, str(tmp_path / "p"), device="cpu", progress=False
    )
    pairs = pairs_dataset(pf)
    # init_from with a tiny LR: the reflow run starts at the first run's EMA.
    start = train(
        _mlp(), pairs, ReflowCoupling(pf), _cfg(steps=1, lr=1e-12, init_from=str(tmp_path / "a" / "model.pt"))
    )
    for k, v in first.ema.state_dict().items():
        torch.testing.assert_close(start.model.state_dict()[k], v, atol=1e-9, rtol=0)
        torch.testing.assert_close(start.ema.state_dict()[k], v, atol=1e-9, rtol=0)
    res = train(
        _mlp(), pairs, ReflowCoupling(pf), _cfg(str(tmp_path / "b"), init_from=str(tmp_path / "a" / "model.pt"))
    )
    assert res.step == 20 and np.isfinite(res.history[-1]["loss"])
    # The reflow targets are near-deterministic functions of the noise: the loss is below the first run's.
    assert res.history[-1]["loss"] < first.history[-1]["loss"]


def test_init_from_raw_weights_and_optimizer(tmp_path):
    ds = data.IndexedDataset(data.load("moons", n=64))
    first = train(
        _mlp(), ds, IndependentCoupling(), _cfg(str(tmp_path / "a"), steps=5), metadata={"model": _mlp().spec}
    )
    ck = load_checkpoint(str(tmp_path / "a" / "checkpoint.pt"))
    from loom_kernels.train.init import init_from
    from loom_kernels.train.run import build

    cfg = _cfg(init_from=str(tmp_path / "a" / "checkpoint.pt"), init_weights="raw", init_optimizer=True, lr=3e-4)
    run = build(_mlp(), ds, IndependentCoupling(), cfg, None)
    init_from(run)
    for k, v in ck["model"].items():
        assert torch.equal(run.model.state_dict()[k], v) and torch.equal(run.ema.state_dict()[k], v)
    for i, st in ck["optimizer"]["state"].items():
        assert torch.equal(run.opt.state_dict()["state"][i]["exp_avg"], st["exp_avg"])
    assert run.opt.param_groups[0]["initial_lr"] == 3e-4  # this run's LR settings stay
    assert not torch.equal(first.model.state_dict()["net.0.weight"], first.ema.state_dict()["net.0.weight"])


def test_init_from_errors(tmp_path):
    ds = data.IndexedDataset(data.load("moons", n=64))
    train(_mlp(), ds, IndependentCoupling(), _cfg(str(tmp_path / "a"), steps=2))
    model_pt = str(tmp_path / "a" / "model.pt")
    wide = models.MLPVelocity((2,), hidden=32, depth=1)
    with pytest.raises(ValueError, match=r"layer 'net.0.weight' has shape \(16, .*\) there, \(32, .*\) in this model"):
        train(wide, ds, IndependentCoupling(), _cfg(init_from=model_pt))
    deep = models.MLPVelocity((2,), hidden=16, depth=2)
    with pytest.raises(ValueError, match=r"layer 'net.2.weight' has shape \(2, 16\) there, \(16, 16\)"):
        train(deep, ds, IndependentCoupling(), _cfg(init_from=model_pt))
    state = _mlp().state_dict()
    with pytest.raises(ValueError, match="'p' has no layer 'net.0.bias'"):
        check_same_layers(_mlp(), {k: v for k, v in state.items() if k != "net.0.bias"}, "p")
    with pytest.raises(ValueError, match="'p' has layer 'extra' that this model lacks"):
        check_same_layers(_mlp(), {**state, "extra": torch.zeros(1)}, "p")
    with pytest.raises(ValueError, match="init_weights='raw' needs a checkpoint.pt"):
        train(_mlp(), ds, IndependentCoupling(), _cfg(init_from=model_pt, init_weights="raw"))
    with pytest.raises(ValueError, match="init_weights must be one of"):
        _cfg(init_from=model_pt, init_weights="best")
    with pytest.raises(ValueError, match="need init_from"):
        _cfg(init_optimizer=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(_mlp(), ds, IndependentCoupling(), _cfg(init_from=str(tmp_path / "none.pt")))


class SpyT(Coupling):
    accepts_t = True

    def __init__(self):
        self.ts, self.stats = [], {}

    def __call__(self, x1, indices=None, *, labels=None, t=None, **kw):
        self.ts.append(t.clone())
        return torch.randn_like(x1), x1


def test_trainer_draws_t_from_t_dist_and_passes_it():
    ds = data.IndexedDataset(data.load("moons", n=256))
    spy = SpyT()
    train(_mlp(), ds, spy, _cfg(steps=40, batch_size=64, t_dist="beta(0.5, 0.5)"))
    t = torch.cat(spy.ts).numpy()
    assert len(t) == 40 * 64
    assert stats.kstest(t, stats.beta(0.5, 0.5).cdf).pvalue > 1e-3
    assert stats.kstest(t, "uniform").pvalue < 1e-3
    with pytest.raises(ValueError, match="TrainConfig.t_dist must be one of"):
        _cfg(t_dist="gamma")


def test_a_coupling_without_t_keeps_the_old_call_and_draw_order():
    # The first step's loss, written out: noise drawn by the coupling first, then t ~ U[0, 1] (the order of
    # runs before t_dist existed, so their streams are unchanged).
    from loom_kernels.train.batches import epoch_order

    ds = data.IndexedDataset(data.load("moons", n=128))
    torch.manual_seed(1)
    model = _mlp()
    ref = _mlp()
    ref.load_state_dict(model.state_dict())
    res = train(model, ds, IndependentCoupling(), _cfg(steps=1, log_every=1, seed=3))
    x1 = ds.data[epoch_order(128, 3, 0)[:32]]
    torch.manual_seed(3)
    x0 = torch.randn(32, 2)
    t = torch.rand(32)
    with torch.no_grad():
        want = torch.nn.functional.mse_loss(ref((1 - t[:, None]) * x0 + t[:, None] * x1, t), x1 - x0)
    assert res.history[0]["loss"] == pytest.approx(float(want), rel=1e-6)


def test_loom_run_pairs_and_reflow_run_from_the_cli(tmp_path, capsys):
    common = [
        "--batch-size",
        "32",
        "--hidden",
        "16",
        "--depth",
        "1",
        "--device",
        "cpu",
        "--no-progress",
        "--warmup",
        "2",
    ]
    a, p, b = (str(tmp_path / n) for n in "apb")
    args = ["--data", "moons", "--points", "128", "--coupling", "loom", "--out", a, "--steps", "15", *common]
    assert train_cli.main(args) == 0
    gen = ["generate", "--model", f"{a}/model.pt", "--num", "128", "--method", "heun", "--nfe", "2", "--out", p]
    assert reflow_cli([*gen, "--device", "cpu", "--no-progress", "--dtype", "float16"]) == 0
    re_args = ["--coupling", "reflow", "--pairs", p, "--out", b, "--steps", "10", "--t-dist", "u_shaped"]
    assert train_cli.main([*re_args, "--init-from", f"{a}/model.pt", *common]) == 0
    assert "with the reflow coupling" in capsys.readouterr().out
    ck = load_checkpoint(f"{b}/checkpoint.pt")
    assert ck["config"]["t_dist"] == "u_shaped" and ck["config"]["init_from"] == f"{a}/model.pt"
    assert load_model(f"{b}/model.pt") is not None
    with pytest.raises(SystemExit, match="--pairs DIR goes with --coupling reflow"):
        train_cli.main(["--data", "moons", "--coupling", "loom", "--pairs", p, "--out", str(tmp_path / "c"), *common])
    with pytest.raises(SystemExit, match="--data is required"):
        train_cli.main(["--coupling", "loom", "--out", str(tmp_path / "c"), *common])
    with pytest.raises(SystemExit, match="--init-from .* layer 'net.0.weight'"):
        train_cli.main(
            [
                *re_args[:5],
                str(tmp_path / "d"),
                "--init-from",
                f"{a}/model.pt",
                *common[:2],
                "--hidden",
                "8",
                *common[4:],
            ]
        )
