"""Compile every Triton kernel of the package for real GPU targets, on a machine without a GPU.

The tests run the kernels under ``TRITON_INTERPRET=1``, which never compiles them, so a
``tl.dot`` shape rule, a shared-memory overflow or a register spill would stay invisible until
a GPU is lent. Triton compiles for a named target with the ptxas its wheel ships, no driver
needed; this module does that with the launch settings the launchers themselves pick:

1. ``discover()`` finds every ``@triton.jit`` function in the package's source (AST scan), so
   a new kernel without a case in ``CASES`` is reported, not skipped.
2. Each case runs a launcher on ``device="meta"`` tensors with the kernel replaced by a
   recorder (``_Recorder``): grid, arguments, ``num_warps``/``num_stages`` come from the code.
3. ``specialize`` turns the recorded arguments into what ``JITFunction.run`` would compile
   (Triton's own ``native_specialize_impl``: dtypes, ``== 1`` constants, 16-divisibility).
4. ``compile_case`` calls ``triton.compile`` for ``GPUTarget("cuda", arch, 32)`` and reads
   ptxas's own ``-v`` report (``TRITON_DUMP_PTXAS_LOG``: registers, spill stores/loads) and the
   cubin's stack frame (the wheel's ``cuobjdump -res-usage``). A stack frame alone is no spill:
   libdevice's sin/cos keep a small local array for huge arguments (the noise kernel: 32 B).

Run it alone for a report (TRITON_INTERPRET must be unset: the kernels must be JITFunctions):

    python python_tests/compile_check.py --jobs 2            # markdown table
    python python_tests/compile_check.py --json out.json     # what test_gpu_compile.py checks

A dev tool beside the tests (it reads csrc/ by the checkout's path, which no wheel has); it
compiles the ``loom_kernels`` found on the path (``PYTHONPATH=src`` for a checkout).

Works with triton 3.6-3.9 (``triton.compile`` + ``ASTSource`` + ``GPUTarget`` +
``native_specialize_impl``); ``api_missing()`` names what an other version lacks.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _package_dir() -> Path:
    import importlib.util

    return Path(importlib.util.find_spec("loom_kernels").submodule_search_locations[0]).resolve()


PACKAGE_DIR = _package_dir()  # the loom_kernels being checked (no import: TRITON_INTERPRET must not matter)
ARCHS = (80, 90)
#: per-block limits of the targets: (max dynamic shared memory with opt-in, registers per block)
LIMITS = {80: (166912, 65536), 90: (232448, 65536)}
MAX_REGS_PER_THREAD = 255
#: deliberate, documented spills: {(kernel, case label prefix): reason}. Empty: none allowed.
ALLOWED_SPILLS: dict = {}


# ---- 1. discovery -------------------------------------------------------------------------------


def _is_jit(dec: ast.expr) -> bool:
    """``@triton.jit``, ``@jit``, ``@triton.jit(...)`` (autotune/heuristics wrap one of these)."""
    if isinstance(dec, ast.Call):
        dec = dec.func
    return (isinstance(dec, ast.Attribute) and dec.attr == "jit") or (isinstance(dec, ast.Name) and dec.id == "jit")


def discover_source(source: str, module: str) -> list:
    """``"module:function"`` for every function of ``source`` decorated with a triton jit."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(_is_jit(d) for d in node.decorator_list):
            found.append(f"{module}:{node.name}")
    return found


def discover(package_dir: Path = PACKAGE_DIR) -> list:
    """Every ``@triton.jit`` kernel of the package's modules, as ``"loom_kernels.mod:name"``."""
    found = []
    for path in sorted(package_dir.rglob("*.py")):
        rel = path.relative_to(package_dir.parent).with_suffix("")
        found += discover_source(path.read_text(), ".".join(rel.parts))
    return sorted(found)


# ---- 2. recording the launchers' settings -------------------------------------------------------


