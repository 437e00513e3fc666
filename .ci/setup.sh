#!/usr/bin/env bash
# Sourced by .ci/test.sh and .ci/main.sh: creates and activates .venv, installs the dependencies
# (a pinned CPU build of torch where no torch is installed yet) and builds llama_fast with its
# extension (CUDA kernels where torch has CUDA and nvcc is found, CPU kernels otherwise).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
VENV=${LLAMA_FAST_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
. "$VENV/bin/activate"
# Pinned (.ci/constraints.txt): CI tests what main was tested with. LLAMA_FAST_UNPINNED=1 takes the newest
# releases instead (.ci/test-latest.sh does, in a venv of its own).
constraints=(-c .ci/constraints.txt)
[ "${LLAMA_FAST_UNPINNED:-0}" = 1 ] && constraints=()
python -m pip install -q "${constraints[@]}" --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
# lm-eval: llama-fast eval --tasks and tests/test_eval.py (accelerate: the harness's hf model, compared with ours).
python -m pip install -q "${constraints[@]}" triton numpy safetensors sentencepiece tqdm transformers \
  pytest pytest-benchmark matplotlib pyyaml ninja lm-eval accelerate
python -m pip install -q -e . --no-build-isolation --no-deps
