"""The thin trainer: learning, logging, the coupling protocol, labels, flips, schedules and errors."""

import csv
import os

import numpy as np
import pytest
import torch

from loom_kernels.train import LOG_COLUMNS, TrainConfig, load_checkpoint, make_coupling, train

from train_common import LabelledIndependent, Recording, digits_set, param_copy, setup_run, small_config


def test_loss_decreases_on_a_toy_set():
    model, ds, coupling = setup_run("ot", n=512, hidden=32)
    res = train(model, ds, coupling, small_config(steps=100, batch_size=64, lr=3e-3, warmup=10))
    losses = [r["loss"] for r in res.history]
    assert res.step == 100 and len(losses) == 100
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:5])
    # The logged coupling stats are the minibatch OT's: re-pairing lowers the cost.
    assert all(r["post_cost"] <= r["pre_cost"] + 1e-6 for r in res.history)
    assert res.history[-1]["lr"] == pytest.approx(3e-3)
    assert res.history[0]["lr"] == pytest.approx(3e-3 / 10)  # linear warm-up


def test_csv_log_columns_and_rows(tmp_path):
    model, ds, coupling = setup_run("loom")
    train(model, ds, coupling, small_config(steps=12, log_every=4, out_dir=str(tmp_path)))
    with open(tmp_path / "log.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == LOG_COLUMNS
    assert [int(r["step"]) for r in rows] == [4, 8, 12]
    assert [int(r["epoch"]) for r in rows] == [0, 1, 1]  # 96 points / batch 16: steps 7-12 are epoch 1
    for r in rows:
        assert float(r["post_cost"]) <= float(r["pre_cost"]) + 1e-6
        assert 0 <= float(r["swaps"]) <= 16 and np.isfinite(float(r["loss"]))


def test_generic_dataset_matches_indexed_dataset():
    class Items(torch.utils.data.Dataset):
        def __init__(self, x):
            self.x = x

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return i, self.x[i].numpy()

    model_a, ds, coup = setup_run("independent")
    res_a = train(model_a, ds, coup, small_config(steps=5))
    model_b, _, coup = setup_run("independent")
    res_b = train(model_b, Items(ds.data), coup, small_config(steps=5))
    for k, v in param_copy(res_a.model).items():
        assert torch.equal(v, param_copy(res_b.model)[k])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(steps=0), "steps must be an integer >= 1"),
        (dict(batch_size=2.5), "batch_size must be an integer"),
        (dict(lr=-1.0), "lr must be a positive"),
        (dict(lr=float("nan")), "lr must be a positive"),
        (dict(ema_decay=1.0), r"ema_decay must be in \[0, 1\)"),
        (dict(grad_clip=0.0), "grad_clip must be positive"),
        (dict(precision="fp8"), "precision must be one of"),
        (dict(ckpt_every=5), "ckpt_every needs out_dir"),
        (dict(resume=True), "resume needs out_dir"),
        (dict(sigma=-1.0), "sigma must be >= 0"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_train_errors():
    model, ds, coupling = setup_run("independent")
    with pytest.raises(ValueError, match="fewer than one global batch of 128"):
        train(model, ds, coupling, small_config(batch_size=128))
    with pytest.raises(ValueError, match="needs a CUDA device"):
        train(model, ds, coupling, small_config(precision="bf16", device="cpu"))
    with pytest.raises(TypeError, match="config must be a TrainConfig"):
        train(model, ds, coupling, {"steps": 3})
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        train(lambda x, t: x, ds, coupling, small_config())
    with pytest.raises(ValueError, match="callback_every"):
        train(model, ds, coupling, small_config(), callback=print)

    class Bad(torch.utils.data.Dataset):
        def __len__(self):
            return 32

        def __getitem__(self, i):
            return torch.zeros(2)

    with pytest.raises(ValueError, match=r"\(index, x\) pairs"):
        train(model, Bad(), coupling, small_config())
    with pytest.raises(ValueError, match="coupling must be one of"):
        make_coupling("nope", 10, (2,))
    with pytest.raises(FileNotFoundError):
        load_checkpoint("/no/such/checkpoint.pt")


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_training_with_autocast(tmp_path, precision):
    model, ds, _ = setup_run("loom")
    coupling = make_coupling("loom", 96, (2,), num_caches=2, seed=0, device="cuda")
    res = train(model, ds, coupling, small_config(steps=12, precision=precision, device="cuda", out_dir=str(tmp_path)))
    assert res.step == 12 and all(np.isfinite(r["loss"]) for r in res.history)
    assert next(res.ema.parameters()).is_cuda and coupling.seeds.is_cuda
    ck = load_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert "cuda" in ck["rng"][0]
    model2, _, _ = setup_run("loom")
    coupling2 = make_coupling("loom", 96, (2,), num_caches=2, seed=0, device="cuda")
    res2 = train(
        model2,
        ds,
        coupling2,
        small_config(steps=16, precision=precision, device="cuda", out_dir=str(tmp_path), resume=True),
    )
    assert res2.step == 16 and [r["step"] for r in res2.history] == [13, 14, 15, 16]


def test_class_conditional_digits_end_to_end_and_resume_with_labels(tmp_path):
    def run(out, steps, resume=False):
        torch.manual_seed(0)
        model = Recording((1, 8, 8), channels=8, num_classes=10)
        coupling = LabelledIndependent()  # global RNG: checkpointed
        res = train(
            model,
            digits_set(),
            coupling,
            small_config(steps=steps, batch_size=32, out_dir=out, resume=resume, label_dropout=0.25, ckpt_every=0),
        )
        return res, model, coupling

    res, model, coupling = run(str(tmp_path / "a"), 8)
    ds = digits_set()
    for idx, labels, x1 in coupling.seen:  # the coupling gets the true labels of its items
        assert torch.equal(labels, ds.labels[idx]) and torch.equal(x1, ds.data[idx])
    ys = torch.cat(model.ys)
    assert ((ys == 10).float().mean() - 0.25).abs() < 0.1  # label dropout to the null label
    assert all(np.isfinite(r["loss"]) for r in res.history)
    run(str(tmp_path / "b"), 4)
    with pytest.warns(UserWarning, match="steps: 4 -> 8"):
        res_b, _, _ = run(str(tmp_path / "b"), 8, resume=True)
    for k, v in param_copy(res.ema).items():  # resume with labels is exact
        assert torch.equal(v, param_copy(res_b.ema)[k]), k


def test_flip_indices_and_views():
    torch.manual_seed(0)
    ds = digits_set(n=64, flip=True)
    coupling = LabelledIndependent()
    train(Recording((1, 8, 8), channels=8, num_classes=10), ds, coupling, small_config(steps=8, batch_size=32))
    idx = torch.cat([s[0] for s in coupling.seen])
    assert idx.max() >= 64 and idx.max() < 128  # the flipped view of item i is item i + N
    for i, _, x1 in coupling.seen:
        base = ds.base.data[i % 64]
        want = torch.where((i >= 64).view(-1, 1, 1, 1), base.flip(-1), base)
        assert torch.equal(x1, want)
    assert sorted(torch.cat([s[0] for s in coupling.seen[:4]]).tolist()) == list(range(128))  # one epoch = 2N items


def test_cosine_schedule_and_metric():
    model, ds, _ = setup_run("independent")
    res = train(
        model,
        ds,
        make_coupling("ot", 96, (2,), metric="euclidean"),
        small_config(steps=12, warmup=2, schedule="cosine", lr=1e-2),
    )
    lrs = [r["lr"] for r in res.history]
    assert lrs[0] == pytest.approx(5e-3) and lrs[1] == pytest.approx(1e-2)
    # step 6: 4 of the 10 post-warm-up steps done
    assert lrs[6] == pytest.approx(1e-2 * 0.5 * (1 + np.cos(np.pi * 4 / 10)))
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    assert make_coupling("loom", 10, (2,), metric="euclidean").metric == "euclidean"


def test_plain_callable_coupling_is_adapted_and_other_objects_refused(tmp_path):
    from loom_kernels.couplings import Coupling

    model, ds, _ = setup_run("independent")
    calls = []

    def fn(x1, indices=None):  # no labels=, no stats, no state: wrapped once by the trainer
        calls.append(indices.clone())
        return torch.randn_like(x1), x1

    res = train(model, ds, fn, small_config(steps=3, out_dir=str(tmp_path)))
    assert len(calls) == 3 and all(np.isnan(r["pre_cost"]) and np.isfinite(r["loss"]) for r in res.history)
    ck = load_checkpoint(os.path.join(tmp_path, "checkpoint.pt"))
    assert ck["coupling"] == {} and ck["coupling_class"] == "function"

    class Identity(Coupling):  # the protocol's own example: no stats of its own
        def __call__(self, x1, *, indices=None, labels=None):
            return torch.zeros_like(x1), x1

    res = train(model, ds, Identity(), small_config(steps=2))
    assert res.step == 2 and np.isnan(res.history[-1]["swaps"])
    with pytest.raises(TypeError, match="coupling must be a loom_kernels.couplings.Coupling.*got int"):
        train(model, ds, 42, small_config())
