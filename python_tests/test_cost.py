"""loom_kernels.cost.pairwise_cost: the torch CPU path, the Triton kernel (interpreter on CPU,
compiled on CUDA), against a float64 explicit-difference reference with per-entry tolerances."""

import pytest
import torch

from loom_kernels import _triton
from loom_kernels.cost import pairwise_cost
from loom_kernels.testing import pairwise_cost_ref

from harness import pairwise_cost_atol
from kernel_paths import BACKENDS, needs_interpreter, on

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _check(out, x, y, metric, eps=2.0**-24):
    """``out`` against the float64 reference computed from the very values the kernel saw."""
    assert out.dtype == torch.float32
    ref = pairwise_cost_ref(x, y, metric)
    assert out.shape == ref.shape
    err = (out.double().cpu() - ref).abs()
    tol = pairwise_cost_atol(x, y, metric, eps=eps)
    bad = err > tol
    assert not bad.any(), f"max err {err.max().item():.3g}, worst err/tol {(err / tol).max().item():.3g}"
    assert (out >= 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", ["sqeuclidean", "euclidean"])
@pytest.mark.parametrize(
    "xs, ys",
    [
        ((5, 3), (7, 3)),  # smaller than every tile
        ((37, 70), (21, 70)),  # ragged in N, M and D
        ((3, 17, 130), (3, 33, 130)),  # batch; D spans several K tiles in the interpreter
        ((1, 1), (1, 1)),
    ],
    ids=["tiny", "ragged", "batch", "one"],
)
def test_matches_reference(backend, dtype, metric, xs, ys):
    x = torch.randn(xs).to(dtype)
    y = (torch.randn(ys) * 2 + 0.5).to(dtype)
    _check(on(backend, pairwise_cost, x, y, metric), x, y, metric)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_batch_and_shared_operand(backend):
    x = torch.randn(4, 9, 40)
    y = torch.randn(11, 40)
    out = on(backend, pairwise_cost, x, y)
    assert out.shape == (4, 9, 11)
    _check(out, x, y.expand(4, -1, -1), "sqeuclidean")
    out2 = on(backend, pairwise_cost, y, x)
    assert out2.shape == (4, 11, 9)
    torch.testing.assert_close(out2, out.transpose(1, 2), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    base_x = torch.randn(50, 3, 8)
    x = base_x.permute(1, 0, 2)[:, ::2]  # (3, 25, 8), strided in every dimension
    y = torch.randn(8, 3, 19).transpose(0, 2).transpose(0, 1)  # (3, 19, 8), last dim strided
    assert not x.is_contiguous() and not y.is_contiguous()
    _check(on(backend, pairwise_cost, x, y), x, y, "sqeuclidean")


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_equals_per_problem(backend):
    x = torch.randn(3, 20, 24)
    y = torch.randn(3, 18, 24)
    out = on(backend, pairwise_cost, x, y)
    for b in range(3):
        torch.testing.assert_close(out[b], on(backend, pairwise_cost, x[b], y[b]), rtol=1e-6, atol=1e-5)


@needs_interpreter
def test_batches_beyond_the_grid_limit_are_split(monkeypatch):
    import loom_kernels.cost as cost

    monkeypatch.setattr(cost, "_MAX_GRID_Z", 2)  # 5 problems -> launches of 2, 2 and 1
    x = torch.randn(5, 6, 8)
    y = torch.randn(7, 8)  # shared operand: stride-0 batch, sliced with the others
    _check(on("triton", pairwise_cost, x, y), x, y.expand(5, -1, -1), "sqeuclidean")


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_offset_and_duplicates(backend):
    # Points far from the origin make the Gram identity cancel; the error must stay within
    # eps * (|x|^2 + |y|^2) and duplicates must give small non-negative costs, never NaN.
    x = 1000.0 + torch.randn(20, 30)
    y = torch.cat([x[:5], 1000.0 + torch.randn(10, 30)])
    for metric in ("sqeuclidean", "euclidean"):
        out = on(backend, pairwise_cost, x, y, metric)
        _check(out, x, y, metric)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_wide_dynamic_range(backend):
    scales = torch.logspace(-3, 3, 16).unsqueeze(1)
    x = torch.randn(16, 12) * scales
    y = torch.randn(16, 12) * scales.flip(0)
    _check(on(backend, pairwise_cost, x, y), x, y, "sqeuclidean")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_inputs_are_not_hidden(backend):
    x = torch.randn(6, 10)
    y = torch.randn(5, 10)
    x[2, 3] = float("nan")
    y[4, 0] = float("inf")
    out = on(backend, pairwise_cost, x, y)
    assert not torch.isfinite(out[2]).any()
    assert not torch.isfinite(out[:, 4]).any()
    keep = torch.ones_like(out, dtype=torch.bool)
    keep[2] = False
    keep[:, 4] = False
    assert torch.isfinite(out[keep]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "xs, ys, expect", [((0, 4), (3, 4), (0, 3)), ((2, 5, 4), (2, 0, 4), (2, 5, 0)), ((0, 5, 4), (0, 3, 4), (0, 5, 3))]
)
def test_empty(backend, xs, ys, expect):
    out = on(backend, pairwise_cost, torch.randn(xs), torch.randn(ys))
    assert out.shape == expect and out.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_features(backend):
    out = on(backend, pairwise_cost, torch.randn(3, 0), torch.randn(4, 0), "euclidean")
    assert torch.equal(out, torch.zeros(3, 4))


def test_float64_input_on_cpu_is_accurate():
    x = torch.randn(30, 50, dtype=torch.float64)
    y = torch.randn(20, 50, dtype=torch.float64)
    out = pairwise_cost(x, y)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), pairwise_cost_ref(x, y), rtol=1e-6, atol=1e-6)


