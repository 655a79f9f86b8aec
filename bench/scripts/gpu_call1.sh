#!/usr/bin/env bash
# Device call: CUDA unit tests, HTTP CUDA-vs-CPU parity on real DeiT-Tiny, model speed sweep.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_CACHE=$PWD/.carry/hf-cache HF_HUB_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"
timeout 120 python3 -m pytest -q -m gpu tests/unit/test_token_mix.py -p no:cacheprovider 2>&1 | tail -15 | tee $OUT/gpu-tests.txt
python3 -m app store pull deit_tiny_patch16_224 --store /tmp/store
timeout 200 python3 -m app.bench.http_eval --images .carry/images/imagenet-dev-256 --store /tmp/store --out $OUT 2>&1 | grep -v "classify:"
timeout 330 bash bench/scripts/run_models_gpu.sh 2>&1 | tail -60
