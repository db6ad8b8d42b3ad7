"""Every coupling follows one calling convention:
``coupling(x1, indices=None, *, x0=None, labels=None, cond=None, return_indices=False)``.

Each coupling the library ships (every scope and table kind of the OT couplings, and the prefetching
wrapper) runs through the same calls: the README's loop ``coupling(x1, idx)``, indices by keyword,
labels, a given noise batch, no indices, the TorchCFM ``(x0, x1)`` mistake, and a state round trip.
A class-level check covers every ``Coupling`` subclass in the package, including ones added later.
Ranks that disagree on a coupling's scope raise on every rank (issue 23 item 9).
"""

import importlib
import inspect

import pytest
import torch

from loom_kernels.couplings import (
    Coupling,
    FixedNoiseCoupling,
    IndependentCoupling,
    KNNNoiseCoupling,
    LoomCoupling,
    MinibatchOTCoupling,
    MixedCoupling,
    PrefetchCoupling,
    ReflowCoupling,
    SemidiscreteCoupling,
    SemidiscreteSeededCoupling,
    ShardedSemidiscreteCoupling,
    SinkhornCoupling,
    TimestepMixedCoupling,
)

from gloo_ranks import run_rank, spawn
from harness import source_rows

N, SHAPE, B = 40, (2, 3), 8


def _gen():
    return torch.Generator().manual_seed(7)


FACTORIES = {
    "independent": lambda tmp: IndependentCoupling(generator=_gen()),
    "minibatch": lambda tmp: MinibatchOTCoupling(generator=_gen()),
    "minibatch-local": lambda tmp: MinibatchOTCoupling(generator=_gen(), scope="local"),
    "minibatch-grouped": lambda tmp: MinibatchOTCoupling(generator=_gen(), scope="grouped", group_size=3),
    "loom": lambda tmp: LoomCoupling(N, SHAPE, num_caches=2, seed=1),
    "loom-local": lambda tmp: LoomCoupling(N, SHAPE, num_caches=2, seed=1, scope="local"),
    "loom-grouped": lambda tmp: LoomCoupling(N, SHAPE, num_caches=2, seed=1, scope="grouped", group_size=3),
    "loom-sharded": lambda tmp: LoomCoupling(N, SHAPE, num_caches=2, seed=1, table="sharded"),
    "loom-mmap": lambda tmp: LoomCoupling(N, SHAPE, num_caches=2, seed=1, mmap_path=tmp / "t.npy", overwrite=True),
    # a small epsilon: the plan is (numerically) the exact permutation, so the protocol's checks hold
    "sinkhorn": lambda tmp: SinkhornCoupling(1e-3, generator=_gen(), max_iter=5000),
    "sinkhorn-local": lambda tmp: SinkhornCoupling(1e-3, generator=_gen(), scope="local", max_iter=5000),
    "sinkhorn-grouped": lambda tmp: SinkhornCoupling(
        1e-3, generator=_gen(), scope="grouped", group_size=3, max_iter=5000
    ),
    "prefetch-independent": lambda tmp: PrefetchCoupling(IndependentCoupling(generator=_gen())),
    "prefetch-minibatch": lambda tmp: PrefetchCoupling(MinibatchOTCoupling(generator=_gen())),
    "prefetch-loom": lambda tmp: PrefetchCoupling(LoomCoupling(N, SHAPE, num_caches=2, seed=1)),
    "fixed": lambda tmp: FixedNoiseCoupling(LoomCoupling(N, SHAPE, seed=1)),
    "reflow": lambda tmp: ReflowCoupling(_pairs(tmp)),
    "mixed": lambda tmp: MixedCoupling(
        IndependentCoupling(generator=_gen()), MinibatchOTCoupling(generator=_gen()), p=0.5, generator=_gen()
    ),
    "knn": lambda tmp: KNNNoiseCoupling(4, generator=_gen()),
    "knn-seeds": lambda tmp: KNNNoiseCoupling(4, generator=_gen(), noise="seeds"),
    "loom-sdseeded": lambda tmp: SemidiscreteSeededCoupling(
        SemidiscreteCoupling(torch.randn(N, *SHAPE, generator=_gen())), LoomCoupling(N, SHAPE, num_caches=2, seed=1)
    ),
}
# Covered by their own tests, not by these runs: TimestepMixedCoupling needs the batch's t= in every call.
COVERED_ELSEWHERE = {TimestepMixedCoupling}
# Couplings that choose the batch themselves (``idx = coupling.draw(b)``, then ``coupling(x1, idx)``): the
# README's loop over the loader's indices does not apply; the signature test below still does.
CHOOSES_BATCHES = {SemidiscreteCoupling, ShardedSemidiscreteCoupling}


