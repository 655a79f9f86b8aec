#!/usr/bin/env bash
# Reproduces: docs/performance.md, table worker-cpu: an HTTP worker's CPU time per request
#   at two commits of the request path, their runs alternating.
# Takes: ~1.5 min a round (ROUNDS=7: ~11 min). Any Linux machine; the table's figures are
#   of a 2-core AMD EPYC. BASE=<commit> (required) against NEW=<commit> (default HEAD);
#   SERVERS='uvicorn granian' runs each commit under each HTTP server (VITSERVE_HTTP_SERVER;
#   BASE=NEW=HEAD compares the servers alone).
# Each commit runs from its own git worktree under $WORK, so what is measured is exactly
#   that commit; every result records it (`code`). One HTTP worker, one engine, a tiny
#   test ViT (32x32, 2 blocks) so that the engine's work stays small, real JPEGs one a
#   request (IMAGES, default ../shared/images/imagenet-dev).
set -euo pipefail
repo=$PWD
base=${BASE:?BASE=<commit> to compare against}; new=${NEW:-HEAD}; rounds=${ROUNDS:-7}
servers=${SERVERS:-uvicorn}
work=${WORK:-/tmp/worker-cpu-ab}; out=${OUT:-$repo/bench/results}
images=$(realpath "${IMAGES:-../shared/images/imagenet-dev}")
mkdir -p "$work" "$out/service"
store=$work/store
[ -d "$store/tiny" ] || PYTHONPATH=$repo python3 -c "
from app.store import ModelStore
from tests.helpers import add_tiny_entry
add_tiny_entry(ModelStore('$store'))"
trees=()
for commit in $( (git rev-parse --short "$base"; git rev-parse --short "$new") | uniq); do
  tree=$work/$commit
  [ -d "$tree" ] || git worktree add -q --detach "$tree" "$commit"
  trees+=("$tree")
done
for round in $(seq "$rounds"); do
  for tree in "${trees[@]}"; do for server in $servers; do
    echo "round $round/$rounds: $(basename "$tree") under $server"
    (cd "$tree" && VITSERVE_HTTP_SERVER=$server python3 -m app bench service \
      --store "$store" --models tiny --concurrency 16 --seconds 20 --warmup 3 --images "$images" --device cpu \
      --engine process --workers 1 --no-half-load --client-processes 1 \
      --out "$out/service")
  done; done
done
for tree in "${trees[@]}"; do git worktree remove --force "$tree"; done
