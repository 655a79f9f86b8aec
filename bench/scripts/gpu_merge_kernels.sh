#!/usr/bin/env bash
# Device call: token merging on the GPU with Triton kernels for the matching (two) and the
# size-weighted merge (one) (#25). Three steps, each under its own time limit so one failure
# keeps the rest, every failure printed loudly:
#   1. the kernel tests on CUDA (matching and merge kernels vs the eager/torch reference,
#      bf16 and fp32, ragged shapes, sizes None and given, the merge's gradient; fullgraph
#      compile and CUDA-graph capture of a merged model);
#   2. one merging step alone per implementation (ToMe's argsorts, torch counting, Triton
#      matching + merge kernels, Triton matching + torch merge), DeiT-S dims (197 tokens,
#      384 channels, 6 heads, r = 13), bf16, batch 16/64/256, eager and from CUDA graphs,
#      CUDA events, medians;
#   3. served mode (CUDA graphs, no compile, bf16): dense, tome-r8, tome-r13, merge=15,
#      tome-r16 and merge-t5 on DeiT-S and DeiT-Tiny (random weights: speed only), batch
#      16/64/256, every ratio against dense timed in the same loop.
# Reproduces: bench/results/kernels/merge-matching-*.json (step 2) and
#   bench/results/models/models-*.json (step 3), the served-mode rows of issue #25.
# Takes: one nvidia-h200 call, at most 7 min with warm-up (limits 130 + 70 + 2 x 110 s).
# Carry: .whl (pydantic and the server's packages for python3.12: the tests import them).
set -uo pipefail
export PYTHONUNBUFFERED=1
source bench/scripts/device_site.sh || echo "WARNING: no wheels installed (carry .whl)"
out=${OUT:-bench/results}; mkdir -p "$out/kernels" "$out/models"
status=0
fail() { echo "!!!!! $1 FAILED (rc $2) !!!!!"; status=1; }
echo "== 1. kernel tests (CUDA)"
timeout 130 python3 -m pytest -q --tb=short -p no:cacheprovider --durations=5 \
  tests/unit/test_merge_kernels.py
rc=$?; [ $rc -ne 0 ] && fail "KERNEL TESTS" $rc
echo "== 2. one merging step per implementation"
timeout 70 python3 -m app.bench.merge_matching --device cuda --dtype bfloat16 \
  --batches 16 64 256 --no-progress --out-dir "$out/kernels"
rc=$?; [ $rc -ne 0 ] && fail "STEP 2 (microbench)" $rc
echo "== 3. served mode: graphs, no compile, bf16"
for arch in deit_small_patch16_224 deit_tiny_patch16_224; do
  timeout 110 python3 -m app.bench.models --archs $arch --device cuda --dtypes bfloat16 \
    --batches 16 64 256 --compile off --cuda-graphs --no-per-layer --no-progress \
    --warmup 5 --repeats 20 --configs tome-r8 tome-r13 merge=15 tome-r16 merge-t5 \
    --out-dir "$out/models"
  rc=$?; [ $rc -ne 0 ] && fail "STEP 3 ($arch)" $rc
done
[ $status -eq 0 ] && echo "== all steps passed" || echo "!!!!! SOME STEPS FAILED: see above !!!!!"
exit $status
