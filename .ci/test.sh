#!/usr/bin/env bash
# The test command: sets up .venv (see setup.sh) and runs the test suite, the CMake compile check
# of csrc/ included, then the drop-in tests on other transformers releases (test-transformers.sh). Extra
# arguments go to pytest (and skip those).
set -euo pipefail
. "$(dirname "$0")/setup.sh"
python -m pytest -q -p no:cacheprovider "$@"
if [ $# -eq 0 ]; then  # the whole suite: then the drop-in tests on the other transformers releases
  bash "$(dirname "$0")/test-transformers.sh"
fi
