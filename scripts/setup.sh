#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with torch, then this package, its
# dependencies and the compiled kernels (pip install -e . --no-build-isolation).
#   --dev  also the test tools (the [dev] extra: pytest, hypothesis, psutil)
#   --cpu  the CPU-only build of torch (from $TORCH_CPU_INDEX, default PyTorch's CPU wheel index);
#          without it, pip's default torch, which on Linux x86_64 is a CUDA build (several GB)
# A second run recompiles nothing when the sources are unchanged: the build keeps its objects in
# build/ and ninja skips what is up to date. The build prints a line per compiled source.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
EXTRA=""
CPU=0
for arg in "$@"; do
    case "$arg" in
        --dev) EXTRA="[dev]" ;;
        --cpu) CPU=1 ;;
        *) echo "usage: bash scripts/setup.sh [--dev] [--cpu]" >&2; exit 2 ;;
    esac
done

step() { echo "== $* ($(date +%T))"; }

[ -x .venv/bin/python ] || { step "virtual environment .venv"; "$PYTHON" -m venv .venv; }
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first: the extension is compiled against the torch that is installed (hence
# --no-build-isolation below).
if [ "$CPU" = 1 ]; then
    step "torch, CPU build"
    python -m pip install -q "${TORCH_SPEC:-torch}" --index-url "${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
    # pip may still take a CUDA build from another index or link folder set in its own config.
    python -W ignore -c "import sys, torch; sys.exit(torch.version.cuda and
        f'--cpu: pip installed torch {torch.__version__}, a CUDA build (an index or link folder of the pip '
        'configuration has it); name a CPU wheel with TORCH_SPEC, e.g. TORCH_SPEC=torch==2.13.0+cpu')"
else
    step "torch (pip's default build)"
    python -m pip install -q "${TORCH_SPEC:-torch}"
fi
step "build tools"
python -m pip install -q -r requirements-build.txt
step "dycon$EXTRA: dependencies and kernels (a line per compiled source; nothing to compile when up to date)"
# -v shows the compiler's lines; of those we print ninja's "[i/n] source" (the full log stays in build/).
mkdir -p build
set +e
python -m pip install -v -e ".$EXTRA" --no-build-isolation 2>&1 | tee build/pip-install.log \
    | { grep --line-buffered -E '^\s*\[[0-9]+/[0-9]+\] |ninja: no work|Successfully installed' || true; } \
    | sed -u -E -e 's/^\s*(\[[0-9]+\/[0-9]+\]) .* -c (\S+) .*/  \1 compile \2/' -e 's/^\s*(\[[0-9]+\/[0-9]+\]) .* -shared .*/  \1 link/'
status=${PIPESTATUS[0]}
set -e
if [ "$status" != 0 ]; then
    tail -n 40 build/pip-install.log
    echo "pip install -e . failed (exit $status); full log: build/pip-install.log" >&2
    exit "$status"
fi
python -c "import dycon_kernels as dk; print('dycon_kernels backends:', dk.available_backends())"
