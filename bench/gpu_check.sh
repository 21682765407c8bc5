#!/usr/bin/env bash
# One call on a lent GPU machine: build the CUDA extension, run the GPU tests, compute-sanitizer on
# the greedy kernel, and the GPU benchmarks of issues 3 and 5. Everything lands under $OUT
# (logs/, results/); the last lines printed are a short summary.
#
#   bash bench/gpu_check.sh            # from the repository root, with $OUT set
#
# Uses the machine's python3 (the one holding a CUDA torch); installs nothing. Tests needing
# packages that machine lacks (llava-torch, POT) skip or are left out. UNTESTED ON GPU: no GPU
# has been lent to this project yet, so this script has never run end to end.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/otprune_gpu}
mkdir -p "$OUT/logs" "$OUT/results"
PY=${PY:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=()

step() {  # step NAME TIMEOUT_S CMD...: run, log to $OUT/logs/NAME.log, remember the exit status
    local name=$1 limit=$2; shift 2
    echo "== $name"
    timeout "$limit" "$@" >"$OUT/logs/$name.log" 2>&1
    local rc=$?
    tail -n 5 "$OUT/logs/$name.log"
    status+=("$name: exit $rc")
}

nvidia-smi >"$OUT/logs/nvidia-smi.log" 2>&1
step build 300 env OTPRUNE_FORCE_CUDA=1 MAX_JOBS=16 "$PY" setup.py build_ext --inplace
step info 60 "$PY" -m otprune info
step tests 600 "$PY" -m pytest -q -rs -p no:cacheprovider \
    tests/test_cuda_ext.py tests/test_triton_kernels.py tests/test_select_reference.py \
    tests/test_kernel_rows.py tests/test_bad_input.py tests/test_properties.py tests/test_official.py \
    tests/test_hf_llava.py
step memcheck 600 compute-sanitizer --tool memcheck --error-exitcode 9 "$PY" -m bench.sanitize_greedy
step racecheck 600 compute-sanitizer --tool racecheck --error-exitcode 9 "$PY" -m bench.sanitize_greedy
step select 600 "$PY" -m bench select --out "$OUT/results" \
    --B 1 8 32 --N 576 2880 --d 4096 --ratio 0.098 --dtype float16
step e2e 600 "$PY" -m bench e2e --out "$OUT/results" --models llava-1.5-7b llava-1.6-7b

echo "== summary"
printf '%s\n' "${status[@]}"
[ -f "$OUT/results/select.md" ] && grep -E "otprune-(cuda|triton)" "$OUT/results/select.md" | cut -c1-160
exit 0
