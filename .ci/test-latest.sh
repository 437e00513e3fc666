#!/usr/bin/env bash
# The test suite against the newest releases of every dependency (CI pins them: .ci/constraints.txt), in a
# venv of its own (.venv-latest), so that a new transformers or triton shows up here before it reaches users.
# Extra arguments go to pytest, e.g. `bash .ci/test-latest.sh tests/test_replace.py`.
# After a green run, move the pins: .venv-latest/bin/pip freeze, minus torch and llama_fast, into .ci/constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
export LLAMA_FAST_VENV=.venv-latest LLAMA_FAST_UNPINNED=1
. .ci/setup.sh
python -m pip install -q --upgrade triton numpy safetensors sentencepiece tqdm transformers peft accelerate pytest \
  pytest-benchmark matplotlib pyyaml ninja wandb lm-eval
python -c "import transformers, triton, numpy; print('newest: transformers', transformers.__version__, \
'triton', triton.__version__, 'numpy', numpy.__version__)"
python -m pytest -q -p no:cacheprovider "$@"
