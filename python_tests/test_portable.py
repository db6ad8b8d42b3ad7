"""The portable CPU build: every instruction-set path of the exact solver gives the same
assignment and of the noise stream the same integers (the normals: bit-identical among the FMA
paths avx2 / avx512, within NORMAL_ATOL of the plain build's), a forced path runs in a fresh
process (what a wheel built here does on an AVX2-only or pre-AVX2 CPU), bad choices are refused,
and the vector code lives only in the per-ISA namespaces of ``_C`` (objdump over its symbol table).

The paths are process-global state of ``_C``; each test restores the one it found.
"""

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from loom_kernels import _native
from loom_kernels.assign import linear_sum_assignment
from loom_kernels.noise import _philox_uint32, gaussian_noise
from loom_kernels.testing import ASSIGN_FAMILIES, assignment_problem

from harness import check_assignment

ALL_ISAS = ("scalar", "avx2", "avx512", "native")
ISAS = _native.cpu_isas()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The FMA builds round the normals' polynomials differently: each path is within ~8.6e-7 of float64
# math for |z| < 6 (3.6e-7 radius, 9e-8 sin/cos; csrc/cpu/philox_cpu.cpp), so two within 2e-6.
NORMAL_ATOL = 2e-6


@pytest.fixture(autouse=True)
def _restore_isa():
    before = _native.cpu_isa()
    yield
    _native.set_cpu_isa(before)


def _on_each_path(fn):
    """``{isa: fn()}`` with each path this build and CPU run forced in turn."""
    out = {}
    for isa in ISAS:
        _native.set_cpu_isa(isa)
        assert _native.cpu_isa() == isa
        out[isa] = fn()
    return out


def _assert_all_equal(results):
    if not results:
        return
    first, *rest = results
    for isa in rest:
        for a, b in zip(results[first], results[isa]):
            np.testing.assert_array_equal(a, b, err_msg=f"{isa} differs from {first}")


# ---- the exact solver ---------------------------------------------------------------------------


def _signed_zeros(n, m, rng):
    # Ties between -0.0 and +0.0 (equal, different bits) everywhere: min/compare lane semantics.
    return rng.choice(np.array([-0.0, 0.0, 1.0]), (n, m))


# Widths around the vector sizes (4 / 8 doubles, 2-4 vectors unrolled) and their tails.
SHAPES = [(1, 1), (3, 7), (7, 3), (8, 8), (15, 17), (31, 33), (33, 31), (64, 64), (40, 127), (100, 257)]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("family", ASSIGN_FAMILIES + ("signed_zeros", "constant"))
def test_solver_paths_agree_and_are_optimal(family, dtype):
    rng = np.random.default_rng([7, ASSIGN_FAMILIES.index(family) if family in ASSIGN_FAMILIES else 99, len(family)])
    for n, m in SHAPES:
        if family == "signed_zeros":
            cost = _signed_zeros(n, m, rng).astype(dtype)
        elif family == "constant":
            cost = np.full((n, m), 0.25, dtype)
        else:
            cost = assignment_problem(family, n, m, rng=rng, dtype=dtype)
        for maximize in (False, True):
            res = _on_each_path(lambda c=cost, mx=maximize: linear_sum_assignment(c, mx, backend="cpu", method="lap"))
            _assert_all_equal(res)
            exact = family in ("int_ties", "signed_zeros", "constant")
            check_assignment(cost, *res[ISAS[0]], maximize=maximize, rtol=0.0 if exact else 1e-9)


def test_solver_paths_agree_on_batches_with_forbidden_and_invalid_entries():
    rng = np.random.default_rng(11)
    cost = assignment_problem("uniform", 48, 70, batch=12, rng=rng)
    cost[rng.random(cost.shape) < 0.3] = np.inf  # forbidden pairs: some problems turn infeasible
    cost[3, 5, 9] = np.nan
    cost[4, 0, :] = np.inf  # a row with no finite entry
    raw = _native.cpu().solve_lap
    res = _on_each_path(lambda: raw(np.ascontiguousarray(cost), False, 2))
    _assert_all_equal(res)
    status = res[ISAS[0]][1]
    assert status[3] == 2 and status[4] == 1 and (status == 0).sum() >= 6, status  # invalid, infeasible, ok
    ok = status == 0
    col = res[ISAS[0]][0]
    rows = np.broadcast_to(np.arange(48), col.shape)
    check_assignment(cost[ok], rows[ok], col[ok])


# ---- the noise stream ---------------------------------------------------------------------------


def _assert_normals_agree(results):
    """Bit-identical among the FMA paths; within NORMAL_ATOL (and mostly identical) across."""
    fma = {isa: z for isa, z in results.items() if isa in ("avx2", "avx512")}
    _assert_all_equal({isa: (z,) for isa, z in fma.items()})
    first, *rest = results
    for isa in rest:
        a, b = results[first], results[isa]
        np.testing.assert_allclose(b, a, rtol=0, atol=NORMAL_ATOL, err_msg=f"{isa} vs {first}")
        assert (a == b).mean() > 0.8, (isa, (a == b).mean())  # only the last bits of a few differ


@pytest.mark.parametrize("row_len", [1, 3, 127, 128, 129, 1000, 2**14 + 5])
def test_noise_paths_agree(row_len):
    seeds = np.array([0, 1, -1, 2**40 + 3, -(2**63), 2**63 - 1, 12345], dtype=np.int64)
    mod = _native.cpu()
    res = _on_each_path(
        lambda: (
            mod.philox_uint32(seeds, row_len, 0),
            mod.philox_normal(seeds, row_len, 1),
            mod.philox_normal(seeds, row_len, 2),
        )
    )
    _assert_all_equal({isa: r[:1] for isa, r in res.items()})  # the words: identical everywhere
    _assert_normals_agree({isa: r[1] for isa, r in res.items()})
    for _words, one, two in res.values():
        assert np.array_equal(one, two) and np.isfinite(one).all()  # threads never change the result


