#!/usr/bin/env bash
# The one command of a GPU session, run from the repository root on the device machine (which starts
# bare each time): installs the wheels carried in .whl/ (e.g. Liger-Kernel), builds llama_fast with
# its CUDA extension for the GPU present only, runs the gpu-marked tests, runs the benchmarks (one
# pytest process and one JSON per benchmark file, so a CUDA fault in one file cannot take the others
# down), and writes env.json and results.md with benchmarks/report.py. results.md is rewritten after
# every benchmark, so a call killed at its limit still returns the tables of the steps that finished.
# A failing step does not stop the later ones (except a failed build, which leaves nothing to test);
# the exit status is 1 if any step failed.
#
#   benchmarks/gpu_session.sh [--dry-run] [--full] [STEP ...]
#     (no STEP)         the release session: test, then bench attention rms_norm train_step
#     test              pytest -m gpu (the tests/ suite's gpu-marked tests, in parallel processes: below)
#     bench [NAME ...]  benchmarks/bench_NAME.py for each NAME; every bench_*.py when no NAME is given
#     --dry-run         print the commands instead of running them
#     --full            every case of each benchmark, with its own warm-up and repetitions (a long call);
#                       without it the benchmarks run the session's cases (below) with fewer repetitions
#
# The release session (no STEP) is sized for one device call of at most 9 minutes on an H100/H200
# from a bare machine; all the GPU time a release may get. Where the time goes (estimates on paper,
# no GPU has run this; the per-step times are printed at the end and kept in $OUT/timings.md, so the
# next session replaces these numbers with measured ones):
#   env.json             ~5 s     torch import, nvidia-smi
#   build              ~90-150 s  9 translation units (5 host C++ files, 4 .cu) compiled in parallel
#                                 (MAX_JOBS = all cores, 16 there) for the one arch present (9.0a on
#                                 Hopper: one device-code pass per .cu; "9.0" would compile sm_90 and,
#                                 as setup.py adds it for the Hopper backward, sm_90a: two), so
#                                 the build takes about as long as its slowest file: bindings.cpp
#                                 (torch/extension.h and torch.library, ~45-90 s) or attention_backward.cu
#                                 (nvcc -O3 for sm_90a alone: 60 s measured on a 2-core machine at load
#                                 average ~100, so ~20-40 s on a free core); plus ~15-30 s of pip and linking
#   gpu tests            ~70-110 s 366 cases, most of whose time is Triton compiling a kernel for each
#                                 new specialization (~1-3 s each; the 28 attention cases alone need
#                                 ~5 each): ~300-500 s in one process, so 12 processes on the 16 cores
#                                 (~30-45 s of compiles each, plus ~10 s of imports and collection), then
#                                 the three 2^31-element cases in one (~20 s: 4-8 GB tensors at ~3 TB/s,
#                                 fp32 checks)
#   bench attention      ~70-100 s the target shapes only (B8 H32 S2048 D128, B2 H32 S8192 D128) and
#                                 the S16384 peak-memory case: 2 shapes x 12 providers (the reference
#                                 skips S8192 itself), each validated on one batch element (4 heads)
#                                 against the reference, then 2 warm-up + 5 timed runs and pytest-
#                                 benchmark's 2 + 5 (5-200 ms each: ~1-3 s a case); ~10-16 Triton JIT
#                                 compiles of ~2-4 s
#   bench rms_norm       ~25-45 s  8 cases of ~0.1-0.5 ms; torch.compile of the reference, forward and
#                                 backward (~15-25 s of inductor)
#   bench train_step    ~120-170 s 1.1B model, 6 providers: 2 warm-up + 5 timed steps each (~0.2-0.3 s
#                                 per step, ~5 s to build a model and its AdamW state); our kernels'
#                                 JIT compiles (~20-30 s, partly cached on disk by the gpu tests);
#                                 torch.compile of HF's Llama (~60-90 s with inductor's 16 workers).
#                                 Left out: our reference backend (its [B, H, S, S] attention runs out
#                                 of memory, by design) and torch.compile of it (not a peer: HF + compile is)
#   report                 ~2 s per benchmark, env.json again at the end ~5 s
#   total              ~420-560 s, ~500 central, against a BUDGET of 540 (the device call's timeout_s
#                                 should be 600): the train step, last, is the step a slow machine cuts
#                                 (its finished providers are kept); the build and tests are the
#                                 least certain estimates, timings.md will replace them with measurements
# Each step has a time budget of its own (STEP_BUDGETS below) within the call's BUDGET, so one slow
# step cannot eat the steps after it; a step that finds no time left is not started.
#
# Smaller calls, e.g. to rerun what a cut session lost:
#   benchmarks/gpu_session.sh test bench rms_norm swiglu rope
#   benchmarks/gpu_session.sh bench attention
#   benchmarks/gpu_session.sh --full bench train_step
# The gpu tests without the three 2^31-element cases (pytest's own PYTEST_ADDOPTS narrows any step
# further, e.g. PYTEST_ADDOPTS='-x'):
#   GPU_TESTS_LARGE=0 benchmarks/gpu_session.sh test
# and merge the calls' JSON afterwards:
#   python benchmarks/report.py call*/bench-*.json --env call1/env.json --junit call*/bench-*.xml
#
# Environment: OUT (default ./gpu-out) receives build.log, gpu-tests.{log,xml},
# bench-NAME.{json,log,xml}, env.json, results.md and timings.md. PYTHON (default python3).
# TORCH_CUDA_ARCH_LIST (default: the compute capability nvidia-smi reports, 9.0 as 9.0a, the arch with
# wgmma; 9.0a where nvidia-smi is absent), MAX_JOBS (default: every core).
# BUDGET (default 540): seconds this call may take, 0 for no limit. The device tool kills a call
# at its limit (600 s by default), which would lose the running step's JSON and the report; so each
# step gets SIGTERM (pytest then still writes the JSON and XML of the cases that finished, see the
# conftest.py files) once its own budget, or the call's BUDGET less RESERVE (20 s) kept for env.json
# and results.md, is spent, whichever comes first. Set BUDGET below the call's timeout_s.
# STEP_BUDGET_<step> (e.g. STEP_BUDGET_build=300, STEP_BUDGET_bench_train_step=200) overrides one step's
# budget in seconds; 0 leaves that step only the call's BUDGET.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# ---- the gpu tests, in parallel ---------------------------------------------------------------------
# (the "gpu tests" step runs this script again with --run-gpu-tests under its time budget.) Most of
# the gpu tests' time is Triton compiling a kernel for each new specialization, one at a time in one
# process: the test cases are dealt round robin to GPU_TEST_SHARDS (default 12) pytest processes that
# share the GPU (correctness tests; nothing is timed) and compile on their own cores. The three
# 2^31-element cases (4-8 GB tensors each) run afterwards in one process of their own, unless
# GPU_TESTS_LARGE=0. Writes gpu-tests-N.{log,xml}; exits 1 if any process failed.
if [ "${1:-}" = --run-gpu-tests ]; then
  shards=${GPU_TEST_SHARDS:-12}
  common=(-q -rfEs -p no:cacheprovider)
  "$PYTHON" -m pytest -m gpu -k "not 2_pow_31" --collect-only "${common[@]}" > "$OUT/gpu-tests-collect.log" 2>&1
  rc=$?
  if [ $rc -ne 0 ] && [ $rc -ne 5 ]; then  # 5: nothing collected
    cat "$OUT/gpu-tests-collect.log"
    exit 1
  fi
  mapfile -t ids < <(grep '::' "$OUT/gpu-tests-collect.log")
  echo "${#ids[@]} gpu test cases in $shards processes"
  pids=()
  for ((i = 0; i < shards; i++)); do
    subset=()
    for ((j = i; j < ${#ids[@]}; j += shards)); do subset+=("${ids[j]}"); done
    [ ${#subset[@]} -gt 0 ] || continue
    OMP_NUM_THREADS=2 "$PYTHON" -m pytest "${common[@]}" --junitxml="$OUT/gpu-tests-$i.xml" "${subset[@]}" \
      > "$OUT/gpu-tests-$i.log" 2>&1 &
    pids+=($!)
  done
  failed=0
  for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
  if [ "${GPU_TESTS_LARGE:-1}" != 0 ]; then
    "$PYTHON" -m pytest -m gpu -k 2_pow_31 "${common[@]}" --junitxml="$OUT/gpu-tests-large.xml" \
      > "$OUT/gpu-tests-large.log" 2>&1
    rc=$?
    [ $rc -eq 0 ] || [ $rc -eq 5 ] || failed=1
  fi
  for log in "$OUT"/gpu-tests-[0-9]*.log "$OUT"/gpu-tests-large.log; do
    [ -f "$log" ] || continue
    echo "== $log"
    grep -E '^(FAILED|ERROR) ' "$log"
    tail -n 1 "$log"
  done
  exit $failed
fi

PYTHON=${PYTHON:-python3}
OUT=${OUT:-./gpu-out}
DRY_RUN=0
FULL=0
RUN_TESTS=0
BENCH_REQUESTED=0
BENCHES=()
BUDGET=${BUDGET:-540}
RESERVE=20  # seconds kept back for env.json and results.md
RELEASE_BENCHES=(attention rms_norm train_step)

# Per-step budgets (seconds): about 1.5x the estimates above, so a step runs out only when something
# is wrong; their sum exceeds BUDGET on purpose (BUDGET is the hard limit; these stop one runaway step).
declare -A STEP_BUDGETS=(
  [wheels]=60 [build]=300 [extension]=60 [gpu_tests]=200 [bench_attention]=150 [bench_rms_norm]=60
  [bench_train_step]=220 [bench_swiglu]=60 [bench_rope]=60 [bench_cross_entropy]=90 [env]=60 [report]=60
)
# The cases and repetitions of a session (without --full): pytest -k per benchmark file, and the caps
# on warm-up and timed runs that benchmarks/common.py's record() reads (median of 5 CUDA-event timings
# after 2 warm-up runs; every case is still validated against the reference before it is timed).
declare -A SESSION_CASES=(
  [attention]='S2048_D128 or S8192_D128 or peak_memory'
  [train_step]='not llama_fast-reference'
)
SESSION_REPS=5
SESSION_WARMUP=2

usage() {
  echo "usage: benchmarks/gpu_session.sh [--dry-run] [--full] [test] [bench [NAME ...]]" >&2
  exit 2
}

# ---- arguments ----------------------------------------------------------------------------------
mode=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    --full) FULL=1 ;;
    -h|--help) usage ;;
    test) RUN_TESTS=1; mode="" ;;
    bench) BENCH_REQUESTED=1; mode=bench ;;
    *)
      if [ "$mode" != bench ]; then
        echo "gpu_session.sh: unknown step '$arg' (expected test, bench [NAME ...], --full or --dry-run)" >&2
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
  BENCHES=("${RELEASE_BENCHES[@]}")
