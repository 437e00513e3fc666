#!/usr/bin/env bash
# The main job: sets up .venv (see setup.sh) and trains the "small" LLaMA on the embedded default
# corpus (the Python standard library's source files), then prints a sample. A few minutes on a
# 2-core CPU. Extra arguments go to `llama-fast train`.
set -euo pipefail
. "$(dirname "$0")/setup.sh"
llama-fast train "$@"
