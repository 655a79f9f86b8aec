#!/usr/bin/env bash
# NVIDIA perf_analyzer against /v2 (Open Inference Protocol), dense vs compressed:
#   bench/scripts/perf_analyzer.sh OUT_DIR
# starts `python -m app serve` as a user would (HTTP on $PORT, gRPC on $GRPC_PORT) on a store
# holding $DENSE and $COMPRESSED (made with random weights from $ARCH and $CONFIG if absent:
# speed does not depend on the weights), then runs perf_analyzer for every model x protocol
# (http, grpc) x input (bytes: the JPEGs of $IMAGES; uint8: the same photos decoded and
# sized to 224x224 by the client) x images a request ($BATCHES, perf_analyzer's -b; default
# 1) x concurrency ($CONCURRENCY), and writes one CSV each to OUT_DIR
# (pa-<model>-<protocol>-<input>-b<images a request>-c<concurrency>.csv), with
# the server's log, a summary table (summary.csv) and the run's JSON record
# (perf-analyzer-<device>-<stamp>.json: environment, levels, compressed/dense ratios).
# Needs perf_analyzer on PATH: `pip install perf-analyzer` (its wheel needs glibc >= 2.38;
# on older systems pip falls back to a 0.1.0 placeholder that only prints "hello").
# Any VITSERVE_* variable set by the caller reaches the server (e.g. VITSERVE_WORKERS=4).
# BENCH_SERVICE=1: then, with that server stopped, `vitserve bench service` on the same
# models, photos and concurrencies (one image a request), its JSON in OUT_DIR too.
set -euo pipefail
out=${1:?usage: $0 OUT_DIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
store=${STORE:-/tmp/pa-store}
arch=${ARCH:-deit_small_patch16_224}
config=${CONFIG:-glad-t3}
dense=${DENSE:-deit_small}
compressed=${COMPRESSED:-deit_small-$config}
images=${IMAGES:-../shared/images/imagenet-dev}
count=${COUNT:-64}
concurrency=${CONCURRENCY:-64 256}
batches=${BATCHES:-1}  # e.g. "1 16": 16 images a request share one request's HTTP cost
protocols=${PROTOCOLS:-http grpc}
inputs=${INPUTS:-bytes uint8}
port=${PORT:-8000}
grpc_port=${GRPC_PORT:-8001}
interval_ms=${MEASURE_MS:-5000}
stability=${STABILITY:-10}  # perf_analyzer's --stability-percentage (a busy CPU needs more)
# At most $TRIALS windows per level: perf_analyzer's default (10 windows until 3 agree within
# $STABILITY %) let 16 levels run past a 600-s device call with nothing written.
trials=${TRIALS:-4}

command -v perf_analyzer > /dev/null || { echo "perf_analyzer not on PATH" >&2; exit 2; }
[ -f "$store/$dense/manifest.json" ] ||
  python3 -m app store random "$arch" --name "$dense" --store "$store"
[ -f "$store/$compressed/manifest.json" ] ||
  python3 -m app store random "$arch" --name "$compressed" --config "$config" --store "$store"
python3 -m app.bench.v2_inputs --images "$images" --count "$count" --out "$out/inputs"

VITSERVE_STORE_DIR=$store VITSERVE_MODELS="[\"$dense\", \"$compressed\"]" \
  VITSERVE_DEFAULT_MODEL=$dense VITSERVE_AUTO_PULL=false VITSERVE_PORT=$port \
  VITSERVE_GRPC_PORT=$grpc_port VITSERVE_LOG_LEVEL=${VITSERVE_LOG_LEVEL:-warning} \
  python3 -m app serve > "$out/server.log" 2>&1 &
server=$!
trap 'kill -INT $server 2> /dev/null; wait $server 2> /dev/null' EXIT
# One /v2/health/ready answer speaks for one worker: wait until /metrics counts them all.
workers=${VITSERVE_WORKERS:-1}
ready_workers() {
  curl -sf "http://127.0.0.1:$port/metrics" |
    awk '/^vitserve_workers_ready/ {n += $2} END {print n + 0}'
}
for _ in $(seq 600); do
  [ "$(ready_workers)" -ge "$workers" ] && break
  kill -0 $server 2> /dev/null || { cat "$out/server.log" >&2; exit 1; }
  sleep 0.5
done
[ "$(ready_workers)" -ge "$workers" ] ||
  { echo "server not ready after 300 s ($(ready_workers) of $workers workers)" >&2; exit 1; }

for model in "$dense" "$compressed"; do
  for protocol in $protocols; do
    url=127.0.0.1:$port
    [ "$protocol" = grpc ] && url=127.0.0.1:$grpc_port
    for input in $inputs; do
      for b in $batches; do
        for c in $concurrency; do
          csv="$out/pa-$model-$protocol-$input-b$b-c$c.csv"
          echo "== $model $protocol $input, $b image(s) a request, concurrency $c"
          timeout $((trials * interval_ms / 1000 * 3 + 30)) \
            perf_analyzer -m "$model" -i "$protocol" -u "$url" -b "$b" \
            --input-data "$out/inputs/$input.json" --concurrency-range "$c:$c" \
            --measurement-interval "$interval_ms" --stability-percentage "$stability" \
            --max-trials "$trials" -f "$csv" | tail -n 4 || true
          [ -s "$csv" ] || echo "   no result (unstable or timed out)"
        done
      done
    done
  done
done
# the levels' CSVs, read once: the JSON record and summary.csv
python3 -m app.bench.perf_analyzer "$out" --dense "$dense" --compressed "$compressed" \
  --dtype "${VITSERVE_DTYPE:-bfloat16}"
column -s, -t "$out/summary.csv" 2> /dev/null || cat "$out/summary.csv"
if [ "${BENCH_SERVICE:-0}" = 1 ]; then
  kill -INT $server && wait $server || true
  trap - EXIT
  # shellcheck disable=SC2086  # the concurrencies are separate arguments
  python3 -m app bench service --store "$store" --models "$dense" "$compressed" \
    --workers "${VITSERVE_WORKERS:-1}" --images "$images" --concurrency $concurrency \
    --images-per-request 1 --seconds 5 --warmup 1.5 --client-processes 4 --no-half-load \
    --out "$out"
fi
