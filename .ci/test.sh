#!/usr/bin/env bash
# The test command: sets up .venv (see setup.sh) and runs the test suite, the CMake compile check
# of csrc/ included. Extra arguments go to pytest.
set -euo pipefail
. "$(dirname "$0")/setup.sh"
python -m pytest -q -p no:cacheprovider "$@"
