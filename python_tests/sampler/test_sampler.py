"""loom_kernels.sampler: accuracy against analytic solutions and a float64 reference, measured
convergence orders, exact NFE counts, time handling, errors, the Triton update kernel under the
interpreter, and (on a GPU) CPU/CUDA agreement and CUDA-graph replay."""

import math
import warnings

import numpy as np
import pytest
import torch

from loom_kernels import _triton, sampler
from loom_kernels.sampler import METHODS, Guidance, Options, clear_graph_cache, sample
from loom_kernels.sampler import field as sampler_field
from loom_kernels.sampler import fixed as sampler_fixed
from loom_kernels.sampler import graphs as sampler_graphs
from loom_kernels.sampler import update as sampler_update
from loom_kernels.testing import ode_reference

from harness import CountingModel, convergence_order, linear_field, time_field
from kernel_paths import needs_interpreter

ALL = sorted(METHODS)
ORDER = {"euler": 1.0, "midpoint": 2.0, "heun": 2.0, "rk4": 4.0}


def cos_field(x, t):
    # dx/dt = cos(t) x  ->  x(t) = x0 exp(sin t - sin t0): time-dependent, so a wrong stage time
    # (midpoint t + h/2, heun t + h) drops the measured order to 1.
    return torch.cos(t).reshape((-1,) + (1,) * (x.ndim - 1)) * x


def cos_exact(x0, t0, t1):
    return x0 * math.exp(math.sin(t1) - math.sin(t0))


def uniform(t0, t1, steps):
    return [t0 + (t1 - t0) * k / steps for k in range(steps + 1)]


