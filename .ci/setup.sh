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
  peft accelerate pytest pytest-benchmark matplotlib pyyaml ninja wandb lm-eval
# The extension is rebuilt only when what it is built from changed: csrc/, the build files, torch, nvcc and the
# build's environment variables (a build takes minutes on 2 cores; the Python sources are installed editable).
build_id=$( { find csrc setup.py pyproject.toml CMakeLists.txt -type f -print0 | sort -z | xargs -0 sha256sum
  python -c "import torch; print(torch.__version__, torch.version.cuda)"
  command -v nvcc || true
  env | grep -E '^(LLAMA_FAST_SKIP_BUILD|LLAMA_FAST_SKIP_CUDA_BUILD|TORCH_CUDA_ARCH_LIST)=' | sort || true
} | sha256sum | cut -d' ' -f1)
if [ "$(cat "$VENV/.llama_fast_build_id" 2>/dev/null)" = "$build_id" ] \
    && python -c "import llama_fast" 2>/dev/null; then
  echo "setup: csrc/ and the build unchanged since the last build; not rebuilding the extension" >&2
else
  python -m pip install -q -e . --no-build-isolation --no-deps
  echo "$build_id" > "$VENV/.llama_fast_build_id"
fi
