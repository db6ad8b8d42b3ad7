"""SemidiscreteCoupling against references: POT's semidiscrete solver, exact OT (POT's LP duals, scipy's
assignment on replicated cells), exact 1-D Gaussian cell masses; fresh and seeded training; bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loom_kernels.couplings import LoomCoupling
from loom_kernels.couplings.semidiscrete import SemidiscreteCoupling
from loom_kernels.couplings.semidiscrete_fit import exact_masses_1d, mass_deviation
from loom_kernels.couplings.semidiscrete_train import SemidiscreteSampler, SemidiscreteSeededCoupling, fill_table
from loom_kernels.noise import gaussian_noise

ot = pytest.importorskip("ot")
scipy_opt = pytest.importorskip("scipy.optimize")


def test_assignment_with_the_lp_dual_is_exact_ot():
    """With the dual potential ``v`` of the discrete problem (M noises, N cells of mass k/M each), every noise's
    exact-OT partner attains ``min_j c_ij - v_j`` (complementary slackness), which the streamed argmin finds;
    where that minimum is unique the cells are the OT plan. The plan's cost equals scipy's assignment on
    replicated cells."""
    n, k = 12, 5
    x, z = torch.randn(n, 3, dtype=torch.float64), torch.randn(n * k, 3, dtype=torch.float64)
    c = torch.cdist(z, x).square().numpy()
    plan, log = ot.emd(np.full(n * k, 1 / (n * k)), np.full(n, 1 / n), c, log=True)
    partner = plan.argmax(1)
    v = torch.from_numpy(log["v"])
    sd = SemidiscreteCoupling(x)
    value, idx = sd.assign(z, g=v)  # float64 in, float64 pass
    reduced = c - log["v"][None, :]
    np.testing.assert_allclose(value.numpy(), reduced.min(1), atol=1e-9)
    np.testing.assert_allclose(reduced[np.arange(n * k), partner], reduced.min(1), atol=1e-9)
    two = np.sort(reduced, 1)
    unique = two[:, 1] - two[:, 0] > 1e-6
    assert unique.sum() >= n and np.array_equal(idx.numpy()[unique], partner[unique])
    rows, cols = scipy_opt.linear_sum_assignment(np.repeat(c, k, axis=1))
    np.testing.assert_allclose((plan * c).sum() * n * k, np.repeat(c, k, 1)[rows, cols].sum(), rtol=1e-9)


def test_fit_matches_exact_masses_and_pot_in_1d():
    x = torch.tensor([-1.5, -0.7, -0.2, 0.1, 0.4, 0.9, 1.6, 2.5])[:, None]
    sd = SemidiscreteCoupling(x, seed=3)
    sd.fit(600, batch_size=256, lr=2.0, progress=False)  # lr 2: few large cells (see fit's lr)
    ours = exact_masses_1d(x[:, 0].numpy(), sd.g.numpy())
    g_pot = ot.semidiscrete.solve_semidiscrete(x.double().numpy(), "normal", max_iter=1000, batch_size=256)
    pot = exact_masses_1d(x[:, 0].numpy(), np.asarray(g_pot))
    n = len(x)
    dev_ours, dev_pot = np.abs(ours * n - 1).max(), np.abs(pot * n - 1).max()
    assert dev_ours < 0.1, (ours * n, dev_pot)
    untrained = np.abs(exact_masses_1d(x[:, 0].numpy(), np.zeros(n)) * n - 1).max()
    assert untrained > 0.5  # the test could fail: g = 0 is far from balanced
    # the potentials agree up to a constant, on the scale of the cells
    d = sd.g.double().numpy() - np.asarray(g_pot)
    assert np.ptp(d) < 0.2 * np.ptp(np.asarray(g_pot)) + 0.1


def test_fit_balances_the_cells_and_reports():
    x = torch.randn(64, 2)
    sd = SemidiscreteCoupling(x, seed=0)
    before = mass_deviation(sd, 64 * 200)["mass_dev"]
    rep = sd.fit(400, batch_size=128, progress=False)
    after = mass_deviation(sd, 64 * 200)
    assert after["mass_dev"] < 0.5 * before and after["mass_dev"] < 0.2
    assert {"semi_dual", "mass_dev", "mass_dev_floor", "history"} <= set(rep)
    assert rep["fit_steps"] == sd.fit_steps == 400


def test_resume_equals_one_run(tmp_path):
    x = torch.randn(50, 3)
    one = SemidiscreteCoupling(x, seed=2)
    one.fit(40, batch_size=32, progress=False)
    two = SemidiscreteCoupling(x, seed=2)
    two.fit(20, batch_size=32, progress=False, checkpoint=tmp_path / "g.pt")
    three = SemidiscreteCoupling(x, seed=2)
    three.load(tmp_path / "g.pt")
    three.fit(20, batch_size=32, progress=False)
    assert torch.equal(one.g, three.g) and one.counter == three.counter


def test_fresh_draw_pairs_each_noise_with_its_cell():
    x, lab = torch.randn(80, 2), torch.arange(80) % 4
    sd = SemidiscreteCoupling(x, labels=lab, seed=1)
    sd.fit(50, batch_size=64, progress=False)
    want = torch.randint(4, (16,))
    idx = sd.draw(16, labels=want)
    assert torch.equal(lab[idx], want)
    x0, x1, perm = sd(x[idx], idx, return_indices=True)
    assert torch.equal(perm, torch.arange(16))
    best = torch.cdist(x0, x).square() - sd.g[None]
    best = best.masked_fill(lab[None] != want[:, None], float("inf"))
    assert torch.equal(best.argmin(1), idx)
    with pytest.raises(ValueError, match="pending draw|draw"):
        sd(x[idx], idx)  # already coupled


def test_sampler_with_a_dataloader():
    from loom_kernels.data import IndexedDataset

    x = torch.randn(40, 2)
    sd = SemidiscreteCoupling(x, seed=0)
    loader = torch.utils.data.DataLoader(IndexedDataset(x), batch_sampler=SemidiscreteSampler(sd, 8))
    n = 0
    for idx, x1 in loader:
        x0, x1 = sd(x1, idx)
        assert x0.shape == x1.shape
        n += 1
    assert n == 5


def test_memmap_data_gives_the_same_draws(tmp_path):
    x = torch.randn(60, 2, 2)
    mm = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32, shape=(60, 2, 2))
    mm[:] = x.numpy()
    mm.flush()
    a = SemidiscreteCoupling(x, seed=4)
    b = SemidiscreteCoupling(np.load(tmp_path / "x.npy", mmap_mode="r"), seed=4)
    a.fit(10, batch_size=32, progress=False)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.draw(16), b.draw(16))


def test_seeded_table_holds_noise_of_each_items_cell():
    x = torch.randn(30, 2)
    sd = SemidiscreteCoupling(x, seed=0)
    sd.fit(100, batch_size=64, progress=False)
    loom = LoomCoupling(30, (2,), num_caches=2, seed=5)
    rep = fill_table(sd, loom, rounds=20)
    assert rep["filled"] == 1.0
    noise = gaussian_noise(loom.seeds.reshape(-1), (2,))
    _, cell = sd.assign(noise)
    assert torch.equal(cell, torch.arange(30).repeat_interleave(2))
    LoomCoupling(30, (2,), num_caches=2, seed=5).load_state_dict(loom.state_dict())  # a valid LOOM table
    seeded = SemidiscreteSeededCoupling(sd, loom)
    x0, x1 = seeded(x[:10], torch.arange(10))
    assert x0.shape == (10, 2)


def test_cond_with_a_large_weight_matches_conditions():
    x = torch.randn(60, 2)
    cond = (torch.arange(60) % 3).double()
    sd = SemidiscreteCoupling(x, cond=cond, cond_weight=1e4, seed=0)
    want = torch.tensor([0.0, 1.0, 2.0, 1.0])
    idx = sd.draw(4, cond=want)
    assert torch.equal(cond[idx], want.double())


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"epsilon": -0.1}, "epsilon"),
        ({"epsilon": float("nan")}, "epsilon"),
        ({"labels": torch.tensor([0, 0, 2, 2]), "num_classes": 3}, "empty class"),
        ({"cond": torch.rand(4), "cond_weight": "adaptive", "cond_ratio": 1.0}, "cond_ratio"),
        ({"cond": torch.rand(4), "cond_weight": "adaptive", "cond_ratio": 0.0}, "cond_ratio"),
    ],
)
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        SemidiscreteCoupling(torch.randn(4, 2), **kw)


def test_bad_data_labels_and_state():
    x = torch.randn(10, 2)
    x[3, 1] = float("nan")
    with pytest.raises(ValueError, match="row 3"):
        SemidiscreteCoupling(x)
    sd = SemidiscreteCoupling(torch.randn(10, 2), labels=torch.arange(10) % 2)
    with pytest.raises(ValueError, match="absent from the fitted cells"):
        sd.draw(2, labels=torch.tensor([0, 5]))
    sd.fit(5, batch_size=8, progress=False)
    g = sd.g.clone()
    state = sd.state_dict()
    other = SemidiscreteCoupling(torch.randn(10, 2), labels=torch.arange(10) % 2)
    with pytest.raises(ValueError, match="another data set"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="11"):
        SemidiscreteCoupling(torch.randn(11, 2)).load_state_dict(state)
    assert torch.equal(sd.g, g) and torch.equal(other.g, torch.zeros(10))  # nothing changed


@pytest.mark.slow
@pytest.mark.parametrize("name", ["semidiscrete", "semidiscrete-seeded", "knn", "knn --knn-noise seeds"])
def test_cli_trains_and_resumes(name, tmp_path):
    from loom_kernels.cli.train import main

    name, *extra = name.split()
    args = ["--data", "moons", "--coupling", name, *extra, "--points", "128", "--batch-size", "32", "--no-progress"]
    args += ["--sd-fit-steps", "20", "--device", "cpu", "--out", str(tmp_path), "--log-every", "1"]
    assert main([*args, "--steps", "4"]) == 0
    assert main([*args, "--steps", "6", "--resume"]) == 0
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert ck["coupling_class"] in ("SemidiscreteCoupling", "SemidiscreteSeededCoupling", "KNNNoiseCoupling")


def test_rank_parts_of_a_global_draw():
    """``draw(b, part=(rank, W))``: each rank assigns its own slice of the W*b global noises, alike on every rank."""
    x = torch.randn(50, 2)
    whole, r0, r1 = (SemidiscreteCoupling(x, seed=7) for _ in range(3))
    idx = whole.draw(8)
    i0, i1 = r0.draw(4, part=(0, 2)), r1.draw(4, part=(1, 2))
    assert torch.equal(torch.cat([i0, i1]), idx)
    assert r0.counter == r1.counter == whole.counter == 8


def _exact_rms_dev(sd) -> float:
    masses = exact_masses_1d(sd.data[:, 0].numpy(), sd.g.double().numpy())
    return float(np.sqrt(((masses * len(masses) - 1) ** 2).mean()))


def test_tol_stops_early_at_the_tolerance_by_the_exact_masses():
    """The stop rule's fresh-noise check against the exact Gaussian masses of 1-D cells: the fit stops long
    before its maximum, says so, and the potential it leaves is within ``tol`` by the exact masses."""
    x = torch.tensor([-2.1, -1.0, -0.6, -0.1, 0.2, 0.3, 0.8, 1.1, 1.9, 3.0])[:, None]
    sd = SemidiscreteCoupling(x, seed=5)
    assert _exact_rms_dev(sd) > 0.3  # g = 0 is far from balanced
    tol = 0.05
    rep = sd.fit(50_000, tol=tol, progress=False)
    assert rep["stopped"] == "tol" and rep["fit_steps"] == sd.fit_steps < 10_000
    assert rep["check"]["mass_dev"] < tol and rep["tol"] == tol
    assert _exact_rms_dev(sd) < tol, (_exact_rms_dev(sd), rep["check"])
    # the maximum still bounds the fit, and the report says which of the two stopped it
    other = SemidiscreteCoupling(x, seed=5)
    assert other.fit(300, tol=1e-4, progress=False)["stopped"] == "steps" and other.fit_steps == 300


def test_mass_deviation_matches_the_exact_masses_in_1d():
    """The debiased fresh-noise estimate (what the stop rule reads) against the exact 1-D masses, on a half-fitted
    potential: within a few of its own noise floors."""
    x = torch.linspace(-2, 2, 12)[:, None]
    sd = SemidiscreteCoupling(x, seed=1)
    sd.fit(6, tol=None, progress=False)
    exact = _exact_rms_dev(sd)
    est = mass_deviation(sd, 200_000, stream=3)
    assert exact > 0.05
    assert abs(est["mass_dev"] ** 2 - exact**2) < 4 * est["mass_dev_floor"] ** 2 + 4 * exact / 200_000**0.5


@pytest.mark.parametrize("tol", [-0.1, 0.0, float("nan"), float("inf"), True, "0.1"])
def test_bad_tol_is_refused(tol):
    sd = SemidiscreteCoupling(torch.randn(8, 2), seed=0)
    with pytest.raises(ValueError, match="tol must be a finite float > 0"):
        sd.fit(10, tol=tol, progress=False)


def test_factory_fits_to_the_default_tolerance():
    from loom_kernels.couplings.factory import make_coupling

    x = torch.randn(64, 2)
    sd = make_coupling("semidiscrete", 64, (2,), seed=0, data=x, options={"progress": False})
    rep = sd.fit_report
    assert rep["tol"] == 0.05 and rep["stopped"] == "tol" and sd.fit_steps < 20_000
    assert mass_deviation(sd, 64 * 2000, stream=7)["mass_dev"] < 0.05


def test_sampler_parts_under_ddp():
    """``SemidiscreteSampler(sd, b, part=(rank, W))``: each rank's batches are its slices of the global batches
    (an epoch of ``ceil(N / (W b))`` of them); a bad part is refused."""
    x = torch.randn(50, 2)
    whole = SemidiscreteCoupling(x, seed=7)
    ranks = [list(SemidiscreteSampler(SemidiscreteCoupling(x, seed=7), 4, part=(r, 2))) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 7
    for k in range(7):
        idx = whole.draw(8).tolist()
        assert ranks[0][k] == idx[:4] and ranks[1][k] == idx[4:]
    with pytest.raises(ValueError, match="part must be"):
        SemidiscreteSampler(whole, 4, part=(2, 2))
