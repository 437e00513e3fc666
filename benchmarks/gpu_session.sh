#!/usr/bin/env bash
# The one command of a GPU session, run from the repository root on the device machine (which starts
# bare each time): installs the wheels carried in .whl/ (e.g. Liger-Kernel), builds llama_fast with
# its CUDA extension, runs the gpu-marked tests, runs the benchmarks (one pytest process and one JSON
# per benchmark file, so a CUDA fault in one file cannot take the others down), then writes env.json
# and results.md with benchmarks/report.py. A failing step does not stop the later ones (except a
# failed build, which leaves nothing to test); the exit status is 1 if any step failed.
#
#   benchmarks/gpu_session.sh [--dry-run] [STEP ...]
#     test              pytest -m gpu (the tests/ suite's gpu-marked tests)
#     bench [NAME ...]  benchmarks/bench_NAME.py for each NAME; every bench_*.py when no NAME is given
#     (no STEP)         test, then every benchmark
#     --dry-run         print the commands instead of running them
#
# One device call is limited to 10 minutes, so a session may split the work, e.g.
#   benchmarks/gpu_session.sh test bench rms_norm swiglu rope
#   benchmarks/gpu_session.sh bench attention
#   benchmarks/gpu_session.sh bench train_step
# pytest's own PYTEST_ADDOPTS narrows a step further, e.g. the gpu tests without the three slow
# 2^31-element cases, or the train step without (then with only) its torch.compile providers:
#   PYTEST_ADDOPTS='-k "not 2_pow_31"' benchmarks/gpu_session.sh test
#   PYTEST_ADDOPTS='-k "not compile"' benchmarks/gpu_session.sh bench train_step
# and merge the calls' JSON afterwards:
#   python benchmarks/report.py call*/bench-*.json --env call1/env.json --junit call*/bench-*.xml
#
# Environment: OUT (default ./gpu-out) receives build.log, gpu-tests.{log,xml},
# bench-NAME.{json,log,xml}, env.json and results.md. PYTHON (default python3).
# BUDGET (default 560): seconds this call may take, 0 for no limit. The device tool kills a call
# at its limit (600 s by default), which would lose the running step's JSON and the report; so each
# step gets SIGTERM (pytest then still writes the JSON and XML of the cases that finished, see the
# conftest.py files) once the budget, less 30 s kept for env.json and results.md, is spent, and a
# step that finds no time left is not started. Set BUDGET below the call's timeout_s.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
OUT=${OUT:-./gpu-out}
DRY_RUN=0
RUN_TESTS=0
BENCH_REQUESTED=0
BENCHES=()
BUDGET=${BUDGET:-560}
RESERVE=30  # seconds kept back for env.json and results.md

usage() {
  echo "usage: benchmarks/gpu_session.sh [--dry-run] [test] [bench [NAME ...]]" >&2
  exit 2
}

# ---- arguments ----------------------------------------------------------------------------------
mode=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage ;;
    test) RUN_TESTS=1; mode="" ;;
    bench) BENCH_REQUESTED=1; mode=bench ;;
    *)
      if [ "$mode" != bench ]; then
        echo "gpu_session.sh: unknown step '$arg' (expected test, bench [NAME ...] or --dry-run)" >&2
        usage
      fi
      if [ ! -f "benchmarks/bench_$arg.py" ]; then
        names=$(cd benchmarks && ls bench_*.py | sed 's/^bench_//; s/\.py$//' | tr '\n' ' ')
        echo "gpu_session.sh: no benchmarks/bench_$arg.py (NAME is one of: $names)" >&2
        exit 2
      fi
      BENCHES+=("$arg")
      ;;
  esac
done
if [ "$RUN_TESTS" -eq 0 ] && [ "$BENCH_REQUESTED" -eq 0 ]; then
  RUN_TESTS=1 BENCH_REQUESTED=1
