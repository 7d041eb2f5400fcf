#!/usr/bin/env bash
# Set up specdec in ./.venv from nothing: PyTorch first (the CPU build where no
# GPU is present), then the package (its native kernels are compiled here, a few
# seconds with the system's C++ compiler) with its test tools and llama.cpp.
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first, pinned, so that nothing later pulls a multi-GB CUDA build on a CPU machine.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/python -m pip install --quiet "torch==${SPECDEC_TORCH_VERSION:-2.13.0}"
fi
# The llama.cpp peer and backend (llama-cpp-python builds llama.cpp from source: ~5 min).
.venv/bin/python -m pip install --quiet -e ".[test,llamacpp]"
echo "specdec installed: $(.venv/bin/specdec --version) in $(pwd)/.venv" >&2
