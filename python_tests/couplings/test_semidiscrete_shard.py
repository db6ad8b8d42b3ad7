"""ShardedSemidiscreteCoupling on 2 gloo ranks against one process on the whole data set (issue 32): the fit's
``g`` bit for bit, the assignment (hard, Gumbel, labels, cond), the fresh draws of DDP (each rank its slice of
the single-process global batch, the same noise), rows from their owners, checkpoints across world sizes, and
refusals raised on every rank."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loom_kernels.couplings import SemidiscreteCoupling, SemidiscreteSampler, ShardedSemidiscreteCoupling
from loom_kernels.couplings.semidiscrete_fit import mass_deviation

from gloo_ranks import run_rank, spawn

N, D, W, STEPS, FIT_B, B = 101, 4, 2, 25, 16, 5  # N odd: blocks of 50 and 51 rows


def _problem():
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(N, D, generator=gen)
    labels = torch.randint(3, (N,), generator=gen)
    cond = torch.randn(N, 2, generator=gen)
    z = torch.randn(12, D, generator=gen)
    return x, labels, cond, z


def _fit_and_draw(sd, rank):
    """What every layout must reproduce: the fit, three draws (with the noise the coupling hands out) and the
    fitted cells' masses."""
    sd.fit(STEPS, batch_size=FIT_B, progress=False, window=10)
    x = _problem()[0]
    draws, x0s = [], []
    for _ in range(3):
        idx = sd.draw(B)
        draws.append(idx)
        x0s.append(sd(x[idx], idx)[0])
    return {
        "g": sd.g.clone(),
        "g_iter": sd.fit_state["g_iter"].clone(),
        "report": {k: v for k, v in sd.fit_report.items() if k != "history"},
        "draws": torch.stack(draws),
        "x0": torch.stack(x0s),
        "mass": mass_deviation(sd, samples=300, batch_size=64),
        "counter": sd.counter,
    }


def _refusals(rank, x, out_dir):
    import torch.distributed as dist

    errors = {}
    sd = ShardedSemidiscreteCoupling(x, seed=1)
    before = sd.g.clone()
    state = sd.state_dict()
    state["g"] = state["g"] + rank  # the ranks would load different potentials
    try:
        sd.load_state_dict(state)
    except ValueError as exc:
        errors["differ"] = str(exc)
    other = SemidiscreteCoupling(x + 1.0, seed=1).state_dict()  # another data set
    try:
        sd.load_state_dict(other if rank == 1 else sd.state_dict())
    except ValueError as exc:
        errors["other data"] = str(exc)
    errors["untouched"] = bool(torch.equal(sd.g, before))
    try:  # rank 1 passes the block of another layout
        ShardedSemidiscreteCoupling(x[:50] if rank == 0 else x[40:], num_points=N, seed=1)
    except ValueError as exc:
        errors["block"] = str(exc)
    try:
        sd.draw(B + rank)
    except ValueError as exc:
        errors["batch"] = str(exc)
    try:
        sd.draw(B, labels=None if rank == 0 else torch.zeros(B, dtype=torch.int64))
    except ValueError as exc:
        errors["labels"] = str(exc)
    dist.barrier()
    return errors


