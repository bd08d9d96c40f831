#!/usr/bin/env bash
# One GPU check, time-boxed for ~10 minutes on an H100/H200 (build included):
#   benchmarks/gpu_check.sh OUT_DIR [--quick]
# 1. builds lkfast._C with CUDA for this GPU's architecture (TORCH_CUDA_ARCH_LIST if set),
# 2. runs the GPU tests (every backend against fp64 PyTorch and cuDNN, every dtype),
# 3. runs the GPU benchmarks (depthwise conv: benchmarks/bench_gpu.py; frequency noise:
#    benchmarks/bench_frequency.py) and writes JSON + markdown into OUT_DIR, with a summary.md.
# Afterwards: `python benchmarks/bench_gpu.py --write-table OUT_DIR/gpu_bench.json` puts the measured
# backend table into lkfast/ops/cuda_table.py (commit it with OUT_DIR copied to benchmarks/results/).
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_check.sh OUT_DIR [--quick]}
QUICK=${2:-}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
summary="$OUT/summary.md"
echo "# lkfast GPU check ($(date -u +%F\ %T) UTC)" > "$summary"

if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device visible to torch; nothing to check" | tee -a "$summary"
  exit 2
fi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
python -c "import torch; print(torch.cuda.get_device_name(), torch.__version__, torch.version.cuda)" | tee -a "$summary"

# 1. build (only this GPU's architecture unless told otherwise: a quicker compile; setup.py finds
# the toolkit even behind an nvcc wrapper script).
arch=$(python -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}')")
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch}
if ! MAX_JOBS=${MAX_JOBS:-$(nproc)} LKFAST_REQUIRE_EXT=1 timeout 300 python -m pip install --no-build-isolation --no-deps -e . \
     > "$OUT/build.log" 2>&1; then
  echo "- build: FAILED (see build.log)" | tee -a "$summary"; tail -30 "$OUT/build.log"; exit 1
fi
echo "- build for sm_${arch/./}: ok ($(elapsed) s)" | tee -a "$summary"
python -c "import lkfast.ops as o; [print(i) for i in o.available_backends().values()]" | tee "$OUT/backends.txt"

# 2. GPU tests (Triton with its first configuration: fewer compiles; the benchmark autotunes)
LKFAST_TRITON_AUTOTUNE=0 timeout 240 python -m pytest -q -m gpu -p no:cacheprovider \
    tests/test_cuda.py tests/test_triton.py tests/test_frequency_noise.py tests/test_depthwise.py \
    --junitxml="$OUT/gpu_tests.xml" > "$OUT/gpu_tests.txt" 2>&1
rc=$?
echo "- GPU tests: $(tail -1 "$OUT/gpu_tests.txt") (rc $rc, $(elapsed) s)" | tee -a "$summary"
grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.txt" | head -20 | sed 's/^/  - /' | tee -a "$summary"

# 3. benchmarks, within what is left of ~9.5 minutes
left=$(( 570 - $(elapsed) - 60 ))
[ "$left" -lt 60 ] && left=60
bench_args=(--out "$OUT" --budget "$left")
[ "$QUICK" = "--quick" ] && bench_args+=(--quick)
timeout $(( left + 90 )) python benchmarks/bench_gpu.py "${bench_args[@]}" > "$OUT/bench_gpu.log" 2>&1
echo "- depthwise benchmark: rc $? ($(elapsed) s), see gpu_bench.md" | tee -a "$summary"
timeout 60 python benchmarks/bench_frequency.py --out "$OUT" --batch 256 > "$OUT/bench_frequency.log" 2>&1
echo "- frequency benchmark: rc $? ($(elapsed) s), see frequency_bench_gpu.md" | tee -a "$summary"
# 4. model (batch 64, bf16) and corruption benchmarks on the GPU, each only while time is left
if [ "$(elapsed)" -lt 450 ]; then
  LKFAST_BENCH_DEVICE=cuda timeout 120 python -m pytest benchmarks/bench_models.py -q -p no:cacheprovider \
      -k replknet --benchmark-json="$OUT/models_gpu.json" > "$OUT/bench_models.log" 2>&1 \
    && python benchmarks/bench_models.py "$OUT/models_gpu.json" "$OUT/models_gpu.md" >> "$OUT/bench_models.log" 2>&1
  echo "- model benchmark: rc $? ($(elapsed) s), see models_gpu.md" | tee -a "$summary"
else
  echo "- model benchmark: skipped, no time left ($(elapsed) s)" | tee -a "$summary"
fi
if [ "$(elapsed)" -lt 520 ]; then
  LKFAST_BENCH_DEVICE=cuda timeout 60 python -m pytest benchmarks/bench_corrupt.py -q -p no:cacheprovider \
      --benchmark-json="$OUT/corrupt_gpu.json" > "$OUT/bench_corrupt.log" 2>&1 \
    && python benchmarks/bench_corrupt.py "$OUT/corrupt_gpu.json" "$OUT/corrupt_gpu.md" >> "$OUT/bench_corrupt.log" 2>&1
  echo "- corruption benchmark: rc $? ($(elapsed) s), see corrupt_gpu.md" | tee -a "$summary"
else
  echo "- corruption benchmark: skipped, no time left ($(elapsed) s)" | tee -a "$summary"
fi
[ -f "$OUT/gpu_bench.md" ] && cat "$OUT/gpu_bench.md" >> "$summary"
[ -f "$OUT/frequency_bench_gpu.md" ] && cat "$OUT/frequency_bench_gpu.md" >> "$summary"
echo "total: $(elapsed) s" | tee -a "$summary"
