#!/usr/bin/env bash
# The GPU check, in one call on a GPU machine without internet (H100/H200):
#   build with the machine's own torch/triton, run the CUDA tests, run the GPU benchmarks, and
#   print one summary table. Stages have their own time limits so the whole stays well under
#   10 minutes and a failing stage still leaves the others' results. Usage: bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=${OUT:-$root/out}
mkdir -p "$out"
py=${PYTHON:-python3}
stage() { echo; echo "=== $1 ($(date +%T))"; }

stage "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | tee "$out/gpu.txt"
$py -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

stage "build (sm_90 only on the device to save time)"
LOOM_CUDA=1 LOOM_CUDA_ARCHS=${LOOM_CUDA_ARCHS:-90} timeout 300 $py -m pip install --no-build-isolation --no-deps . \
  >"$out/build.log" 2>&1 || { tail -n 60 "$out/build.log"; echo "BUILD FAILED"; exit 1; }
grep -E "^\[loom_kernels\]" "$out/build.log"
# Tests and benches run from /tmp so that the installed package, not the checkout, is imported.
cd /tmp

stage "CUDA tests"
timeout ${TEST_TIMEOUT:-240} $py -m pytest "$root/python_tests" -m cuda -q -rfEs -p no:cacheprovider \
  --junitxml="$out/cuda_tests.xml" 2>&1 | tee "$out/cuda_tests.log" | tail -n 80
echo "cuda tests exit: ${PIPESTATUS[0]}"

stage "GPU benchmarks"
timeout ${BENCH_TIMEOUT:-240} $py -m pytest "$root/bench" -m cuda -q -p no:cacheprovider \
  --benchmark-json="$out/bench.json" --benchmark-min-rounds=5 --benchmark-max-time=0.5 \
  --benchmark-warmup=on --benchmark-columns=median,iqr,rounds 2>&1 | tee "$out/bench.log" | tail -n 60
echo "bench exit: ${PIPESTATUS[0]}"

stage "summary"
if [ -s "$out/bench.json" ]; then
  $py "$root/bench/summary.py" "$out/bench.json" --gpu "$(head -n1 "$out/gpu.txt")" | tee "$out/summary.md"
else
  echo "no benchmark ran (no GPU, or the bench stage failed: see $out/bench.log)"
fi
