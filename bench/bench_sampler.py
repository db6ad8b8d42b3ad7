"""Sampler speed: loom_kernels.sampler.sample against torchdiffeq.odeint (method "euler" or
"midpoint" on the same fixed grid) and against a plain Python loop, 8 model evaluations, for a
small MLP (2-D points, batch 4096) and a small conv net (8x8x1 images, batch 256); on CUDA also
the fused Heun update kernel against torch's two kernels.

    python -m pytest bench/bench_sampler.py -q                       # CPU cases
    python -m pytest bench/bench_sampler.py -q -m cuda               # GPU cases (CUDA graph)

Providers: ``loom`` (sample, cuda_graph="auto": replays a CUDA graph on GPU), ``loom_eager``
(GPU only: cuda_graph=False, fused Triton updates), ``loop`` (x = x + h * model(x, t) in Python),
``torchdiffeq``. Every provider's output is checked against ``loop`` before timing.

Also: ``sample(..., model_kwargs={"y": y})`` against the same conditional MLP with ``y`` fixed on the
module (``no_kwargs``), and ``loom_kernels.compat.flow_matching.ODESolver`` against flow_matching's
own ``ODESolver`` (euler, midpoint; 8 steps of a 3x256 MLP, batch 64 and 4096; skipped when
flow_matching is not installed)::

    OMP_NUM_THREADS=1 python -m pytest bench/bench_sampler.py -q -k "kwargs or flow_matching"
"""

import pytest
import torch

from loom_kernels.sampler import METHODS, clear_graph_cache, sample
from loom_kernels.sampler import update as sampler_update

try:  # optional: the offline GPU machine may lack it; only the torchdiffeq cases need it
    import torchdiffeq
except ImportError:
    torchdiffeq = None


def _torchdiffeq():
    if torchdiffeq is None:
        pytest.skip("torchdiffeq is not installed")
    return torchdiffeq


NFE = 8  # euler: 8 steps; midpoint: 4 steps of 2 evaluations
CASES = {"mlp": 4096, "conv": 256}  # model -> batch


class MLP(torch.nn.Module):
    """2 -> 256 -> 256 -> 2 with the time as a third input."""

    def __init__(self, dim=2, width=256):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(dim + 1, width),
            torch.nn.SiLU(),
            torch.nn.Linear(width, width),
            torch.nn.SiLU(),
            torch.nn.Linear(width, dim),
        )

    def forward(self, x, t):
        return self.net(torch.cat([x, t[:, None]], 1))


class ConvNet(torch.nn.Module):
    """(B, 1, 8, 8) images; the time enters as a constant extra channel."""

    def __init__(self, width=32):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(2, width, 3, padding=1),
            torch.nn.SiLU(),
            torch.nn.Conv2d(width, width, 3, padding=1),
            torch.nn.SiLU(),
            torch.nn.Conv2d(width, 1, 3, padding=1),
        )

    def forward(self, x, t):
        return self.net(torch.cat([x, t[:, None, None, None].expand_as(x)], 1))


def make_problem(case, device):
    """The one problem factory every provider uses: (model, x0)."""
    torch.manual_seed(0)
    batch = CASES[case]
    if case == "mlp":
        model, x0 = MLP(), torch.randn(batch, 2)
    else:
        model, x0 = ConvNet(), torch.randn(batch, 1, 8, 8)
    return model.to(device).eval(), x0.to(device)


def python_loop(model, x0, method="euler", nfe=NFE):
    """The baseline a user would write: x = x + h * v, one new tensor per operation."""
    steps = nfe // METHODS[method]
    h = 1.0 / steps
    with torch.no_grad():
        x = x0
        for k in range(steps):
            t = torch.full((x.shape[0],), k * h, device=x.device, dtype=x.dtype)
            if method == "euler":
                x = x + h * model(x, t)
            else:  # midpoint
                x = x + h * model(x + 0.5 * h * model(x, t), t + 0.5 * h)
        return x


def diffeq(model, x0, method="euler", nfe=NFE):
    steps = nfe // METHODS[method]
    grid = torch.linspace(0.0, 1.0, steps + 1, device=x0.device, dtype=x0.dtype)
    with torch.no_grad():
        return _torchdiffeq().odeint(lambda t, x: model(x, t.expand(x.shape[0])), x0, grid, method=method)[-1]


def provider_fn(provider, model, x0, method):
    if provider == "loom":
        return lambda: sample(model, x0, NFE, method=method)
    if provider == "loom_eager":
        return lambda: sample(model, x0, NFE, method=method, cuda_graph=False)
    if provider == "loop":
        return lambda: python_loop(model, x0, method)
    return lambda: diffeq(model, x0, method)


