#!/usr/bin/env bash
# The GPU check (docs/engineering.md): on a machine with an NVIDIA GPU, build the package
# with its CUDA kernels, run the whole test suite on the GPU (no Triton interpreter), run both
# benchmarks at sizes that finish in a few minutes, and write a dated report:
#
#     benchmarks/results/gpu_check-<date>.md      card, driver, versions, stage status, test
#                                                 summary, benchmark tables
#     benchmarks/results/gpu_check-<date>/        the benchmarks' CSV and PNG files
#
# and, when $OUT is set (the device tool brings back only what is written there), the same files
# plus every stage's log under $OUT. Each stage runs under `timeout` (limits below, about 7.5 min
# in all: the whole check stays under 8 min on an H100) and the report is rewritten after every
# stage and on exit, so it exists even when a stage fails or hangs.
#
# Usage: bash benchmarks/gpu_check.sh          (PYTHON=... to pick the interpreter)
#        GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh   checks this script on a CPU machine: no
#        build, tests only collected, benchmarks --quick on the CPU, report under benchmarks/out/
set -u -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
ROOT=$(pwd)
PY=${PYTHON:-$(command -v python || command -v python3)}
STAMP=$(date -u +%Y-%m-%d)
DRY=${GPU_CHECK_DRY_RUN:-0}
RESULTS=$ROOT/benchmarks/results
[ "$DRY" = 1 ] && RESULTS=$ROOT/benchmarks/out/gpu_check_dry_run
REPORT=$RESULTS/gpu_check-$STAMP.md
FILES=$RESULTS/gpu_check-$STAMP
WORK=$ROOT/benchmarks/out/gpu_check         # logs and benchmark output (git-ignored)
mkdir -p "$RESULTS" "$FILES" "$WORK"
[ -n "${OUT:-}" ] && mkdir -p "$OUT"

# Stage limits in seconds (sum 450 s, plus a few seconds of nvidia-smi and python -c).
T_BUILD=${T_BUILD:-160}
T_TESTS=${T_TESTS:-140}
T_UNCL=${T_UNCL:-55}
T_FECL=${T_FECL:-95}

unset TRITON_INTERPRET
export PYTHONDONTWRITEBYTECODE=1 PY WORK DRY
START=$(date +%s)
STAGES=()   # "name|status|seconds|limit"

run_stage() {  # run_stage NAME LIMIT CMD...: log to $WORK/NAME.log, record status and time
    local name=$1 limit=$2 t0 rc status
    shift 2
    t0=$(date +%s)
    echo "== $name (limit ${limit}s)"
    # timeout runs programs, not shell functions: the stage functions are exported to a bash -c.
    timeout -s INT -k 10 "$limit" bash -c "$*" >"$WORK/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124|137) status="TIMEOUT (limit ${limit}s)" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    STAGES+=("$name|$status|$(( $(date +%s) - t0 ))|$limit")
    echo "   $status after $(( $(date +%s) - t0 ))s (log: $WORK/$name.log)"
    write_report
    return $rc
}

build() {
    if [ "$DRY" = 1 ]; then echo "dry run: no build"; return 0; fi
    export DYCON_FORCE_CUDA=1
    export MAX_JOBS=${MAX_JOBS:-$(nproc)}
    # Only this card's architecture: half the nvcc time of the default "8.0;9.0".
    if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
        TORCH_CUDA_ARCH_LIST=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1)
        export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
    fi
    echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
    if ! "$PY" -m pip install -e . --no-build-isolation --no-deps --no-index; then
        echo "pip could not install: building in place instead"
        "$PY" setup.py build_ext --inplace || return 1
    fi
    "$PY" -c "import dycon_kernels as dk; from dycon_kernels.backends import extension_has; \
print('backends on cuda:', dk.available_backends('cuda'), '| CUDA kernels built:', extension_has('CUDA'))"
}

tests() {
    if [ "$DRY" = 1 ]; then "$PY" -m pytest -q -p no:cacheprovider --co | tail -3; return; fi
    "$PY" -m pytest -q -p no:cacheprovider
}

