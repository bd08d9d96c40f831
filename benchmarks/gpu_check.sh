#!/usr/bin/env bash
# The GPU check, for one unattended command on a bare GPU machine (python3 with its own torch,
# triton and timm; no network; ~10 minutes per command; few files taken back):
#
#   benchmarks/gpu_check.sh OUT_DIR --quick     first call, <= 5 minutes: build, CUDA assert, smoke test
#                                               (CUDA_LAUNCH_BLOCKING=1, own process), the op test files
#                                               (every GPU backend x dtype x pass against F.conv2d,
#                                               not the CPU cases; the tensor-core triton_mma file
#                                               last; stopped by SIGINT at its cap), the k=31
#                                               stage-1 and the stage-3 timings, compute-sanitizer on the
#                                               smoke test when the machine has it and time is left
#   benchmarks/gpu_check.sh OUT_DIR             second call (full), < 10 minutes: build (incremental),
#                                               smoke, the evaluation on the GPU against the CPU
#                                               (tests/test_eval_gpu.py), the WHOLE test suite, every
#                                               benchmark shape, frequency noise (all three paths),
#                                               host time per op call, models and corruptions
#   benchmarks/gpu_check.sh OUT_DIR --dry-run   --quick's steps on the CPU on tiny shapes (Triton in its
#                                               interpreter, no build, the op tests collected only,
#                                               test_eval_gpu.py's GPU tests skipped, no sanitizer):
#                                               checks the script before GPU time is spent
#                                               on it; tests/test_benchmarks.py runs it
#
# To save the compile (minutes of the GPU session), make the extension here first, for the GPU
# machine's python and torch: `.ci/gpu_stack --prebuild`, then carry lkfast/_C.cpython-312-*.so and
# its .sources record (`run`'s carry). It is used only if built from the same csrc/ and it runs there.
#
# OUT_DIR receives at most 5 files, none in a sub-folder: summary.md (always written, even when a step
# hangs or fails), gpu_bench.json and gpu_bench.md (bench_gpu.py), tests.log (smoke test and pytest),
# rest.tar.gz (everything else: build log, nvidia-smi, backends, other benchmarks, sanitizer).
# Every step runs under `timeout`; the whole command ends before GPU_CHECK_LIMIT seconds (default 570;
# 290 with --quick). Environment: PYTHON (default python3), LKFAST_WHEELS (a folder of wheels, e.g.
# pytest, installed with --no-index when pytest is missing), TORCH_CUDA_ARCH_LIST, MAX_JOBS.
# Afterwards: `python benchmarks/bench_gpu.py --write-table OUT_DIR/gpu_bench.json` ships the table.
set -uo pipefail
usage="usage: benchmarks/gpu_check.sh OUT_DIR [--quick|--dry-run]"
[ $# -ge 1 ] && [ $# -le 2 ] || { echo "$usage" >&2; exit 2; }
OUT=$1
MODE=${2:---full}
case "$MODE" in --quick|--dry-run|--full) ;; *) echo "$usage" >&2; exit 2 ;; esac
MODE=${MODE#--}
cd "$(dirname "$0")/.." || exit 2
REPO=$PWD
PY=${PYTHON:-python3}
command -v "$PY" > /dev/null 2>&1 || PY=python
default_limit=570
[ "$MODE" = quick ] && default_limit=290
LIMIT=${GPU_CHECK_LIMIT:-$default_limit}
RESERVE=20  # seconds kept for packing the results
T0=$(date +%s)
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
SUMMARY="$OUT/summary.md"
TESTS_LOG="$WORK/tests.log"
rm -f "$OUT/summary.md" "$OUT/gpu_bench.json" "$OUT/gpu_bench.md" "$OUT/tests.log" "$OUT/rest.tar.gz"
: > "$TESTS_LOG"

FAILED=0
SKIPPED=0
elapsed() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( LIMIT - RESERVE - $(elapsed) )); }
# probe CMD...: a short check, under a timeout of at most 60 s and never past the deadline
probe() {
  local budget
  budget=$(left)
  [ "$budget" -gt 60 ] && budget=60
  [ "$budget" -lt 1 ] && return 124
  timeout --kill-after=2 "$budget" "$@"
}
note() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME CAP CMD...: run CMD (output to $WORK/NAME.log) under a timeout of CAP seconds or what is
# left, note the outcome in the summary, return CMD's exit status (124: timed out; 125: no time left).
step() {
  local name=$1 cap=$2 budget rc t
  shift 2
  budget=$(left)
  [ "$budget" -gt "$cap" ] && budget=$cap
  if [ "$budget" -lt 5 ]; then
    note "- $name: skipped, no time left ($(elapsed) s)"
    SKIPPED=$(( SKIPPED + 1 ))
    return 125
  fi
  t=$(date +%s)
  # SIGINT first: pytest then still prints which tests failed and the counts so far (a Python
  # script stops with a traceback); whatever ignores it is killed 5 s later
  timeout --signal=INT --kill-after=5 "$budget" "$@" > "$WORK/$name.log" 2>&1
  rc=$?
  if [ $rc -eq 0 ]; then
    note "- $name: ok ($(( $(date +%s) - t )) s)"
  elif { [ $rc -eq 124 ] || [ $rc -eq 137 ]; } && [ -n "${TIMEOUT_IS_SKIP:-}" ]; then
    note "- $name: did not finish in ${budget} s: inconclusive, counted as skipped for time (see $name.log in rest.tar.gz)"
    SKIPPED=$(( SKIPPED + 1 ))
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    note "- $name: TIMED OUT after ${budget} s (see $name.log in rest.tar.gz)"
    FAILED=$(( FAILED + 1 ))
  else
    note "- $name: FAILED, exit $rc ($(( $(date +%s) - t )) s; see $name.log in rest.tar.gz)"
    FAILED=$(( FAILED + 1 ))
  fi
  return $rc
}

