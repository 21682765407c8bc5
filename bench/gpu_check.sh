#!/usr/bin/env bash
# One short run on a GPU machine (at most 540 s of step time, at most 8 files under $OUT):
#
#   OUT=/some/dir bash bench/gpu_check.sh            # run every step, in this order:
#     build      the CUDA extension (OTPRUNE_FORCE_CUDA=1, pip install -e . with this python3,
#                no index, no build isolation), then `otprune info` (auto's picks)
#     select     the GPU select sweep: B 1/8/32, N 576/2880, d 4096, fp16, ratio 0.098
#     model      the cost model beside the sweep's measurements (model.md)
#     tests      the CUDA and Triton test files with OTPRUNE_REQUIRE_EXT=1
#     memcheck   compute-sanitizer memcheck on the project's kernels (PYTORCH_NO_CUDA_MEMORY_CACHING=1)
#     racecheck  compute-sanitizer racecheck on the project's kernels
#     e2e        the 7B-shaped end-to-end benchmark, only with the time left of the 540 s
#   bash bench/gpu_check.sh --plan      # STEP <name> <cap_s> lines, OUTPUT <file> lines, TOTAL <s>
#   bash bench/gpu_check.sh --dry-run   # the plan's steps with the command each would run
#
# A step that fails or hits its cap does not stop the later ones; compute-sanitizer refusing the
# device ("Device not supported") is reported and the step skipped. Every step appends to
# $OUT/gpu_check.log (also printed); the last lines are a summary. Uses the machine's python3
# ($PY to override) and installs nothing from the network. UNTESTED ON GPU: no GPU has been
# available to this project, so this script has never run there.
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=run
case "${1:-}" in
    --plan) MODE=plan ;;
    --dry-run) MODE=dry ;;
    "") ;;
    *) echo "usage: bash bench/gpu_check.sh [--plan | --dry-run]" >&2; exit 2 ;;
esac
OUT=${OUT:-/tmp/otprune_gpu}
PY=${PY:-python3}
BUDGET=540
LOG="$OUT/gpu_check.log"
export PYTHONUNBUFFERED=1

STEPS=(build select model tests memcheck racecheck e2e)
declare -A CAP=([build]=140 [select]=140 [model]=15 [tests]=110 [memcheck]=45 [racecheck]=45)
used=0
for s in "${STEPS[@]}"; do [ "$s" = e2e ] || used=$((used + CAP[$s])); done
CAP[e2e]=$((BUDGET - used))  # its guaranteed share; at run time it gets whatever is left
OUTPUTS=(gpu_check.log select.csv select.md select.png model.md e2e.csv e2e.md e2e.png)
# CUDA and Triton tests; test_host_sync.py holds the CUDA-graph capture of the sync-free path
GPU_TESTS="tests/test_cuda_ext.py tests/test_triton_kernels.py tests/test_triton_kernel_matrix.py tests/test_host_sync.py"

sanitizer() {  # compute-sanitizer on PATH, beside nvcc, under CUDA_HOME or /usr/local/cuda*
    local c nvcc
    nvcc=$(command -v nvcc 2>/dev/null || true)
    for c in "$(command -v compute-sanitizer 2>/dev/null)" "${nvcc:+$(dirname "$nvcc")/compute-sanitizer}" \
        "${CUDA_HOME:+$CUDA_HOME/bin/compute-sanitizer}" /usr/local/cuda/bin/compute-sanitizer \
        /usr/local/cuda-*/bin/compute-sanitizer; do
        if [ -n "$c" ] && [ -x "$c" ]; then echo "$c"; return; fi
    done
    echo compute-sanitizer
}

cmd() {  # the shell command of step $1
    case $1 in
        build) echo "OTPRUNE_FORCE_CUDA=1 MAX_JOBS=16 $PY -m pip install --no-index --no-build-isolation --no-deps -e . && $PY -m otprune info" ;;
        select) echo "$PY -m bench select --out $OUT --B 1 8 32 --N 576 2880 --d 4096 --ratio 0.098 --dtype float16" ;;
        model) echo "$PY -m bench model --out $OUT --measured $OUT/select.csv" ;;
        tests) echo "OTPRUNE_REQUIRE_EXT=1 $PY -m pytest -q -rs -p no:cacheprovider $GPU_TESTS" ;;
        memcheck) echo "PYTORCH_NO_CUDA_MEMORY_CACHING=1 $(sanitizer) --tool memcheck --error-exitcode 9 $FILTERS $PY -m bench.sanitize_greedy" ;;
        racecheck) echo "$(sanitizer) --tool racecheck --error-exitcode 9 $FILTERS $PY -m bench.sanitize_greedy" ;;
        e2e) echo "$PY -m bench e2e --out $OUT --models llava-1.5-7b" ;;
    esac
}

total=0
for s in "${STEPS[@]}"; do total=$((total + CAP[$s])); done
if [ "$MODE" = plan ]; then
    for s in "${STEPS[@]}"; do echo "STEP $s ${CAP[$s]}"; done
    for f in "${OUTPUTS[@]}"; do echo "OUTPUT $f"; done
    echo "TOTAL $total"
    exit 0
fi
FILTERS=$("$PY" -m bench.sanitize_greedy --kernel-filters)
if [ "$MODE" = dry ]; then
    for s in "${STEPS[@]}"; do echo "STEP $s ${CAP[$s]}: $(cmd "$s")"; done
    exit 0
fi

mkdir -p "$OUT"
log() { echo "$*" | tee -a "$LOG"; }
status=()
START=$SECONDS
log "otprune gpu_check $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u +%FT%TZ)"
nvidia-smi 2>&1 | tee -a "$LOG" >/dev/null

run_step() {
    local name=$1 cap=${CAP[$1]} c tmp rc t0 why
    c=$(cmd "$name")
    if [ "$name" = e2e ]; then
        cap=$((BUDGET - (SECONDS - START)))
        if [ "$cap" -lt 30 ]; then
            log "== e2e skipped: ${cap} s left of ${BUDGET} s"
            status+=("e2e: skipped (no time left)")
            return
        fi
    fi
    log "== $name (cap ${cap} s): $c"
    tmp=$(mktemp)
    t0=$SECONDS
    timeout --kill-after=10 "$cap" bash -c "$c" 2>&1 | tee -a "$LOG" "$tmp"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) why="ok" ;;
        124 | 137) why="TIMED OUT at ${cap} s" ;;
        *) why="FAILED (exit $rc)" ;;
    esac
    if [[ $name == *check ]] && grep -q "Device not supported" "$tmp"; then
        why="skipped: compute-sanitizer refused this device (Device not supported)"
    elif [[ $name == *check ]] && ! command -v "$(sanitizer)" >/dev/null 2>&1; then
        why="skipped: compute-sanitizer not found"
    fi
    rm -f "$tmp"
    status+=("$name: $why ($((SECONDS - t0)) s)")
    log "== $name: $why"
}

for s in "${STEPS[@]}"; do run_step "$s"; done

log "== summary ($((SECONDS - START)) s of ${BUDGET} s)"
for line in "${status[@]}"; do log "$line"; done
extra=$(cd "$OUT" && ls -A | grep -vxF "$(printf '%s\n' "${OUTPUTS[@]}")")
[ -z "$extra" ] || log "unexpected files under \$OUT (not in the plan): $extra"
[ -f "$OUT/select.md" ] && grep -E "otprune-(cuda|triton|torch)" "$OUT/select.md" | cut -c1-160 | tee -a "$LOG"
exit 0