def _pairs(tmp):
    from loom_kernels.reflow import generate_pairs

    class Shrink(torch.nn.Module):
        shape = SHAPE

        def forward(self, x, t):
            return -0.5 * x

    return generate_pairs(Shrink(), N, "euler", 2, str(tmp), device="cpu", progress=False)


TAKES_X0 = {
    "independent",
    "minibatch",
    "minibatch-local",
    "minibatch-grouped",
    "prefetch-independent",
    "prefetch-minibatch",
    "sinkhorn",
    "sinkhorn-local",
    "sinkhorn-grouped",
    "mixed",
}
NEEDS_INDICES = {name for name in FACTORIES if "loom" in name or name in ("fixed", "reflow")}


def _batch(k=0):
    g = torch.Generator().manual_seed(100 + k)
    idx = torch.randperm(N, generator=g)[:B]
    return idx, torch.randn(B, *SHAPE, generator=g)


@pytest.fixture(params=sorted(FACTORIES))
def name(request):
    return request.param


def test_readme_loop_and_indices_by_position_or_keyword(name, tmp_path):
    a, b = FACTORIES[name](tmp_path / "a"), FACTORIES[name](tmp_path / "b")
    assert isinstance(a, Coupling)
    for k in range(3):  # the README's loop: for idx, x1 in loader: x0, x1 = coupling(x1, idx)
        idx, x1 = _batch(k)
        x0, out = a(x1, idx)
        x0_kw, _ = b(x1, indices=idx)
        assert out is x1 and x0.shape == x1.shape and x0.dtype == x1.dtype and bool(torch.isfinite(x0).all())
        assert torch.equal(x0, x0_kw), "coupling(x1, idx) and coupling(x1, indices=idx) differ"
        assert {"pre_cost", "post_cost", "swaps"} <= set(a.stats)
        assert float(a.stats["post_cost"]) <= float(a.stats["pre_cost"]) + 1e-6


def test_labels_keep_every_pairing_within_its_class(name, tmp_path):
    c = FACTORIES[name](tmp_path)
    idx, x1 = _batch()
    y = idx % 3
    if name not in TAKES_X0:
        x0, _ = c(x1, idx, labels=y)
        assert x0.shape == x1.shape
        return
    noise = torch.randn(B, *SHAPE, generator=torch.Generator().manual_seed(5))
    x0, _ = c(x1, idx, x0=noise, labels=y)
    assert torch.equal(y[source_rows(x0, noise)], y)


def test_x0_is_paired_by_the_couplings_that_take_noise_and_refused_by_loom(name, tmp_path):
    c = FACTORIES[name](tmp_path)
    idx, x1 = _batch()
    noise = torch.randn(B, *SHAPE, generator=torch.Generator().manual_seed(6))
    if name in TAKES_X0:
        x0, _ = c(x1, idx, x0=noise)
        assert sorted(source_rows(x0, noise).tolist()) == list(range(B))
    else:
        with pytest.raises(ValueError, match="x0 must be None"):
            c(x1, idx, x0=noise)


def test_indices_may_be_left_out_only_by_couplings_without_memory(name, tmp_path):
    c = FACTORIES[name](tmp_path)
    _, x1 = _batch()
    if name in NEEDS_INDICES:
        with pytest.raises(ValueError, match="needs the dataset indices"):
            c(x1)
    else:
        x0, out = c(x1)
        assert out is x1 and x0.shape == x1.shape


