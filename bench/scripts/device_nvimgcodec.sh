#!/usr/bin/env bash
# Make .carry/nvimg.tgz (~9 MB): nvImageCodec (the `hwdecode` extra) slimmed to what a
# device call needs -- its Python 3.12 module, libnvimgcodec, the nvjpeg and libjpeg-turbo
# extensions -- and libnvjpeg.so.13, laid out as the wheels install them (nvidia/...). The
# two wheels whole (29 MB) would not fit the 64 MiB carry beside .whl and the photos.
# Run here, in the repo root; bench/scripts/gpu_hardware_decode.sh unpacks it.
set -euo pipefail
cd "$(dirname "$0")/../.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$tmp/w" nvidia-nvimgcodec-cu13 "nvidia-nvjpeg>=13"
for w in "$tmp"/w/*.whl; do python3 -m zipfile -e "$w" "$tmp/x"; done
codec=nvidia/nvimgcodec
keep=("$codec/__init__.py" "$codec/libnvimgcodec.so.0"
  "$codec/nvimgcodec_impl.cpython-312-x86_64-linux-gnu.so" nvidia/cu13/lib/libnvjpeg.so.13)
keep+=($(cd "$tmp/x" && ls $codec/extensions/libnvjpeg_ext.so.* $codec/extensions/libjpeg_turbo_ext.so.*))
mkdir -p .carry
tar czf .carry/nvimg.tgz -C "$tmp/x" "${keep[@]}"
tar tzvf .carry/nvimg.tgz