class _Recorder:
    """Stands in for a JIT kernel: ``kernel[grid](*args, **kw)`` appends ``(grid, args, kw)``."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kw: self.calls.append((grid, args, kw))


@contextlib.contextmanager
def _recording(module, kernel_name: str, **patches):
    """Replace ``module.<kernel_name>`` by a recorder (and other attributes by ``patches``)."""
    rec = _Recorder(getattr(module, kernel_name))
    saved = {k: getattr(module, k) for k in [kernel_name, *patches]}
    setattr(module, kernel_name, rec)
    for k, v in patches.items():
        setattr(module, k, v)
    try:
        yield rec
    finally:
        for k, v in saved.items():
            setattr(module, k, v)


def _meta(*shape, dtype):
    import torch

    return torch.empty(*shape, device="meta", dtype=dtype)


def _cost_cases():
    """pairwise_cost: every input dtype, D aligned to 16 or not, small and transposed inputs."""
    import torch

    from loom_kernels import cost

    f32, f16, bf16, f64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
    cases = []
    for dtype in (f32, f16, bf16, f64):
        for d in (3072, 2352, 784, 40, 37, 2):  # CIFAR, 28x28x3, MNIST; odd D: rows not 16-aligned
            cases.append(
                (
                    f"{dtype} 64x256x{d}",
                    lambda dt=dtype, d=d: cost._launch(
                        _meta(64, 256, d, dtype=dt), _meta(64, 256, d, dtype=dt), False, False
                    ),
                )
            )
        # a 2-D x shared by a batch (stride-0 batch), tiny sets (16-wide tiles), transposed rows
        cases.append(
            (
                f"{dtype} shared-x 256x3072",
                lambda dt=dtype: cost._launch(
                    _meta(256, 3072, dtype=dt).expand(8, -1, -1), _meta(8, 256, 3072, dtype=dt), True, False
                ),
            )
        )
        cases.append(
            (
                f"{dtype} 4x10x3",
                lambda dt=dtype: cost._launch(_meta(4, 10, 3, dtype=dt), _meta(4, 12, 3, dtype=dt), True, False),
            )
        )
        cases.append(
            (
                f"{dtype} transposed 8x256x37",
                lambda dt=dtype: cost._launch(
                    _meta(8, 37, 256, dtype=dt).transpose(1, 2),
                    _meta(8, 37, 256, dtype=dt).transpose(1, 2),
                    False,
                    False,
                ),
            )
        )
    for d in (3072, 37):
        cases.append(
            (
                f"float32 tf32 64x256x{d}",
                lambda d=d: cost._launch(_meta(64, 256, d, dtype=f32), _meta(64, 256, d, dtype=f32), False, True),
            )
        )
    patches = dict(check_launchable=lambda *a: None, interpreting=lambda: False)
    return cost, "_pairwise_cost_kernel", patches, cases


def _noise_cases():
    """gaussian_noise / _philox_uint32: every output dtype and the raw stream, big and tiny rows."""
    import torch

    from loom_kernels import noise

    cases = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64):
        for n in (3072, 5):
            raw = dtype == torch.int64
            cases.append(
                (
                    f"{dtype} 256x{n}",
                    lambda dt=dtype, n=n, raw=raw: noise._launch(
                        _meta(256, dtype=torch.int64), n, _meta(256, n, dtype=dt), raw
                    ),
                )
            )
    patches = dict(check_launchable=lambda *a: None, interpreting=lambda: False)
    return noise, "_gaussian_noise_kernel", patches, cases


def _sampler_cases():
    """sampler's fused update: every state dtype it takes, one and two velocities."""
    from loom_kernels.sampler import update as sampler_update

    cases = []
    for dtype in sampler_update.TRITON_DTYPES:
        for two in (False, True):

            def run(dt=dtype, two=two):
                x = _meta(4096, 2, dtype=dt)
                v2 = _meta(4096, 2, dtype=dt) if two else None
                sampler_update.update(x, _meta(4096, 2, dtype=dt), v2, 0.1, 0.2, x)

            cases.append((f"{dtype} 4096x2 {'two' if two else 'one'}", run))
    return sampler_update, "_ode_update_kernel", dict(_use_triton=lambda x: True), cases


def _sinkhorn_cases():
    """sinkhorn's streamed LSE and argmax (with and without Gumbel noise): D in one K-tile or
    several, tiny and large sets, a batch, TF32."""
    import torch

    from loom_kernels.sinkhorn import _kernels

    f32, i64 = torch.float32, torch.int64

    def launch(b, n, m, d, mode="lse", tf32=False):
        x, y = _meta(b, n, d, dtype=f32), _meta(b, m, d, dtype=f32)
        u, scale = _meta(b, m, dtype=f32), _meta(b, dtype=f32)
        if mode == "lse":
            return lambda: _kernels.lse(x, y, u, scale, tf32)
        keys = (_meta(b, n, dtype=i64), _meta(m, dtype=i64)) if mode == "sample" else (None, None)
        return lambda: _kernels.argmax(x, y, u, scale, *keys, tf32)

    cases = []
    for mode in ("lse", "sample", "argmax"):
        cases += [
            (f"{mode} {n}x{m}x{d}", launch(1, n, m, d, mode))
            for n, m, d in [(65536, 65536, 64), (4096, 4096, 2), (4096, 4096, 3072), (4096, 4000, 37), (10, 7, 3)]
        ]
        cases += [
            (f"{mode} tf32 4096x4096x64", launch(1, 4096, 4096, 64, mode, True)),
            (f"{mode} batch 64x256x256x100", launch(64, 256, 256, 100, mode)),
        ]
    patches = dict(check_launchable=lambda *a: None, interpreting=lambda: False)
    return _kernels, "_sinkhorn_stream_kernel", patches, cases


