"""loom_kernels.noise.gaussian_noise: the Philox4x32-10 stream against Random123's known answers
and a plain-Python reference, CPU vs Triton (interpreter / CUDA) agreement, the pure-function
contract (batch/position independence) and statistical sanity."""

import math

import numpy as np
import pytest
import torch

from loom_kernels import _triton
from loom_kernels.noise import _philox4x32_10, _philox_uint32, gaussian_noise
from loom_kernels.testing import (
    PHILOX4X32_10_KAT,
    noise_stream_ref,
    philox4x32_10_ref,
)

from kernel_paths import BACKENDS, needs_interpreter, on

# Corner seeds: zero, the int64 extremes, -1 (all ones), seeds differing only in the high word.
EDGE_SEEDS = [0, 1, -1, 2**63 - 1, -(2**63), 2**32, 2**32 + 1, 123456789012345]


# ---- the integer stream -------------------------------------------------------------------------


@pytest.mark.parametrize("ctr, key, expect", PHILOX4X32_10_KAT)
def test_philox_known_answers(ctr, key, expect):
    assert philox4x32_10_ref(ctr, key) == expect
    words = _philox4x32_10(*(np.array([v], dtype=np.uint64) for v in (*ctr, *key)))
    assert tuple(int(w[0]) for w in words) == expect


@pytest.mark.parametrize("backend", BACKENDS)
def test_stream_starts_with_the_zero_vector(backend):
    # seed 0, block 0 is counter 0 / key 0: Random123's first known answer.
    got = on(backend, _philox_uint32, [0], 4)[0].tolist()
    assert tuple(got) == PHILOX4X32_10_KAT[0][2]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1, 3, 13, 70])
def test_stream_matches_python_reference(backend, n):
    words = on(backend, _philox_uint32, EDGE_SEEDS, n)
    normals = on(backend, gaussian_noise, EDGE_SEEDS, (n,))
    for i, s in enumerate(EDGE_SEEDS):
        ref_words, ref_normals = noise_stream_ref(s, n)
        assert words[i].tolist() == ref_words
        ref = torch.tensor(ref_normals, dtype=torch.float64)
        torch.testing.assert_close(normals[i].double(), ref, rtol=0, atol=1e-5)


@needs_interpreter
@pytest.mark.parametrize("n", [1, 5, 2051])  # 2051: past one program's block, ragged
def test_triton_kernel_matches_cpu_path(n):
    seeds = torch.randint(-(2**63), 2**63 - 1, (5,), dtype=torch.int64)
    assert torch.equal(on("triton", _philox_uint32, seeds, n), _philox_uint32(seeds, n))
    a = on("triton", gaussian_noise, seeds, (n,))
    b = gaussian_noise(seeds, (n,))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_triton_kernel_output_dtypes(dtype):
    seeds = [3, -7]
    a = on("triton", gaussian_noise, seeds, (2, 9), dtype=dtype)
    assert a.dtype == dtype and a.shape == (2, 2, 9)
    b = gaussian_noise(seeds, (2, 9), dtype=torch.float32)
    tol = {torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float64: 1e-5}[dtype]
    torch.testing.assert_close(a.double(), b.double(), rtol=0, atol=tol)


# ---- pure function of the seed ------------------------------------------------------------------


def test_row_independent_of_batch_and_position():
    seeds = torch.randint(-(2**63), 2**63 - 1, (16,), dtype=torch.int64)
    full = gaussian_noise(seeds, (3, 4, 5))
    perm = torch.randperm(16)
    assert torch.equal(gaussian_noise(seeds[perm], (3, 4, 5)), full[perm])
    assert torch.equal(gaussian_noise(seeds[5:6], (3, 4, 5))[0], full[5])
    # the same seed twice gives the same row twice
    twice = gaussian_noise(torch.stack([seeds[2], seeds[2]]), (3, 4, 5))
    assert torch.equal(twice[0], twice[1])


def test_shape_is_a_prefix_of_the_stream():
    # The row is the stream reshaped: a longer row starts with the shorter one.
    a = gaussian_noise([42], (10,))
    b = gaussian_noise([42], (2, 3, 5))
    assert torch.equal(b.reshape(1, -1)[:, :10], a)


