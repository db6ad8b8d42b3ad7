"""Build driver: setup.py -> CMake -> ninja, one native build for both modules.

LOOM_CUDA=auto (default) builds ``loom_kernels._cuda`` when nvcc is found, whether or not a
GPU is present; LOOM_CUDA=0/1 forces the choice. LOOM_CUDA_ARCHS overrides the GPU targets (default:
every architecture the toolkit supports from sm_75 up as machine code, plus PTX for the newest).
LOOM_NATIVE=1 tunes the CPU module for the build machine (-march=native: it may crash with an
illegal instruction elsewhere); the default is a portable build that picks AVX2 / AVX-512 at run time.
"""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _find_nvcc():
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _cuda_decision():
    mode = os.environ.get("LOOM_CUDA", "auto").strip().lower()
    nvcc = _find_nvcc()
    if mode in ("0", "off", "false", "no"):
        return None, "LOOM_CUDA=0: CUDA module disabled"
    if mode in ("1", "on", "true", "yes"):
        if nvcc is None:
            raise RuntimeError("LOOM_CUDA=1 but nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
        return nvcc, f"LOOM_CUDA=1: building the CUDA module with {nvcc}"
    if mode != "auto":
        raise RuntimeError(f"LOOM_CUDA must be auto, 0 or 1, got {mode!r}")
    if nvcc is None:
        return None, "LOOM_CUDA=auto: nvcc not found, building the CPU module only"
    return nvcc, f"LOOM_CUDA=auto: nvcc found at {nvcc}, building the CUDA module too"


def _flag(name):
    value = os.environ.get(name, "0").strip().lower()
    if value not in ("0", "1", "off", "on", "false", "true", "no", "yes", ""):
        raise RuntimeError(f"{name} must be 0 or 1, got {value!r}")
    return value in ("1", "on", "true", "yes")


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    _configured = False

    def build_extension(self, ext):
        # One CMake run builds every module; later extensions only need their file copied.
        if CMakeBuild._configured:
            return
        CMakeBuild._configured = True
        import pybind11

        extdir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        nvcc, why = _cuda_decision()
        print(f"[loom_kernels] {why}", flush=True)
        build_dir = Path(os.environ.get("LOOM_BUILD_DIR", Path(self.build_temp) / "cmake")).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = os.environ.get("LOOM_BUILD_TYPE", "Release")
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DLOOM_CUDA={'ON' if nvcc else 'OFF'}",
            # Always passed: CMake's cache would otherwise keep an earlier build's choice.
            f"-DLOOM_NATIVE={'ON' if _flag('LOOM_NATIVE') else 'OFF'}",
        ]
        if nvcc:
            args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
            # Always passed (empty: sm_75 to the toolkit's newest + PTX, see CMakeLists.txt), so a
            # reused build folder never keeps an earlier build's targets.
            args.append(f"-DLOOM_CUDA_ARCHS={os.environ.get('LOOM_CUDA_ARCHS', '').strip()}")
        if shutil.which("ninja"):
            args.append("-GNinja")
        env = dict(os.environ)
        env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        # pip shows this only with -v (its spinner otherwise): say what compiles and roughly for how long.
        print(f"[loom_kernels] compiling: {_plan(nvcc)}", flush=True)
        start = time.monotonic()
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_dir, check=True, env=env)
        subprocess.run(["cmake", "--build", ".", "--config", cfg], cwd=build_dir, check=True, env=env)
        built = sorted(p.name for p in extdir.glob("_*.so"))
        took = time.monotonic() - start
        print(f"[loom_kernels] built {', '.join(built)} into {extdir} in {took:.0f} s", flush=True)


def _plan(nvcc):
    """What the build compiles and its rough time (measured on a 2-core machine; bench/RESULTS.md)."""
    cpu = "the CPU module _C (~1 min on 2 cores)"
    if not nvcc:
        return cpu
    archs = os.environ.get("LOOM_CUDA_ARCHS", "").strip()
    n = len([a for a in archs.replace(";", ",").split(",") if a.strip()]) if archs else 7
    which = f"LOOM_CUDA_ARCHS={archs}" if archs else "sm_75 to the toolkit's newest, 7 with CUDA 13"
    return (
        f"{cpu} and the CUDA module _cuda for {n} GPU architecture(s) ({which}; ~25 s each on 2 cores, "
        f"~{max(1, round(n * 25 / 60))} min; LOOM_CUDA_ARCHS=90 builds one, LOOM_CUDA=0 none)"
    )


# One CMake project produces _C and, when CUDA is on, _cuda; declaring both lets setuptools
# copy both for in-place and editable builds.
_modules = ["loom_kernels._C"] + (["loom_kernels._cuda"] if _cuda_decision()[0] else [])
setup(ext_modules=[CMakeExtension(m) for m in _modules], cmdclass={"build_ext": CMakeBuild})
