#!/usr/bin/env bash
# The GPU check (docs/engineering.md), sized for one 15-minute GPU loan: under 8 minutes on
# an H100/H200, the most important results first. Stages, each under its own `timeout`:
#
#   build | warm  (in parallel) build the CUDA kernels for this card only | compile every Triton
#                 kernel the later stages launch (the Triton half of the correctness tests, -n 8)
#   tests         tests/test_gpu_kernels.py: each fused backend x dtype x size at the GPU tile
#                 sizes against the reference, forward and backward; no copy/sync per call
#   sanitizer     compute-sanitizer memcheck and racecheck on one small FeCL and UnCL call
#                 (benchmarks/sanitize_case.py) per fused backend
#   bench_fecl    bf16 and fp32 FeCL, D = 256, N in {1728, 13824, 110592}, against the dense
#                 reference: time, peak memory, fraction of the measured bf16 tensor-core rate and
#                 of the instruction-issue bound from benchmarks/results/kernel_report.csv
#   bench_uncl    UnCL at B = 8, 96^3 against the card's measured copy bandwidth
#
# Report: benchmarks/results/gpu_check-<date>.md (card, versions, stage table, each stage's
# results) and the benchmarks' CSV/PNG under benchmarks/results/gpu_check-<date>/; with $OUT set
# (the device tool brings back only what is written there) the same files and every stage's log
# under $OUT. The report is rewritten after every stage and on exit, so it exists even when a
# later stage fails or hangs.
#
# Usage: bash benchmarks/gpu_check.sh [--dry-run]     (PYTHON=... picks the interpreter)
#   --dry-run (or GPU_CHECK_DRY_RUN=1): the same stages on the CPU at tiny sizes under the Triton
#   interpreter, no build and no sanitizer; report under benchmarks/out/gpu_check_dry_run/.
#   tests/test_gpu_check.py runs it, so the script cannot rot where there is no GPU.
set -u -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
ROOT=$(pwd)
PY=${PYTHON:-$(command -v python || command -v python3)}
STAMP=$(date -u +%Y-%m-%d)
DRY=${GPU_CHECK_DRY_RUN:-0}
[ "${1:-}" = "--dry-run" ] && DRY=1
RESULTS=$ROOT/benchmarks/results
[ "$DRY" = 1 ] && RESULTS=$ROOT/benchmarks/out/gpu_check_dry_run
RESULTS=${GPU_CHECK_RESULTS:-$RESULTS}
REPORT=$RESULTS/gpu_check-$STAMP.md
FILES=$RESULTS/gpu_check-$STAMP
WORK=${GPU_CHECK_WORK:-$ROOT/benchmarks/out/gpu_check}   # logs and benchmark output (git-ignored)
mkdir -p "$RESULTS" "$FILES" "$WORK/stages"
[ -n "${OUT:-}" ] && mkdir -p "$OUT"

# Stage limits in seconds: 160 (build | warm) + 90 + 80 + 95 + 40 = 465 s at most.
T_BUILD=${T_BUILD:-160}
T_TESTS=${T_TESTS:-90}
T_SANITIZER=${T_SANITIZER:-80}
T_FECL=${T_FECL:-95}
T_UNCL=${T_UNCL:-40}
STAGE_ORDER="build warm tests sanitizer bench_fecl bench_uncl"

export PYTHONDONTWRITEBYTECODE=1 PY WORK DRY ROOT
if [ "$DRY" = 1 ]; then
    export GPU_CHECK_DRY_RUN=1 TRITON_INTERPRET=1 OMP_NUM_THREADS=1
else
    unset TRITON_INTERPRET
fi
START=$(date +%s)

run_stage() {  # run_stage NAME LIMIT FUNCTION: log to $WORK/NAME.log, status to $WORK/stages/NAME
    local name=$1 limit=$2 t0 rc status
    t0=$(date +%s)
    echo "== $name (limit ${limit}s)"
    # timeout runs programs, not shell functions: the stage functions are exported to a bash -c.
    timeout -s INT -k 10 "$limit" bash -c "$3" >"$WORK/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124|137) status="TIMEOUT (limit ${limit}s)" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    echo "$status|$(( $(date +%s) - t0 ))|$limit" >"$WORK/stages/$name"
    echo "   $name: $status after $(( $(date +%s) - t0 ))s (log: $WORK/$name.log)"
    write_report
    return $rc
}

