#!/usr/bin/env bash
# The test command: sets up .venv (a pinned CPU torch where no GPU torch is present), builds
# llama_fast with its extension, and runs the test suite, CMake compile check of csrc/ included.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# A CPU build of torch unless a torch is already installed in this environment (CUDA machines).
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q "triton==3.9.0" numpy safetensors sentencepiece tqdm "transformers>=4.45" \
  pytest pytest-benchmark matplotlib pyyaml ninja
python -m pip install -q -e . --no-build-isolation --no-deps
python -m pytest -q -p no:cacheprovider "$@"