fi
if [ "$BENCH_REQUESTED" -eq 1 ] && [ ${#BENCHES[@]} -eq 0 ]; then
  for file in benchmarks/bench_*.py; do
    name=${file#benchmarks/bench_}
    BENCHES+=("${name%.py}")
  done
fi
case "$BUDGET" in ''|*[!0-9]*) echo "gpu_session.sh: BUDGET must be a number of seconds, got '$BUDGET'" >&2; exit 2 ;; esac
for key in "${!STEP_BUDGETS[@]}"; do
  override=STEP_BUDGET_$key
  if [ -n "${!override:-}" ]; then
    case "${!override}" in *[!0-9]*) echo "gpu_session.sh: $override must be a number of seconds" >&2; exit 2 ;; esac
    STEP_BUDGETS[$key]=${!override}
  fi
done

# The build: only the arch of the GPU present, on every core.
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' ')
  case "$cap" in
    9.0|'') TORCH_CUDA_ARCH_LIST=9.0a ;;  # Hopper: the arch with wgmma (and the default without nvidia-smi)
    *) TORCH_CUDA_ARCH_LIST=$cap ;;
  esac
fi
MAX_JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 16)}

# ---- running steps ------------------------------------------------------------------------------
FAILED=()
TIMINGS=()
START=$SECONDS

