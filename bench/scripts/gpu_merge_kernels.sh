#!/usr/bin/env bash
# Device call: token merging's matching on the GPU, sorts replaced by counting and two Triton
# kernels (#25). Four steps, each under its own time limit so one failure keeps the rest:
#   1. the kernel tests on CUDA (Triton vs the eager reference, bf16 to 1e-3; fullgraph
#      compile and CUDA-graph capture of a merged model); a failure is printed loudly;
#   2. one merging step alone per implementation (ToMe's argsorts, torch counting,
#      Triton), DeiT-S dims (197 tokens, 384 channels, 6 heads, r = 13), bf16, batch
#      16/64/256, eager and from CUDA graphs, CUDA events, medians;
#   3. served mode (CUDA graphs, no compile, bf16): dense, tome-r13, tome-r8 and merge-t5 on
#      DeiT-S and DeiT-Tiny (random weights: speed only), batch 16/64/256, every ratio
#      against dense timed in the same loop;
#   4. what compiling costs now that merged models compile whole: dense and tome-r13 on
#      DeiT-S, compiled and called once at batch 64 (wall seconds printed, JSON not kept;
#      the sorts, in the graph, used to take Inductor minutes per merging block).
# Reproduces: bench/results/kernels/merge-matching-*.json (step 2) and
#   bench/results/models/models-*.json (step 3), the served-mode rows of issue #25.
# Takes: one nvidia-h200 call, at most 7 min with warm-up (limits 110 + 60 + 2 x 80 + 90 s).
# Carry: .whl (pydantic and the server's packages for python3.12: the tests import them).
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || echo "WARNING: no wheels installed (carry .whl)"
export PYTHONPATH=/tmp/site:$PWD
out=${OUT:-bench/results}; mkdir -p "$out/kernels" "$out/models"
status=0
echo "== 1. kernel tests (CUDA)"
timeout 110 python3 -m pytest -q --tb=short -p no:cacheprovider --durations=5 \
  tests/unit/test_merge_kernels.py
rc=$?; [ $rc -ne 0 ] && { echo "!!!!! KERNEL TESTS FAILED (rc $rc) !!!!!"; status=1; }
echo "== 2. matching step per implementation"
timeout 60 python3 -m app.bench.merge_matching --device cuda --dtype bfloat16 \
  --batches 16 64 256 --no-progress --out-dir "$out/kernels" || { echo "!!!!! STEP 2 FAILED"; status=1; }
echo "== 3. served mode: graphs, no compile, bf16"
for arch in deit_small_patch16_224 deit_tiny_patch16_224; do
  timeout 80 python3 -m app.bench.models --archs $arch --device cuda --dtypes bfloat16 \
    --batches 16 64 256 --compile off --cuda-graphs --no-per-layer --no-progress \
    --warmup 5 --repeats 20 --configs tome-r13 tome-r8 merge-t5 --out-dir "$out/models" \
    || { echo "!!!!! STEP 3 FAILED for $arch"; status=1; }
done
echo "== 4. compile time, DeiT-S dense + tome-r13, fullgraph-capable"
t=$SECONDS
timeout 90 python3 -m app.bench.models --archs deit_small_patch16_224 --device cuda \
  --dtypes bfloat16 --batches 64 --compile on --no-per-layer --no-progress --warmup 0 \
  --repeats 1 --configs tome-r13 --out-dir /tmp/compile-time || { echo "!!!!! STEP 4 FAILED"; status=1; }
echo "compile + one timed call of dense and tome-r13: $((SECONDS - t)) s"
exit $status
