#!/usr/bin/env bash
# Reproduces: docs/performance.md, "Model speed, GPU" (table speed-gpu), the glad rows:
#   bench/scripts/run_models_gpu.sh --batches 256 --dtypes bfloat16 --cuda-graphs \
#     --configs glad-t3 glad-s3-t3 glad-s3-t2
# Takes: one nvidia-h200 call, ~6 minutes (the full sweep below; the glad rows alone less).
# GPU sweep of dense vs every compressed preset (random weights, speed only), one call:
#   deit_small and deit_base; bfloat16 and float32; batches 1, 32, 256 eager;
#   compiled rows (torch.compile, mode default) only for bfloat16 at batch 256, because
#   compile time dominates: 2 archs x 6 models compile once each, which keeps the whole
#   run near 6 minutes. Eager rows run first and the JSON is rewritten after every row
#   group, so a run cut short still leaves the finished rows.
# Writes into $OUT when set (else bench/results/models) and copies the JSON to bench/results/models.
# Extra arguments go to `python -m app.bench.models` (later flags win), e.g.
#   bench/scripts/run_models_gpu.sh --compiled-batches 32 256 --compile-mode max-autotune-no-cudagraphs
set -euo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! python3 -c "import pydantic" 2>/dev/null && [ -d .whl ]; then  # a device's python lacks it
  source bench/scripts/device_site.sh
fi
out="${OUT:-bench/results/models}"
mkdir -p "$out" bench/results/models

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
  --format=csv || true
python -m app.bench.models \
  --archs deit_small_patch16_224 deit_base_patch16_224 \
  --dtypes bfloat16 float32 \
  --batches 1 32 256 \
  --compile both --compiled-batches 256 --compiled-dtypes bfloat16 \
  --warmup 5 --repeats 30 \
  --device cuda \
  --out-dir "$out" \
  --no-progress \
  "$@"

if [ "$(realpath "$out")" != "$(realpath bench/results/models)" ]; then
  cp "$out"/models-*.json bench/results/models/
fi