def test_noise_in_the_indices_place_is_refused(name, tmp_path):
    # TorchCFM's order coupling(x0, x1) would train the reverse flow: every coupling refuses it
    c = FACTORIES[name](tmp_path)
    _, x1 = _batch()
    with pytest.raises(TypeError, match="indices must be integer.*TorchCFM"):
        c(x1, torch.randn(B, *SHAPE))
    with pytest.raises(ValueError, match=r"indices must have shape \(b,\)"):
        c(x1, torch.arange(B + 1))


def test_state_round_trips(name, tmp_path):
    c = FACTORIES[name](tmp_path)
    idx, x1 = _batch()
    c(x1, idx)
    state = c.state_dict()
    c.load_state_dict(state)
    x0, _ = c(*reversed(_batch(1)))
    assert x0.shape == (B, *SHAPE)


# ---- every Coupling class in the package has the protocol's signature --------------------------------

MODULES = (
    "loom_kernels.couplings",
    "loom_kernels.couplings.prefetch",
    "loom_kernels.train",
    "loom_kernels.train.run",
    "loom_kernels.study",
    "loom_kernels.experiments.study",
    "loom_kernels.testing",
    "loom_kernels.compat.torchcfm",
)


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def _package_couplings():
    for m in MODULES:
        importlib.import_module(m)
    return sorted(
        {c for c in _subclasses(Coupling) if c.__module__.startswith("loom_kernels.")},
        key=lambda c: f"{c.__module__}.{c.__qualname__}",
    )


def test_every_shipped_coupling_is_covered_by_the_protocol_runs(tmp_path):
    covered = set(COVERED_ELSEWHERE)
    for make in FACTORIES.values():
        c = make(tmp_path / str(len(covered)))
        covered.add(type(c))
        if isinstance(c, PrefetchCoupling):
            covered.add(type(c.coupling))
    mine = {c for c in _package_couplings() if c.__module__.startswith("loom_kernels.couplings")} - CHOOSES_BATCHES
    assert mine <= covered, f"add a factory for {sorted(c.__name__ for c in mine - covered)}"


# Couplings owned by work in flight (the trainer's split, issue 24 item 4): strict, so the entry must go
# as soon as the class conforms.
PENDING = {}


def _signature_params():
    for cls in _package_couplings():
        key = f"{cls.__module__}.{cls.__qualname__}"
        marks = [pytest.mark.xfail(strict=True, reason=PENDING[key])] if key in PENDING else []
        yield pytest.param(cls, id=key, marks=marks)


def _protocol_problems(cls) -> list:
    """What in ``cls.__call__``'s signature departs from the protocol's (empty: it conforms)."""
    params = list(inspect.signature(cls.__call__).parameters.values())[1:]  # after self
    P, problems = inspect.Parameter, []
    if len(params) < 2 or [p.name for p in params[:2]] != ["x1", "indices"]:
        return [f"x1, indices first, got {[p.name for p in params[:2]]}"]
    if params[0].kind != P.POSITIONAL_OR_KEYWORD or params[1].kind != P.POSITIONAL_OR_KEYWORD:
        problems.append("x1 and indices may be passed by position or keyword")
    if params[1].default is not None:
        problems.append("indices defaults to None")
    kw = {p.name: p for p in params[2:]}
    defaults = {"x0": None, "labels": None, "cond": None, "return_indices": False}
    for key, default in defaults.items():
        if key not in kw:
            problems.append(f"no keyword {key}")
        elif kw[key].kind != P.KEYWORD_ONLY or kw[key].default is not default:
            problems.append(f"{key} keyword-only with default {default}")
    if not all(p.kind == P.KEYWORD_ONLY and p.default is not P.empty for p in params[2:]):
        problems.append("every parameter after indices keyword-only, with a default")
    return problems


@pytest.mark.parametrize("cls", list(_signature_params()))
def test_every_coupling_class_has_the_protocol_signature(cls):
    assert _protocol_problems(cls) == [], cls