# ---- accuracy -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_matches_float64_reference(method, dtype, tol):
    x0 = torch.randn(33, 3, dtype=dtype)
    nfe = 12
    out = sample(cos_field, x0, nfe, method=method)
    ref = ode_reference(cos_field, x0, uniform(0.0, 1.0, nfe // METHODS[method]), method)[-1]
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    assert out.dtype == dtype and out.shape == x0.shape


@pytest.mark.parametrize("method", ALL)
def test_convergence_order(method):
    x0 = torch.randn(16, 2, dtype=torch.float64)
    exact = cos_exact(x0, 0.0, 1.5)
    nfes = [8, 16, 32, 64, 128]
    errors = [(sample(cos_field, x0, n, method=method, t1=1.5) - exact).abs().max().item() for n in nfes]
    order = convergence_order(nfes, errors)
    assert abs(order - ORDER[method]) < 0.12, (method, order, errors)


@pytest.mark.parametrize("method", ALL)
def test_linear_field_converges_to_exp(method):
    model, exact = linear_field(-0.7)
    x0 = torch.randn(8, 4, dtype=torch.float64)
    err = (sample(model, x0, 256, method=method) - exact(x0, 0.0, 1.0)).abs().max().item()
    assert err < (5e-3 if method == "euler" else 3e-5)
    # and the order-1, 2 and 4 errors are the textbook ones for one step of size 1
    one = sample(model, x0, METHODS[method], method=method)
    growth = {"euler": 1 - 0.7, "midpoint": 1 - 0.7 + 0.7**2 / 2, "heun": 1 - 0.7 + 0.7**2 / 2}
    growth["rk4"] = growth["midpoint"] - 0.7**3 / 6 + 0.7**4 / 24
    torch.testing.assert_close(one, x0 * growth[method], rtol=1e-14, atol=1e-14)


def test_time_field_quadratic():
    c = 3.0
    model, exact = time_field(c)
    x0 = torch.randn(5, 2, dtype=torch.float64)
    # second-order methods integrate a linear-in-t velocity exactly
    for method in ("midpoint", "heun"):
        torch.testing.assert_close(sample(model, x0, 6, method=method), exact(x0, 0.0, 1.0), rtol=0, atol=1e-14)
    # euler's left Riemann sum misses exactly c h / 2 (h = 1/steps)
    steps = 5
    torch.testing.assert_close(sample(model, x0, steps), exact(x0, 0.0, 1.0) - c / (2 * steps), rtol=0, atol=1e-14)


@pytest.mark.parametrize("method", ALL)
def test_straight_field_is_exact(method):
    x0 = torch.randn(64, 3)
    x1 = torch.randn(64, 3)
    model = lambda x, t: x1 - x0  # noqa: E731  - the velocity of a known straight coupling
    out = sample(model, x0, METHODS[method], method=method)
    tol = 1e-6 if method == "rk4" else 0  # its weights 1/6, 1/3 round
    torch.testing.assert_close(out, x0 + (x1 - x0), rtol=tol, atol=tol)
    torch.testing.assert_close(sample(model, x0, 8, method=method), x1, rtol=1e-6, atol=1e-6)


def test_image_shaped_and_noncontiguous_input():
    x0 = torch.randn(6, 1, 8, 8).transpose(2, 3)  # non-contiguous
    keep = x0.clone()
    model, exact = linear_field(0.5)
    out = sample(model, x0, 64, method="heun")
    assert out.shape == (6, 1, 8, 8) and out.is_contiguous()
    torch.testing.assert_close(out, exact(x0, 0.0, 1.0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x0, keep, rtol=0, atol=0)  # x0 is never written


def test_backwards_integration_inverts():
    model, exact = linear_field(1.2)
    x0 = torch.randn(10, 2, dtype=torch.float64)
    x1 = sample(model, x0, 64, method="midpoint")
    back = sample(model, x1, 64, method="midpoint", t0=1.0, t1=0.0)
    # midpoint's error is ~1e-4 here; a sign slip in h would be off by O(1)
    torch.testing.assert_close(back, x0, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(back, exact(x1, 1.0, 0.0), rtol=1e-3, atol=1e-3)


def test_empty_batch():
    x0 = torch.zeros(0, 3)
    assert sample(lambda x, t: x, x0, 4, method="heun").shape == (0, 3)


# ---- NFE counts and the t handed to the model ----------------------------------------------------


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("nfe", [2, 4, 10])
@pytest.mark.parametrize("trajectory", [False, True])
def test_exact_nfe(method, nfe, trajectory):
    nfe *= METHODS[method] // 2 or 1  # rk4: 4 per step
    model = CountingModel(lambda x, t: -x)
    sample(model, torch.randn(3, 2), nfe, method=method, return_trajectory=trajectory)
    assert model.calls == nfe


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_t_shape_dtype_and_values(method, dtype):
    model = CountingModel(lambda x, t: torch.zeros_like(x))
    B, nfe, t0, t1 = 7, 8, 0.25, 0.75
    sample(model, torch.randn(B, 2, 3).to(dtype), nfe, method=method, t0=t0, t1=t1)
    for t in model.ts:
        assert t.shape == (B,) and t.dtype == dtype and t.device.type == "cpu"
        assert bool((t == t[0]).all())
    got = [float(t[0]) for t in model.ts]
    g = uniform(t0, t1, nfe // METHODS[method])
    h = g[1] - g[0]
    want = {
        "euler": g[:-1],
        "midpoint": [s for a in g[:-1] for s in (a, a + h / 2)],
        "heun": [s for a, b in zip(g[:-1], g[1:]) for s in (a, b)],
        "rk4": [s for a, b in zip(g[:-1], g[1:]) for s in (a, a + h / 2, a + h / 2, b)],
    }[method]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-3 if dtype == torch.float16 else 1e-7)


def test_time_grid_nonuniform_matches_reference():
    grid = [0.0, 0.05, 0.2, 0.5, 0.9, 1.0]
    x0 = torch.randn(9, 2, dtype=torch.float64)
    for method in ALL:
        nfe = 5 * METHODS[method]
        for g in (grid, torch.tensor(grid), np.asarray(grid, np.float32), torch.tensor(grid, dtype=torch.float32)):
            out = sample(cos_field, x0, nfe, method=method, time_grid=g)
            gref = torch.as_tensor(g, dtype=torch.float64).tolist()
            ref = ode_reference(cos_field, x0, gref, method)[-1]
            torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        model = CountingModel(lambda x, t: -x)
        sample(model, x0, nfe, method=method, time_grid=grid)
        assert model.calls == nfe


def test_time_grid_uniform_equals_default_and_other_interval():
    x0 = torch.randn(4, 3, dtype=torch.float64)
    torch.testing.assert_close(
        sample(cos_field, x0, 8, method="heun", time_grid=torch.linspace(0, 1, 5, dtype=torch.float64)),
        sample(cos_field, x0, 8, method="heun"),
        rtol=1e-14,
        atol=1e-14,
    )
    grid = [0.2, 0.4, 0.9]
    out = sample(cos_field, x0, 2, time_grid=grid, t0=0.2, t1=0.9)
    torch.testing.assert_close(out, ode_reference(cos_field, x0, grid, "euler")[-1], rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("method", ALL)
def test_trajectory(method):
    x0 = torch.randn(5, 2, 2, dtype=torch.float64)
    nfe = 3 * METHODS[method]
    traj = sample(cos_field, x0, nfe, method=method, return_trajectory=True)
    steps = nfe // METHODS[method]
    assert traj.shape == (steps + 1, 5, 2, 2)
    torch.testing.assert_close(traj[0], x0, rtol=0, atol=0)
    torch.testing.assert_close(traj[-1], sample(cos_field, x0, nfe, method=method), rtol=0, atol=0)
    ref = ode_reference(cos_field, x0, uniform(0.0, 1.0, steps), method)
    torch.testing.assert_close(traj, ref, rtol=1e-12, atol=1e-12)


def test_progress_bar_same_result(capsys):
    x0 = torch.randn(4, 2)
    a = sample(cos_field, x0, 4, method="midpoint", progress=True)
    b = sample(cos_field, x0, 4, method="midpoint")
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---- model handling ------------------------------------------------------------------------------


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        self.drop = torch.nn.Dropout(0.5)
        self.seen = []

    def forward(self, x, t):
        self.seen.append((self.training, self.drop.training, torch.is_grad_enabled()))
        return self.drop(self.lin(torch.cat([x, t[:, None]], 1)))


def test_eval_mode_no_grad_and_mode_restored():
    net = _Net()
    net.train()
    net.lin.eval()  # a mixed state must come back as it was
    x0 = torch.randn(8, 2, requires_grad=True)
    out = sample(net, x0, 4, method="heun")
    assert all(s == (False, False, False) for s in net.seen)
    assert net.training and net.drop.training and not net.lin.training
    assert not out.requires_grad
    # eval mode means dropout is off: deterministic
    torch.testing.assert_close(out, sample(net, x0, 4, method="heun"), rtol=0, atol=0)
    net.eval()
    sample(net, x0, 2)
    assert not net.training and not net.drop.training


def test_mode_restored_when_model_raises():
    net = _Net()
    net.train()

    def boom(x, t):
        net(x, t)
        raise KeyError("inside the model")

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x, t):
            return boom(x, t)

    w = Wrapper().train()
    with pytest.raises(KeyError, match="inside the model"):
        sample(w, torch.randn(3, 2), 2)
    assert w.training and net.training and net.drop.training


# ---- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(nfe=0), ValueError, "nfe must be a positive integer"),
        (dict(nfe=-2), ValueError, "nfe must be a positive integer"),
        (dict(nfe=3, method="midpoint"), ValueError, "nfe must be a positive multiple of 2.*midpoint.*got 3"),
        (dict(nfe=5, method="heun"), ValueError, "multiple of 2.*heun"),
        (dict(nfe=4.0), TypeError, "nfe must be an int, got float"),
        (dict(nfe=True), TypeError, "nfe must be an int, got bool"),
        (dict(nfe=4, method="rk5"), ValueError, "method must be one of"),
        (dict(nfe=4, method=None), ValueError, "method must be one of"),
        (dict(nfe=4, t0=0.5, t1=0.5), ValueError, "t0 and t1 must differ"),
        (dict(nfe=4, t1=float("nan")), ValueError, "t1 must be finite"),
        (dict(nfe=4, t0="0"), TypeError, "t0 must be a real number"),
        (dict(nfe=2, time_grid=[0.0, 1.0], t0=0.0), ValueError, "time_grid must be 1-D with nfe/1 \\+ 1 = 3 points"),
        (dict(nfe=4, method="heun", time_grid=[0.0, 0.5, 0.7, 1.0]), ValueError, "3 points.*got shape \\(4,\\)"),
        (dict(nfe=2, time_grid=[[0.0, 0.5, 1.0]]), ValueError, "time_grid must be 1-D"),
        (dict(nfe=2, time_grid=[0.0, 0.7, 0.5, 1.0][:1] + [0.7, 0.5]), ValueError, "strictly increasing"),
        (dict(nfe=2, time_grid=[0.0, 0.0, 1.0]), ValueError, "strictly increasing"),
        (dict(nfe=2, time_grid=[0.0, float("nan"), 1.0]), ValueError, "finite"),
        (dict(nfe=2, time_grid=[0.0, 0.5, 0.9], t1=1.0), ValueError, "from t0=0.0 to t1=1.0.*0.9"),
        (dict(nfe=2, time_grid=[0.1, 0.5, 1.0], t0=0.0), ValueError, "from t0=0.0 to t1=1.0"),
        (dict(nfe=2, time_grid=[0.0, 0.0]), ValueError, "first and last times must differ"),
        (dict(nfe=2, time_grid=[1.0, 0.5, 0.7]), ValueError, "strictly decreasing"),
        (dict(nfe=2, options=dict(info={})), TypeError, "options must be a loom_kernels.sampler.Options"),
        (dict(nfe=2, infos={}), TypeError, "unexpected keyword arguments \\['infos'\\]"),
        (dict(nfe=2, cuda_graph="yes"), ValueError, "cuda_graph must be 'auto', True or False"),
        (dict(nfe=2, cuda_graph=1), ValueError, "cuda_graph must be"),
        (dict(nfe=2, cuda_graph=True), ValueError, "cuda_graph=True needs x0 on a CUDA device, got x0 on cpu"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        sample(lambda x, t: x, torch.randn(4, 2), **kwargs)


def test_bad_model_and_input():
    x0 = torch.randn(4, 2)
    with pytest.raises(TypeError, match="model must be callable"):
        sample(3, x0, 2)
    with pytest.raises(TypeError, match="x0 must be a torch.Tensor"):
        sample(lambda x, t: x, np.zeros((4, 2)), 2)
    with pytest.raises(TypeError, match="x0 must be a floating tensor, got torch.int64"):
        sample(lambda x, t: x, torch.zeros(4, 2, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="0-d"):
        sample(lambda x, t: x, torch.tensor(1.0), 2)
    with pytest.raises(ValueError, match=r"shaped like x \(4, 2\).*got \(4, 1\)"):
        sample(lambda x, t: x[:, :1], x0, 2)
    with pytest.raises(TypeError, match="must return a torch.Tensor, got tuple"):
        sample(lambda x, t: (x,), x0, 2)


# ---- the Triton update kernel, through the interpreter on CPU -----------------------------------


@needs_interpreter
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
@pytest.mark.parametrize("n", [1, 1000, 2500])
def test_update_kernel_interpreter(monkeypatch, dtype, tol, n):
    monkeypatch.setattr(_triton, "KERNELS_ON_CPU", True)
    x = torch.randn(n).to(dtype)
    v1 = torch.randn(n).to(dtype)
    v2 = torch.randn(n).to(dtype)
    ref1 = (x.double() + 0.3 * v1.double()).to(dtype)
    ref2 = (x.double() + 0.3 * v1.double() - 1.7 * v2.double()).to(dtype)
    out = torch.empty_like(x)
    sampler_update.update(x, v1, None, 0.3, 0.0, out)
    torch.testing.assert_close(out, ref1, rtol=tol, atol=tol)
    sampler_update.update(x, v1, v2, 0.3, -1.7, out)
    torch.testing.assert_close(out, ref2, rtol=tol, atol=tol)
    # in place, with the velocity aliasing the state
    y = x.clone()
    sampler_update.update(y, y, None, 0.5, 0.0, y)
    torch.testing.assert_close(y, (1.5 * x.double()).to(dtype), rtol=tol, atol=tol)
    # non-contiguous velocity
    vv = torch.randn(2 * n).to(dtype)[::2]
    sampler_update.update(x, vv, None, 2.0, 0.0, out)
    torch.testing.assert_close(out, (x.double() + 2.0 * vv.double()).to(dtype), rtol=tol, atol=tol)
    _check_update_aliasing(x, v1, tol)


def _check_update_aliasing(x, v, tol):
    """The two-velocity launch when its operands alias the output or are strided (what the sampler's
    stage updates can pass: a model returning its input, a view, a broadcast)."""
    dtype, n = x.dtype, x.numel()
    ref = lambda a, v1, v2: (x.double() + a * v1.double() + 0.5 * v2.double()).to(dtype)  # noqa: E731
    y = x.clone()  # x, v1, v2 and out all one buffer: out = y + 0.25 y + 0.5 y
    sampler_update.update(y, y, y, 0.25, 0.5, y)
    torch.testing.assert_close(y, (1.75 * x.double()).to(dtype), rtol=tol, atol=tol)
    y = x.clone()  # v2 is the output buffer (out written while v2 is read)
    sampler_update.update(x, v, y, 0.25, 0.5, y)
    torch.testing.assert_close(y, ref(0.25, v, x), rtol=tol, atol=tol)
    v2 = torch.randn(n, 2).to(dtype).t()[1]  # strided second velocity
    b = torch.randn(1).to(dtype).expand(n)  # stride 0: a broadcast velocity
    out = torch.empty_like(x)
    sampler_update.update(x, b, v2, 0.25, 0.5, out)
    torch.testing.assert_close(out, ref(0.25, b, v2), rtol=tol, atol=tol)
    assert v2.stride() != (1,) and (n == 1 or b.stride() == (0,))


@needs_interpreter
@pytest.mark.parametrize("method", ALL)
def test_sample_through_triton_matches_torch(monkeypatch, method):
    x0 = torch.randn(40, 3, 5)
    want = sample(cos_field, x0, 4, method=method, return_trajectory=True)
    monkeypatch.setattr(_triton, "KERNELS_ON_CPU", True)
    calls = []
    real = sampler_update._ode_update_kernel

    class Spy:
        def __getitem__(self, grid):
            calls.append(grid)
            return real[grid]

    monkeypatch.setattr(sampler_update, "_ode_update_kernel", Spy())
    got = sample(cos_field, x0, 4, method=method, return_trajectory=True)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # one fused launch per update: euler 4 steps, 2-stage 2x2, rk4 one step of 6
    assert len(calls) == (6 if method == "rk4" else 4)
    # float64 states keep the torch path (Triton would round h to fp32)
    calls.clear()
    sample(cos_field, x0.double(), 4, method=method)
    assert calls == []


@needs_interpreter
@pytest.mark.parametrize("method", ALL)
def test_model_returning_one_tensor_for_every_stage(monkeypatch, method):
    # A model that hands back the same tensor object at each evaluation (a constant field, or one writing
    # into a preallocated output): heun's second stage used to be dropped on the kernel path (x + h/2 c).
    c, x0 = torch.randn(8, 2), torch.randn(8, 2)
    want = x0 + c  # dx/dt = c: every method is exact
    torch.testing.assert_close(sample(lambda x, t: c, x0, 4, method=method), want, rtol=1e-6, atol=1e-6)
    monkeypatch.setattr(_triton, "KERNELS_ON_CPU", True)
    torch.testing.assert_close(sample(lambda x, t: c, x0, 4, method=method), want, rtol=1e-6, atol=1e-6)


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    if sampler_update.triton is None:
        pytest.skip("triton is not installed")
    monkeypatch.setattr(_triton, "KERNELS_ON_CPU", True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        sample(lambda x, t: x, torch.randn(4, 2), 2)


# ---- CUDA ----------------------------------------------------------------------------------------------


def _mlp(device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.l1 = torch.nn.Linear(3, 64)
            self.l2 = torch.nn.Linear(64, 2)
            with torch.no_grad():
                for p in self.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)

        def forward(self, x, t):
            return self.l2(torch.tanh(self.l1(torch.cat([x, t[:, None]], 1))))

    return MLP().to(device, dtype)


@pytest.mark.cuda(triton_only=True)
@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12), (torch.bfloat16, 1e-1)])
def test_cuda_matches_cpu(method, dtype, tol):
    clear_graph_cache()
    net = _mlp("cpu", dtype)
    x0 = torch.randn(513, 2).to(dtype)
    want = sample(net, x0, 8, method=method, return_trajectory=True)
    netc = _mlp("cuda", dtype)
    for graph in (False, True):
        got = sample(netc, x0.cuda(), 8, method=method, return_trajectory=True, cuda_graph=graph)
        assert got.device.type == "cuda" and got.dtype == dtype
        torch.testing.assert_close(got.cpu().float(), want.float(), rtol=tol, atol=tol)


@pytest.mark.cuda(triton_only=True)
@pytest.mark.parametrize("method", ALL)
def test_cuda_graph_replay_matches_eager(method):
    clear_graph_cache()
    net = _mlp("cuda")
    count = CountingModel(net)
    for trajectory in (False, True):
        for _ in range(4):  # auto: eager, capture (2x calls), replay, replay
            x0 = torch.randn(300, 2, device="cuda")
            want = sample(net, x0, 6, method=method, cuda_graph=False, return_trajectory=trajectory)
            got = sample(count, x0, 6, method=method, return_trajectory=trajectory)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # per trajectory flag: eager (6) + warm-up (6) + capture (6), then replays make no Python calls
    assert count.calls == 2 * 18
    assert len(sampler_graphs.DEFAULT_CACHE) == 2


@pytest.mark.cuda(triton_only=True)
def test_cuda_graph_sees_inplace_updates_and_new_models():
    clear_graph_cache()
    net = _mlp("cuda", seed=1)
    x0 = torch.randn(64, 2, device="cuda")
    for _ in range(3):
        sample(net, x0, 4, cuda_graph=True)
    with torch.no_grad():
        net.l2.weight.mul_(-2.0)  # in place: same address, the graph must read the new values
    torch.testing.assert_close(sample(net, x0, 4), sample(net, x0, 4, cuda_graph=False), rtol=1e-6, atol=1e-6)
    net.l2.weight = torch.nn.Parameter(net.l2.weight.detach() * 0.5)  # rebinding: new address
    torch.testing.assert_close(sample(net, x0, 4), sample(net, x0, 4, cuda_graph=False), rtol=1e-6, atol=1e-6)
    other = _mlp("cuda", seed=2)  # a different model must never hit net's graph
    for _ in range(3):
        torch.testing.assert_close(sample(other, x0, 4), sample(other, x0, 4, cuda_graph=False), rtol=1e-6, atol=1e-6)


@pytest.mark.cuda(triton_only=True)
def test_cuda_graph_freed_with_its_model():
    clear_graph_cache()
    net = _mlp("cuda")
    x0 = torch.randn(64, 2, device="cuda")
    sample(net, x0, 4, cuda_graph=True)
    assert len(sampler_graphs.DEFAULT_CACHE) == 1
    del net
    assert len(sampler_graphs.DEFAULT_CACHE) == 0


@pytest.mark.cuda(triton_only=True)
def test_cuda_graph_fallback_for_uncapturable_model():
    clear_graph_cache()
    net = _mlp("cuda")

    def syncing(x, t):
        scale = float(x.abs().max().item() > -1)  # a host sync: cannot be captured
        return scale * net(x, t)

    x0 = torch.randn(64, 2, device="cuda")
    want = sample(net, x0, 4, cuda_graph=False)
    default = torch.cuda.current_stream()
    sampler_graphs.DEFAULT_CACHE.warned = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            torch.testing.assert_close(sample(syncing, x0, 4), want, rtol=1e-6, atol=1e-6)
    assert sum("CUDA-graph capture failed" in str(w.message) for w in caught) == 1
    assert torch.cuda.current_stream() == default  # the capture stream was not left current
    with pytest.raises(RuntimeError, match="could not be captured"):
        sample(syncing, x0, 4, cuda_graph=True)
    assert torch.cuda.current_stream() == default
    torch.testing.assert_close(sample(net, x0, 4, cuda_graph=True), want, rtol=1e-6, atol=1e-6)
    torch.cuda.synchronize()


@pytest.mark.cuda(triton_only=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_update_kernel_cuda(dtype):
    n = 3 * 1024 + 7
    x, v1, v2 = (torch.randn(n, device="cuda").to(dtype) for _ in range(3))
    out = torch.empty_like(x)
    sampler_update.update(x, v1, v2, 0.25, 0.75, out)
    ref = (x.double() + 0.25 * v1.double() + 0.75 * v2.double()).to(dtype)
    tol = 1e-2 if dtype != torch.float32 else 1e-6
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    _check_update_aliasing(x, v1, tol)  # aliasing and strided operands on the compiled kernel


# ---- model_kwargs, guidance and calling conventions ----------------------------------------------


class LabelField(torch.nn.Module):
    """v = W[y] x + b[y] t, with a distinct field per label (the last label is the 'null' class)."""

    num_classes = 3
    null_label = 3

    def __init__(self, dim=2):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.w = torch.nn.Parameter(torch.randn(4, dim, dim, generator=g) * 0.5)
        self.b = torch.nn.Parameter(torch.randn(4, dim, generator=g))
        self.calls = []

    def forward(self, x, t, y, scale=1.0):
        self.calls.append((x.shape[0], y.clone(), scale))
        return scale * (torch.einsum("bij,bj->bi", self.w[y], x) + self.b[y] * t[:, None])


def _euler(field, x0, nfe):
    x, h = x0.clone(), 1.0 / nfe
    for k in range(nfe):
        x = x + h * field(x, torch.full((x.shape[0],), k * h, dtype=x.dtype))
    return x


@pytest.mark.parametrize("w", [0.0, 1.0, 2.5, -0.5])
def test_guidance_formula_and_one_batched_call_per_evaluation(w):
    net = LabelField()
    x0 = torch.randn(5, 2, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1, 0])
    net.double()
    info = {}
    got = sample(net, x0, 6, model_kwargs={"y": y, "scale": 0.7}, guidance=w, info=info)
    assert info["nfe"] == 6 and len(net.calls) == 6  # one call per evaluation, counted as one NFE
    for b, labels, scale in net.calls:
        assert b == 10 and scale == 0.7
        assert labels[:5].tolist() == y.tolist() and labels[5:].tolist() == [3] * 5
    null = torch.full_like(y, 3)
    want = _euler(lambda x, t: (1 - w) * net(x, t, null, 0.7) + w * net(x, t, y, 0.7), x0, 6)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if w == 1.0:  # w = 1 is the conditional model itself
        torch.testing.assert_close(got, sample(net, x0, 6, model_kwargs={"y": y, "scale": 0.7}), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ALL)
def test_model_kwargs_reach_every_call(method):
    net = LabelField().double()
    x0 = torch.randn(4, 2, dtype=torch.float64)
    y = torch.tensor([2, 0, 1, 1])
    got = sample(net, x0, 4, method=method, model_kwargs={"y": y, "scale": 2.0})
    assert len(net.calls) == 4 and all(c[1].tolist() == y.tolist() and c[2] == 2.0 for c in net.calls)
    want = sample(lambda x, t: net(x, t, y, 2.0), x0, 4, method=method)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_signatures_match_the_default_convention():
    net = LabelField().double()
    x0 = torch.randn(4, 2, dtype=torch.float64)
    y = torch.tensor([2, 0, 1, 1])
    want = sample(net, x0, 4, method="heun", model_kwargs={"y": y})
    seen = []

    def tcfm(t, x, y=None):
        seen.append(("torchcfm", tuple(t.shape)))
        return net(x, t, y)

    def tdiffeq(t, x, y):
        seen.append(("torchdiffeq", tuple(t.shape)))
        return net(x, t.expand(x.shape[0]), y)

    def fm(*, x, t, y):
        seen.append(("flow_matching", tuple(t.shape)))
        return net(x, t.expand(x.shape[0]), y)

    for sig, fn in (("torchcfm", tcfm), ("torchdiffeq", tdiffeq), ("flow_matching", fm)):
        got = sample(fn, x0, 4, method="heun", model_kwargs={"y": y}, signature=sig)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert set(seen) == {("torchcfm", (4,)), ("torchdiffeq", ()), ("flow_matching", ())}


def test_torchcfm_unet_runs_unchanged():
    unet = pytest.importorskip("torchcfm.models.unet")  # imports without torchdyn
    model = unet.UNetModel(
        dim=(1, 8, 8),
        num_channels=32,
        num_res_blocks=1,
        num_classes=4,
        class_cond=True,
        attention_resolutions="4",
        channel_mult=(1, 2),
        num_heads=1,
    )
    x0 = torch.randn(3, 1, 8, 8)
    y = torch.tensor([0, 3, 1])
    got = sample(model, x0, 2, signature="torchcfm", model_kwargs={"y": y})
    with torch.no_grad():
        want = x0 + 0.5 * model(torch.zeros(3), x0, y=y)
        want = want + 0.5 * model(torch.full((3,), 0.5), want, y=y)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_kwargs_and_guidance_errors():
    net = LabelField()
    x0 = torch.randn(4, 2)
    y = torch.tensor([0, 1, 2, 1])
    msg = (
        r"calling the model as model\(x, t_B, \*\*kw\) with model_kwargs \['y', 'z'\]"
        r".*unexpected keyword argument 'z'"
    )
    with pytest.raises(TypeError, match=msg):
        sample(net, x0, 2, model_kwargs={"y": y, "z": 1})
    with pytest.raises(ValueError, match=r"labels in \[0, 3\], outside the model's 3 classes"):
        sample(net, x0, 2, model_kwargs={"y": torch.tensor([0, 1, 3, 1])}, guidance=2.0)
    with pytest.raises(ValueError, match=r"labels in \[-1, 2\]"):
        sample(net, x0, 2, model_kwargs={"y": torch.tensor([0, -1, 2, 1])}, guidance=2.0)
    with pytest.raises(ValueError, match=r"must have shape \(4,\)"):
        sample(net, x0, 2, model_kwargs={"y": y[:3]}, guidance=2.0)
    with pytest.raises(TypeError, match="integer tensor, got torch.float32"):
        sample(net, x0, 2, model_kwargs={"y": y.float()}, guidance=2.0)
    with pytest.raises(ValueError, match="guidance needs the class labels"):
        sample(net, x0, 2, guidance=2.0)
    with pytest.raises(ValueError, match="guidance needs null_label"):
        sample(lambda x, t, y: x, x0, 2, model_kwargs={"y": y}, guidance=2.0)
    with pytest.raises(ValueError, match="guidance must be finite"):
        sample(net, x0, 2, model_kwargs={"y": y}, guidance=float("inf"))
    with pytest.raises(ValueError, match="signature must be one of"):
        sample(net, x0, 2, signature="tx")
    with pytest.raises(TypeError, match="model_kwargs must be a dict"):
        sample(net, x0, 2, model_kwargs=[y])
    with pytest.raises(ValueError, match=r"must not contain \['x'\]"):
        sample(net, x0, 2, model_kwargs={"x": x0}, signature="flow_matching")


def test_model_kwargs_take_any_tensor_without_guidance():
    # Labels are only labels when guidance needs them (#21): a continuous condition under the
    # default label key "y", of any dtype and shape, reaches the model untouched.
    class Conditioned(torch.nn.Module):
        num_classes = 3  # a label-range check would refuse these values

        def forward(self, x, t, y):
            return -x * y[:, :1] + t[:, None] * y[:, 1:]

    x0 = torch.randn(4, 2, dtype=torch.float64)
    y = torch.tensor([[0.5, 7.0], [1.5, -2.0], [2.5, 0.25], [-3.0, 9.5]], dtype=torch.float64)
    for method in ("euler", "heun", "dopri5"):
        nfe = None if method == "dopri5" else 8
        got = sample(Conditioned(), x0, nfe, method=method, model_kwargs={"y": y})
        want = sample(lambda x, t: Conditioned()(x, t, y), x0, nfe, method=method)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the bool and the (B,) float forms too, and another key under label_key= is checked only with guidance
    sample(lambda x, t, y: x * y[:, None], x0, 2, model_kwargs={"y": torch.rand(4, dtype=torch.float64)})
    sample(lambda x, t, y: x, x0, 2, model_kwargs={"y": torch.ones(4, dtype=torch.bool)})
    net = LabelField()
    labels = torch.tensor([0, 1, 2, 1])
    with pytest.raises(TypeError, match=r"model_kwargs\['c'\] \(class labels\) must be an integer"):
        sample(
            lambda x, t, c, y: x,
            x0,
            2,
            model_kwargs={"c": labels.float(), "y": labels.float()},
            guidance=2.0,
            label_key="c",
            null_label=3,
        )
    sample(
        lambda x, t, c, y: x,
        x0,
        2,
        model_kwargs={"c": labels, "y": labels.float()},
        guidance=2.0,
        label_key="c",
        null_label=3,
    )
    assert net.num_classes == 3


def test_velocity_hook_sees_every_raw_model_output():
    net = LabelField()
    x0 = torch.randn(4, 2)
    y = torch.tensor([0, 1, 2, 1])
    seen = []
    want = sample(net, x0, 6, method="midpoint", model_kwargs={"y": y}, guidance=2.0)
    got = sample(
        net,
        x0,
        6,
        method="midpoint",
        model_kwargs={"y": y},
        guidance=2.0,
        velocity_hook=lambda v: seen.append(v.clone()),
    )
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert [tuple(v.shape) for v in seen] == [(8, 2)] * 6  # raw: the doubled batch, before guidance
    times, weights = sampler.quadrature("midpoint", 6)
    assert len(times) == len(weights) == 6 and math.isclose(sum(weights), 1.0)
    seen.clear()
    sample(lambda x, t: -x, x0, method="dopri5", velocity_hook=lambda v: seen.append(v))
    assert seen
    with pytest.raises(TypeError, match="velocity_hook must be callable"):
        sample(net, x0, 2, model_kwargs={"y": y}, velocity_hook=1)


# ---- dopri5 -----------------------------------------------------------------------------------------


def test_dopri5_accuracy_follows_the_tolerance_and_nfe_shrinks():
    x0 = torch.randn(32, 3, dtype=torch.float64)
    errors, nfes = [], []
    for tol in (1e-10, 1e-8, 1e-6, 1e-4):
        info = {}
        got = sample(cos_field, x0, method="dopri5", rtol=tol, atol=tol, info=info)
        err = (got - cos_exact(x0, 0.0, 1.0)).abs().max().item()
        errors.append(err)
        nfes.append(info["nfe"])
        assert err < 100 * tol * (1 + x0.abs().max().item())
        assert info["nfe"] == 2 + 6 * (info["steps"] + info["rejected"])  # f0, the initial-step probe, 6 per trial
    assert nfes == sorted(nfes, reverse=True) and nfes[0] > 2 * nfes[-1]
    assert errors[0] < errors[-1]


def test_dopri5_time_grid_trajectory_and_backwards():
    x0 = torch.randn(8, 2, dtype=torch.float64)
    grid = [0.0, 0.2, 0.7, 1.0]
    traj = sample(cos_field, x0, method="dopri5", time_grid=grid, return_trajectory=True, rtol=1e-9, atol=1e-9)
    assert traj.shape == (4, 8, 2)
    for k, t in enumerate(grid):
        torch.testing.assert_close(traj[k], cos_exact(x0, 0.0, t), rtol=1e-7, atol=1e-7)
    back = sample(cos_field, traj[-1], method="dopri5", t0=1.0, t1=0.0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(back, x0, rtol=1e-7, atol=1e-7)


def test_dopri5_matches_torchdiffeq():
    torchdiffeq = pytest.importorskip("torchdiffeq")
    net = _mlp("cpu", torch.float64)
    x0 = torch.randn(64, 2, dtype=torch.float64)
    info = {}
    got = sample(net, x0, method="dopri5", rtol=1e-8, atol=1e-8, info=info)
    calls = []

    def f(t, x):
        calls.append(t)
        return net(x, t.expand(x.shape[0]))

    with torch.no_grad():
        want = torchdiffeq.odeint(
            f, x0, torch.tensor([0.0, 1.0], dtype=torch.float64), method="dopri5", rtol=1e-8, atol=1e-8
        )[-1]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert 0.5 * len(calls) <= info["nfe"] <= 2 * len(calls)  # the same control, within a few steps


def test_dopri5_errors():
    x0 = torch.randn(4, 2)
    with pytest.raises(RuntimeError, match=r"exceed max_nfe=20 .*loosen rtol/atol"):
        sample(cos_field, x0, method="dopri5", rtol=1e-12, atol=1e-12, max_nfe=20)
    with pytest.raises(ValueError, match="nfe must be None for method='dopri5'"):
        sample(cos_field, x0, 8, method="dopri5")
    with pytest.raises(ValueError, match="rtol must be positive"):
        sample(cos_field, x0, method="dopri5", rtol=0.0)
    with pytest.raises(ValueError, match="max_nfe must be an int >= 8"):
        sample(cos_field, x0, method="dopri5", max_nfe=3)
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        sample(lambda x, t: x * float("nan"), x0, method="dopri5")
    with pytest.raises(ValueError, match="strictly increasing"):
        sample(cos_field, x0, method="dopri5", time_grid=[0.0, 0.6, 0.5, 1.0])


# ---- the CUDA-graph key and static inputs (CPU-testable parts) ------------------------------------


def _field(model, kwargs, guidance=None):
    return sampler_field.Field(model, "xt", kwargs, guidance, "y", 3, 4)


def test_graph_key_depends_on_kwargs_layout_not_values():
    net = LabelField()
    x0 = torch.randn(4, 2)
    plan = sampler_fixed.make_plan("euler", 4, 0.0, 1.0, None)
    key = lambda kw, g=None: sampler_graphs._graph_key(_field(net, kw, g), x0, plan, False)  # noqa: E731
    y = torch.tensor([0, 1, 2, 1])
    base = key({"y": y, "scale": 1.0})
    assert base is not None
    assert key({"y": torch.tensor([2, 2, 0, 0]), "scale": 1.0}) == base  # new values: same graph, copied in
    assert key({"y": y[:3], "scale": 1.0}) != base  # new shape
    assert key({"y": y.int(), "scale": 1.0}) != base  # new dtype
    assert key({"y": y, "scale": 2.0}) != base  # a Python value is baked into the graph
    assert key({"y": y, "scale": 1.0}, 2.0) != base  # guidance
    assert key({"y": y, "scale": [1.0]}) is None  # unhashable: never cached


def test_static_inputs_are_owned_and_refreshed():
    x0 = torch.randn(4, 2)
    y = torch.tensor([0, 1, 2, 1])
    plan = sampler_fixed.make_plan("midpoint", 4, 0.0, 1.0, None)
    assert sampler_fixed.alloc(x0, plan, False, {}, 8).times.shape == (4, 8)  # guided: W = 2B rows per call
    bufs = sampler_fixed.alloc(x0, plan, False, {"y": y, "scale": 1.0}, 4, static=True)
    assert bufs.kwargs["y"].data_ptr() != y.data_ptr()
    y2 = torch.tensor([2, 2, 0, 1])
    sampler_graphs._load_inputs(bufs, x0, {"y": y2, "scale": 1.0})
    assert bufs.kwargs["y"].tolist() == y2.tolist() and torch.equal(bufs.input, x0)
    # the loop reads the static copy: eager and graphed paths share _loop
    net = LabelField()
    field = _field(net, {"y": y2, "scale": 1.0})
    with torch.no_grad():
        sampler_fixed.loop(field, bufs, plan)
    assert all(c[1].tolist() == y2.tolist() for c in net.calls)
    torch.testing.assert_close(bufs.output, sample(net, x0, 4, method="midpoint", model_kwargs={"y": y2}))


@pytest.mark.cuda(triton_only=True)
@pytest.mark.parametrize("guidance", [None, 2.0])
def test_cuda_graph_with_kwargs_matches_eager(guidance):
    clear_graph_cache()
    net = LabelField().cuda()
    for _ in range(4):  # eager, capture, replay, replay: new labels each call
        x0 = torch.randn(64, 2, device="cuda")
        y = torch.randint(0, 3, (64,), device="cuda")
        kw = dict(model_kwargs={"y": y}, guidance=guidance)
        want = sample(net, x0, 4, method="heun", cuda_graph=False, **kw)
        torch.testing.assert_close(sample(net, x0, 4, method="heun", **kw), want, rtol=1e-6, atol=1e-6)
    assert len(sampler_graphs.DEFAULT_CACHE) == 1


def test_graph_cache_bookkeeping_without_a_gpu():
    # The cache logic is plain Python: a graph lives while its model does, LRU beyond max_graphs,
    # and "auto" captures only on the second sight of a key.
    import gc

    cache = sampler.GraphCache(max_graphs=2)
    models = [torch.nn.Linear(2, 2) for _ in range(3)]
    for i, m in enumerate(models):
        cache.store(("k", i), sampler_graphs._Graphed(graph=None, bufs=None, model_ref=None), m)
    assert len(cache) == 2 and cache.lookup(("k", 0), models[0]) is None  # evicted first
    assert cache.lookup(("k", 2), models[2]) is not None
    assert cache.lookup(("k", 2), models[1]) is None and len(cache) == 1  # another model: dropped
    cache.store(("k", 1), sampler_graphs._Graphed(graph=None, bufs=None, model_ref=None), models[1])
    del models[1]
    gc.collect()
    assert len(cache) == 0
    assert cache.first_sight("x") and not cache.first_sight("x")
    cache.mark_failed("y")
    cache.clear()
    assert len(cache) == 0 and not cache.seen and not cache.failed


def test_grouped_options_equal_the_legacy_keywords():
    x0 = torch.randn(6, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])

    def model(x, t, c):  # labels under another key than "y"
        return -x * (1.0 + c[:, None].to(x.dtype)) + t[:, None]

    new, old = {}, {}
    a = sample(
        model,
        x0,
        8,
        method="heun",
        time_grid=(0.2, 0.9),
        model_kwargs={"c": y},
        guidance=Guidance(2.0, null_label=3, label_key="c"),
        options=Options(info=new),
    )
    b = sample(
        model, x0, 8, method="heun", t0=0.2, t1=0.9, model_kwargs={"c": y}, guidance=2.0, null_label=3, label_key="c",
        info=old,
    )  # fmt: skip
    assert torch.equal(a, b) and new == old == {"nfe": 8}
    # a two-point time_grid is the interval (here backwards), split into uniform steps
    on_grid = sample(model, x0, 4, time_grid=uniform(0.9, 0.2, 4), model_kwargs={"c": y})
    on_interval = sample(model, x0, 4, time_grid=(0.9, 0.2), model_kwargs={"c": y})
    torch.testing.assert_close(on_interval, on_grid, rtol=1e-13, atol=1e-13)
    with pytest.raises(TypeError, match=r"pass \['null_label'\] inside Guidance"):
        sample(model, x0, 8, model_kwargs={"c": y}, guidance=Guidance(2.0, label_key="c"), null_label=3)
