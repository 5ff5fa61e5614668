#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with torch and the dependencies, then
# build the kernels (pip install -e . --no-build-isolation). `--dev` adds the test tools.
# Re-running it is cheap: pip skips what is installed and the build reuses its objects.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
REQS=requirements.txt
[ "${1:-}" = "--dev" ] && REQS=requirements-dev.txt

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first: the extension is compiled against the torch that is installed (hence
# --no-build-isolation below). On a machine without a GPU this is still the CUDA build when
# pip's default is, which lets the build compile the CUDA sources with the machine's nvcc.
python -m pip install -q torch
python -m pip install -q -r "$REQS"
python -m pip install -q -e . --no-build-isolation
python -c "import dycon_kernels as dk; print('dycon_kernels backends:', dk.available_backends())"
