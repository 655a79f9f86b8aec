#!/usr/bin/env bash
# Device call: bench/scripts/gpu_engine.sh (PARTS, default "s b s16 litserve") with py-spy
# profiles, 4 s each, of the engine (--gil: what holds its GIL), one HTTP worker and one
# load-client process, taken during the first c=256 level of part s. Everything lands in
# $OUT/results.tgz (the device returns 8 files at most): the service JSONs under r/, the
# three profiles (py-spy raw format) beside them.
#   OUT=$OUT bash bench/scripts/gpu_engine_profile.sh
# Carry: .whl (bench/scripts/device_wheels.sh; py-spy among them) and
# .carry/images/imagenet-dev.
set -u
export PYTHONUNBUFFERED=1
mkdir -p $OUT/r
( PARTS="${PARTS:-s b s16 litserve}" OUT=$OUT/r timeout ${T:-480} bash bench/scripts/gpu_engine.sh 2>&1 | tee $OUT/engine.log ) &
main=$!
spy=/tmp/site/bin/py-spy
for i in $(seq 1 300); do
  sleep 1
  [ "$(grep -c "c=64:" $OUT/engine.log 2>/dev/null)" -ge 2 ] 2>/dev/null && break
done
sleep 1.0
serve=$(pgrep -f "app serve" | head -1)
engine=$(pgrep -f "app.serving.engine" | head -1)
worker=$(pgrep -P $serve -f "spawn_main" | head -1)
bench=$(pgrep -f "app bench service" | head -1)
client=$(pgrep -P $bench -f "spawn_main" | grep -v "^$serve$" | head -1)
echo "pids: serve=$serve engine=$engine worker=$worker bench=$bench client=$client"
[ -n "$engine" ] && $spy record --nonblocking --gil -r 250 -d 4 -f raw -o $OUT/engine-gil.txt -p $engine > /dev/null 2>&1 &
[ -n "$worker" ] && $spy record --nonblocking -r 250 -d 4 -f raw -o $OUT/worker.txt -p $worker > /dev/null 2>&1 &
[ -n "$client" ] && $spy record --nonblocking -r 250 -d 4 -f raw -o $OUT/client.txt -p $client > /dev/null 2>&1 &
wait $main
cd $OUT && tar czf results.tgz r engine-gil.txt worker.txt client.txt 2>/dev/null; ls -la $OUT