def _streamed_cases():
    """the streamed argmin (issue 32): the bench's shapes (b = 256, N = 50,000, D = 784 / 3,072), ragged D,
    every option (condition dot, labels, Gumbel), TF32, one row."""
    import torch

    from loom_kernels.streamed import _kernels

    f32, i64 = torch.float32, torch.int64

    def launch(b, n, d, aux=False, labels=False, gumbel=False, tf32=False):
        z, x, u = _meta(b, d, dtype=f32), _meta(n, d, dtype=f32), _meta(n, dtype=f32)
        a = (_meta(b, 3, dtype=f32), _meta(n, 3, dtype=f32)) if aux else None
        lab = (_meta(b, dtype=i64), _meta(n, dtype=i64)) if labels else None
        keys = _meta(b, dtype=i64) if gumbel else None
        return lambda: _kernels.stream_max(z, x, u, a, lab, keys, 2.0, 0, tf32)

    cases = [(f"{b}x{n}x{d}", launch(b, n, d)) for b, n, d in [(256, 50000, 784), (256, 50000, 3072), (1, 10, 37)]]
    cases += [
        ("all options 256x50000x784", launch(256, 50000, 784, True, True, True)),
        ("tf32 gumbel 256x50000x3072", launch(256, 50000, 3072, gumbel=True, tf32=True)),
    ]
    patches = dict(check_launchable=lambda *a: None, interpreting=lambda: False)
    return _kernels, "_streamed_max_kernel", patches, cases


#: kernel -> function returning (module, kernel attribute, patches, [(label, launch)]).
CASES = {
    "loom_kernels.sinkhorn._kernels:_sinkhorn_stream_kernel": _sinkhorn_cases,
    "loom_kernels.streamed._kernels:_streamed_max_kernel": _streamed_cases,
    "loom_kernels.cost:_pairwise_cost_kernel": _cost_cases,
    "loom_kernels.noise:_gaussian_noise_kernel": _noise_cases,
    "loom_kernels.sampler.update:_ode_update_kernel": _sampler_cases,
}


def record(kernel: str):
    """``[(label, jit_function, args, kwargs)]``: the launches the cases of ``kernel`` make."""
    module, name, patches, cases = CASES[kernel]()
    out = []
    for label, launch in cases:
        with _recording(module, name, **patches) as rec:
            launch()
        if not rec.calls:
            raise AssertionError(f"{kernel} case {label!r} launched nothing")
        out += [(label, rec.kernel, args, kw) for _, args, kw in rec.calls]
    return out


# ---- 3. what JITFunction.run would compile ------------------------------------------------------


def api_missing():
    """None when this triton can compile for a target without a driver, else what it lacks."""
    try:
        import triton  # noqa: F401  (is it installed at all)
        from triton._C.libtriton import native_specialize_impl  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        return f"triton {getattr(sys.modules.get('triton'), '__version__', '?')} lacks {e.name or e}: {e}"
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "TRITON_INTERPRET=1: the kernels are interpreted functions (run in a clean process)"
    return None


def specialize(kernel, args, kwargs):
    """``(signature, constexprs, attrs, options)`` for ``triton.compile``, as the JIT binds them."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    names = [p.name for p in kernel.params]
    bound = dict(zip(names, args))
    bound.update({k: v for k, v in kwargs.items() if k in names})
    options = {k: v for k, v in kwargs.items() if k not in names}
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(kernel.params):
        value = bound[p.name]
        if p.is_constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", value
            continue
        ty, spec = native_specialize_impl(
            CUDABackend, value, p.is_const, not p.do_not_specialize, not p.do_not_specialize_on_alignment
        )[:2]
        if ty == "constexpr":  # an int equal to 1
            signature[p.name], constexprs[p.name] = "constexpr", spec
        else:
            signature[p.name] = ty
            if isinstance(spec, str) and CUDABackend.parse_attr(spec):
                attrs[(i,)] = CUDABackend.parse_attr(spec)
    return signature, constexprs, attrs, options


def _key(kernel_name, arch, spec):
    signature, constexprs, attrs, options = spec
    return json.dumps(
        [
            kernel_name,
            arch,
            signature,
            {k: str(v) for k, v in constexprs.items()},
            sorted((str(k), v) for k, v in attrs.items()),
            sorted(options.items()),
        ]
    )


# ---- 4. compile and read the resources ----------------------------------------------------------


def _tool(name: str):
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(path) if path.is_file() else shutil.which(name)


_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def resources(cubin: bytes) -> dict:
    """Registers per thread and stack frame (spill) bytes of the cubin's one kernel."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        text = subprocess.run(
            [_tool("cuobjdump"), "-res-usage", str(path)], capture_output=True, text=True, check=True
        ).stdout
    m = _RES.findall(text)
    if len(m) != 1:
        raise RuntimeError(f"cuobjdump -res-usage: expected one kernel, got:\n{text}")
    reg, stack, _, local = map(int, m[0])
    return {"regs": reg, "stack": stack, "local": local}


