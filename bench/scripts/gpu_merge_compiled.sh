#!/usr/bin/env bash
# Reproduces: docs/performance.md, "Model speed, GPU" (table speed-gpu), the compiled and
#   compiled+graphs columns: CONFIGS="merge-t5 merge-t5-c37 merge-t5-c34 merge-t6 tome-r16"
#   (both archs), then CONFIGS="glad-t3 glad-s3-t2" ARCHS=deit_small_patch16_224.
# Takes: one nvidia-h200 call; ~3 min of compiling for five configs x two archs, then
#   ~40 s per config (WARM_S / TIME_S bound both).
# Device call: compiled rows of token merging and its hybrids (torch.compile, the whole
# model in the graph), DeiT-S and DeiT-B (random weights: speed only), bf16, batch 256,
# each ratio against compiled dense in the same process; with the default compile mode also
# compiled+graphs rows (the compiled models replayed from CUDA graphs, as the server runs
# them with VITSERVE_COMPILE=1).
# Compiling is CPU work and dominates: phase 1 compiles every config at once, one process
# each (one timed call), which fills Inductor's on-disk caches; phase 2 then times one
# config at a time on a quiet machine, its compile mostly served from those caches. Each
# config writes its own JSON, so one that runs out of time costs only its own rows.
#   CONFIGS  presets or config texts (default: merge-t5/t6/t4, ToMe r = 8, 13, 16, two hybrids)
#   ARCHS    default: deit_small_patch16_224 deit_base_patch16_224
#   WARM_S / TIME_S  time limits of phase 1 (all configs together) and of each timing run
#   COMPILE_MODE     torch.compile mode (default; reduce-overhead adds CUDA graphs)
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
out=${OUT:-bench/results/models}; mkdir -p "$out" /tmp/warm
read -ra configs <<< "${CONFIGS:-merge-t5 merge-t6 tome-r13 tome-r16 tome-r8 hybrid-s2-r16 hybrid-s2-r24-16 merge-t4}"
read -ra archs <<< "${ARCHS:-deit_small_patch16_224 deit_base_patch16_224}"
bench=(python3 -m app.bench.models --archs "${archs[@]}" --dtypes bfloat16 --batches 256
  --device cuda --compile on --compile-mode "${COMPILE_MODE:-default}"
  --no-per-layer --no-progress)
[ "${COMPILE_MODE:-default}" = default ] && bench+=(--cuda-graphs)
start=$SECONDS
for c in "${configs[@]}"; do
  timeout "${WARM_S:-300}" "${bench[@]}" --configs "$c" --warmup 0 --repeats 1 --out-dir "/tmp/warm/${c//[^a-z0-9]/_}" \
    > "/tmp/warm/${c//[^a-z0-9]/_}.log" 2>&1 &
done
wait
echo "phase 1 (compile all, in parallel): $((SECONDS - start)) s"
for c in "${configs[@]}"; do
  t=$SECONDS
  timeout "${TIME_S:-90}" "${bench[@]}" --configs "$c" --warmup 5 --repeats 20 --out-dir "$out" \
    2>&1 | grep -v "^W1\|^  warnings" | tail -n 4
  echo "$c: phase 2 run $((SECONDS - t)) s"
done
