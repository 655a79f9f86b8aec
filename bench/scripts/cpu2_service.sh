#!/usr/bin/env bash
# Reproduces: docs/compression-training-free.md, the speed of the training-free DeiT-Tiny
#   entries on 2 CPU cores: the model alone (batch 16, fp32) and end to end through HTTP
#   (16 photos of imagenet-dev a request, 4 in flight, one server serving dense and the
#   entries, interleaved levels that alternate which model goes first).
# Takes: ~5 min. Runs on any Linux machine with >= 2 cores: everything (server, client and
#   the model-only timing) is pinned to cores $CORES with taskset, so a device call measures
#   2 quiet cores of a bigger host. Weights are random (speed does not depend on them).
# ENGINE=process serves through the engine (default: the server's, inline). REPEATS=8 measures
#   each model at 4 in flight 8 times (default 4): the JSON's median_speedups then hold on a
#   noisy host, where the best level alone reads high.
# Carry (device): .whl (fastapi, uvicorn, pydantic, ... for its python) and
#   .carry/images/imagenet-dev; locally IMAGES=../shared/images/imagenet-dev.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
cores=${CORES:-0,1}; out=${OUT:-bench/results}; store=${STORE:-/tmp/cpu2-store}
images=${IMAGES:-.carry/images/imagenet-dev}
entries=(${ENTRIES:-tome-r13 tome-r8})
pin() { taskset -c "$cores" "$@"; }
mkdir -p "$out/models" "$out/service"
[ -f "$store/deit_tiny_patch16_224/manifest.json" ] ||
  python3 -m app store random deit_tiny_patch16_224 --name deit_tiny_patch16_224 --store "$store"
for cfg in "${entries[@]}"; do
  [ -f "$store/deit_tiny-$cfg/manifest.json" ] || python3 -m app store random \
    deit_tiny_patch16_224 --name "deit_tiny-$cfg" --config "$cfg" --store "$store"
done
pin python3 -m app.bench.models --device cpu --threads 2 --archs deit_tiny_patch16_224 \
  --dtypes float32 --batches 16 --warmup 3 --repeats 10 --no-per-layer --no-progress \
  --configs "${entries[@]}" --out-dir "$out/models"
pin python3 -m app.bench.service --store "$store" --device cpu \
  --models deit_tiny_patch16_224 "${entries[@]/#/deit_tiny-}" \
  --concurrency $(for _ in $(seq "${REPEATS:-4}"); do echo 4; done) --images-per-request 16 --images "$images" \
  --seconds "${SECONDS_PER_LEVEL:-25}" --warmup 6 --no-half-load --out "$out/service" \
  ${ENGINE:+--engine "$ENGINE"}
