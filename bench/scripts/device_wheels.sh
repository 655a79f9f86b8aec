#!/usr/bin/env bash
# Fetch, into .whl/, the wheels a device call installs: the server's packages that the
# device image lacks (its python3 is 3.12 with torch, timm, aiohttp, uvloop, grpcio, ...),
# plus LitServe (the peer), py-spy (profiles), pytest-asyncio (the GPU tests), and the
# Open Inference Protocol's: tritonclient's gRPC messages (the server's gRPC port), with
# the grpcio and protobuf they were generated for, NVIDIA's perf_analyzer, and granian
# (VITSERVE_HTTP_SERVER=granian) with click.
# Run here, in the repo root; the calls name .whl in `carry` (it is git-ignored).
set -euo pipefail
cd "$(dirname "$0")/../.."
pkgs=(fastapi starlette "uvicorn[standard]" uvicorn httptools websockets watchfiles
  python-dotenv pydantic pydantic-core pydantic-settings annotated-types typing-inspection
  python-multipart simplejpeg fastapi-offline litserve pyzmq py-spy pytest-asyncio
  typing-extensions opentelemetry-api tritonclient python-rapidjson grpcio "protobuf<7"
  perf-analyzer granian click)
plat=()
for n in 17 24 27 28 31 34 38; do plat+=(--platform "manylinux_2_${n}_x86_64"); done
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${plat[@]}" --platform manylinux2014_x86_64 -d .whl "${pkgs[@]}"
ls .whl
