#!/usr/bin/env bash
# Reproduces: the served fronts (docs/pareto-served-*.png; tables front-served and
#   front-served-h100 in docs/compression.md): every front config in served mode (CUDA
#   graphs, no compile) at batch 16, 64 and 256 on DeiT-S and DeiT-Tiny, then the compiled
#   (+ graphs) batch-256 curve of the fastest configs on DeiT-S.
# Takes: one GPU call, ~8 min on an H100 (GRID_S per arch, COMPILED_S for the compiled run, 0 to skip it).
# Random weights (speed only); bf16; each ratio against dense timed in the same loop. Rows
# are written as they finish, so a run cut short keeps what it measured. Then, here:
#   python -m app.bench.pareto --cuda-graphs --arch deit_small_patch16_224 --batch 64 \
#     --folder pooled --min-photos 1500 --target 1.5:0.9 --speed <its JSON> --fidelity ...
# Carry (device): .whl for the wheels device_site.sh installs (source it first).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
out=${OUT:-bench/results}/models; mkdir -p "$out"
configs=(tome-r8 tome-r13 tome-r16 merge-t5 merge-t5-c34 merge-t6 glad-s3-t3 merge-4x35
  merge-3x47 "merge=55@0,55@4,43@8" "merge=44@0,40@3,36@6,30@9"
  "merge=47@0,47@4,47@8;proportional=off" "merge=55@0,55@4,43@8;proportional=off")
for arch in deit_small_patch16_224 deit_tiny_patch16_224; do
  timeout "${GRID_S:-170}" python3 -m app.bench.models --archs "$arch" --device cuda \
    --dtypes bfloat16 --batches 64 16 256 1 --compile off --cuda-graphs --no-per-layer \
    --no-progress --warmup 5 --repeats 20 --configs "${configs[@]}" --out-dir "$out"
done
# COMPILED_S=0 skips the compiled curve (a rerun of the served grid alone)
[ "${COMPILED_S:-140}" -gt 0 ] && timeout "${COMPILED_S:-140}" python3 -m app.bench.models \
  --archs deit_small_patch16_224 \
  --device cuda --dtypes bfloat16 --batches 256 --compiled-batches 256 --compile on \
  --cuda-graphs --no-per-layer --no-progress --warmup 5 --repeats 20 \
  --configs tome-r13 merge-t5 merge-3x47 "merge=55@0,55@4,43@8" --out-dir "$out"