def _body(rank, npy, out_dir):
    x, labels, cond, z = _problem()
    lo, hi = [0, N // 2, N][rank], [0, N // 2, N][rank + 1]
    out = {"whole": _fit_and_draw(ShardedSemidiscreteCoupling(x, seed=5), rank)}
    block = ShardedSemidiscreteCoupling(x[lo:hi].clone(), num_points=N, seed=5)
    out["checksum"] = block.checksum
    out["block"] = _fit_and_draw(block, rank)
    out["memmap"] = _fit_and_draw(ShardedSemidiscreteCoupling(np.load(npy, mmap_mode="r"), seed=5), rank)
    mine = torch.tensor([[3, 99, 50, 7], [49, 50, 0, 100]][rank])
    out["fetch"] = block.fetch(mine)
    out["rows"] = block.rows(torch.tensor([100, 0, 50, 49]))
    # the assignment alone: Gumbel cells, classes, conditions (the scan split at row 50)
    sd = ShardedSemidiscreteCoupling(x[lo:hi].clone(), num_points=N, labels=labels, cond=cond, seed=2)
    sd.g = torch.linspace(-1, 1, N)
    zl, zc = labels[:12], cond[:12] + 0.1
    out["assign"] = [sd.assign(z, epsilon=0.3, seed=9), sd.assign(z, labels=zl, cond=zc)]
    out["assign_adaptive"] = ShardedSemidiscreteCoupling(x, cond=cond, cond_weight="adaptive", seed=2).cond_weight
    # fresh DDP draws with this rank's own labels, through the sampler
    sd.counter = 0
    out["label_draw"] = sd.draw(B, labels=labels[rank * B : (rank + 1) * B])
    out["sampler"] = list(SemidiscreteSampler(sd, 3))
    # checkpoints: one file, written by rank 0, resumed at W = 2 and (in the test) in one process
    block.save(f"{out_dir}/sd.pt")
    resumed = ShardedSemidiscreteCoupling(x, seed=5)
    resumed.load(f"{out_dir}/sd.pt")
    out["resumed"] = [resumed.draw(B), resumed.g.clone()]
    out["refusals"] = _refusals(rank, x, out_dir)
    return out


def _train(x):
    """The trainer under DDP with the sharded coupling choosing each rank's batches (its draw(b, part=...))."""
    from loom_kernels import data
    from loom_kernels.models import MLPVelocity
    from loom_kernels.train import TrainConfig, train

    torch.manual_seed(0)
    model = MLPVelocity((D,), hidden=8, depth=1, time_dim=4)
    sd = ShardedSemidiscreteCoupling(x, seed=5)
    sd.fit(5, batch_size=8, progress=False)
    res = train(model, data.IndexedDataset(x), sd, TrainConfig(steps=3, batch_size=4, progress=False, seed=3))
    return {"counter": sd.counter, "params": [p.detach().clone() for p in res.model.parameters()]}


def _train_target(rank, world, store, out_dir):
    run_rank(rank, world, store, out_dir, lambda: _train(_problem()[0]))


def _target(rank, world, store, out_dir, npy):
    run_rank(rank, world, store, out_dir, lambda: _body(rank, npy, out_dir))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("sdshard")
    np.save(out / "x.npy", _problem()[0].numpy())
    return out, spawn(W, out, _target, (str(out / "x.npy"),))


def _reference():
    """One process on the whole data set: the same fit, then three global batches ``draw(W b)`` and their noise."""
    x = _problem()[0]
    sd = SemidiscreteCoupling(x, seed=5)
    sd.fit(STEPS, batch_size=FIT_B, progress=False, window=10)
    ref = {"g": sd.g.clone(), "g_iter": sd.fit_state["g_iter"].clone(), "report": dict(sd.fit_report)}
    draws = [sd.draw(W * B) for _ in range(3)]
    ref["x0"] = torch.stack([sd(x[idx], idx)[0] for idx in draws])
    ref.update(draws=torch.stack(draws), mass=mass_deviation(sd, samples=300, batch_size=64), counter=sd.counter)
    ref["report"].pop("history")
    return ref


@pytest.mark.parametrize("layout", ["whole", "block", "memmap"])
def test_fit_and_draws_equal_one_process(ranks, layout):
    """Same noise, same g after k steps (bit for bit), each rank's draw the slice of one process's draw(W b)."""
    _, res = ranks
    ref = _reference()
    assert len(torch.unique(ref["draws"])) > 10 and ref["g"].abs().max() > 0  # a potential that moved
    for r, out in enumerate(res):
        got = out[layout]
        assert torch.equal(got["g"], ref["g"]) and torch.equal(got["g_iter"], ref["g_iter"]), (layout, r)
        assert got["report"] == ref["report"] and got["mass"] == ref["mass"]
        assert got["counter"] == ref["counter"] == STEPS * FIT_B + 3 * W * B
        sl = slice(r * B, (r + 1) * B)
        assert torch.equal(got["draws"], ref["draws"][:, sl])
        assert torch.equal(got["x0"], ref["x0"][:, sl])
    assert res[0]["checksum"] == SemidiscreteCoupling(_problem()[0]).checksum


def test_assignment_equals_one_process(ranks):
    """Gumbel cells (the counter hash keyed by global column), classes and conditions across the split."""
    _, res = ranks
    x, labels, cond, z = _problem()
    sd = SemidiscreteCoupling(x, labels=labels, cond=cond, seed=2)
    sd.g = torch.linspace(-1, 1, N)
    want = [sd.assign(z, epsilon=0.3, seed=9), sd.assign(z, labels=labels[:12], cond=cond[:12] + 0.1)]
    hard = sd.assign(z, epsilon=0.0, seed=9)[1]
    assert not torch.equal(want[0][1], hard)  # the Gumbel draw moved some rows: the keys are checked
    for out in res:
        for (v, i), (wv, wi) in zip(out["assign"], want):
            assert torch.equal(i, wi) and torch.equal(v, wv)
        for _, i in out["assign"]:
            assert bool((i < N // 2).any() and (i >= N // 2).any())  # winners on both ranks' blocks
        adaptive = SemidiscreteCoupling(x, cond=cond, cond_weight="adaptive", seed=2).cond_weight
        assert out["assign_adaptive"] == adaptive


def test_fresh_ddp_draws_with_labels_and_the_sampler(ranks):
    """Each rank's labels gathered into the global batch; the sampler's batches are the ranks' slices."""
    _, res = ranks
    x, labels, cond, _ = _problem()
    sd = SemidiscreteCoupling(x, labels=labels, cond=cond, seed=2)
    sd.g = torch.linspace(-1, 1, N)
    want = sd.draw(W * B, labels=labels[: W * B])
    assert bool((labels[want] == labels[: W * B]).all())
    batches = [sd.draw(W * 3) for _ in range(-(-N // (W * 3)))]
    for r, out in enumerate(res):
        assert torch.equal(out["label_draw"], want[r * B : (r + 1) * B])
        assert out["sampler"] == [b_[r * 3 : (r + 1) * 3].tolist() for b_ in batches]


def test_rows_come_from_their_owners(ranks):
    _, res = ranks
    x = _problem()[0]
    assert torch.equal(res[0]["fetch"], x[[3, 99, 50, 7]]) and torch.equal(res[1]["fetch"], x[[49, 50, 0, 100]])
    for out in res:
        assert torch.equal(out["rows"], x[[100, 0, 50, 49]])


def test_a_checkpoint_resumes_at_any_world_size(ranks):
    """One file (rank 0's): loaded at W = 2 and by one process on the whole data set, the same draws."""
    out_dir, res = ranks
    x = _problem()[0]
    one = SemidiscreteCoupling(x, seed=5)
    one.load(out_dir / "sd.pt")
    assert torch.equal(one.g, res[0]["block"]["g"])
    idx = one.draw(W * B)
    for r, out in enumerate(res):
        assert torch.equal(out["resumed"][0], idx[r * B : (r + 1) * B])
        assert torch.equal(out["resumed"][1], one.g)


@pytest.mark.slow
def test_ddp_training_with_the_sharded_coupling(tmp_path):
    """train() under DDP: the coupling's collective draws keep the ranks in step (3 global batches of 2 x 4)."""
    res = spawn(W, tmp_path, _train_target)
    assert res[0]["counter"] == res[1]["counter"] == 5 * 8 + 3 * W * 4
    for a, b_ in zip(res[0]["params"], res[1]["params"]):
        assert torch.equal(a, b_)


def test_refusals_are_raised_on_every_rank(ranks):
    _, res = ranks
    for out in res:
        err = out["refusals"]
        assert "differs across ranks (the state to load" in err["differ"]
        assert err["untouched"]
        assert "block" in err and ("must have 51 rows" in err["block"] or "refused their input" in err["block"])
        assert "every rank must pass a batch of the same size" in err["batch"]
        assert "labels must be passed on every rank or on none" in err["labels"]
    assert "another data set" in res[1]["refusals"]["other data"]
    assert "refused their input" in res[0]["refusals"]["other data"]


def test_without_a_process_group_it_is_one_process():
    x = _problem()[0]
    one, alone = SemidiscreteCoupling(x, seed=3), ShardedSemidiscreteCoupling(x, seed=3)
    one.fit(10, batch_size=8, progress=False)
    alone.fit(10, batch_size=8, progress=False)
    assert alone.part == (0, 1) and alone.cols == (0, N)
    assert torch.equal(one.g, alone.g) and torch.equal(one.draw(6), alone.draw(6))
    with pytest.raises(ValueError, match="must have 101 rows"):
        ShardedSemidiscreteCoupling(x[:100], num_points=N)
    with pytest.raises(ValueError, match="part must be None or this rank's"):
        alone.draw(3, part=(1, 2))
