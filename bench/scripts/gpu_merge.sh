#!/usr/bin/env bash
# Reproduces: docs/performance.md, "Model speed, GPU" (table speed-gpu), the eager and graphs
#   columns of the ToMe and hybrid rows: ARCHS="deit_small_patch16_224 deit_base_patch16_224".
# Takes: one nvidia-h200 call, at most $LIMIT_S (default 600 s).
# Device call: token merging and its hybrids on the GPU, eager and eager replayed from CUDA
# graphs (as the server runs them), DeiT-S (random weights: speed only), bf16, batch 256,
# each ratio against dense timed in the same run, plus each merging block timed alone
# (eager: what matching, merging and proportional attention cost). Rows are written as
# they finish, so a run cut short (timeout $LIMIT_S) keeps what it measured; configs are in
# order of need. Compiled rows: bench/scripts/gpu_merge_compiled.sh.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
out=${OUT:-bench/results/models}; mkdir -p "$out"
configs=(merge-t6 merge-t4 tome-r13 tome-r16 hybrid-s2-r16 tome-r8 hybrid-s2-r24-16 "merge=24@0-6")
timeout "${LIMIT_S:-600}" python3 -m app.bench.models --archs "${ARCHS:-deit_small_patch16_224}" \
  --dtypes bfloat16 --batches 256 --device cuda --warmup 5 --repeats 20 \
  --compile "${COMPILE:-off}" --cuda-graphs \
  --no-progress --configs "${configs[@]}" --out-dir "$out"