_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas(log: str) -> dict:
    """``{"ptxas_regs", "spill_stores", "spill_loads"}`` over the entries of a ``ptxas -v`` log
    (None where the log has no such line)."""
    spills = [tuple(map(int, m)) for m in _PTXAS_SPILL.findall(log)]
    regs = [int(m) for m in _PTXAS_REGS.findall(log)]
    return {
        "ptxas_regs": max(regs) if regs else None,
        "spill_stores": sum(s for s, _ in spills) if spills else None,
        "spill_loads": sum(ld for _, ld in spills) if spills else None,
    }


def compile_case(kernel, arch: int, spec) -> dict:
    """Compile one specialization for ``sm_<arch>``: shared bytes, registers, spills, or the error."""
    import io

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs, options = spec
    t0 = time.perf_counter()
    log = io.StringIO()
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # the nvidia backend prints ptxas -v to stdout
    try:
        with contextlib.redirect_stdout(log):
            ck = triton.compile(
                ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                target=GPUTarget("cuda", arch, 32),
                options=dict(options),
            )
        res = resources(ck.asm["cubin"])
    except Exception as e:  # a compile error is a result, reported by the caller
        return {"error": f"{type(e).__name__}: {str(e)[-2000:]}", "seconds": time.perf_counter() - t0}
    return {
        "shared": int(ck.metadata.shared),
        "num_warps": int(ck.metadata.num_warps),
        **res,
        **parse_ptxas(log.getvalue()),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def problems(row: dict) -> list:
    """Why a compiled case is not fit for the target (empty when it is)."""
    if "error" in row:
        return [f"compile error: {row['error']}"]
    shared_max, regs_max = LIMITS[row["arch"]]
    out = []
    if row["shared"] > shared_max:
        out.append(f"shared memory {row['shared']} B > {shared_max} B")
    if row["regs"] > MAX_REGS_PER_THREAD or row["regs"] * 32 * row["num_warps"] > regs_max:
        out.append(f"{row['regs']} registers x {32 * row['num_warps']} threads > {regs_max}")
    if row["spill_stores"] is None:  # no ptxas log from this triton: the stack frame is the bound
        spilled, what = row["stack"] or row["local"], f"{row['stack']} B stack frame (no ptxas log)"
    else:
        spilled, what = (
            row["spill_stores"] + row["spill_loads"],
            (f"{row['spill_stores']} B spill stores, {row['spill_loads']} B spill loads"),
        )
    if spilled and not any(row["kernel"] == k and row["cases"][0].startswith(p) for k, p in ALLOWED_SPILLS):
        out.append(f"spills: {what} per thread at {row['regs']} registers")
    return out


def _work(item):
    kernel_name, arch, label_list, spec, control = item
    module, name, _, _ = CASES[kernel_name]()
    kernel = getattr(module, name)
    return {
        "kernel": kernel_name,
        "arch": arch,
        "cases": label_list,
        "control": control,
        "signature": spec[0],
        "constexprs": {k: str(v) for k, v in spec[1].items()},
        "options": spec[3],
        **compile_case(kernel, arch, spec),
    }


def _control():
    """The launch that spilled before the fix (issue 14): 16-bit rows of D=37 with the aligned
    rows' 128x128x64 tile. Compiled beside the cases so a test can show the check sees spills."""
    import torch

    from loom_kernels import cost

    patches = dict(check_launchable=lambda *a: None, interpreting=lambda: False)
    if hasattr(cost, "_rows_aligned"):  # before the fix every launch took the aligned tile
        patches["_rows_aligned"] = lambda t: True
    with _recording(cost, "_pairwise_cost_kernel", **patches) as rec:
        x = _meta(64, 256, 37, dtype=torch.bfloat16)
        cost._launch(x, x, False, False)
    ((_, args, kw),) = rec.calls
    spec = specialize(rec.kernel, args, kw)
    label = "control: pre-fix bf16 64x256x37 at 128x128x64"
    return ("loom_kernels.cost:_pairwise_cost_kernel", 90, [label], spec, True)


def plan(kernels=None, archs=ARCHS, control=False) -> list:
    """The distinct compiles: ``[(kernel, arch, [case labels], spec, is_control)]`` (launches
    that the JIT would compile identically share one entry)."""
    items = {}
    for kernel_name in kernels or sorted(CASES):
        for label, kernel, args, kw in record(kernel_name):
            spec = specialize(kernel, args, kw)
            for arch in archs:
                key = _key(kernel_name, arch, spec)
                items.setdefault(key, (kernel_name, arch, [], spec, False))[2].append(label)
    return list(items.values()) + ([_control()] if control else [])


def run(kernels=None, archs=ARCHS, jobs: int = 1, control: bool = False) -> list:
    """Compile every distinct case (``jobs`` processes) into a fresh cache; one dict per compile."""
    missing = api_missing()
    if missing:
        raise RuntimeError(missing)
    items = plan(kernels, archs, control)
    with tempfile.TemporaryDirectory(prefix="loom-compile-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # no stale hits, nothing left behind
        os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # a cache hit (two equal cases) would print no ptxas log
        if jobs > 1:
            import multiprocessing as mp

            with mp.get_context("fork").Pool(jobs) as pool:
                return pool.map(_work, items, chunksize=1)
        return [_work(item) for item in items]


# ---- the CUDA module: nvcc -Xptxas -v ----------------------------------------------------------

CUDA_SOURCE = "csrc/cuda/auction_cuda.cu"
_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
_PROPS = re.compile(
    r"Function properties for (\S+)\s*\n\s*(\d+) bytes stack frame, (\d+) bytes spill stores, "
    r"(\d+) bytes spill loads"
)


def nvcc_command(nvcc: str, root: Path, arch: int, out: Path) -> list:
    """The CUDA module's device compile for ``sm_<arch>`` (CMakeLists' flags), ptxas reporting."""
    return [
        nvcc,
        "-std=c++17",
        "-O3",
        f"-I{root / 'csrc'}",
        f"-arch=sm_{arch}",
        "-cubin",
        "-Xptxas",
        "-v",
        "-o",
        str(out),
        str(root / CUDA_SOURCE),
    ]


def parse_nvcc_ptxas(log: str) -> dict:
    """``{function: {"regs", "stack", "spill_stores", "spill_loads"}}`` from an ``-Xptxas -v`` log:
    every entry kernel and every function ptxas kept separate (``__noinline__``)."""
    out = {}
    for name, stack, st, ld in _PROPS.findall(log):
        out[name] = {"regs": None, "stack": int(stack), "spill_stores": int(st), "spill_loads": int(ld)}
    # "Used N registers" follows the properties of the entry it belongs to
    for block in re.split(r"(?=ptxas info\s*: Compiling entry function)", log):
        m, regs = _ENTRY.search(block), _PTXAS_REGS.search(block)
        if m and regs and m.group(1) in out:
            out[m.group(1)]["regs"] = int(regs.group(1))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 90 (repeatable)")
    ap.add_argument("--kernel", action="append", help="module:function (repeatable); default every case")
    ap.add_argument("--control", action="store_true", help="also compile the pre-fix spilling cost launch")
    args = ap.parse_args(argv)
    missing = api_missing()
    if missing:  # the test reads this and skips with the reason
        if args.json:
            Path(args.json).write_text(json.dumps({"missing": missing}))
        print(missing)
        return []
    import triton

    t0 = time.perf_counter()
    rows = run(args.kernel, tuple(args.arch or ARCHS), args.jobs, args.control)
    wall = time.perf_counter() - t0
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "triton": triton.__version__,
                    "seconds": wall,
                    "rows": rows,
                    "discovered": discover(),
                    "cases": sorted(CASES),
                },
                indent=1,
            )
        )
    print(f"triton {triton.__version__}, {len(rows)} compiles in {wall:.1f} s\n")
    print("| kernel | sm | cases | warps | stages | shared B | regs | spill st/ld B | problems |")
    print("|---|---|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        p = "; ".join(problems(r)) or "ok"
        print(
            f"| {r['kernel'].split(':')[1]} | {r['arch']} | {', '.join(r['cases'])[:60]} | "
            f"{r['options'].get('num_warps', '')} | {r['options'].get('num_stages', '')} | {r.get('shared', '')} | "
            f"{r.get('regs', '')} | {r.get('spill_stores', '')}/{r.get('spill_loads', '')} | {p[:120]} |"
        )
    return rows


if __name__ == "__main__":
    main()