def test_noise_paths_agree_through_the_public_api():
    seeds = torch.randint(-(2**63), 2**63 - 1, (64,), generator=torch.Generator().manual_seed(3))
    res = _on_each_path(lambda: (gaussian_noise(seeds, (3, 8, 8)).numpy(), _philox_uint32(seeds, 50).numpy()))
    _assert_all_equal({isa: r[1:] for isa, r in res.items()})
    _assert_normals_agree({isa: r[0] for isa, r in res.items()})


# ---- a forced path in a fresh process: a build from here on a smaller CPU -----------------------

_CHILD = """
import sys, numpy as np, torch
from loom_kernels import _native
from loom_kernels.assign import assign
from loom_kernels.noise import gaussian_noise
from loom_kernels.testing import assignment_problem
cost = assignment_problem("sq_high", 96, 130, batch=3, rng=np.random.default_rng(5))
col = assign(cost, backend="cpu", method="lap")
z = gaussian_noise(torch.arange(9), (3, 17)).numpy()
np.savez(sys.argv[1], isa=_native.cpu_isa(), col=col, z=z)
"""


@pytest.mark.parametrize("isa", ["scalar", "avx2"])
def test_forced_path_in_a_fresh_process(isa, tmp_path):
    if isa not in ISAS:
        pytest.skip(f"this build/CPU has no {isa} path ({ISAS})")
    out = tmp_path / "out.npz"
    env = dict(os.environ, LOOM_CPU_ISA=isa)
    subprocess.run([sys.executable, "-c", _CHILD, str(out)], env=env, check=True, timeout=300, cwd=ROOT)
    got = np.load(out)
    assert str(got["isa"]) == isa
    _native.set_cpu_isa(ISAS[-1])  # the best path here, in this process
    from loom_kernels.assign import assign

    cost = assignment_problem("sq_high", 96, 130, batch=3, rng=np.random.default_rng(5))
    np.testing.assert_array_equal(got["col"], assign(cost, backend="cpu", method="lap"))
    np.testing.assert_allclose(got["z"], gaussian_noise(torch.arange(9), (3, 17)).numpy(), rtol=0, atol=NORMAL_ATOL)


def test_bad_environment_choice_is_a_clear_error():
    env = dict(os.environ, LOOM_CPU_ISA="avx1024")
    code = "import numpy as np; from loom_kernels.assign import assign; assign(np.eye(3))"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode != 0
    assert "LOOM_CPU_ISA='avx1024'" in r.stderr and "scalar" in r.stderr, r.stderr


@pytest.mark.parametrize("name", ALL_ISAS)
def test_a_path_the_build_or_cpu_lacks_is_refused(name):
    if name in ISAS:
        pytest.skip(f"this build and CPU run {name}")
    with pytest.raises(ValueError, match=f"'{name}' is not available.*run {', '.join(ISAS)}"):
        _native.set_cpu_isa(name)
    assert _native.cpu_isa() in ISAS  # unchanged


def test_set_cpu_isa_bad_names():
    with pytest.raises(ValueError, match="must be auto, scalar, avx2, avx512 or native, got 'AVX2'"):
        _native.set_cpu_isa("AVX2")
    with pytest.raises(TypeError, match="name must be a str"):
        _native.set_cpu_isa(2)
    _native.set_cpu_isa(ISAS[0])
    _native.set_cpu_isa("auto")
    assert _native.cpu_isa() == ISAS[-1]  # the best


# ---- vector instructions only where the dispatch guards them ------------------------------------

_VECTOR = re.compile(r"%[xyz]mm(1[6-9]|2\d|3[01])|%[yz]mm|%k[0-7]")  # ymm/zmm, EVEX-only xmm, masks


def _vector_code_by_function(so):
    dis = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", "-C", so], capture_output=True, text=True, check=True
    ).stdout
    counts, fn = {}, None
    for line in dis.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if head:
            fn = head.group(1)
            continue
        ins = re.match(r"^\s+[0-9a-f]+:\s+(\S+)\s*(.*)$", line)
        # VEX/EVEX mnemonics all start with v (vaddpd, vzeroupper, ...); SSE2 ones never do.
        if ins and fn and (ins.group(1).startswith("v") or _VECTOR.search(ins.group(2))):
            counts[fn] = counts.get(fn, 0) + 1
    return counts


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("objdump") is None, reason="needs objdump")
def test_vector_code_only_in_the_per_isa_namespaces():
    if "avx2" not in ISAS:
        pytest.skip(f"not a portable x86-64 build on an AVX2 CPU ({ISAS})")
    so = _native.cpu().__file__
    counts = _vector_code_by_function(so)
    if (
        not any("loom::" in f for f in counts)
        and "loom::" not in subprocess.run(["nm", "-C", so], capture_output=True, text=True).stdout
    ):
        pytest.skip("_C was stripped of its symbol table")
    guarded = [f for f in counts if re.search(r"loom::isa_avx(2|512)::", f)]
    assert any("isa_avx512::" in f for f in guarded) and any("isa_avx2::" in f for f in guarded), guarded
    outside = {f: n for f, n in counts.items() if f not in guarded}
    assert not outside, f"AVX instructions outside the dispatched code (would crash on an older CPU): {outside}"
