#!/usr/bin/env bash
# The drop-in tests (tests/test_replace.py) on the transformers releases the package claims: the oldest
# (4.45), one between (4.57) and the newest (5.25); the pinned .venv has 5.24 (.ci/constraints.txt) and
# runs them with the whole suite. Each release goes, with the packages it needs that .venv's differ from,
# into .ci-envs/tf-VERSION (pip --target, no resolver, pinned below) and is put first on PYTHONPATH, so
# the venv's torch, triton and llama_fast build serve all of them. Run by .ci/test.sh (about 5 minutes on
# 2 cores, the installs cached in .ci-envs/); alone: `bash .ci/test-transformers.sh [VERSION ...]`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${LLAMA_FAST_VENV:-.venv}
HUB_0X="huggingface_hub==0.36.2 requests==2.34.2 urllib3==2.8.0 certifi==2026.10.19.post1 charset-normalizer==3.5.3"
declare -A PINS=(
  # transformers 4.45 wants tokenizers < 0.21 and huggingface_hub < 1; peft and accelerate of its time.
  [4.45.2]="tokenizers==0.20.3 $HUB_0X peft==0.13.2 accelerate==1.0.1"
  [4.57.6]="tokenizers==0.22.1 $HUB_0X"
  # 5.25.0 lists kernels >= 0.19.1, which the index does not have (0.17.2 is its newest); transformers
  # imports it only for hub kernels, which these tests do not use.
  [5.25.0]=""
)
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(4.45.2 4.57.6 5.25.0)
for version in "${versions[@]}"; do
  if [ -z "${PINS[$version]+set}" ]; then
    echo "test-transformers.sh: no pins for transformers $version (known: ${!PINS[*]})" >&2
    exit 2
  fi
  target=.ci-envs/tf-$version
  if [ ! -f "$target/.complete" ]; then
    rm -rf "$target"
    # shellcheck disable=SC2086  # the pins are words
    "$VENV/bin/python" -m pip install -q --no-deps --target "$target" "transformers==$version" ${PINS[$version]}
    touch "$target/.complete"
  fi
  echo "== tests/test_replace.py on transformers $version"
  deselect=()
  # transformers.trainer imports the venv's datasets (lm-eval's), which needs huggingface_hub >= 1; 4.x
  # needs < 1, so their Trainer cannot import beside lm-eval: the Trainer test runs on 5.x and the pinned one.
  [[ "$version" == 4.* ]] && deselect=(-k "not test_trainer_losses_agree")
  PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}" "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
    tests/test_replace.py "${deselect[@]}"
done
