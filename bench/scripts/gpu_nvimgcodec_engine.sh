#!/usr/bin/env bash
# Device call: does nvImageCodec's CUDA decoder (VITSERVE_GPU_JPEG_DECODER=nvimgcodec: nvjpeg
# with host threads of its own for the Huffman pass, outside the GIL) lift one engine past
# torchvision's nvjpeg, whose process-wide lock caps it near 10k JPEGs/s? In one call:
#   1. the GPU decode tests;
#   2. each GPU decoder's ceiling (torchvision; nvImageCodec CUDA on 1, 4 and 8 host threads,
#      with GPU Huffman, and the JPEG engines + CUDA on 8), on 1 and 2 Python threads;
#   3. the engine alone (app.bench.engine_ceiling), DeiT-S dense and merge-t5, batch 64:
#      torchvision (JPEG and client pixels), its Python per image (app.bench.engine_loop),
#      then nvImageCodec (JPEG, 1 and 2 decode threads);
#   4. in the time left, part s of gpu_engine.sh (dense DeiT-S, end to end) with nvImageCodec.
# Reproduces: the decoders and engine-ceiling tables of docs/performance.md. ~9.5 min.
#   OUT=$OUT bash bench/scripts/gpu_nvimgcodec_engine.sh   (BUDGET=<s>: a shorter call; its
#   end-to-end part runs only with more than 150 s of it left)
# Carry: .whl (device_wheels.sh), .carry/nvimg.tgz (device_nvimgcodec.sh) and photos in
# ${IMAGES:-.carry/dev96/imagenet-dev}.
set -u
export PYTHONUNBUFFERED=1
images=${IMAGES:-.carry/dev96/imagenet-dev}; out=${OUT:-bench/results}
nvidia-smi --query-gpu=name --format=csv,noheader
source bench/scripts/device_site.sh > /dev/null || exit 1
python3 -c "from nvidia import nvimgcodec; print('nvImageCodec', nvimgcodec.__version__)" || exit 1
timeout 90 python3 -m pytest -q -m gpu --tb=short -p no:cacheprovider tests/unit/test_decode.py \
  tests/unit/test_batcher.py tests/unit/test_cuda_graphs.py tests/unit/test_nvimgcodec_jpeg.py \
  2>&1 | tail -12
timeout 200 python3 -m app.bench.jpeg_decoders --images "$images" --batches 64 256 --seconds 1.0 \
  --threads 1 2 --decoders torchvision-nvjpeg nvimgcodec-cuda nvimgcodec-cuda-t4 \
  nvimgcodec-cuda-t8 nvimgcodec-cuda-gpu-huffman nvimgcodec-hw+cuda-t8 --out-dir "$out/decode" \
  2>&1 | grep -v "it/s\]\|[Ww]arn" | tail -60
store=/tmp/store
python3 -m app store random deit_small_patch16_224 --name deit_small --store $store > /dev/null
python3 -m app store random deit_small_patch16_224 --name deit_small-merge-t5 --config merge-t5 \
  --store $store > /dev/null
ec=(--store $store --images "$images" --count 96 --device cuda --seconds 2.5 --warmup 0.7
  --in-flight 2048 --models deit_small deit_small-merge-t5 --batches 64 --out "$out/engine")
timeout 80 python3 -m app.bench.engine_ceiling "${ec[@]}" --kinds pixels jpeg --decode-threads 2 \
  2>&1 | grep "^| deit\|speedup\|Error"
# the engine's own CPU per image (no decode) on this host's cores
timeout 60 python3 -m app.bench.engine_loop --store $store --model deit_small --device cuda \
  --concurrency 256 --seconds 5 --out "$out/engine" 2>&1 | grep "^| pre\|Error"
export VITSERVE_GPU_JPEG_DECODER=nvimgcodec VITSERVE_NVIMGCODEC_THREADS=${NVIMGCODEC_THREADS:-8}
timeout 100 python3 -m app.bench.engine_ceiling "${ec[@]}" --kinds jpeg --decode-threads 1 2 \
  2>&1 | grep "^| deit\|speedup\|Error\|nvImageCodec"
left=$((${BUDGET:-575} - SECONDS)); echo "left: $left s"
[ $left -gt 150 ] && DENSE_ONLY=1 PARTS=s IMAGES=$images OUT=$out timeout $left \
  bash bench/scripts/gpu_engine.sh 2>&1 | grep -v "[Ww]arn" | tail -25
