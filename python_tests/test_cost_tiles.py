"""pairwise_cost's Triton kernel, in the interpreter, with every tile configuration the GPU launcher picks.

The interpreter normally tiles 64x64x64 (cost._block_config's interpreter branch); here that branch is
bypassed so the kernel runs with the compiled path's choices: 16-bit inputs 128x128x64 (16-aligned rows)
or 128x128x16 (unaligned), float32 64x64x16, and the shrunken 16-wide tiles of small problems. Each runs
the edge cases (NaN/inf propagation, large-offset cancellation, empty inputs) against the float64
reference. What the interpreter cannot show (register pressure, spills, tensor-core rounding) is in
test_gpu_compile.py and the `cuda` tests of test_cost.py.
"""

import pytest
import torch

import loom_kernels.cost as cost
from loom_kernels.cost import pairwise_cost
from loom_kernels.testing import pairwise_cost_ref

from harness import pairwise_cost_atol
from kernel_paths import needs_interpreter, on

pytestmark = needs_interpreter

# (dtype, D, transposed) -> the GPU's tile (BLOCK_N, BLOCK_M, BLOCK_K) for N, M >= 128
GPU_TILES = [
    (torch.float16, 128, False, (128, 128, 64)),  # aligned 16-bit: tensor-core tile
    (torch.bfloat16, 128, False, (128, 128, 64)),
    (torch.float16, 37, False, (128, 128, 16)),  # rows not 16-aligned
    (torch.bfloat16, 64, True, (128, 128, 16)),  # transposed rows
    (torch.float32, 128, False, (64, 64, 16)),  # IEEE fp32 on FMA units
    (torch.float32, 37, False, (64, 64, 16)),  # same tile, one stage
]
IDS = [f"{str(d).split('.')[1]}-D{k}{'-T' if t else ''}" for d, k, t, _ in GPU_TILES]


@pytest.fixture
def gpu_tiles(monkeypatch):
    """The GPU launcher's tile policy inside the interpreter; records each launch's (BLOCK_N, BLOCK_M, BLOCK_K)."""
    policy, seen = cost._block_config, []

    def gpu_policy(n, m, d, dtype, interpret, aligned=True):
        cfg = policy(n, m, d, dtype, False, aligned)
        seen.append(cfg[:3])
        return cfg

    monkeypatch.setattr(cost, "_block_config", gpu_policy)
    return seen


def _points(n, d, dtype, transposed, scale=1.0, offset=0.0):
    x = torch.randn(d, n).T if transposed else torch.randn(n, d)  # transposed: a strided row view
    return (x * scale + offset).to(dtype)


def _check(out, x, y, metric, eps):
    ref = pairwise_cost_ref(x, y, metric)
    err = (out.double() - ref).abs()
    tol = pairwise_cost_atol(x, y, metric, eps=eps)
    assert (err <= tol).all(), f"worst err/tol {(err / tol).max().item():.3g}"


@pytest.mark.parametrize("dtype, d, transposed, tile", GPU_TILES, ids=IDS)
@pytest.mark.parametrize("metric", ["sqeuclidean", "euclidean"])
def test_each_gpu_tile_matches_reference(gpu_tiles, dtype, d, transposed, tile, metric):
    # ragged: 2 x 2 (or 3 x 3) tiles with partial last tiles in N, M and K
    x, y = _points(130, d, dtype, transposed), _points(140, d, dtype, transposed, 2.0, 0.5)
    out = on("triton", pairwise_cost, x, y, metric)
    assert gpu_tiles == [tile]
    _check(out, x, y, metric, 2.0**-24)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize("dtype, d, transposed, tile", GPU_TILES, ids=IDS)
def test_each_gpu_tile_propagates_nan_and_inf(gpu_tiles, dtype, d, transposed, tile):
    x, y = _points(130, d, dtype, transposed), _points(129, d, dtype, transposed)
    x, y = x.clone(), y.clone()
    x[2, d - 1] = float("nan")  # the last K tile: the partial one
    x[127, 0] = float("inf")  # the last row of the first N tile
    y[128, 3] = float("-inf")  # the first row of the second M tile
    out = on("triton", pairwise_cost, x, y)
    assert gpu_tiles == [tile]
    bad_rows, bad_cols = [2, 127], [128]
    for r in bad_rows:
        assert not torch.isfinite(out[r]).any(), r
    assert not torch.isfinite(out[:, 128]).any()
    keep = torch.ones_like(out, dtype=torch.bool)
    keep[bad_rows] = False
    keep[:, bad_cols] = False
    assert torch.isfinite(out[keep]).all()


@pytest.mark.parametrize("dtype, d, transposed, tile", GPU_TILES, ids=IDS)
def test_each_gpu_tile_large_offset_cancellation(gpu_tiles, dtype, d, transposed, tile):
    # far from the origin the Gram identity cancels: the error stays within eps (|x|^2 + |y|^2) and
    # duplicates give small non-negative costs, never NaN (the clamp before the square root)
    offset = 1000.0 if dtype == torch.float32 else 100.0  # 16-bit inputs: within their range at D = 128
    x = _points(130, d, dtype, transposed, offset=offset)
    y = torch.cat([x[:5], _points(130, d, dtype, transposed, offset=offset)])
    for metric in ("sqeuclidean", "euclidean"):
        gpu_tiles.clear()
        out = on("triton", pairwise_cost, x, y, metric)
        assert gpu_tiles == [tile]
        _check(out, x, y, metric, 2.0**-24)
        assert torch.isfinite(out).all() and (out >= 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "xs, ys, expect",
    [
        ((0, 40), (130, 40), (0, 130)),
        ((2, 130, 40), (2, 0, 40), (2, 130, 0)),
        ((0, 5, 16), (0, 3, 16), (0, 5, 3)),
        ((130, 0), (7, 0), (130, 7)),
    ],
)
def test_gpu_tiles_on_empty_inputs(gpu_tiles, dtype, xs, ys, expect):
    x, y = torch.randn(xs).to(dtype), torch.randn(ys).to(dtype)
    out = on("triton", pairwise_cost, x, y, "euclidean")
    assert out.shape == expect and out.dtype == torch.float32
    if xs[-1] == 0:  # no features: every distance is 0, through the kernel (its K loop never runs)
        assert torch.equal(out, torch.zeros(expect)) and len(gpu_tiles) == 1
    else:  # nothing to compute: no launch
        assert gpu_tiles == []


@pytest.mark.parametrize(
    "n, m, d, tile", [(5, 7, 3, (16, 16, 16)), (20, 40, 33, (32, 64, 16)), (100, 9, 300, (64, 16, 16))]
)
def test_small_problems_shrink_the_gpu_tile(gpu_tiles, n, m, d, tile):
    x, y = torch.randn(n, d), torch.randn(m, d)
    out = on("triton", pairwise_cost, x, y)
    assert gpu_tiles == [tile]
    _check(out, x, y, "sqeuclidean", 2.0**-24)