bench_uncl() {
    if [ "$DRY" = 1 ]; then
        "$PY" benchmarks/bench_uncl.py --device cpu --quick --threads 1 --sizes 1x32 --out "$WORK"
    else
        "$PY" benchmarks/bench_uncl.py --device cuda --sizes 2x64,2x96,8x96 --out "$WORK"
    fi
}

bench_fecl() {
    if [ "$DRY" = 1 ]; then
        "$PY" benchmarks/bench_fecl.py --device cpu --quick --threads 1 --n 256 --k none --presets dycon \
            --out "$WORK"
    else
        "$PY" benchmarks/bench_fecl.py --device cuda --n 1024,8192,110592 --d 256 --k none,32 \
            --ref-max-n 8192 --repeats 5 --out "$WORK"
    fi
}
export -f build tests bench_uncl bench_fecl

section_from_log() {  # section_from_log TITLE LOG LINES: the last LINES lines of a log, fenced
    echo
    echo "## $1"
    echo
    if [ -f "$2" ]; then
        echo '```'
        tail -n "$3" "$2"
        echo '```'
    else
        echo "(not run)"
    fi
}

bench_section() {  # bench_section TITLE NAME LOG: the benchmark's own NAME_*.md, or its log
    local md
    md=$(ls -t "$WORK/$2"_*.md 2>/dev/null | head -1)
    echo
    echo "## $1"
    echo
    if [ -n "$md" ] && [ "$md" -nt "$WORK/.started" ]; then
        sed -e 's/^## /#### /' -e 's/^# /### /' "$md"
    elif [ -f "$3" ]; then
        echo "(no table written; the end of the log follows)"
        echo '```'
        tail -n 60 "$3"
        echo '```'
    else
        echo "(not run)"
    fi
}

write_report() {
    {
        echo "# GPU check, $STAMP"
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
        local s
        for s in ${STAGES[@]+"${STAGES[@]}"}; do
            IFS='|' read -r n st sec lim <<<"$s"
            echo "| $n | $st | $sec | $lim |"
        done
        echo
        echo "## Tests"
        echo
        if [ -f "$WORK/tests.log" ]; then
            echo "summary: $(grep -E '(passed|failed|error|skipped|no tests ran|collected)' "$WORK/tests.log" | tail -1)"
            echo
            if grep -qE '^(FAILED|ERROR) ' "$WORK/tests.log"; then
                echo '```'
                grep -E '^(FAILED|ERROR) ' "$WORK/tests.log" | head -40
                echo '```'
            else
                echo "no FAILED/ERROR lines"
            fi
        else
            echo "(not run)"
        fi
        section_from_log "Build (end of log)" "$WORK/build.log" 15
        bench_section "UnCL benchmark" uncl "$WORK/bench_uncl.log"
        bench_section "FeCL benchmark" fecl "$WORK/bench_fecl.log"
    } >"$REPORT.tmp" 2>&1
    mv -f "$REPORT.tmp" "$REPORT"
    cp -f "$WORK"/*.csv "$WORK"/*.png "$FILES"/ 2>/dev/null
    if [ -n "${OUT:-}" ]; then
        cp -f "$REPORT" "$OUT"/ 2>/dev/null
        cp -f "$WORK"/*.csv "$WORK"/*.png "$WORK"/*.md "$WORK"/*.log "$OUT"/ 2>/dev/null
    fi
}

trap write_report EXIT
rm -f "$WORK"/*.log "$WORK"/*.md "$WORK"/*.csv "$WORK"/*.png
touch "$WORK/.started"

if [ "$DRY" != 1 ] && { ! command -v nvidia-smi >/dev/null \
        || ! "$PY" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; }; then
    echo "no usable NVIDIA GPU here (nvidia-smi or torch.cuda missing)"
    STAGES+=("gpu|FAILED (no GPU visible to torch)|0|0")
    exit 1
fi

run_stage build "$T_BUILD" build
run_stage tests "$T_TESTS" tests
run_stage bench_uncl "$T_UNCL" bench_uncl
run_stage bench_fecl "$T_FECL" bench_fecl
echo "report: $REPORT ($(( $(date +%s) - START ))s in all)"
