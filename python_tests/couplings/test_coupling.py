"""Tests for loom_kernels.couplings: invariants of LOOM, exactness against scipy, persistence, errors."""

import os

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from loom_kernels.couplings import IndependentCoupling, LoomCoupling, MinibatchOTCoupling
from loom_kernels.noise import gaussian_noise
from loom_kernels.testing import (
    cost_matrix_np,
    coupling_cost_np,
    loom_table_cost,
    reference_loom_step,
)

from harness import clustered, pair_costs, per_class_ot, source_rows

METRICS = ["sqeuclidean", "euclidean"]


def _data(n, shape, seed=0):
    # Structured data (two clusters, shifted), so assignments differ clearly from the identity.
    return clustered(n, shape, seed, spread=0.5)


def _batches(num_points, b, epochs, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(num_points, generator=g)
        for a in range(0, num_points - b + 1, b):
            yield perm[a : a + b]


def _slots_stream(seed, num_caches):
    """The documented slot choice: uniform draws from a CPU generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    if num_caches == 1:
        return lambda n: torch.zeros(n, dtype=torch.int64)
    return lambda n: torch.randint(num_caches, (n,), generator=g)


# ---- IndependentCoupling / MinibatchOTCoupling ------------------------------------------------------


def test_independent_shapes_generator_and_stats():
    x1 = torch.rand(16, 3, 4, dtype=torch.float64)
    x0, out = IndependentCoupling(generator=torch.Generator().manual_seed(3))(x1)
    assert out is x1 and x0.shape == x1.shape and x0.dtype == x1.dtype
    again, _ = IndependentCoupling(generator=torch.Generator().manual_seed(3))(x1)
    assert torch.equal(x0, again)
    c = IndependentCoupling()
    c(x1)
    x0b, _ = c(x1)
    assert float(c.stats["pre_cost"]) == pytest.approx(coupling_cost_np(x1, x0b).mean(), rel=1e-9)
    assert int(c.stats["swaps"]) == 0
    with pytest.raises(TypeError, match="x1 must have a floating dtype"):
        c(torch.ones(4, 2, dtype=torch.int64))


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("b,m", [(1, 1), (17, 17), (64, 64), (20, 33)])
def test_minibatch_ot_is_optimal(metric, b, m):
    x1 = _data(b, (3, 2), seed=b)
    x0 = torch.randn(m, 3, 2)
    out0, out1 = MinibatchOTCoupling(metric)(x1, x0=x0)
    assert out1 is x1 and out0.shape == x1.shape
    # out0 is made of distinct rows of x0
    rows = source_rows(out0, x0).tolist()
    assert len(set(rows)) == b
    best = coupling_cost_np(x1, x0[per_class_ot(x1, x0, metric=metric)], metric).sum()
    got = coupling_cost_np(x1, out0, metric).sum()
    assert got == pytest.approx(best, rel=1e-5, abs=1e-6)


def test_minibatch_ot_draws_noise_and_stats():
    torch.manual_seed(1)
    x1 = _data(32, (4,))
    c = MinibatchOTCoupling()
    x0, _ = c(x1)
    post = coupling_cost_np(x1, x0).mean()
    assert float(c.stats["post_cost"]) == pytest.approx(post, rel=1e-4)
    assert float(c.stats["post_cost"]) < float(c.stats["pre_cost"])
    assert 0 < int(c.stats["swaps"]) <= 32
    torch.manual_seed(1)
    x0b, _ = MinibatchOTCoupling()(x1)
    assert torch.equal(x0, x0b)  # global RNG: reproducible under torch.manual_seed


def test_minibatch_ot_errors():
    c = MinibatchOTCoupling()
    with pytest.raises(ValueError, match="metric must be one of"):
        MinibatchOTCoupling("cosine")
    with pytest.raises(ValueError, match=r"x0 must have shape \(m, \*x1.shape\[1:\]\) with m >= b = 8"):
        c(torch.rand(8, 2), x0=torch.rand(7, 2))
    with pytest.raises(ValueError, match="x0 must have shape"):
        c(torch.rand(8, 2), x0=torch.rand(8, 3))
    with pytest.raises(ValueError, match="x0 must be on x1's device cpu, got meta"):
        c(torch.rand(8, 2), x0=torch.rand(8, 2, device="meta"))
    with pytest.raises(TypeError, match="x1 must be a torch.Tensor"):
        c(np.zeros((4, 2)))
    with pytest.raises(ValueError, match="at least one feature dim"):
        c(torch.rand(8))


# ---- LoomCoupling: one step against the float64 scipy reference ---------------------------------------


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("num_caches", [1, 3])
def test_loom_step_matches_reference(metric, num_caches):
    p, b, shape = 50, 16, (2, 3)
    data = _data(p, shape)
    c = LoomCoupling(p, shape, num_caches=num_caches, seed=5, metric=metric)
    slots = _slots_stream(5, num_caches)
    for idx in _batches(p, b, 2, seed=1):
        before = c.seeds.clone()
        s = slots(b)
        ref_table, ref_x0, _ = reference_loom_step(before, data[idx], idx, s, metric)
        x0, x1 = c(data[idx], idx)
        assert torch.equal(x1, data[idx])
        # the optimum is unique on continuous random data: same table, same pairs
        np.testing.assert_array_equal(c.seeds.numpy(), ref_table)
        np.testing.assert_allclose(x0.double().numpy(), ref_x0, rtol=0, atol=1e-6)
        pre = coupling_cost_np(data[idx], gaussian_noise(before[idx, s], shape), metric).mean()
        assert float(c.stats["pre_cost"]) == pytest.approx(pre, rel=1e-4)
        assert float(c.stats["post_cost"]) == pytest.approx(coupling_cost_np(data[idx], x0, metric).mean(), rel=1e-4)
        assert float(c.stats["post_cost"]) < float(c.stats["pre_cost"])


def test_loom_x0_pairs_with_x1_and_stats():
    p, shape = 40, (5,)
    data = _data(p, shape)
    c = LoomCoupling(p, shape, seed=2)
    idx = torch.randperm(p)
    before = c.seeds[idx, 0].clone()
    x0, _ = c(data[idx], idx)
    after = c.seeds[idx, 0]
    np.testing.assert_allclose(x0.numpy(), gaussian_noise(after, shape).numpy(), atol=1e-6)
    pre = coupling_cost_np(data[idx], gaussian_noise(before, shape)).mean()
    assert float(c.stats["pre_cost"]) == pytest.approx(pre, rel=1e-4)
    assert int(c.stats["swaps"]) == int((before != after).sum()) > 0


# ---- invariants over many steps ---------------------------------------------------------------------


@pytest.mark.parametrize("num_caches", [1, 4])
def test_loom_total_cost_never_increases_and_seeds_conserved(num_caches):
    p, b, shape = 96, 12, (3,)
    data = _data(p, shape)
    c = LoomCoupling(p, shape, num_caches=num_caches, seed=11)
    multiset = np.sort(c.seeds.numpy().ravel())
    assert len(np.unique(multiset)) == p * num_caches  # all distinct at the start
    prev = loom_table_cost(c.seeds, data)
    decreased = 0
    for idx in _batches(p, b, 6, seed=3):
        c(data[idx], idx)
        cur = loom_table_cost(c.seeds, data)
        # float32 cost entries: allow their rounding, nothing more
        assert cur.sum() <= prev.sum() * (1 + 1e-6) + 1e-6
        if num_caches == 1:
            assert cur[:, 0].sum() <= prev[:, 0].sum() * (1 + 1e-6) + 1e-6
        decreased += cur.sum() < prev.sum() - 1e-6
        prev = cur
        np.testing.assert_array_equal(np.sort(c.seeds.numpy().ravel()), multiset)
    assert decreased > 10  # the test can fail: the coupling really moves


def test_loom_approaches_global_optimum():
    # Low D, a few hundred points: LOOM's table ends near the dataset-wide optimum and far below
    # what fresh minibatch OT reaches with the same batch size.
    p, b, shape = 256, 16, (2,)
    data = _data(p, shape)
    c = LoomCoupling(p, shape, seed=0)
    noise = gaussian_noise(c.seeds[:, 0], shape)
    _, col = linear_sum_assignment(cost_matrix_np(data, noise))
    optimum = coupling_cost_np(data, noise[torch.as_tensor(col)]).mean()
    start = loom_table_cost(c.seeds, data).mean()
    for idx in _batches(p, b, 25, seed=4):
        c(data[idx], idx)
    final = loom_table_cost(c.seeds, data).mean()
    ot = MinibatchOTCoupling()
    fresh = []
    for idx in _batches(p, b, 3, seed=5):
        x0, _ = ot(data[idx])
        fresh.append(coupling_cost_np(data[idx], x0).mean())
    fresh = float(np.mean(fresh))
    # measured: final ~1.01 x optimum, fresh minibatch OT ~1.4 x, the random start ~2.4 x
    assert optimum * (1 - 1e-6) <= final <= optimum * 1.03, (optimum, final)
    assert fresh < start and final - optimum < 0.1 * (fresh - optimum), (optimum, final, fresh, start)
    # the remembered seeds are still exactly the original noise set
    np.testing.assert_array_equal(np.sort(c.seeds[:, 0].numpy()), np.sort(LoomCoupling(p, shape).seeds[:, 0].numpy()))


def test_loom_same_seed_same_batches_same_table():
    p, b, shape = 60, 10, (2, 2)
    data = _data(p, shape)
    a = LoomCoupling(p, shape, num_caches=3, seed=7)
    c = LoomCoupling(p, shape, num_caches=3, seed=7)
    d = LoomCoupling(p, shape, num_caches=3, seed=8)
    assert torch.equal(a.seeds, c.seeds) and not torch.equal(a.seeds, d.seeds)
    for idx in _batches(p, b, 3):
        xa, _ = a(data[idx], idx)
        xc, _ = c(data[idx], idx)
        assert torch.equal(xa, xc)
    assert torch.equal(a.seeds, c.seeds)
    # different seeds give disjoint noise sets
    assert not set(a.seeds.numpy().ravel()) & set(d.seeds.numpy().ravel())


def test_loom_multiple_caches_use_all_slots():
    p, shape, k = 30, (2,), 4
    data = _data(p, shape)
    c = LoomCoupling(p, shape, num_caches=k, seed=1)
    start = c.seeds.clone()
    for idx in _batches(p, 10, 8):
        c(data[idx], idx)
    changed = (c.seeds != start).any(0)
    assert bool(changed.all()), changed  # every cache column was touched
    # seeds migrate between caches (the reason the per-cache total is not monotone with k > 1)
    cols = {int(s): j for j in range(k) for s in start[:, j]}
    moved = sum(cols[int(s)] != j for j in range(k) for s in c.seeds[:, j])
    assert moved > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_loom_dtypes(dtype):
    p, shape = 20, (4,)
    data = _data(p, shape).to(dtype)
    c = LoomCoupling(p, shape)
    idx = torch.arange(p)
    x0, x1 = c(data, idx)
    assert x0.dtype == dtype and x0.shape == data.shape
    fresh = LoomCoupling(p, shape).seeds
    np.testing.assert_array_equal(np.sort(c.seeds.numpy().ravel()), np.sort(fresh.numpy().ravel()))


@pytest.mark.parametrize(
    "as_indices",
    [
        lambda i: torch.tensor(i, dtype=torch.int32),
        lambda i: torch.tensor(i, dtype=torch.int16),
        lambda i: torch.tensor(i, dtype=torch.uint8),
        lambda i: np.array(i, dtype=np.int32),  # numpy indices accepted
        lambda i: list(i),
    ],  # so are lists
    ids=["int32", "int16", "uint8", "numpy", "list"],
)
def test_loom_small_batches_and_index_dtypes(as_indices):
    # Every index type must address the same rows as int64 indices: each step against scipy.
    c = LoomCoupling(10, 3, seed=2)
    x0, x1 = c(torch.rand(1, 3), as_indices([4]))
    assert x0.shape == (1, 3) and int(c.stats["swaps"]) == 0
    x0, _ = c(torch.rand(0, 3), torch.zeros(0, dtype=torch.int64))
    assert x0.shape == (0, 3)
    x1 = _data(10, (3,), seed=3)
    for idx in ([1, 2, 7], [9, 0, 5, 6], [8, 3]):
        want_table, want_x0, _ = reference_loom_step(c.seeds, x1[idx], torch.tensor(idx), torch.zeros(len(idx)))
        x0, _ = c(x1[idx], as_indices(idx))
        np.testing.assert_allclose(x0.double().numpy(), want_x0, rtol=0, atol=1e-6)
        assert np.array_equal(c.seeds.numpy(), want_table), idx


def test_loom_augmentation_indices_example():
    # Flipped images get index i + len(dataset); the table is sized for both views.
    n, shape = 16, (1, 2, 4)
    images = _data(n, shape)
    c = LoomCoupling(2 * n, shape, seed=0)
    idx = torch.arange(8)
    flip = torch.rand(8) < 0.5
    x1 = torch.where(flip[:, None, None, None], images[idx].flip(-1), images[idx])
    x0, _ = c(x1, idx + n * flip.long())
    assert x0.shape == x1.shape
    with pytest.raises(ValueError, match=r"i \+ len\(dataset\)"):
        LoomCoupling(n, shape)(x1, idx + n * flip.long() + n)


def test_loom_ties_and_invalid_data():
    p, shape = 12, (3,)
    c = LoomCoupling(p, shape, num_caches=2, seed=1)
    multiset = np.sort(c.seeds.numpy().ravel())
    # identical data points: every pairing costs the same; the invariants still hold
    x1 = torch.zeros(6, 3)
    idx = torch.tensor([0, 2, 4, 6, 8, 10])
    x0, _ = c(x1, idx)
    assert float(c.stats["post_cost"]) == pytest.approx(float(c.stats["pre_cost"]), rel=1e-6)
    np.testing.assert_array_equal(np.sort(c.seeds.numpy().ravel()), multiset)
    # NaN or inf data (or costs that overflow): refused naming x1, and the table is left as it was
    before = c.seeds.clone()
    for v in (float("nan"), float("inf"), -float("inf"), 1e30):
        bad = torch.rand(4, 3)
        bad[1, 2] = v
        with pytest.raises(ValueError, match="x1 contains NaN or inf"):
            c(bad, torch.arange(4))
        assert torch.equal(c.seeds, before)
        with pytest.raises(ValueError, match="x1 contains NaN or inf"):
            c(bad, torch.arange(4), labels=torch.tensor([0, 1, 0, 1]))
        assert torch.equal(c.seeds, before)


# ---- resample ----------------------------------------------------------------------------------------


def test_resample_rows_and_all():
    p, k = 40, 2
    c = LoomCoupling(p, (2,), num_caches=k, seed=3)
    before = c.seeds.clone()
    rows = torch.tensor([3, 17, 39])
    c.resample(rows)
    mask = torch.zeros(p, dtype=torch.bool)
    mask[rows] = True
    assert torch.equal(c.seeds[~mask], before[~mask])
    assert bool((c.seeds[mask] != before[mask]).all())
    assert len(np.unique(c.seeds.numpy())) == p * k
    assert not set(c.seeds[mask].numpy().ravel()) & set(before.numpy().ravel())
    mid = c.seeds.clone()
    c.resample()
    assert bool((c.seeds != mid).all()) and len(np.unique(c.seeds.numpy())) == p * k
    assert not set(c.seeds.numpy().ravel()) & (set(mid.numpy().ravel()) | set(before.numpy().ravel()))
    # deterministic: another coupling doing the same calls holds the same table
    d = LoomCoupling(p, (2,), num_caches=k, seed=3)
    d.resample(rows.tolist())
    d.resample()
    assert torch.equal(c.seeds, d.seeds)
    with pytest.raises(ValueError, match=r"\[0, 40\)"):
        c.resample(torch.tensor([40]))
    with pytest.raises(ValueError, match="distinct"):
        c.resample(torch.tensor([1, 1]))
    with pytest.raises(TypeError, match="integer dtype"):
        c.resample(torch.tensor([1.0]))


# ---- errors -----------------------------------------------------------------------------------------


def test_loom_errors():
    c = LoomCoupling(10, (2, 3))
    x = torch.rand(4, 2, 3)
    idx = torch.arange(4)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, num_points\) = \[0, 10\), got 10"):
        c(x, torch.tensor([0, 1, 2, 10]))
    with pytest.raises(ValueError, match=r"got -1 .*i \+ len\(dataset\)"):
        c(x, torch.tensor([0, -1, 2, 3]))
    with pytest.raises(ValueError, match=r"x1 must have shape \(b, 2, 3\), got \(4, 3, 2\)"):
        c(torch.rand(4, 3, 2), idx)
    with pytest.raises(ValueError, match=r"indices must have shape \(b,\) = \(4,\) .* got \(3,\)"):
        c(x, torch.arange(3))
    with pytest.raises(ValueError, match=r"indices must have shape"):
        c(x, torch.arange(4).reshape(2, 2))
    with pytest.raises(TypeError, match="integer dataset indices, got dtype torch.float32.*TorchCFM's argument order"):
        c(x, idx.float())
    with pytest.raises(TypeError, match="integer dataset indices"):
        c(x, idx > 1)
    with pytest.raises(ValueError, match="needs the dataset indices"):
        c(x, None)
    with pytest.raises(ValueError, match="indices must be on the table's device cpu .* got meta"):
        c(x, idx.to("meta"))
    with pytest.raises(ValueError, match="x1 is on meta but the coupling computes on cpu"):
        c(x.to("meta"), idx)
    with pytest.raises(TypeError, match="floating dtype"):
        c(x.long(), idx)
    before = c.seeds.clone()
    with pytest.raises(ValueError, match="index 2 appears 2 times"):
        c(x, torch.tensor([2, 0, 2, 3]))
    assert torch.equal(c.seeds, before)  # a refused batch leaves the table alone
    for kwargs, msg in [
        (dict(num_points=0), "num_points must be a positive int"),
        (dict(num_caches=0), "num_caches must be a positive int"),
        (dict(shape=()), "shape must be a non-empty tuple"),
        (dict(shape=(3, 0)), "shape must be a non-empty tuple"),
        (dict(metric="l1"), "metric must be one of"),
        (dict(scope="ring"), "scope must be one of"),
        (dict(seed=1.5), "seed must be an int"),
    ]:
        args = dict(num_points=10, shape=(2,))
        args.update(kwargs)
        with pytest.raises(ValueError, match=msg):
            LoomCoupling(args.pop("num_points"), args.pop("shape"), **args)


def test_loom_duplicate_index_is_refused_even_with_caches():
    # Same index twice is refused whatever slots the generator draws (even distinct slots, which
    # would be harmless): the behaviour must not depend on chance. The table is untouched.
    c = LoomCoupling(10, (2,), num_caches=8)
    before = c.seeds.clone()
    for _ in range(5):
        with pytest.raises(ValueError, match="distinct within the batch"):
            c(torch.rand(3, 2), torch.tensor([1, 5, 1]))
    assert torch.equal(c.seeds, before)


# ---- persistence ---------------------------------------------------------------------------------


def _run(c, data, batches):
    outs = []
    for idx in batches:
        x0, _ = c(data[idx], idx)
        outs.append(x0)
    return outs


def test_state_dict_roundtrip_resumes_exactly(tmp_path):
    p, shape = 48, (3,)
    data = _data(p, shape)
    batches = list(_batches(p, 8, 4, seed=9))
    a = LoomCoupling(p, shape, num_caches=3, seed=4)
    _run(a, data, batches[:10])
    a.resample(torch.tensor([0, 1]))
    a.save(tmp_path / "c.pt")
    sd = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in a.state_dict().items()}
    rest_a = _run(a, data, batches[10:])
    b = LoomCoupling.load(tmp_path / "c.pt")
    rest_b = _run(b, data, batches[10:])
    assert all(torch.equal(u, v) for u, v in zip(rest_a, rest_b))
    assert torch.equal(a.seeds, b.seeds)
    c = LoomCoupling(p, shape, num_caches=3, seed=4)
    c.load_state_dict(sd)
    _run(c, data, batches[10:])
    assert torch.equal(a.seeds, c.seeds)
    a.resample()
    b.resample()
    assert torch.equal(a.seeds, b.seeds)  # the resample counter is part of the state


@pytest.mark.parametrize(
    "kwargs,key",
    [
        (dict(num_points=49), "num_points"),
        (dict(num_caches=2), "num_caches"),
        (dict(seed=5), "seed"),
        (dict(metric="euclidean"), "metric"),
        (dict(shape=(1, 3)), "shape"),
    ],
)
def test_load_state_dict_refuses_other_config(kwargs, key):
    a = LoomCoupling(48, (3,), num_caches=3, seed=4)
    args = dict(num_points=48, shape=(3,), num_caches=3, seed=4)
    args.update(kwargs)
    b = LoomCoupling(args.pop("num_points"), args.pop("shape"), **args)
    with pytest.raises(ValueError, match=f"does not match .*{key}: saved"):
        b.load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="missing keys"):
        b.load_state_dict({"seeds": a.seeds})


def test_save_is_atomic(tmp_path, monkeypatch):
    p, shape = 20, (2,)
    data = _data(p, shape)
    path = tmp_path / "coupling.pt"
    c = LoomCoupling(p, shape, seed=1)
    c.save(path)
    good = c.seeds.clone()
    c(data, torch.arange(p))
    assert not torch.equal(c.seeds, good)

    real_save = torch.save

    def crash_mid_write(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a zip file")  # bytes reach the temp file, then the process "dies"
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(OSError, match="disk full"):
        c.save(path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(LoomCoupling.load(path).seeds, good)
    assert sorted(os.listdir(tmp_path)) == ["coupling.pt"]  # no temp file left behind

    def crash_at_rename(src, dst):
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", crash_at_rename)
    with pytest.raises(OSError, match="power cut"):
        c.save(path)
    monkeypatch.undo()
    assert torch.equal(LoomCoupling.load(path).seeds, good)
    assert sorted(os.listdir(tmp_path)) == ["coupling.pt"]
    c.save(path)
    assert torch.equal(LoomCoupling.load(path).seeds, c.seeds)


def test_mmap_table_matches_memory_and_survives_save_load(tmp_path):
    p, shape = 64, (2, 2)
    data = _data(p, shape)
    batches = list(_batches(p, 16, 3, seed=2))
    table = tmp_path / "table.npy"
    m = LoomCoupling(p, shape, num_caches=2, seed=6, mmap_path=table)
    r = LoomCoupling(p, shape, num_caches=2, seed=6)
    assert torch.equal(m.seeds, r.seeds)
    for idx in batches[:6]:
        xm, _ = m(data[idx], idx)
        xr, _ = r(data[idx], idx)
        assert torch.equal(xm, xr)
    m.flush()
    np.testing.assert_array_equal(np.load(table), r.seeds.numpy())  # the file is the table
    m.save(tmp_path / "ckpt.pt")
    snapshot = r.seeds.clone()
    for idx in batches[6:]:
        m(data[idx], idx)
        r(data[idx], idx)
    # resume (the live coupling released first): the file is restored from the checkpoint, which is untouched
    m.close()
    m2 = LoomCoupling.load(tmp_path / "ckpt.pt")
    assert m2.mmap_path == os.fspath(table) and torch.equal(m2.seeds, snapshot)
    np.testing.assert_array_equal(np.load(table), snapshot.numpy())
    r2 = LoomCoupling.load(tmp_path / "ckpt.pt", mmap_path=None)
    assert r2.mmap_path is None and torch.equal(r2.seeds, snapshot)
    for idx in batches[6:]:
        a, _ = m2(data[idx], idx)
        b, _ = r2(data[idx], idx)
        assert torch.equal(a, b)
    m2.flush()
    np.testing.assert_array_equal(np.load(table), r.seeds.numpy())
    assert torch.equal(m2.seeds, r.seeds)
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "table.npy"]


# ---- GPU ---------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("num_caches", [1, 3])
def test_loom_cuda_matches_cpu(num_caches):
    p, b, shape = 512, 128, (3, 8, 8)
    data = _data(p, shape)
    g = LoomCoupling(p, shape, num_caches=num_caches, seed=1, device="cuda")
    c = LoomCoupling(p, shape, num_caches=num_caches, seed=1)
    for idx in _batches(p, b, 2):
        xg, _ = g(data[idx].cuda(), idx.cuda())
        xc, _ = c(data[idx], idx)
        # same pairs up to float ties: compare the matched cost, then the conserved multiset
        np.testing.assert_allclose(
            coupling_cost_np(data[idx], xg.cpu()).sum(), coupling_cost_np(data[idx], xc).sum(), rtol=1e-5
        )
        assert float(g.stats["post_cost"]) <= float(g.stats["pre_cost"])
    assert torch.equal(g.seeds.cpu().flatten().sort().values, c.seeds.flatten().sort().values)
    # CPU indices are accepted for a CUDA table
    g(data[:8].cuda(), torch.arange(8))
    with pytest.raises(ValueError, match="indices must lie in"):
        g(data[:2].cuda(), torch.tensor([0, p], device="cuda"))
    with pytest.raises(ValueError, match="distinct"):
        g(data[:2].cuda(), torch.tensor([1, 1], device="cuda"))


@pytest.mark.cuda
def test_loom_cuda_step_has_no_host_sync_of_its_own():
    # The only host sync of a CUDA step is the one inside assign (to raise its errors); with host
    # indices the coupling itself must not synchronize. torch reports syncs it performs as warnings
    # attributed to the calling Python frame.
    import warnings

    p, b, shape = 1024, 256, (3, 32, 32)
    data = _data(p, shape).cuda()
    c = LoomCoupling(p, shape, num_caches=6, device="cuda")
    batches = list(_batches(p, b, 1))
    for idx in batches[:2]:
        c(data[idx.cuda()], idx)  # warm-up: kernel compilation may synchronize
    idx = batches[2]
    x1 = data[idx.cuda()]
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            c(x1, idx)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    # Every synchronizing call of the step (torch attributes each to the Python frame that made it) must be
    # assign's status read: one in couplings/, noise, cost or anywhere else is a regression.
    syncs = [(w.filename, w.lineno) for w in caught if "synchroniz" in str(w.message).lower()]
    assert syncs, "no sync reported at all: the detector is not working (assign's status read is one)"
    assign_py = os.path.join("loom_kernels", "assign.py")
    assert all(f.endswith(assign_py) for f, _ in syncs), syncs
    assert float(c.stats["post_cost"]) <= float(c.stats["pre_cost"])


# ---- the protocol, keyword-only x0, labels -----------------------------------------------------------


def test_every_coupling_follows_the_protocol():
    from loom_kernels.couplings.base import Coupling

    x1, idx = _data(8, (2,)), torch.arange(8)
    for c in (IndependentCoupling(), MinibatchOTCoupling(), LoomCoupling(8, (2,))):
        assert isinstance(c, Coupling)
        x0, out = c(x1, indices=idx, labels=idx % 2)
        assert out is x1 and x0.shape == x1.shape
        c.load_state_dict(c.state_dict())
    assert MinibatchOTCoupling().state_dict() == {}
    with pytest.raises(ValueError, match="MinibatchOTCoupling has no state to load"):
        MinibatchOTCoupling().load_state_dict({"seeds": 1})


def test_minibatch_ot_refuses_noise_in_the_indices_place():
    # the second positional argument is the protocol's indices: a floating tensor there is TorchCFM's
    # (x0, x1) order by mistake, which would train the reverse flow
    x0, x1 = torch.randn(8, 2), torch.rand(8, 2)
    with pytest.raises(
        TypeError,
        match=r"indices must be integer dataset indices.*keyword x0=: TorchCFM's order "
        r"\(x0, x1\).*reverse flow",
    ):
        MinibatchOTCoupling()(x0, x1)
    out0, _ = MinibatchOTCoupling()(x1, x0=x0)
    assert sorted(source_rows(out0, x0).tolist()) == list(range(8))


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("classes", [1, 3, 10, 1000])
def test_minibatch_ot_labels_equal_per_class_ot(metric, classes):
    b = 96
    x1, x0 = _data(b, (3,), seed=classes), torch.randn(b, 3)
    y = torch.randint(classes, (b,))
    c = MinibatchOTCoupling(metric)
    out0, _ = c(x1, x0=x0, labels=y)
    col = source_rows(out0, x0)
    assert sorted(col.tolist()) == list(range(b))
    assert torch.equal(y[col], y), "a noise crossed classes"  # noise j starts as item j's, in j's class
    got = coupling_cost_np(x1, out0, metric).sum()
    best = pair_costs(x1, x0[per_class_ot(x1, x0, y, metric)], metric).sum()  # exact OT within each class
    assert got == pytest.approx(best, rel=1e-5, abs=1e-6)
    assert float(c.stats["post_cost"]) <= float(c.stats["pre_cost"]) + 1e-6
    if classes == 1:  # one class is the unconditional problem
        ref, _ = MinibatchOTCoupling(metric)(x1, x0=x0)
        assert torch.equal(ref, out0)


def test_label_errors_name_labels():
    x1 = torch.rand(8, 2)
    y = torch.arange(8) % 2
    for c in (MinibatchOTCoupling(), IndependentCoupling()):
        with pytest.raises(TypeError, match="labels must have an integer dtype, got torch.float32"):
            c(x1, labels=y.float())
        with pytest.raises(TypeError, match="labels must have an integer dtype, got torch.bool"):
            c(x1, labels=y.bool())
        with pytest.raises(TypeError, match="labels must be an integer torch.Tensor"):
            c(x1, labels=[0, 1] * 4)
        with pytest.raises(ValueError, match=r"labels must have shape \(b,\) = \(8,\) to match x1, got \(7,\)"):
            c(x1, labels=y[:7])
        with pytest.raises(ValueError, match="labels must be on x1's device cpu, got meta"):
            c(x1, labels=y.to("meta"))
    with pytest.raises(ValueError, match="labels need x0 with exactly b = 8 rows"):
        MinibatchOTCoupling()(x1, x0=torch.rand(9, 2), labels=y)
    with pytest.raises(ValueError, match="x1 contains NaN or inf"):
        MinibatchOTCoupling()(torch.full((4, 2), float("nan")))
    with pytest.raises(ValueError, match="scope must be one of"):
        MinibatchOTCoupling(scope="world")


@pytest.mark.parametrize("num_caches", [1, 3])
def test_loom_labels_keep_each_class_seeds_and_equal_per_class_steps(num_caches):
    p, shape, b = 60, (2, 2), 24
    data = _data(p, shape)
    y = torch.randint(4, (p,), generator=torch.Generator().manual_seed(1))
    c = LoomCoupling(p, shape, num_caches=num_caches, seed=2)
    owned = {k: sorted(c.seeds[y == k].flatten().tolist()) for k in range(4)}
    table = c.seeds.clone()
    slots = _slots_stream(2, num_caches)
    swaps = 0
    for idx in _batches(p, b, 4, seed=3):
        sl = slots(b)
        x0, _ = c(data[idx], idx, labels=y[idx])
        # reference: one exact LOOM step per class on the same slots
        for k in torch.unique(y[idx]).tolist():
            m = torch.nonzero(y[idx] == k).flatten()
            new, x0k, _ = reference_loom_step(table, data[idx][m], idx[m], sl[m])
            table = torch.from_numpy(new)
            np.testing.assert_allclose(x0[m].double().numpy(), x0k, rtol=0, atol=1e-5)
        swaps += int(c.stats["swaps"])
        assert torch.equal(c.seeds, table)
        assert {k: sorted(c.seeds[y == k].flatten().tolist()) for k in range(4)} == owned, "a seed changed class"
    assert swaps > 0


def test_loom_label_errors_leave_the_table_unchanged():
    c = LoomCoupling(16, (2,), num_caches=2)
    before = c.seeds.clone()
    x1, idx = torch.rand(8, 2), torch.arange(8)
    for bad, err in ((idx.float(), TypeError), (idx[:7], ValueError), (idx.to("meta"), ValueError)):
        with pytest.raises(err, match="labels must"):
            c(x1, idx, labels=bad)
        assert torch.equal(c.seeds, before)


@pytest.mark.cuda
@pytest.mark.parametrize("classes", [10, 1000])
def test_labels_on_cuda_match_cpu(classes):
    p, b, shape = 512, 256, (3, 8, 8)
    data = _data(p, shape)
    y = torch.randint(classes, (p,))
    x0 = torch.randn(b, *shape)
    og, _ = MinibatchOTCoupling()(data[:b].cuda(), x0=x0.cuda(), labels=y[:b].cuda())
    oc, _ = MinibatchOTCoupling()(data[:b], x0=x0, labels=y[:b])
    assert torch.equal(y[:b][source_rows(og.cpu(), x0)], y[:b]), "a noise crossed classes on CUDA"
    np.testing.assert_allclose(
        coupling_cost_np(data[:b], og.cpu()).sum(), coupling_cost_np(data[:b], oc).sum(), rtol=1e-5
    )
    g = LoomCoupling(p, shape, num_caches=2, seed=1, device="cuda")
    owned = {k: sorted(g.seeds.cpu()[y == k].flatten().tolist()) for k in torch.unique(y).tolist()}
    for idx in _batches(p, b, 2):
        g(data[idx].cuda(), idx, labels=y[idx].cuda())
    assert {k: sorted(g.seeds.cpu()[y == k].flatten().tolist()) for k in owned} == owned
    bad = data[:4].cuda().clone()
    bad[0, 0, 0, 0] = float("nan")
    before = g.seeds.clone()
    with pytest.raises(ValueError, match="x1 contains NaN or inf"):
        g(bad, torch.arange(4), labels=y[:4].cuda())
    assert torch.equal(g.seeds, before)
    with pytest.raises(ValueError, match="labels must be on x1's device"):
        g(data[:4].cuda(), torch.arange(4), labels=y[:4])