def test_seed_forms_agree():
    ref = gaussian_noise(torch.tensor([5, -1, 2**40]), 8)
    assert torch.equal(gaussian_noise([5, -1, 2**40], 8), ref)
    assert torch.equal(gaussian_noise(np.array([5, -1, 2**40]), 8), ref)
    assert torch.equal(gaussian_noise(np.array([5, 2**64 - 1, 2**40], dtype=np.uint64), 8), ref)  # same 64 bits
    assert torch.equal(gaussian_noise(torch.tensor([5, -1, 2**40]).numpy(), 8), ref)
    assert torch.equal(gaussian_noise(torch.tensor([5], dtype=torch.int32), 8), ref[:1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtype_is_a_cast_of_float32(dtype):
    a = gaussian_noise([1, 2], (3, 7), dtype=dtype)
    assert a.dtype == dtype and a.shape == (2, 3, 7)
    assert torch.equal(a, gaussian_noise([1, 2], (3, 7)).to(dtype))


def test_empty_and_default_device():
    assert gaussian_noise([], (3, 2)).shape == (0, 3, 2)
    assert gaussian_noise([1, 2], (0, 4)).shape == (2, 0, 4)
    assert gaussian_noise([1, 2], ()).shape == (2,)
    assert gaussian_noise(torch.tensor([1]), 3).device.type == "cpu"
    assert _philox_uint32([], 5).shape == (0, 5)


@pytest.mark.parametrize(
    "seeds, shape, kwargs, exc, match",
    [
        ([1.5, 2.0], 3, {}, TypeError, "seeds must hold integers"),
        (torch.tensor([1.0]), 3, {}, TypeError, "seeds must be an integer"),
        (torch.ones(2, 2, dtype=torch.int64), 3, {}, ValueError, r"seeds must be 1-D \(S,\), got shape \(2, 2\)"),
        ([1], (3, -1), {}, ValueError, "non-negative"),
        ([1], "abc", {}, TypeError, "shape must be an int or a sequence of ints"),
        ([1], 3, {"dtype": torch.int32}, TypeError, "dtype must be one of"),
        ([1], 2**35, {}, ValueError, "at most 4 \\* 2\\*\\*32"),
    ],
)
def test_bad_input(seeds, shape, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        gaussian_noise(seeds, shape, **kwargs)


@pytest.mark.skipif(
    _triton.triton is None or _triton.interpreting(), reason="checks the error raised outside the interpreter"
)
def test_triton_on_cpu_without_interpreter_raises():
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        on("triton", gaussian_noise, [1], 4)


# ---- statistics ---------------------------------------------------------------------------------


def _noise_block():
    # Consecutive seeds: the adversarial case for a weak key schedule.
    return gaussian_noise(torch.arange(256), 3072).double()


def test_moments():
    z = _noise_block().flatten()
    n = z.numel()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    skew = (z**3).mean().item()
    kurt = (z**4).mean().item()
    assert abs(skew) < 5 * math.sqrt(15 / n)
    assert abs(kurt - 3) < 5 * math.sqrt(96 / n)
    # tails: P(|z| > 3) = 0.0026998
    p = (z.abs() > 3).double().mean().item()
    assert abs(p - 0.0026998) < 5 * math.sqrt(0.0027 / n)


def test_normality_ks():
    stats = pytest.importorskip("scipy.stats")
    z = _noise_block().flatten()[:200_000].numpy()
    assert stats.kstest(z, "norm").pvalue > 1e-3


def test_independence_across_seeds_and_elements():
    z = _noise_block()  # (256, 3072)
    n_bound = 5 / math.sqrt(z.shape[1])

    def corr(a, b):
        a = a - a.mean(-1, keepdim=True)
        b = b - b.mean(-1, keepdim=True)
        return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))

    # neighbouring seeds (s, s+1): every one of 255 pairs small, and no systematic sign
    c = corr(z[:-1], z[1:])
    assert c.abs().max() < n_bound
    assert abs(c.mean().item()) < 5 / math.sqrt(z.shape[1] * c.numel())
    # neighbouring elements inside a row: every lane of the 4-word block against the next one,
    # the Box-Muller partners (cos, sin) and the same lane in the next block
    blocks = z.reshape(256, -1, 4)
    m = 5 / math.sqrt(blocks.shape[0] * blocks.shape[1])
    for a, b in ((0, 1), (1, 2), (2, 3), (0, 2), (1, 3)):
        assert abs(corr(blocks[..., a].flatten(), blocks[..., b].flatten()).item()) < m
    assert abs(corr(z[:, :-4].flatten(), z[:, 4:].flatten()).item()) < 5 / math.sqrt(z.numel())
    # squares too: Box-Muller partners share the radius, which a wrong mapping would couple
    for a, b in ((0, 1), (2, 3), (1, 2)):
        assert abs(corr(blocks[..., a].flatten() ** 2, blocks[..., b].flatten() ** 2).item()) < m


def test_seeds_differing_in_high_word_are_independent():
    lo = gaussian_noise(torch.arange(64), 4096).double()
    hi = gaussian_noise(torch.arange(64) + 2**32, 4096).double()
    neg = gaussian_noise(-torch.arange(1, 65), 4096).double()
    for other in (hi, neg):
        c = ((lo - lo.mean(1, keepdim=True)) * (other - other.mean(1, keepdim=True))).mean(1)
        assert c.abs().max() < 5 / math.sqrt(4096)


# ---- compiled kernel on the GPU -----------------------------------------------------------------


@pytest.mark.cuda(triton_only=True)
@pytest.mark.parametrize("n", [1, 7, 3072, 4 * 513 + 3])
def test_cuda_integers_bit_identical(n):
    seeds = torch.cat([torch.tensor(EDGE_SEEDS), torch.randint(-(2**63), 2**63 - 1, (200,))])
    gpu = _philox_uint32(seeds.cuda(), n)
    assert gpu.device.type == "cuda"
    assert torch.equal(gpu.cpu(), _philox_uint32(seeds, n))


@pytest.mark.cuda(triton_only=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_cuda_noise_matches_cpu(dtype):
    seeds = torch.randint(-(2**63), 2**63 - 1, (256,))
    gpu = gaussian_noise(seeds.cuda(), (3, 32, 32), dtype=dtype)
    assert gpu.device.type == "cuda" and gpu.dtype == dtype and gpu.shape == (256, 3, 32, 32)
    cpu32 = gaussian_noise(seeds, (3, 32, 32))
    if dtype in (torch.float32, torch.float64):
        torch.testing.assert_close(gpu.double().cpu(), cpu32.double(), rtol=0, atol=1e-5)
    else:  # both round the float32 value: at most one ulp apart where it sits near a tie
        torch.testing.assert_close(
            gpu.cpu().float(), cpu32.to(dtype).float(), rtol=2 * torch.finfo(dtype).eps, atol=1e-5
        )


@pytest.mark.cuda(triton_only=True)
def test_cuda_device_argument_and_seed_device():
    seeds = [1, 2, 3]
    a = gaussian_noise(seeds, 100, device="cuda")
    b = gaussian_noise(torch.tensor(seeds, device="cuda"), 100)
    assert a.device.type == "cuda" and torch.equal(a, b)
    c = gaussian_noise(torch.tensor(seeds, device="cuda"), 100, device="cpu")
    assert c.device.type == "cpu"
    torch.testing.assert_close(a.cpu(), c, rtol=0, atol=1e-5)


# ---- the compiled CPU stream (loom_kernels._C.philox_normal / philox_uint32) -------------------

from loom_kernels.noise import _compiled_cpu, _stream_numpy  # noqa: E402

needs_compiled = pytest.mark.skipif(
    _compiled_cpu() is None, reason="loom_kernels._C is not built (or predates philox_normal): the numpy path serves"
)
# Row lengths around every boundary of the C++ loop: a block (4), a step of 32 counters (128
# elements), a work chunk (16384 elements), and odd lengths that are multiples of none.
RAGGED_LENGTHS = [1, 2, 3, 5, 127, 128, 129, 131, 16384 - 1, 16384 + 13]


def _edge_and_random_seeds(k):
    rnd = torch.randint(-(2**63), 2**63 - 1, (k,), dtype=torch.int64).numpy()
    return np.concatenate([np.array(EDGE_SEEDS, dtype=np.int64), rnd])


def _box_muller_f64(words):
    """float64 normals from the uint32 words (``(S, 4 m)``): the stream's formulas, exact angle."""
    u = ((words.astype(np.int64) >> 8) + 1) / 2.0**24
    b = u.reshape(words.shape[0], -1, 4)
    out = np.empty_like(b)
    for a, t, lane in ((0, 1, 0), (2, 3, 2)):
        r = np.sqrt(-2.0 * np.log(b[..., a]))
        out[..., lane] = r * np.cos(2.0 * np.pi * b[..., t])
        out[..., lane + 1] = r * np.sin(2.0 * np.pi * b[..., t])
    return out.reshape(words.shape)


@needs_compiled
@pytest.mark.parametrize("n", RAGGED_LENGTHS)
def test_compiled_stream_matches_numpy_path(n):
    C = _compiled_cpu()
    seeds = _edge_and_random_seeds(4 if n > 1000 else 24)
    words = C.philox_uint32(seeds, n)
    assert words.dtype == np.uint32 and words.shape == (len(seeds), n)
    ref_words = _stream_numpy(seeds, -(-n // 4), normals=False)[:, :n]
    assert np.array_equal(words, ref_words)  # bit for bit
    z = C.philox_normal(seeds, n)
    assert z.dtype == np.float32 and z.shape == (len(seeds), n)
    ref_z = _stream_numpy(seeds, -(-n // 4), normals=True)[:, :n]
    np.testing.assert_allclose(z, ref_z, rtol=0, atol=1e-5)


@needs_compiled
@pytest.mark.parametrize("n", [1, 3, 131])
def test_compiled_stream_matches_python_reference(n):
    C = _compiled_cpu()
    words, z = C.philox_uint32(np.array(EDGE_SEEDS), n), C.philox_normal(np.array(EDGE_SEEDS), n)
    for i, s in enumerate(EDGE_SEEDS):
        ref_words, ref_normals = noise_stream_ref(s, n)
        assert words[i].tolist() == ref_words
        np.testing.assert_allclose(z[i], ref_normals, rtol=0, atol=1e-5)


@needs_compiled
def test_compiled_normals_accuracy_on_many_words():
    # 1.3M normals against float64 math on the same words, over the whole (0, 1] range of the
    # uniforms. Budget, worst case (radius <= 5.77): the stream's float32 angle fl(2pi_f32 * u)
    # is off the exact 2 pi u by <= 4.2e-7 rad (x 5.77 = 2.4e-6), the radius <= 3.6e-7, the
    # polynomials and the product a few float32 ulps: < 4e-6. Observed max ~1.8e-6.
    C = _compiled_cpu()
    seeds = torch.randint(-(2**63), 2**63 - 1, (64,), dtype=torch.int64).numpy()
    n = 20_000
    z = C.philox_normal(seeds, n).astype(np.float64)
    ref = _box_muller_f64(C.philox_uint32(seeds, n))
    assert np.isfinite(z).all()
    assert np.abs(z - ref).max() < 4e-6


@needs_compiled
def test_compiled_empty_shapes():
    C = _compiled_cpu()
    for seeds, n in ((np.zeros(0, np.int64), 5), (np.array([1, 2]), 0), (np.zeros(0, np.int64), 0)):
        for fn, dt in ((C.philox_normal, np.float32), (C.philox_uint32, np.uint32)):
            out = fn(seeds, n)
            assert out.shape == (len(seeds), n) and out.dtype == dt
    one = C.philox_normal(np.array([-5]), 9)
    assert one.shape == (1, 9)
    np.testing.assert_allclose(one[0], noise_stream_ref(-5, 9)[1], rtol=0, atol=1e-5)


@needs_compiled
@pytest.mark.parametrize("rows, n", [(9, 40_003), (1, 200_001)])  # threads over rows; one long row over chunks
def test_compiled_thread_count_does_not_change_the_stream(rows, n):
    C = _compiled_cpu()
    seeds = torch.randint(-(2**63), 2**63 - 1, (rows,), dtype=torch.int64).numpy()
    z1, w1 = C.philox_normal(seeds, n, 1), C.philox_uint32(seeds, n, 1)
    for threads in (2, 3, 7, 0):
        assert np.array_equal(C.philox_normal(seeds, n, threads), z1)
        assert np.array_equal(C.philox_uint32(seeds, n, threads), w1)
    # the long row's tail against the numpy path (the last chunk, ragged)
    assert np.array_equal(w1[:, -300:], _stream_numpy(seeds, -(-n // 4), normals=False)[:, n - 300 : n])


@needs_compiled
def test_compiled_bad_input():
    C = _compiled_cpu()
    with pytest.raises(ValueError, match="row_len must be in"):
        C.philox_normal(np.array([1]), -1)
    with pytest.raises(ValueError, match="seeds must be a 1-D"):
        C.philox_uint32(np.ones((2, 2), np.int64), 3)


@needs_compiled
def test_public_path_uses_the_compiled_stream(monkeypatch):
    # gaussian_noise on the CPU is the compiled stream, and the numpy fallback gives the same
    import loom_kernels.noise as noise_mod

    seeds = torch.tensor(EDGE_SEEDS)
    fast, fast_words = gaussian_noise(seeds, (3, 7)), _philox_uint32(seeds, 21)
    ref = torch.from_numpy(_compiled_cpu().philox_normal(seeds.numpy(), 21))
    assert torch.equal(fast.reshape(len(EDGE_SEEDS), -1), ref)
    monkeypatch.setattr(noise_mod, "_compiled_cpu", lambda: None)
    calls = []
    numpy_path = noise_mod._stream_numpy
    monkeypatch.setattr(noise_mod, "_stream_numpy", lambda *a: calls.append(a) or numpy_path(*a))
    slow = gaussian_noise(seeds, (3, 7))
    assert len(calls) == 1  # really the other path
    torch.testing.assert_close(slow, fast, rtol=0, atol=1e-5)
    assert torch.equal(_philox_uint32(seeds, 21), fast_words) and len(calls) == 2
    for s, row in zip(EDGE_SEEDS, slow.reshape(len(EDGE_SEEDS), -1)):  # both against the float64 reference
        np.testing.assert_allclose(row.numpy(), noise_stream_ref(s, 21)[1], rtol=0, atol=1e-5)
