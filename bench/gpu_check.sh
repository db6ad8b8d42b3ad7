#!/usr/bin/env bash
# The GPU check, in one call on a GPU machine without internet (H100/H200), in at most 7 minutes
# so that a 15-minute loan can run it twice:
#   build with the machine's own torch/triton, run the CUDA tests, run every GPU benchmark
#   (every bench/bench_*.py, -m cuda), and print one table with every target of bench/RESULTS.md.
# Each stage gets what is left of a global deadline (CHECK_SECONDS, default 400 s), so a slow or
# hung stage cannot push the whole past 7 minutes, and a failing stage still leaves the others'
# results. Benchmarks whose peer package is missing (torchcfm, flow_matching, torchdiffeq, POT,
# lapx) skip, and their targets say "not run".
# Exit status: non-zero when the build fails, when the CUDA module does not load, or when the CUDA tests
# fail (or run none: python_tests/gpu_gate.py); the benchmarks still run after failed tests.
# Usage: bash bench/gpu_check.sh      (results under $OUT, default ./out)
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=${OUT:-$root/out}
mkdir -p "$out"
py=${PYTHON:-python3}
start=$(date +%s)
deadline=$((start + ${CHECK_SECONDS:-400}))
stage() { echo; echo "=== $1 ($(date +%T), $(( $(date +%s) - start )) s in)"; }
# seconds for a stage: its own cap, but never past the deadline minus what later stages reserve
budget() {
  local cap=$1 left
  left=$(( deadline - $2 - $(date +%s) ))
  (( left < cap )) && cap=$left
  (( cap < 10 )) && cap=10
  echo "$cap"
}

stage "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | tee "$out/gpu.txt"
$py -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
nproc

stage "build (sm_90 only on the device to save time)"
LOOM_CUDA=1 LOOM_CUDA_ARCHS=${LOOM_CUDA_ARCHS:-90} MAX_JOBS=$(nproc) CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
  timeout "$(budget 180 200)" $py -m pip install --no-build-isolation --no-deps . \
  >"$out/build.log" 2>&1 || { tail -n 60 "$out/build.log"; echo "BUILD FAILED"; exit 1; }
grep -E "^\[loom_kernels\]|loom_kernels: " "$out/build.log" | head -n 5
# Tests and benches run from /tmp so that the installed package, not the checkout, is imported.
cd /tmp
# A build that "succeeded" without a working CUDA module would only skip the GPU tests: stop here instead.
$py -c "from loom_kernels._native import cuda; n = cuda().device_count(); assert n > 0, n; print('CUDA module OK,', n, 'device(s)')" \
  || { echo "CUDA MODULE BROKEN (built, but does not import or sees no GPU)"; exit 1; }

stage "CUDA tests"
timeout "$(budget ${TEST_SECONDS:-100} 170)" $py -m pytest "$root/python_tests" -m cuda -q -rfEs -p no:cacheprovider \
  --junitxml="$out/cuda_tests.xml" 2>&1 | tee "$out/cuda_tests.log" | tail -n 40
tests_rc=${PIPESTATUS[0]}
echo "cuda tests exit: $tests_rc (124: cut at the stage's time limit; 1 also when no cuda test ran)"

stage "GPU benchmarks (every bench/bench_*.py with cuda cases, one pytest per module)"
# One run per module, each with its own JSON: a slow or hung module loses only its own rows.
# The target modules go first; max-time 0.25 s per benchmark (min 5 rounds) keeps each group
# to a few seconds, the pedantic ones (assign, sampler) fix their own rounds.
rm -f "$out"/bench_*.json
first="assign_cuda cost noise coupling sampler"
mods=$(for m in $first; do [ -f "$root/bench/bench_$m.py" ] && echo "$root/bench/bench_$m.py"; done
       grep -l "mark.cuda" "$root"/bench/bench_*.py)
for f in $(echo "$mods" | awk '!seen[$0]++'); do
  name=$(basename "$f" .py)
  t=$(budget 150 15)
  echo "--- $name (limit ${t} s)"
  timeout "$t" $py -m pytest "$f" -m cuda -q -rfEs -p no:cacheprovider \
    --benchmark-json="$out/$name.json" --benchmark-min-rounds=5 --benchmark-max-time=0.25 \
    --benchmark-warmup=on --benchmark-warmup-iterations=20 --benchmark-columns=median,iqr,rounds \
    >"$out/$name.log" 2>&1
  rc=$?
  tail -n 4 "$out/$name.log"
  echo "$name exit: $rc (5: no cuda case; 124: cut at its time limit)"
done

stage "summary"
$py "$root/tools/summary.py" "$out"/bench_*.json --gpu "$(head -n1 "$out/gpu.txt")" >"$out/groups.md" 2>&1
$py "$root/tools/summary.py" "$out"/bench_*.json --targets --gpu "$(head -n1 "$out/gpu.txt")" | tee "$out/summary.md"
echo "(per-group medians: $out/groups.md; total $(( $(date +%s) - start )) s)"
# The check's status is the CUDA tests' (the benchmarks' own statuses are printed above).
exit "$tests_rc"