def _check_and_time(benchmark, fn, want, device, rounds, group, tol=2e-4, **extra):
    """Warm ``fn`` up (on CUDA: eager, capture, replay), check it against ``want`` to ``tol``, then time
    it (on CUDA with a synchronize per round) under ``group``, ``extra`` going to extra_info."""
    clear_graph_cache()
    for _ in range(3 if device == "cuda" else 1):
        got = fn()
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    timed = fn
    if device == "cuda":

        def timed():
            fn()
            torch.cuda.synchronize()

    benchmark.group = group
    benchmark.extra_info.update(extra)
    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)


def _run(benchmark, case, method, provider, device):
    model, x0 = make_problem(case, device)
    fn = provider_fn(provider, model, x0, method)
    _check_and_time(
        benchmark,
        fn,
        python_loop(model, x0, method),
        device,
        20 if device == "cuda" else 5,
        f"sampler {method} nfe {NFE}, {case} batch {CASES[case]}, {device}",
        provider=provider,
        nfe=NFE,
        batch=CASES[case],
    )


@pytest.mark.parametrize("provider", ["loom", "loop", "torchdiffeq"])
@pytest.mark.parametrize("method", ["euler", "midpoint"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_sampler_cpu(benchmark, case, method, provider):
    _run(benchmark, case, method, provider, "cpu")


@pytest.mark.cuda
@pytest.mark.parametrize("provider", ["loom", "loom_eager", "loop", "torchdiffeq"])
@pytest.mark.parametrize("method", ["euler", "midpoint"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_sampler_cuda(benchmark, case, method, provider):
    _run(benchmark, case, method, provider, "cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("provider", ["loom", "torch"])
@pytest.mark.parametrize("numel", [8192, 1 << 24])
def test_heun_update_cuda(benchmark, numel, provider):
    """Heun's combine x + a v1 + b v2: one fused Triton kernel against torch's two kernels."""
    x, v1, v2 = (torch.randn(numel, device="cuda") for _ in range(3))
    out = torch.empty_like(x)
    if provider == "loom":

        def fn():
            sampler_update.update(x, v1, v2, 0.25, 0.25, out)
    else:

        def fn():
            torch.add(x, v1, alpha=0.25, out=out).add_(v2, alpha=0.25)

    fn()
    torch.testing.assert_close(out, x + 0.25 * (v1 + v2), rtol=1e-6, atol=1e-6)

    def timed():
        for _ in range(100):
            fn()
        torch.cuda.synchronize()

    benchmark.group = f"heun state update, {numel} floats, cuda (100 launches)"
    benchmark.extra_info.update(provider=provider, numel=numel)
    benchmark.pedantic(timed, rounds=10, iterations=1, warmup_rounds=1)


# ---- model_kwargs, and the flow_matching drop-in ----------------------------------------------------------

KW_BATCH, FM_BATCHES, FM_STEPS = 4096, (64, 4096), 8


class CondMLP(torch.nn.Module):
    """MLP's 2 -> 256 -> 256 -> 2 with a class embedding added to its first layer; ``y`` may be fixed
    on the module (``self.y``) or passed per call."""

    def __init__(self, classes=10, width=256):
        super().__init__()
        self.mlp, self.emb, self.y = MLP(width=width), torch.nn.Embedding(classes, width), None

    def forward(self, x, t, y=None):
        y = self.y if y is None else y
        h = self.mlp.net[0](torch.cat([x, t[:, None]], 1)) + self.emb(y)
        return self.mlp.net[1:](h)


def _kwargs_problem(device):
    torch.manual_seed(0)
    model = CondMLP().to(device).eval()
    return model, torch.randn(KW_BATCH, 2, device=device), torch.randint(0, 10, (KW_BATCH,), device=device)


def _run_kwargs(benchmark, method, provider, device):
    """``sample(model_kwargs={"y": y})`` against the same model with ``y`` fixed on it (no kwargs)."""
    model, x0, y = _kwargs_problem(device)
    if provider == "model_kwargs":

        def fn():
            return sample(model, x0, NFE, method=method, model_kwargs={"y": y})
    else:
        bound = CondMLP().to(device).eval()
        bound.load_state_dict(model.state_dict())
        bound.y = y

        def fn():
            return sample(bound, x0, NFE, method=method)

    _check_and_time(
        benchmark,
        fn,
        python_loop(lambda x, t: model(x, t, y), x0, method),
        device,
        20,
        f"sampler {method} nfe {NFE} with/without model_kwargs, cond-MLP batch {KW_BATCH}, {device}",
        provider=provider,
        nfe=NFE,
        batch=KW_BATCH,
    )


@pytest.mark.parametrize("provider", ["model_kwargs", "no_kwargs"])
@pytest.mark.parametrize("method", ["euler", "midpoint"])
def test_model_kwargs_cpu(benchmark, method, provider):
    _run_kwargs(benchmark, method, provider, "cpu")


@pytest.mark.cuda
@pytest.mark.parametrize("provider", ["no_kwargs", "model_kwargs"])
@pytest.mark.parametrize("method", ["euler", "midpoint"])
def test_model_kwargs_cuda(benchmark, method, provider):
    _run_kwargs(benchmark, method, provider, "cuda")


class MLP3(torch.nn.Module):
    """flow_matching's convention ``model(x=, t=)`` with a 0-dim ``t``: 3 hidden layers of 256, SiLU."""

    def __init__(self, dim=2, width=256):
        super().__init__()
        layers, d = [], dim + 1
        for _ in range(3):
            layers += [torch.nn.Linear(d, width), torch.nn.SiLU()]
            d = width
        self.net = torch.nn.Sequential(*layers, torch.nn.Linear(width, dim))

    def forward(self, x, t):
        return self.net(torch.cat([x, t.reshape(-1, 1).expand(x.shape[0], 1).to(x.dtype)], 1))


def _run_fm(benchmark, batch, method, provider, device):
    fm_solver = pytest.importorskip("flow_matching.solver")
    from loom_kernels.compat import flow_matching as compat

    torch.manual_seed(0)
    model, x0 = MLP3().to(device).eval(), torch.randn(batch, 2, device=device)
    solver = (compat.ODESolver if provider == "loom" else fm_solver.ODESolver)(velocity_model=model)

    def fn():
        return solver.sample(x0, step_size=1.0 / FM_STEPS, method=method)

    want = fm_solver.ODESolver(velocity_model=model).sample(x0, step_size=1.0 / FM_STEPS, method=method)
    _check_and_time(
        benchmark,
        fn,
        want,
        device,
        20,
        f"ODESolver.sample {method}, {FM_STEPS} steps, 3x256 MLP batch {batch}, {device}",
        provider=provider,
        steps=FM_STEPS,
        batch=batch,
    )


@pytest.mark.parametrize("provider", ["loom", "flow_matching"])
@pytest.mark.parametrize("method", ["euler", "midpoint"])
@pytest.mark.parametrize("batch", FM_BATCHES)
def test_flow_matching_solver_cpu(benchmark, batch, method, provider):
    _run_fm(benchmark, batch, method, provider, "cpu")


@pytest.mark.cuda
@pytest.mark.parametrize("provider", ["loom", "flow_matching"])
@pytest.mark.parametrize("method", ["euler", "midpoint"])
@pytest.mark.parametrize("batch", FM_BATCHES)
def test_flow_matching_solver_cuda(benchmark, batch, method, provider):
    _run_fm(benchmark, batch, method, provider, "cuda")


def diffeq_dopri5(model, x0, tol=1e-5):
    grid = torch.tensor([0.0, 1.0], device=x0.device, dtype=x0.dtype)
    with torch.no_grad():
        return _torchdiffeq().odeint(
            lambda t, x: model(x, t.expand(x.shape[0])), x0, grid, method="dopri5", rtol=tol, atol=tol
        )[-1]


def _run_dopri5(benchmark, provider, device):
    model, x0 = make_problem("mlp", device)
    if provider == "loom":

        def fn():
            return sample(model, x0, method="dopri5", rtol=1e-5, atol=1e-5)
    else:

        def fn():
            return diffeq_dopri5(model, x0)

    # Both are adaptive with the same tolerance: they agree to about the tolerance, not to rounding.
    _check_and_time(
        benchmark,
        fn,
        diffeq_dopri5(model, x0),
        device,
        5,
        f"sampler dopri5 rtol=atol=1e-5, mlp batch {CASES['mlp']}, {device}",
        tol=1e-3,
        provider=provider,
    )


@pytest.mark.parametrize("provider", ["loom", "torchdiffeq"])
def test_dopri5_cpu(benchmark, provider):
    _run_dopri5(benchmark, provider, "cpu")


@pytest.mark.cuda
@pytest.mark.parametrize("provider", ["loom", "torchdiffeq"])
def test_dopri5_cuda(benchmark, provider):
    _run_dopri5(benchmark, provider, "cuda")
