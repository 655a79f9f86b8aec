#!/usr/bin/env bash
# Reproduces: docs/performance.md, "The service end to end" (table service, the H200 rows:
#   PARTS="s b"), "Against LitServe" (table litserve: PARTS=litserve) and "The decode stage"
#   (table decode, written by the s run).
# Takes: 2-4 min per part on one nvidia-h200, most of it the workers' start-up; one call
#   (10 min) fits two or three parts.
# Device call: the service end to end on one GPU with real JPEGs (imagenet-dev: ~110 KB,
# ~500x375), DeiT-S and DeiT-B with random weights (none are available offline; speed does
# not depend on them), dense vs compressed ($CONFIG, default glad-t3), $WORKERS server
# processes; and dense DeiT-S through our service vs LitServe, one image a request.
# Before that, the CUDA tests: nvjpeg vs Pillow, and GPU metrics from a real server.
# $PARTS picks the runs (default "tests s b litserve"); each takes 2-4 min, most of it the
# workers' start-up, so split them over calls: one call has 10 min.
# Carry: .whl (fastapi, uvicorn, litserve, ... for python3.12) and .carry/images/imagenet-dev.
set -uo pipefail
export PYTHONUNBUFFERED=1
source bench/scripts/device_site.sh || exit 1
out=${OUT:-bench/results/service}; store=/tmp/store; cfg=${CONFIG:-glad-t3}; mkdir -p "$out"
for arch in small base; do
  python3 -m app store random deit_${arch}_patch16_224 --name deit_$arch --store $store
  python3 -m app store random deit_${arch}_patch16_224 --name deit_$arch-$cfg --config $cfg \
    --store $store
done
common=(--store $store --images .carry/images/imagenet-dev --device cuda --seconds 5
  --warmup 1.5 --client-processes 4 --max-batch-size 256 --queue-size 4096
  --workers "${WORKERS:-6}" --start-timeout 240 --out "$out")
dense_vs_compressed() {  # arch: small or base
  python3 -m app bench service "${common[@]}" --images-per-request 16 --concurrency ${CONC:-8 32 64} \
    --half-load-seconds "${HALF_LOAD_S:-15}" --models "deit_$1" "deit_$1-$cfg"
}
for part in ${PARTS:-tests s b litserve}; do
  case $part in
    tests) timeout 120 python3 -m pytest -q -m gpu --tb=short -p no:cacheprovider \
        tests/unit/test_decode.py tests/unit/test_cuda_graphs.py tests/bench/test_bench.py tests/unit/test_patch_embed.py \
        tests/bench/test_bench_kernels.py tests/service/test_gpu_metrics.py 2>&1 | grep -v "Warning\|warn\|^$\|^  " ;;
    s) dense_vs_compressed small ;;
    b) dense_vs_compressed base ;;
    litserve) python3 -m app bench service "${common[@]}" --models deit_small \
        --images-per-request 1 --concurrency 64 256 --litserve --litserve-workers 4 \
        --no-half-load ;;
  esac
done
(cd "$out" && ls ./*.png > /dev/null 2>&1 && tar czf service-plots.tgz ./*.png && rm ./*.png)
