#!/usr/bin/env bash
# Device call: the service through the engine (one engine process per GPU, HTTP workers that
# only speak HTTP) on one H200, end to end with real imagenet-dev JPEGs, one per request,
# 64 and 256 clients; DeiT-S with random weights (none offline), dense vs $CONFIG
# (default merge-t5); then LitServe at its best set-up (12 workers x 1 torch thread, 4 API
# servers, batch 64, 10 ms) in the same run, same client and images.
# Reproduces: the service table of docs/performance.md. Takes ~6 min; PARTS picks the runs
# (default "tests s litserve"; "b" adds DeiT-B, "s16" DeiT-S with 16 images a request,
# "litserve-batch" LitServe again with each batch decoded in its batch() on
# LITSERVE_DECODE_THREADS (4) threads, "inline" the per-worker design of before;
# ENGINES=3 runs every part with 3 engines on the
# GPU, REPLICAS='["cuda:0","cuda:1"]' with one per listed device; DENSE_ONLY=1 times part s on
# dense DeiT-S alone, no half load).
# Carry: .whl (fastapi, uvicorn, pydantic, litserve, ... for python3.12) and
# .carry/images/imagenet-dev (or IMAGES=another folder); with .carry/nvimg.tgz nvImageCodec is
# there for VITSERVE_GPU_JPEG_DECODER=nvimgcodec or VITSERVE_HARDWARE_DECODE=true.
set -uo pipefail
export PYTHONUNBUFFERED=1
source bench/scripts/device_site.sh || exit 1
out=${OUT:-bench/results}/service; store=/tmp/store; cfg=${CONFIG:-merge-t5}; mkdir -p "$out"
for arch in small base; do  # kept between runs of one call
  [ -f $store/deit_$arch/manifest.json ] ||
    python3 -m app store random deit_${arch}_patch16_224 --name deit_$arch --store $store
  [ -f $store/deit_$arch-$cfg/manifest.json ] ||
    python3 -m app store random deit_${arch}_patch16_224 --name deit_$arch-$cfg --config $cfg \
      --store $store
done
common=(--store $store --images "${IMAGES:-.carry/images/imagenet-dev}" --device cuda --seconds 5
  --warmup 1.5 --client-processes 4 --max-batch-size 256 --queue-size 4096
  --start-timeout 240 --out "$out" ${ENGINES:+--engines-per-device "$ENGINES"}
  ${REPLICAS:+--replica-devices "$REPLICAS"})
one=(--images-per-request 1 --concurrency 64 256)
s_models=(--models deit_small "deit_small-$cfg" --half-load-seconds 10)
s16_models=(--models deit_small "deit_small-$cfg")
[ -n "${DENSE_ONLY:-}" ] && s_models=(--models deit_small --no-half-load) &&
  s16_models=(--models deit_small)
for part in ${PARTS:-tests s litserve}; do
  case $part in
    tests) timeout 150 python3 -m pytest -q -m gpu --tb=short -p no:cacheprovider \
        tests/unit/test_decode.py tests/unit/test_nvimgcodec_jpeg.py tests/unit/test_cuda_graphs.py \
        tests/service/test_gpu_metrics.py \
        2>&1 | grep -v "Warning\|warn\|^$\|^  " ;;
    s) python3 -m app bench service "${common[@]}" "${one[@]}" --engine process --workers "${WORKERS:-12}" \
        --decode-threads "${DECODE_THREADS:-2}" "${s_models[@]}" ;;
    b) python3 -m app bench service "${common[@]}" "${one[@]}" --engine process --workers "${WORKERS:-12}" \
        --decode-threads "${DECODE_THREADS:-2}" --models deit_base "deit_base-$cfg" \
        --no-half-load ;;
    s16) python3 -m app bench service "${common[@]}" --images-per-request 16 --concurrency 16 64 \
        --engine process --workers "${WORKERS:-12}" --decode-threads "${DECODE_THREADS:-2}" \
        "${s16_models[@]}" --no-half-load ;;
    inline) python3 -m app bench service "${common[@]}" "${one[@]}" --engine inline --workers 6 \
        --models deit_small "deit_small-$cfg" --no-half-load ;;
    litserve|litserve-batch) python3 -m app bench service "${common[@]}" "${one[@]}" --engine process \
        --workers "${WORKERS:-12}" --decode-threads "${DECODE_THREADS:-2}" --models deit_small \
        --no-half-load --litserve --litserve-workers 12 --litserve-api-servers 4 \
        --litserve-max-batch-size 64 --litserve-timeout-ms 10 \
        --litserve-decode-threads "$([ $part = litserve ] && echo 0 || echo "${LITSERVE_DECODE_THREADS:-4}")" ;;
  esac
done
(cd "$out" && ls ./*.png > /dev/null 2>&1 && tar czf service-plots.tgz ./*.png && rm ./*.png)