def test_the_signature_check_catches_a_coupling_without_cond_or_return_indices():
    class Old(Coupling):  # the signature before issue 21 (module: this test file, not the package)
        def __call__(self, x1, indices=None, *, x0=None, labels=None):
            return x1, x1

    class Flag(Coupling):
        def __call__(self, x1, indices=None, *, x0=None, labels=None, cond=None, return_indices=None):
            return x1, x1

    assert _protocol_problems(Old) == ["no keyword cond", "no keyword return_indices"]
    assert _protocol_problems(Flag) == ["return_indices keyword-only with default False"]
    assert _protocol_problems(IndependentCoupling) == []


def test_the_three_classes_that_lacked_them_are_checked():
    names = {c.__qualname__ for c in _package_couplings()}
    assert {"FixedNoiseCoupling", "_CallableCoupling", "LargeBatchSinkhorn", "PrefetchCoupling"} <= names


def test_fixed_noise_and_callable_couplings_take_cond_and_return_indices():
    from loom_kernels.train.run import as_coupling

    idx, x1 = _batch()
    fixed = FixedNoiseCoupling(LoomCoupling(N, SHAPE, seed=1))
    x0, _ = fixed(x1, idx)
    x0c, _, perm = fixed(x1, idx, cond=torch.rand(B), labels=idx % 2, return_indices=True)
    assert torch.equal(x0, x0c) and torch.equal(perm, torch.arange(B))  # nothing exchanged
    with pytest.raises(TypeError, match="return_indices must be True or False"):
        fixed(x1, idx, return_indices=1)
    seen = []

    def fn(x1, indices=None, **kw):
        seen.append(sorted(kw))
        return torch.zeros_like(x1), x1

    wrapped = as_coupling(fn)
    wrapped(x1, idx)
    wrapped(x1, idx, cond=torch.rand(B), return_indices=True)
    assert seen == [[], ["cond", "return_indices"]]  # passed on only when given


# ---- ranks that disagree on the scope (issue 23 item 9) ---------------------------------------------------


def _scope_body(rank, scopes):
    import torch.distributed as dist

    torch.manual_seed(rank)
    x1, x0 = torch.randn(B, 4), torch.randn(B, 4)
    out = {}
    for label, pair in scopes.items():
        c = MinibatchOTCoupling(scope=pair[rank], group_size=4)
        try:
            c(x1, x0=x0)
            out[label] = None
        except ValueError as exc:
            out[label] = str(exc)
    # the refusals left no collective behind: a matching coupling still works on both ranks
    c = MinibatchOTCoupling(scope="global")
    x0m, _ = c(x1, x0=x0)
    g = [torch.empty_like(x0m) for _ in range(2)]
    dist.all_gather(g, x0m)
    out["after"] = torch.cat(g)
    return out


def _scope_rank(rank, world, store, out_dir, scopes):
    run_rank(rank, world, store, out_dir, lambda: _scope_body(rank, scopes))


@pytest.mark.distributed
def test_minibatch_ranks_with_different_scopes_raise_on_every_rank(tmp_path):
    scopes = {
        "local/global": ("local", "global"),
        "grouped/local": ("grouped", "local"),
        "local/local": ("local", "local"),
    }
    ranks = spawn(2, tmp_path, _scope_rank, (scopes,))
    for r, res in enumerate(ranks):
        for label in ("local/global", "grouped/local"):
            assert res[label] is not None and "MinibatchOTCoupling differs across ranks (scope)" in res[label], (
                r,
                label,
                res[label],
            )
        assert res["local/local"] is None
    assert torch.equal(ranks[0]["after"], ranks[1]["after"])


def test_prefetch_state_after_close_is_the_wrapped_couplings():
    inner = LoomCoupling(N, SHAPE, num_caches=2, seed=1)
    pre = PrefetchCoupling(inner)
    idx, x1 = _batch()
    pending = pre.submit(x1, idx)
    state = pre.state_dict()  # waits for the pending call
    assert pending.done() and torch.equal(state["seeds"], inner.seeds)
    pre.close()
    pre.load_state_dict(pre.state_dict())