finish() {
  local status=$?
  trap - EXIT INT TERM
  [ "$status" -eq 0 ] && [ $(( FAILED + SKIPPED )) -gt 0 ] && status=1
  note ""
  note "steps failed or timed out: $FAILED, skipped for time: $SKIPPED; exit status $status"
  for f in gpu_bench.md; do
    [ -f "$WORK/$f" ] && { cat "$WORK/$f" >> "$SUMMARY"; echo >> "$SUMMARY"; }
  done
  note "total: $(elapsed) s (limit $LIMIT s, mode $MODE)"
  [ -f "$WORK/gpu_bench.json" ] && cp "$WORK/gpu_bench.json" "$OUT/gpu_bench.json"
  [ -f "$WORK/gpu_bench.md" ] && cp "$WORK/gpu_bench.md" "$OUT/gpu_bench.md"
  cp "$TESTS_LOG" "$OUT/tests.log"
  rm -f "$WORK/gpu_bench.json" "$WORK/gpu_bench.md" "$TESTS_LOG"
  tar -czf "$OUT/rest.tar.gz" -C "$WORK" . 2> /dev/null
  chmod 644 "$OUT"/* 2> /dev/null
  rm -rf "$WORK"
  exit $status
}
trap finish EXIT
trap 'note "- interrupted"; exit 130' INT TERM

echo "# lkfast GPU check, $MODE ($(date -u '+%F %T') UTC)" > "$SUMMARY"
note ""
commit=unknown
if git rev-parse --short HEAD > /dev/null 2>&1; then
  commit=$(git rev-parse --short HEAD)$(git diff --quiet HEAD 2> /dev/null || echo ' (with local changes)')
fi
note "commit $commit, python: $PY"
step versions 60 "$PY" - << 'EOF'
import sys
print(f"python {sys.version.split()[0]}")
import torch
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), device: "
      f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device'}")
for name in ("triton", "timm", "pytest"):
    try:
        module = __import__(name)
        print(f"{name} {module.__version__}")
    except Exception as exc:
        print(f"{name}: not available ({type(exc).__name__})")
EOF
sed 's/^/    /' "$WORK/versions.log" 2> /dev/null | tee -a "$SUMMARY"
probe nvidia-smi > "$WORK/nvidia-smi.txt" 2>&1 || true

if [ "$MODE" = dry-run ]; then
  DEVICE=cpu
  export TRITON_INTERPRET=1  # Triton kernels on CPU tensors
else
  DEVICE=cuda
  if ! probe "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2> /dev/null; then
    note "- no CUDA device visible to torch: nothing to check on a GPU (--dry-run walks the steps on the CPU)"
    exit 2
  fi
fi

# 1. build against the torch that is here (no index, no isolation, no dependencies)
if [ "$MODE" = dry-run ]; then
  note "- build: skipped (dry run: the extension already built here is used)"
else
  arch=$(probe "$PY" -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}')")
  [ -n "$arch" ] && export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch}  # this GPU only: a quicker compile
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  # A carried extension (.ci/gpu_stack --prebuild made it for this machine's python and torch)
  # saves the compile: used when it was built from these csrc/ sources, with CUDA, and runs here
  abi=$(probe "$PY" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
  built=no
  if [ -n "$abi" ] && [ -f "lkfast/_C$abi" ]; then
    if ! LKFAST_PREBUILT=1 step install_prebuilt 90 "$PY" -m pip install --no-index --no-build-isolation --no-deps -e .; then
      # no editable install here (e.g. no `wheel`): import lkfast, and lkfast.kernels (kernels/ in the
      # tree, mapped by the install) through a link, from the checkout
      export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
      [ -e lkfast/kernels ] || ln -s ../kernels lkfast/kernels
    fi
    if step prebuilt_check 60 "$PY" benchmarks/gpu_smoke.py --check-extension; then
      built=yes
      note "- build: skipped, the carried lkfast/_C$abi was built from these sources and runs here"
    else
      note "- the carried lkfast/_C$abi does not fit (see above): building it here"
    fi
  fi
  if [ $built = no ] && ! LKFAST_REQUIRE_EXT=1 step build 240 "$PY" -m pip install --no-index --no-build-isolation --no-deps -e .; then
    tail -20 "$WORK/build.log" | sed 's/^/    /' >> "$SUMMARY"
    # without pip's editable install (e.g. no `wheel`): build in place and import from the checkout,
    # where lkfast.kernels (kernels/ in the tree, mapped by the install) needs a link
    LKFAST_REQUIRE_EXT=1 step build_inplace 180 "$PY" setup.py build_ext --inplace \
      && export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" && { [ -e lkfast/kernels ] || ln -s ../kernels lkfast/kernels; }
  fi
fi

# 2. the extension: built with CUDA (on the GPU), and which backends this machine has
if [ "$MODE" = dry-run ]; then
  assert='import torch, lkfast._C as c; print("lkfast._C with_cuda =", c.with_cuda)'
else
  assert='import torch, lkfast._C as c; assert c.with_cuda, "lkfast._C was built without CUDA (see build.log)"; print("lkfast._C with_cuda = True")'
fi
step extension 60 "$PY" -c "$assert
import lkfast.ops as o
for info in o.available_backends().values():
    print(info)"
sed 's/^/    /' "$WORK/extension.log" >> "$SUMMARY" 2> /dev/null

# 3. smoke test in its own process: a sticky CUDA fault ends this process only. Triton with its
#    first configuration, as in the tests: autotuning every (shape, dtype, layout) compiles and times
#    all 4 configurations of each kernel, more than the step's cap on a cold Triton cache
smoke_args=(--device "$DEVICE" --json "$WORK/smoke.json")
[ "$MODE" = dry-run ] && smoke_args+=(--tiny)
CUDA_LAUNCH_BLOCKING=1 LKFAST_TRITON_AUTOTUNE=0 step smoke 120 "$PY" benchmarks/gpu_smoke.py "${smoke_args[@]}"
{ echo "=== smoke test (benchmarks/gpu_smoke.py ${smoke_args[*]})"; cat "$WORK/smoke.log" 2> /dev/null; echo; } >> "$TESTS_LOG"
grep -E "^smoke:|^FAIL" "$WORK/smoke.log" 2> /dev/null | head -20 | sed 's/^/    /' >> "$SUMMARY"

# 4. the tests: quick, the op test files (every backend x dtype x pass against F.conv2d);
#    full, the whole suite; dry run, collected only. Triton with its first configuration (fewer compiles).
probe "$PY" -c "import pytest" 2> /dev/null
have_pytest=$?
if [ $have_pytest -ne 0 ] && [ $have_pytest -ne 124 ] && [ -d "${LKFAST_WHEELS:-}" ]; then
  step pytest_install 60 "$PY" -m pip install --no-index --find-links "$LKFAST_WHEELS" pytest
  have_pytest=$?
fi
if [ $have_pytest -eq 124 ]; then
  note "- tests: skipped, checking for pytest timed out"
  SKIPPED=$(( SKIPPED + 1 ))
elif [ $have_pytest -eq 0 ]; then
  case "$MODE" in
    quick)  # what is left minus ~150 s for the timings, 30..150 s (on the H200, 2026-12-04, the quick
      # timings took ~125 s in fp16, cuDNN's algorithm searches included; with 100 s kept for them the
      # op tests' cap of 81 s left the timings 85 s, one shape); the CPU cases (CI runs them) left
      # out, so the cap goes to the GPU ones: 663 of the files' 971 tests. Besides the cases with
      # "cpu" in their id, the tests that never touch a GPU and cost minutes of CPU: the Python
      # replays of the CUDA kernels, the sm_90 ahead-of-time compiles, torch.compile on CPU tensors
      test_args=(--durations=15 -k "not cpu and not replay and not compiles_for_sm90 and not torch_compile"
                 tests/test_depthwise.py tests/test_cuda.py tests/test_triton.py tests/test_triton_mma.py)
      cap=$(( $(left) - 150 )); [ "$cap" -gt 150 ] && cap=150; [ "$cap" -lt 30 ] && cap=30 ;;
    # full: the files that compute on the GPU beyond --quick's first (the fused frequency noise, training
    # on the default device, cuda where there is one), then the rest of the suite as far as the cap goes
    # (mostly the CPU's tests, which CI runs)
    full) first=(tests/test_frequency_noise.py tests/test_train.py)
          test_args=(--durations=15 "${first[@]}")
          for file in tests/test_*.py; do
            case " ${first[*]} tests/test_eval_gpu.py " in *" $file "*) ;; *) test_args+=("$file") ;; esac
          done
          cap=240 ;;
    dry-run) test_args=(--collect-only tests/test_depthwise.py tests/test_cuda.py tests/test_triton.py tests/test_triton_mma.py); cap=60 ;;
  esac
  if [ "$MODE" != quick ]; then
    # the whole evaluation (python -m lkfast.eval: every benchmark task and analysis) on the GPU
    # against the same run on the CPU, before the suite (no other test runs it on CUDA); in the dry
    # run its GPU tests skip and the comparison they make is checked
    LKFAST_TRITON_AUTOTUNE=0 step eval_gpu 150 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_eval_gpu.py
    tail -n 3 "$WORK/eval_gpu.log" 2> /dev/null | grep -E "passed|failed|error|skipped" | tail -1 | sed 's/^/    /' >> "$SUMMARY"
    grep -E "^(FAILED|ERROR)" "$WORK/eval_gpu.log" 2> /dev/null | head -10 | sed 's/^/    /' >> "$SUMMARY"
    { echo "=== pytest tests/test_eval_gpu.py"; cat "$WORK/eval_gpu.log" 2> /dev/null; echo; } >> "$TESTS_LOG"
    rm -f "$WORK/eval_gpu.log"
  fi
  LKFAST_TRITON_AUTOTUNE=0 step pytest "$cap" "$PY" -m pytest -q "${test_args[@]}"
  tail -n 3 "$WORK/pytest.log" 2> /dev/null | grep -E "passed|failed|error|collected|no tests" | tail -1 | sed 's/^/    /' >> "$SUMMARY"
  grep -E "^(FAILED|ERROR)" "$WORK/pytest.log" 2> /dev/null | head -20 | sed 's/^/    /' >> "$SUMMARY"
  { echo "=== pytest ${test_args[*]}"; cat "$WORK/pytest.log" 2> /dev/null; } >> "$TESTS_LOG"
  rm -f "$WORK/pytest.log"
else
  note "- tests: skipped, pytest is not installed here (set LKFAST_WHEELS to a folder with its wheels);" \
       "the smoke test above covered every backend x dtype x pass"
fi

# 5. timings
case "$MODE" in
  quick) bench_args=(--quick); reserve_after=0 ;;
  full) bench_args=(); reserve_after=90 ;;
  dry-run) bench_args=(--dry-run); reserve_after=0 ;;
esac
budget=$(( $(left) - reserve_after - 30 ))  # bench_gpu.py overruns its budget by its last case at most
[ "$MODE" = dry-run ] && budget=20
if [ "$budget" -ge 20 ]; then
  step bench_gpu $(( budget + 60 )) "$PY" benchmarks/bench_gpu.py --out "$WORK" --budget "$budget" "${bench_args[@]}"
else
  note "- bench_gpu: skipped, no time left ($(elapsed) s)"
fi
if [ "$MODE" = full ]; then
  step bench_frequency 60 "$PY" benchmarks/bench_frequency.py --out "$WORK" --batch 256
  # host time per call: the eager path against the registered op (its log goes to rest.tar.gz)
  step probe_host_overhead 60 "$PY" benchmarks/probe_host_overhead.py
  if probe "$PY" -c "import pytest_benchmark" 2> /dev/null; then
    LKFAST_BENCH_DEVICE=cuda step bench_models 120 "$PY" -m pytest benchmarks/bench_models.py -q -p no:cacheprovider \
        -k replknet --benchmark-json="$WORK/models_gpu.json" \
      && probe "$PY" benchmarks/bench_models.py "$WORK/models_gpu.json" "$WORK/models_gpu.md" >> "$WORK/bench_models.log" 2>&1
    LKFAST_BENCH_DEVICE=cuda step bench_corrupt 60 "$PY" -m pytest benchmarks/bench_corrupt.py -q -p no:cacheprovider \
        --benchmark-json="$WORK/corrupt_gpu.json" \
      && probe "$PY" benchmarks/bench_corrupt.py "$WORK/corrupt_gpu.json" "$WORK/corrupt_gpu.md" >> "$WORK/bench_corrupt.log" 2>&1
  else
    note "- model and corruption benchmarks: skipped, pytest-benchmark is not installed here"
  fi
fi

# 6. compute-sanitizer on the tiny smoke test and the CUDA kernels' edge cases, last: it is slow, and
#    it must not cost the results above. PyTorch's caching allocator off: memcheck sees only what
#    cudaMalloc handed out, so with the cache on, an access past a small tensor lands inside a cached
#    block and is not reported (c10/cuda/CUDACachingAllocator.cpp: "the caching allocator foils
#    cuda-memcheck")
if [ "$MODE" != dry-run ]; then
  sanitizer=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}"/bin/compute-sanitizer 2> /dev/null | head -1)
  # --quick gives it what the steps above left; under 45 s it is left to the full mode by design
  # (not a skip), and a run cut short by the limit is inconclusive (skipped for time), not a failure:
  # only an error it reports (exit 3) fails the check
  if [ -n "$sanitizer" ] && [ "$MODE" = quick ] && [ "$(left)" -lt 45 ]; then
    note "- compute-sanitizer: left to the full mode ($(left) s left)"
  elif [ -n "$sanitizer" ]; then
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 LKFAST_TRITON_AUTOTUNE=0 TIMEOUT_IS_SKIP=1 step sanitizer \
        "${GPU_CHECK_SANITIZER_CAP:-150}" "$sanitizer" --tool memcheck \
        --error-exitcode 3 "$PY" benchmarks/gpu_smoke.py --tiny --edge --device cuda
    grep -E "ERROR SUMMARY|^smoke:" "$WORK/sanitizer.log" 2> /dev/null | tail -2 | sed 's/^/    /' >> "$SUMMARY"
  else
    note "- compute-sanitizer: not on this machine"
  fi
fi