pytest_parallel() {  # -n N when pytest-xdist is installed
    "$PY" -c 'import xdist' 2>/dev/null && echo "-n $1"
}

build() {
    if [ "$DRY" = 1 ]; then echo "dry run: no build"; return 0; fi
    export DYCON_FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
    if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then  # this card only: a fraction of the default list's nvcc time
        TORCH_CUDA_ARCH_LIST=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1)
        export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
    fi
    echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
    "$PY" setup.py build_ext --inplace || return 1
    "$PY" -c "import dycon_kernels as dk; from dycon_kernels.backends import extension_has; \
print('backends on cuda:', dk.available_backends('cuda'), '| CUDA kernels built:', extension_has('CUDA'))"
}

warm() {  # the Triton kernels compiled (and tested) while nvcc builds the CUDA ones
    if [ "$DRY" = 1 ]; then echo "dry run: interpreted kernels, nothing to compile"; return 0; fi
    # shellcheck disable=SC2046
    "$PY" -m pytest -q -p no:cacheprovider $(pytest_parallel 8) tests/test_gpu_kernels.py -k triton
}

tests() {
    # shellcheck disable=SC2046
    "$PY" -m pytest -q -p no:cacheprovider -rfEs $(pytest_parallel 4) tests/test_gpu_kernels.py
}

sanitizer() {
    if [ "$DRY" = 1 ]; then
        "$PY" benchmarks/sanitize_case.py --device cpu --backends triton
        return
    fi
    local rc=0 tool san
    san=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
    if [ -z "$san" ]; then echo "compute-sanitizer not found"; return 1; fi
    for tool in memcheck racecheck; do
        echo "--- compute-sanitizer --tool $tool"
        # No caching allocator: an access past a tensor's end is outside any allocation.
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$san" --tool "$tool" --error-exitcode 3 \
            "$PY" benchmarks/sanitize_case.py || rc=1
    done
    return $rc
}

bench_fecl() {
    local report=$ROOT/benchmarks/results/kernel_report.csv rc=0 dtype
    if [ "$DRY" = 1 ]; then
        "$PY" benchmarks/bench_fecl.py --device cpu --quick --threads 1 --repeats 1 --n 16 --d 8 --k 4 \
            --presets dycon --backends triton --out "$WORK"
        return
    fi
    for dtype in bfloat16 float32; do
        "$PY" benchmarks/bench_fecl.py --device cuda --dtype "$dtype" --n 1728,13824,110592 --d 256 --k 32 \
            --presets dycon --repeats 5 --cuda-max-n 13824 --kernel-report "$report" --out "$WORK" || rc=1
    done
    return $rc
}

bench_uncl() {
    if [ "$DRY" = 1 ]; then
        "$PY" benchmarks/bench_uncl.py --device cpu --quick --threads 1 --repeats 1 --sizes 1x8 --backends triton \
            --out "$WORK"
    else
        "$PY" benchmarks/bench_uncl.py --device cuda --sizes 8x96 --repeats 10 --out "$WORK"
    fi
}
export -f pytest_parallel build warm tests sanitizer bench_fecl bench_uncl

log_section() {  # log_section TITLE LOG PATTERN LINES: the log's lines matching PATTERN (or its end)
    echo
    echo "## $1"
    echo
    if [ ! -f "$2" ]; then echo "(not run)"; return; fi
    echo '```'
    { grep -E "$3" "$2" || tail -n "$4" "$2"; } | tail -n "$4"
    echo '```'
}

bench_section() {  # bench_section TITLE GLOB LOG: the benchmark's own .md files, or the end of its log
    local md found=0
    echo
    echo "## $1"
    for md in $(ls -tr "$WORK"/$2 2>/dev/null); do
        if [ "$md" -nt "$WORK/.started" ]; then
            echo
            sed -e 's/^## /#### /' -e 's/^# /### /' "$md"
            found=1
        fi
    done
    [ $found = 1 ] && return
    echo
    if [ -f "$3" ]; then
        echo "(no table written; the end of the log follows)"
        echo '```'
        tail -n 40 "$3"
        echo '```'
    else
        echo "(not run)"
    fi
}

