#!/usr/bin/env bash
# Device call: the decode stage with the GPU's JPEG engines (nvImageCodec, the `hwdecode`
# extra) beside nvjpeg. Makes nvImageCodec importable as nvidia.nvimgcodec next to the
# device image's own nvidia packages, then runs the GPU decode tests, each backend's decode
# ceiling (app.bench.jpeg_decoders: torchvision-nvjpeg, nvimgcodec-hw/-cuda, simplejpeg,
# Pillow) and the engine tables with profiles (gpu_engine_profile.sh; PARTS, default "s").
# Reproduces: the decoders table and the service table of docs/performance.md. ~7 min.
#   OUT=$OUT bash bench/scripts/gpu_hardware_decode.sh
# AB='nvjpeg:false:2 engines:true:2 granian:false:2:granian' instead runs part s
# once per set-up (name:VITSERVE_HARDWARE_DECODE:decode threads[:uvicorn|granian]; ~3 min
# each, ~1.5 with DENSE_ONLY=1), after the decoders' ceilings if THREADS is
# set, then, with REPLICAS='["cuda:0","cuda:0","cuda:0"]', once more on that many engines.
# THREADS='1 4' also times the GPU decoders on 4 threads at once; PARTS=none stops after the
# decoders.
# Carry: .whl (device_wheels.sh), .carry/nvimg.tgz (device_nvimgcodec.sh) and
# ${IMAGES:-.carry/images/imagenet-dev}.
set -uo pipefail
export PYTHONUNBUFFERED=1
source bench/scripts/device_site.sh || exit 1  # with .carry/nvimg.tgz: nvImageCodec too
[ -f .carry/nvimg.tgz ] || { echo "no .carry/nvimg.tgz"; exit 1; }
decoders() {
  timeout 300 python3 -m app.bench.jpeg_decoders --images ${IMAGES:-.carry/images/imagenet-dev} \
    --batches 64 256 --seconds ${DECODE_SECONDS:-1.5} --threads ${THREADS:-1} \
    --out-dir "${OUT:-bench/results}/decode"
}
gpu_tests() {
  timeout 120 python3 -m pytest -q -m gpu --tb=short -p no:cacheprovider \
    tests/unit/test_nvimgcodec_jpeg.py tests/unit/test_decode.py 2>&1 | tail -8
}
# Part s once per set-up named in $AB (each: name:hardware_decode:decode threads[:http
# server]), the same call, results under $OUT/<name>.
ab() {
  local mode name hw threads http
  for mode in $AB; do
    IFS=: read -r name hw threads http <<< "$mode"
    echo "== part s, set-up $name"
    # REPLICAS= : gpu_engine.sh reads it too; the set-ups run on one engine, REPLICAS after
    REPLICAS= VITSERVE_HARDWARE_DECODE=$hw DECODE_THREADS=$threads \
      VITSERVE_HTTP_SERVER=${http:-uvicorn} \
      PARTS=s OUT=${OUT:-bench/results}/$name timeout ${T:-240} bash bench/scripts/gpu_engine.sh
  done
}
if [ -n "${AB:-}" ]; then
  [ -n "${TESTS:-}" ] && gpu_tests  # TESTS=1: the GPU tests first
  [ -n "${THREADS:-}" ] && decoders  # THREADS: the decoders' ceilings first
  ab
  [ -n "${REPLICAS:-}" ] && PARTS=s OUT=${OUT:-bench/results}/replicas \
    timeout ${T:-240} bash bench/scripts/gpu_engine.sh  # REPLICAS: then that many engines
  exit
fi
python3 -c "import torch; from app.serving.nvimgcodec_jpeg import NvImageCodecJpeg
print('JPEG engines:', NvImageCodecJpeg.load(torch.device('cuda')))"
gpu_tests
decoders
[ "${PARTS:-s}" = none ] ||
  PARTS="${PARTS:-s}" T=${T:-300} OUT=${OUT:-bench/results} bash bench/scripts/gpu_engine_profile.sh
