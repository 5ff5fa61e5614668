#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with torch, then this package, its
# dependencies and the compiled kernels (pip install -e . --no-build-isolation).
#
#   (no flag)  which torch depends on the machine: where no NVIDIA driver is found, the CPU-only
#              build (small, no CUDA kernels compiled: nothing could run them); where one is, pip's
#              default torch (on Linux x86_64 a CUDA build of several GB). A torch already in
#              .venv is kept.
#   --dev      the test environment, what CI runs: the [dev] extra too (pytest, hypothesis, psutil,
#              and nnunetv2, monai, medpy that the cross-checks compare with). torch is installed
#              with the torchvision nnunetv2 needs, both pinned for the rest of the install so that
#              nothing replaces them, and is pip's default build unless --cpu: the CUDA kernels are
#              compiled wherever nvcc is, driver or not, so that CI keeps them compiling.
#   --cpu      force the CPU-only torch (from $TORCH_CPU_INDEX, default PyTorch's CPU wheel index).
#   --cuda     force pip's default torch (the CUDA build) without a driver; the CUDA kernels are
#              compiled when nvcc is found.
#   --dry-run  say which torch would be installed and why, and stop.
# TORCH_SPEC picks the torch (e.g. TORCH_SPEC=torch==2.13.0+cpu), TORCHVISION_SPEC the torchvision.
# A second run recompiles nothing when the sources are unchanged: the build keeps its objects in
# build/ and ninja skips what is up to date. The build prints a line per compiled source.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
usage="usage: bash scripts/setup.sh [--dev] [--cpu | --cuda] [--dry-run]"
DEV=0
DRY_RUN=0
TORCH_BUILD=auto
for arg in "$@"; do
    case "$arg" in
        --dev) DEV=1 ;;
        --dry-run) DRY_RUN=1 ;;
        --cpu) [ "$TORCH_BUILD" = cuda ] && { echo "$usage: --cpu and --cuda exclude each other" >&2; exit 2; }; TORCH_BUILD=cpu ;;
        --cuda) [ "$TORCH_BUILD" = cpu ] && { echo "$usage: --cpu and --cuda exclude each other" >&2; exit 2; }; TORCH_BUILD=cuda ;;
        -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "$usage (unknown argument: $arg)" >&2; exit 2 ;;
    esac
done

step() { echo "== $* ($(date +%T))"; }

nvidia_driver() {
    [ -e /proc/driver/nvidia/version ] || { command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; }
}

if [ "$TORCH_BUILD" = auto ]; then
    if nvidia_driver; then
        TORCH_BUILD=cuda; why="an NVIDIA driver is present"
    elif [ "$DEV" = 1 ]; then
        TORCH_BUILD=cuda; why="--dev: the test environment compiles the CUDA kernels where nvcc is; --cpu for a CPU-only one"
    else
        TORCH_BUILD=cpu; why="no NVIDIA driver found; --cuda for the CUDA build"
    fi
else
    why="--$TORCH_BUILD"
fi

if [ "$DRY_RUN" = 1 ]; then
    echo "torch: $([ "$TORCH_BUILD" = cpu ] && echo "CPU build" || echo "pip's default build") ($why)"
    exit 0
fi

[ -x .venv/bin/python ] || { step "virtual environment .venv"; "$PYTHON" -m venv .venv; }
. .venv/bin/activate
python -m pip install -q --upgrade pip

# torch first: the extension is compiled against the torch that is installed (hence
# --no-build-isolation below). --dev takes torchvision in the same resolution: nnunetv2 pulls it,
# and a torchvision resolved later would replace torch with the release it was built for.
torch_pkgs=("${TORCH_SPEC:-torch}")
[ "$DEV" = 1 ] && torch_pkgs+=("${TORCHVISION_SPEC:-torchvision}")
installed=$(python -m pip list --format=freeze 2>/dev/null | grep -E '^torch==' || true)
if [ -n "$installed" ] && [ "$DEV" = 0 ] && [ "$why" != "--$TORCH_BUILD" ] && [ -z "${TORCH_SPEC:-}" ]; then
    # Without a flag, a second run (or the demo's set-up after the tests') keeps the torch it
    # finds rather than switching builds under the compiled kernels.
    step "torch ${installed#torch==}, already in .venv: kept (remove .venv or set TORCH_SPEC to change it)"
elif [ "$TORCH_BUILD" = cpu ]; then
    step "torch, CPU build ($why)"
    python -m pip install -q --retries 1 "${torch_pkgs[@]}" --index-url "${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
    # pip may still take a CUDA build from another index or link folder set in its own config.
    python -W ignore -c "import sys, torch; sys.exit(torch.version.cuda and
        f'CPU path: pip installed torch {torch.__version__}, a CUDA build (an index or link folder of the pip '
        'configuration has it); name a CPU wheel with TORCH_SPEC, e.g. TORCH_SPEC=torch==2.13.0+cpu')"
else
    step "torch, pip's default build ($why)"
    python -m pip install -q "${torch_pkgs[@]}"
fi
# Pin what was installed for every later pip call of this script.
mkdir -p build
python -m pip list --format=freeze 2>/dev/null | grep -E '^(torch|torchvision)==' > build/torch-pin.txt
echo "   $(tr '\n' ' ' < build/torch-pin.txt)"

step "build tools"
python -m pip install -q -r requirements-build.txt -c build/torch-pin.txt

EXTRA=""
[ "$DEV" = 1 ] && EXTRA="[dev]"
step "dycon$EXTRA: dependencies and kernels (a line per compiled source; nothing to compile when up to date)"
# Say before a long silence that it is coming (compilers print nothing while they work).
echo "   A first build compiles the C++ kernels: $(ls csrc/*.cpp | wc -l) sources (the hot loops once per vector ISA),"
echo "   up to a minute or two each on 2 cores."
if python -W ignore -c "import sys, torch; sys.exit(torch.version.cuda is None)" && [ "${DYCON_SKIP_CUDA:-0}" = 0 ] \
    && { command -v nvcc >/dev/null || [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; }; then
    echo "   Then the CUDA kernels (torch is a CUDA build and nvcc is here): 2 sources, each for every GPU"
    echo "   architecture of TORCH_CUDA_ARCH_LIST (4 by default): a minute or two each, several in all."
fi
# -v shows the compiler's lines; of those we print ninja's "[i/n] source" (the full log stays in build/).
set +e
python -m pip install -v -e ".$EXTRA" --no-build-isolation -c build/torch-pin.txt 2>&1 | tee build/pip-install.log \
    | { grep --line-buffered -E '^\s*\[[0-9]+/[0-9]+\] |ninja: no work|Successfully installed' || true; } \
    | sed -u -E -e 's/^\s*(\[[0-9]+\/[0-9]+\]) .* -c (\S+) .*/  \1 compile \2/' -e 's/^\s*(\[[0-9]+\/[0-9]+\]) .* -shared .*/  \1 link/'
status=${PIPESTATUS[0]}
set -e
if [ "$status" != 0 ]; then
    tail -n 40 build/pip-install.log
    echo "pip install -e . failed (exit $status); full log: build/pip-install.log" >&2
    exit "$status"
fi
python -W ignore -c "import torch, dycon_kernels as dk; print('torch', torch.__version__, '| dycon_kernels backends:', dk.available_backends())"