write_report() {
    {
        echo "# GPU check, $STAMP$([ "$DRY" = 1 ] && echo ' (DRY RUN: CPU, Triton interpreter, tiny sizes)')"
        echo
        echo "- started: $(date -u -d "@$START" '+%Y-%m-%d %H:%M:%S UTC'), elapsed $(( $(date +%s) - START ))s"
        echo "- card: $(nvidia-smi --query-gpu=name,memory.total,compute_cap --format=csv,noheader 2>/dev/null | head -1)"
        echo "- driver: $(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)"
        echo "- nvcc: $(nvcc --version 2>/dev/null | grep -o 'release [0-9.]*' || echo 'not found')"
        echo "- $("$PY" -c 'import platform, torch
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = "not installed"
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {tv}")' 2>&1 | tail -1)"
        echo "- commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
        echo
        echo "| stage | status | seconds | limit |"
        echo "|---|---|---|---|"
        local name
        for name in $STAGE_ORDER; do
            if [ -f "$WORK/stages/$name" ]; then
                IFS='|' read -r st sec lim <"$WORK/stages/$name"
                echo "| $name | $st | $sec | $lim |"
            else
                echo "| $name | not run | - | - |"
            fi
        done
        log_section "Correctness: tests/test_gpu_kernels.py" "$WORK/tests.log" \
            '^(FAILED|ERROR|SKIPPED)|[0-9]+ (passed|failed)|no tests ran' 60
        log_section "Triton warm-up (the Triton half of the tests)" "$WORK/warm.log" \
            '^(FAILED|ERROR)|[0-9]+ (passed|failed)|tests? collected|no tests ran' 30
        log_section "compute-sanitizer" "$WORK/sanitizer.log" \
            '^--- |ERROR SUMMARY|RACECHECK SUMMARY|: ok$|Error|error' 40
        bench_section "FeCL benchmark" "fecl_*.md" "$WORK/bench_fecl.log"
        bench_section "UnCL benchmark" "uncl_*.md" "$WORK/bench_uncl.log"
        log_section "Build (end of log)" "$WORK/build.log" 'backends on cuda|error' 15
    } >"$REPORT.tmp.$BASHPID" 2>&1
    mv -f "$REPORT.tmp.$BASHPID" "$REPORT"
    cp -f "$WORK"/*.csv "$WORK"/*.png "$FILES"/ 2>/dev/null
    if [ -n "${OUT:-}" ]; then
        cp -f "$REPORT" "$OUT"/ 2>/dev/null
        cp -f "$WORK"/*.csv "$WORK"/*.png "$WORK"/*.md "$WORK"/*.log "$OUT"/ 2>/dev/null
    fi
    return 0
}

trap write_report EXIT
rm -f "$WORK"/*.log "$WORK"/*.md "$WORK"/*.csv "$WORK"/*.png "$WORK"/stages/*
touch "$WORK/.started"

if [ "$DRY" != 1 ] && { ! command -v nvidia-smi >/dev/null \
        || ! "$PY" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; }; then
    echo "no usable NVIDIA GPU here (nvidia-smi or torch.cuda missing)"
    echo "FAILED (no GPU visible to torch)|0|0" >"$WORK/stages/build"
    exit 1
fi

run_stage build "$T_BUILD" build &
BUILD_PID=$!
run_stage warm "$T_BUILD" warm
wait "$BUILD_PID"
status=0
run_stage tests "$T_TESTS" tests || status=1
run_stage sanitizer "$T_SANITIZER" sanitizer || status=1
run_stage bench_fecl "$T_FECL" bench_fecl || status=1
run_stage bench_uncl "$T_UNCL" bench_uncl || status=1
grep -q FAILED "$WORK/stages/build" 2>/dev/null && status=1
echo "report: $REPORT ($(( $(date +%s) - START ))s in all)"
exit $status
