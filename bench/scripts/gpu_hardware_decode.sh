#!/usr/bin/env bash
# Device call: the decode stage with the GPU's JPEG engines (nvImageCodec, the `hwdecode`
# extra) beside nvjpeg. Makes nvImageCodec importable as nvidia.nvimgcodec next to the
# device image's own nvidia packages, then runs the GPU decode tests, each backend's decode
# ceiling (app.bench.jpeg_decoders: torchvision-nvjpeg, nvimgcodec-hw/-cuda, simplejpeg,
# Pillow) and the engine tables with profiles (gpu_engine_profile.sh; PARTS, default "s").
# Reproduces: the decoders table and the service table of docs/performance.md. ~7 min.
#   OUT=$OUT bash bench/scripts/gpu_hardware_decode.sh
# AB=1 instead runs part s twice, VITSERVE_HARDWARE_DECODE=false then true (~6 min).
# Carry: .whl (device_wheels.sh), .carry/nvimg.tgz (device_nvimgcodec.sh) and
# .carry/images/imagenet-dev.
set -uo pipefail
export PYTHONUNBUFFERED=1
mkdir -p /tmp/nv && tar xzf .carry/nvimg.tgz -C /tmp/nv || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
cat > /tmp/site/sitecustomize.py <<'PY'
import sys

sys.path.append("/tmp/nv")  # a namespace nvidia package merges it
try:
    import nvidia

    if isinstance(nvidia.__path__, list) and "/tmp/nv/nvidia" not in nvidia.__path__:
        nvidia.__path__.append("/tmp/nv/nvidia")  # a regular one needs it in its __path__
except ImportError:
    pass
PY
export LD_LIBRARY_PATH=/tmp/nv/nvidia/cu13/lib:${LD_LIBRARY_PATH:-}
export PYTHONPATH=/tmp/site:$PWD
if [ -n "${AB:-}" ]; then  # AB=1: part s with the engines off, then on, in one call
  for on in false true; do
    VITSERVE_HARDWARE_DECODE=$on PARTS=s OUT=${OUT:-bench/results}/hw-$on \
      timeout ${T:-240} bash bench/scripts/gpu_engine.sh
  done
  exit
fi
python3 -c "import torch; from app.serving.hardware_jpeg import HardwareJpeg
print('JPEG engines:', HardwareJpeg.load(torch.device('cuda')))"
timeout 120 python3 -m pytest -q -m gpu --tb=short -p no:cacheprovider \
  tests/unit/test_hardware_jpeg.py tests/unit/test_decode.py 2>&1 | tail -8
timeout 150 python3 -m app.bench.jpeg_decoders --images .carry/images/imagenet-dev \
  --batches 64 256 --seconds 2 --out-dir "${OUT:-bench/results}/decode"
PARTS="${PARTS:-s}" T=${T:-300} OUT=${OUT:-bench/results} bash bench/scripts/gpu_engine_profile.sh
