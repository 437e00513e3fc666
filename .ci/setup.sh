#!/usr/bin/env bash
# Sourced by .ci/test.sh and .ci/main.sh: creates and activates .venv, installs the dependencies
# (a pinned CPU build of torch where no torch is installed yet) and builds llama_fast with its
# extension (CUDA kernels where torch has CUDA and nvcc is found, CPU kernels otherwise).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q "triton==3.9.0" numpy safetensors sentencepiece tqdm "transformers>=4.45" \
  pytest pytest-benchmark matplotlib pyyaml ninja
python -m pip install -q -e . --no-build-isolation --no-deps