fi
if [ "$BENCH_REQUESTED" -eq 1 ] && [ ${#BENCHES[@]} -eq 0 ]; then
  for file in benchmarks/bench_*.py; do
    name=${file#benchmarks/bench_}
    BENCHES+=("${name%.py}")
  done
fi

# ---- running steps ------------------------------------------------------------------------------
FAILED=()
START=$SECONDS
case "$BUDGET" in ''|*[!0-9]*) echo "gpu_session.sh: BUDGET must be a number of seconds, got '$BUDGET'" >&2; exit 2 ;; esac

# step NAME LOG CMD...: runs CMD with its output in LOG (the last lines echoed), records a failure.
# Under a BUDGET, CMD runs under `timeout` (SIGTERM, then SIGKILL 20 s later) until the budget less
# RESERVE is spent (build, tests, benchmarks) or until the whole budget is (the env and report steps).
step() {
  local name=$1 log=$2
  shift 2
  if [ "$BUDGET" -gt 0 ]; then
    local left=$((BUDGET - (SECONDS - START)))
    [ "$name" = env ] || [ "$name" = report ] || left=$((left - RESERVE))
    if [ "$left" -le 0 ]; then
      echo "+ not run: $name (no time left of BUDGET=$BUDGET s)"
      FAILED+=("$name (not run: no time left of BUDGET=$BUDGET s)")
      return 1
    fi
    set -- timeout --kill-after=20 "$left" "$@"
  fi
  echo "+ $(printf '%q ' "$@")> $log"
  [ "$DRY_RUN" -eq 1 ] && return 0
  "$@" > "$log" 2>&1
  local rc=$?
  tail -n 25 "$log"
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    FAILED+=("$name (stopped at the BUDGET=$BUDGET s deadline, see $log)")
  elif [ $rc -ne 0 ]; then
    FAILED+=("$name (exit $rc, see $log)")
  fi
  return $rc
}

[ "$DRY_RUN" -eq 1 ] || mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

shopt -s nullglob
wheels=(.whl/*.whl)
if [ ${#wheels[@]} -gt 0 ]; then
  step wheels "$OUT/wheels.log" "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site "${wheels[@]}"
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  echo "+ export PYTHONPATH=$PYTHONPATH"
fi

if step build "$OUT/build.log" env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 \
     "$PYTHON" -m pip install -e . --no-build-isolation --no-deps &&
   step extension "$OUT/extension.log" "$PYTHON" -c \
     "import llama_fast._extension as e; assert e.WITH_CUDA, e.LOAD_ERROR or 'no CUDA kernels in llama_fast._C'"
then
  if [ "$RUN_TESTS" -eq 1 ]; then
    step "gpu tests" "$OUT/gpu-tests.log" "$PYTHON" -m pytest -m gpu -q -rfEs -p no:cacheprovider \
      --junitxml="$OUT/gpu-tests.xml"
  fi
  for name in "${BENCHES[@]}"; do
    step "bench $name" "$OUT/bench-$name.log" "$PYTHON" -m pytest "benchmarks/bench_$name.py" -q -rfEs \
      -p no:cacheprovider --benchmark-json="$OUT/bench-$name.json" --junitxml="$OUT/bench-$name.xml"
  done
fi

step env "$OUT/env.log" "$PYTHON" benchmarks/report.py --write-env "$OUT/env.json"
jsons=("$OUT"/bench-*.json)
xmls=("$OUT"/bench-*.xml)
if [ "$DRY_RUN" -eq 1 ]; then  # nothing ran: show the command with its globs
  jsons=("$OUT/bench-*.json") xmls=("$OUT/bench-*.xml")
fi
if [ $((${#jsons[@]} + ${#xmls[@]})) -gt 0 ]; then
  step report "$OUT/report.log" "$PYTHON" benchmarks/report.py "${jsons[@]}" --env "$OUT/env.json" \
    --junit "${xmls[@]}" -o "$OUT/results.md"
fi

# ---- summary ------------------------------------------------------------------------------------
echo
echo "outputs in $OUT: build.log, gpu-tests.{log,xml}, bench-NAME.{json,log,xml}, env.json, results.md"
[ "$DRY_RUN" -eq 1 ] || [ ! -f "$OUT/results.md" ] || cat "$OUT/results.md"
if [ ${#FAILED[@]} -gt 0 ]; then
  printf 'FAILED: %s\n' "${FAILED[@]}"
  exit 1
fi
[ "$DRY_RUN" -eq 1 ] && echo "dry run: nothing was run" || echo "all steps passed"