# step NAME LOG CMD...: runs CMD with its output in LOG (the last lines echoed), records a failure and
# the step's seconds. Under a BUDGET, CMD runs under `timeout` (SIGTERM, then SIGKILL 15 s later) for
# the step's own budget or until the BUDGET less RESERVE is spent (build, tests, benchmarks) or the
# whole BUDGET is (the env and report steps), whichever comes first.
step() {
  local name=$1 log=$2
  shift 2
  local key=${name// /_}
  local limit=${STEP_BUDGETS[$key]:-0}
  if [ "$BUDGET" -gt 0 ]; then
    local left=$((BUDGET - (SECONDS - START)))
    [ "$name" = env ] || [ "$name" = report ] || left=$((left - RESERVE))
    if [ "$left" -le 0 ]; then
      echo "+ not run: $name (no time left of BUDGET=$BUDGET s)"
      FAILED+=("$name (not run: no time left of BUDGET=$BUDGET s)")
      TIMINGS+=("| $name | not run | 0 |")
      return 1
    fi
    if [ "$limit" -eq 0 ] || [ "$left" -lt "$limit" ]; then
      limit=$left
    fi
  fi
  [ "$limit" -gt 0 ] && set -- timeout --kill-after=15 "$limit" "$@"
  echo "+ $(printf '%q ' "$@")> $log"
  [ "$DRY_RUN" -eq 1 ] && return 0
  local began=$SECONDS
  "$@" > "$log" 2>&1
  local rc=$?
  local took=$((SECONDS - began))
  tail -n 25 "$log"
  local status=ok
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    status="stopped at its ${limit} s budget"
    FAILED+=("$name (stopped at its ${limit} s budget, BUDGET=$BUDGET s; see $log)")
  elif [ $rc -ne 0 ]; then
    status="exit $rc"
    FAILED+=("$name (exit $rc, see $log)")
  fi
  TIMINGS+=("| $name | $status | $took |")
  echo "= $name: $status in ${took} s, $((SECONDS - START)) s into the call"
  write_timings
  return $rc
}

write_timings() {
  [ "$DRY_RUN" -eq 1 ] && return 0
  {
    echo "| step | result | seconds |"
    echo "|---|---|---|"
    printf '%s\n' "${TIMINGS[@]}"
    echo "| total | | $((SECONDS - START)) |"
  } > "$OUT/timings.md"
}

# report: results.md from every benchmark JSON so far (after each benchmark, and once at the end).
report() {
  local jsons=("$OUT"/bench-*.json) xmls=("$OUT"/bench-*.xml)
  if [ "$DRY_RUN" -eq 1 ]; then  # nothing ran: show the command with its globs
    jsons=("$OUT/bench-*.json") xmls=("$OUT/bench-*.xml")
  fi
  [ $((${#jsons[@]} + ${#xmls[@]})) -gt 0 ] || return 0
  local env_args=()
  [ "$DRY_RUN" -eq 1 ] || [ -f "$OUT/env.json" ] && env_args=(--env "$OUT/env.json")
  step report "$OUT/report.log" "$PYTHON" benchmarks/report.py "${jsons[@]}" "${env_args[@]}" \
    --junit "${xmls[@]}" -o "$OUT/results.md"
}

[ "$DRY_RUN" -eq 1 ] || mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ "$FULL" -eq 0 ]; then
  export LLAMA_FAST_BENCH_REPS=$SESSION_REPS LLAMA_FAST_BENCH_WARMUP=$SESSION_WARMUP
  echo "+ export LLAMA_FAST_BENCH_REPS=$SESSION_REPS LLAMA_FAST_BENCH_WARMUP=$SESSION_WARMUP"
fi

shopt -s nullglob
wheels=(.whl/*.whl)
if [ ${#wheels[@]} -gt 0 ]; then
  step wheels "$OUT/wheels.log" "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site "${wheels[@]}"
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  echo "+ export PYTHONPATH=$PYTHONPATH"
fi

# The environment first (seconds): a call cut short still says what it ran on.
step env "$OUT/env.log" "$PYTHON" benchmarks/report.py --write-env "$OUT/env.json"

if step build "$OUT/build.log" env TORCH_CUDA_ARCH_LIST="$TORCH_CUDA_ARCH_LIST" MAX_JOBS="$MAX_JOBS" \
     "$PYTHON" -m pip install -e . --no-build-isolation --no-deps --no-cache-dir &&
   step extension "$OUT/extension.log" "$PYTHON" -c \
     "import llama_fast._extension as e; assert e.WITH_CUDA, e.LOAD_ERROR or 'no CUDA kernels in llama_fast._C'"
then
  if [ "$RUN_TESTS" -eq 1 ]; then
    step "gpu tests" "$OUT/gpu-tests.log" env PYTHON="$PYTHON" OUT="$OUT" \
      bash benchmarks/gpu_session.sh --run-gpu-tests
  fi
  for name in "${BENCHES[@]}"; do
    select=()
    if [ "$FULL" -eq 0 ] && [ -n "${SESSION_CASES[$name]:-}" ]; then
      select=(-k "${SESSION_CASES[$name]}")
    fi
    step "bench $name" "$OUT/bench-$name.log" "$PYTHON" -m pytest "benchmarks/bench_$name.py" -q -rfEs \
      -p no:cacheprovider "${select[@]}" --benchmark-json="$OUT/bench-$name.json" --junitxml="$OUT/bench-$name.xml"
    [ "$DRY_RUN" -eq 1 ] || report  # results.md so far: a call killed later still returns these tables
  done
fi

# The environment again, now with the extension built (its status is part of env.json), and the report.
step env "$OUT/env.log" "$PYTHON" benchmarks/report.py --write-env "$OUT/env.json"
report

# ---- summary ------------------------------------------------------------------------------------
echo
echo "outputs in $OUT: build.log, gpu-tests.{log,xml}, bench-NAME.{json,log,xml}, env.json, results.md, timings.md"
[ "$DRY_RUN" -eq 1 ] || [ ! -f "$OUT/results.md" ] || cat "$OUT/results.md"
if [ "$DRY_RUN" -eq 0 ]; then
  write_timings
  echo
  cat "$OUT/timings.md"
fi
if [ ${#FAILED[@]} -gt 0 ]; then
  printf 'FAILED: %s\n' "${FAILED[@]}"
  exit 1
fi
[ "$DRY_RUN" -eq 1 ] && echo "dry run: nothing was run" || echo "all steps passed"