class _KernelSpy:
    """Stands in for ``cost._pairwise_cost_kernel``: records each launch's keyword arguments, then runs it."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            return self.kernel[grid](*args, **kwargs)

        return launch


@needs_interpreter
@pytest.mark.parametrize(
    "dtype, allow_tf32, precision",
    [
        (torch.float32, False, "ieee"),
        (torch.float32, True, "tf32"),
        (torch.float64, False, "ieee"),
        (torch.float16, False, "tf32"),
    ],
)
def test_allow_tf32_reaches_the_kernel(monkeypatch, dtype, allow_tf32, precision):
    # The flag only matters on the kernel (the CPU path ignores it): it must arrive as the dot's precision,
    # for float32 only (float64 is computed as float32; 16-bit operands always take tensor cores).
    import loom_kernels.cost as cost

    spy = _KernelSpy(cost._pairwise_cost_kernel)
    monkeypatch.setattr(cost, "_pairwise_cost_kernel", spy)
    x, y = torch.randn(9, 33).to(dtype), torch.randn(7, 33).to(dtype)
    out = on("triton", pairwise_cost, x, y, allow_tf32=allow_tf32)
    assert [k["INPUT_PRECISION"] for k in spy.launches] == [precision]
    _check(out, x, y, "sqeuclidean", eps=2.0**-11 if allow_tf32 else 2.0**-24)
    # the torch path ignores the flag: full float32 precision against the float64 reference even when
    # allow_tf32 is set (a reduced-precision product would miss this tolerance), torch's own flags untouched
    before = (torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision())
    _check(pairwise_cost(x, y, allow_tf32=allow_tf32), x, y, "sqeuclidean", eps=2.0**-24)
    assert (torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()) == before


@pytest.mark.parametrize(
    "x, y, exc, match",
    [
        (torch.randn(3), torch.randn(3, 3), ValueError, r"x must have shape \(N, D\) or \(B, N, D\), got \(3,\)"),
        (torch.randn(2, 3), torch.randn(1, 2, 3, 4), ValueError, r"y must have shape .* got \(1, 2, 3, 4\)"),
        (torch.randn(2, 3), torch.randn(2, 4), ValueError, "same number of features D"),
        (torch.randn(2, 3, 4), torch.randn(3, 3, 4), ValueError, "same batch size B"),
        (torch.ones(2, 3, dtype=torch.int64), torch.randn(2, 3), TypeError, "x must be float32.*got torch.int64"),
        ([[1.0, 2.0]], torch.randn(2, 2), TypeError, "x must be a torch.Tensor.*got list"),
        (torch.randn(2, 3), torch.randn(2, 3, device="meta"), ValueError, "same device"),
    ],
)
def test_bad_input(x, y, exc, match):
    with pytest.raises(exc, match=match):
        pairwise_cost(x, y)


def test_bad_metric():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="metric must be one of"):
        pairwise_cost(x, x, "cosine")


@pytest.mark.skipif(
    _triton.triton is None or _triton.interpreting(), reason="checks the error raised outside the interpreter"
)
def test_triton_on_cpu_without_interpreter_raises():
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        on("triton", pairwise_cost, torch.randn(2, 3), torch.randn(2, 3))


# ---- compiled kernel on the GPU -----------------------------------------------------------------


@pytest.mark.cuda(triton_only=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", ["sqeuclidean", "euclidean"])
@pytest.mark.parametrize("xs, ys", [((300, 3072), (200, 3072)), ((4, 129, 1000), (4, 77, 1000)), ((3, 5), (2, 5))])
def test_cuda_matches_reference(dtype, metric, xs, ys):
    x = torch.randn(xs, device="cuda").to(dtype)
    y = torch.randn(ys, device="cuda").to(dtype)
    out = pairwise_cost(x, y, metric)
    assert out.device.type == "cuda"
    _check(out, x.cpu(), y.cpu(), metric)


@pytest.mark.cuda(triton_only=True)
def test_cuda_tf32_within_tf32_tolerance():
    x = torch.randn(2, 100, 512, device="cuda")
    y = torch.randn(2, 90, 512, device="cuda")
    _check(pairwise_cost(x, y, allow_tf32=True), x.cpu(), y.cpu(), "sqeuclidean", eps=2.0**-11)


@pytest.mark.cuda(triton_only=True)
def test_cuda_non_contiguous_and_shared_operand():
    x = torch.randn(64, 3, 256, device="cuda").transpose(0, 1)  # (3, 64, 256), strided batch
    y = torch.randn(40, 256, device="cuda")
    out = pairwise_cost(x, y)
    _check(out, x.cpu(), y.cpu().expand(3, -1, -1), "sqeuclidean")


@pytest.mark.cuda(triton_only=True)
def test_cuda_agrees_with_cpu_path():
    x = torch.randn(8, 64, 3072)
    y = torch.randn(8, 64, 3072)
    cpu = pairwise_cost(x, y)
    gpu = pairwise_cost(x.cuda(), y.cuda()).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-5, atol=1e-2)


def test_cpu_paths_work_without_triton(tmp_path):
    # A fresh interpreter where `import triton` fails: both CPU paths must still run, and the
    # Triton path must say what is missing.
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from loom_kernels.cost import pairwise_cost\n"
        "from loom_kernels.noise import gaussian_noise\n"
        "assert pairwise_cost(torch.randn(3, 4), torch.randn(2, 4)).shape == (3, 2)\n"
        "assert gaussian_noise([1, 2], 5).shape == (2, 5)\n"
        "try:\n"
        "    from loom_kernels import _triton; _triton.KERNELS_ON_CPU = True\n"
        "    pairwise_cost(torch.randn(3, 4), torch.randn(2, 4))\n"
        "except RuntimeError as e:\n"
        "    assert 'needs triton' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no error without triton')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
