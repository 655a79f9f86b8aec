#!/usr/bin/env bash
# Reproduces: the cross-fitted fidelity of distilled entries whose recorded recipes want a
#   GPU (deit_tiny-merge-t6, deit_tiny-glad-s3-t3 in docs/compression.md). On one GPU
#   machine every fold of FOLDS trains side by side (cross_fit.sh with TRAIN_ONLY=1: the
#   entry's own recipe on half of imagenet-extra), and comes back packed (pack_folds.py;
#   at most seven folds a call, the device's limit on files). Here:
#     python3 bench/scripts/unpack_folds.py <the call's files> /tmp/cross-fit
#     ENTRY=deit_tiny-merge-t6 SEEDS="0 1 2" WORK=/tmp/cross-fit bash bench/scripts/cross_fit.sh
#   scores them over dev + extra and records the figure in the entry's manifest.
# Takes: the GPU sets the pace, shared by the folds side by side: on an H100, six 800-step
#   merge-t6 folds and one 3,000-step glad-s3-t3 fold took 450 s in all (the merge folds done
#   at 150 s); GLAD folds share the GPU with no gain: two side by side took 310 s of training
#   (400 s a call), three ran at 7 steps/s each and missed a 575-s limit at 90%. LIMIT (s)
#   bounds the call, leaving a minute to pack: each fold's training gets what is left less
#   START_S for its start-up (FOLD_BUDGET_S), stops there and keeps its checkpoint under
#   WORK, so the same call again on the still-warm machine resumes it; a cold machine
#   starts it over.
#   FOLDS="deit_tiny-merge-t6:0:a deit_tiny-merge-t6:0:b" IMAGES=<its photos> \
#     HF_HUB_CACHE=<hub cache> WHEELS=<wheels> OUT=<out> bash bench/scripts/gpu_cross_fit.sh
# A dry run here: NO_WHEELS=1 OPTIONS='{"steps":2,"batch_size":8}' TAG=smoke.
set -uo pipefail
cd "$(dirname "$0")/../.."
T0=$(date +%s); LIMIT=${LIMIT:-540}
source bench/scripts/device_site.sh || [ -n "${NO_WHEELS:-}" ] || exit 1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
work=${WORK:-/tmp/cross-fit}; logs=$work/logs; out=${OUT:?the folder whose files come back}
mkdir -p "$logs" "$out"
names=()
declare -A prepared
for fold in ${FOLDS:?ENTRY:SEED:FOLD ...}; do
  IFS=: read -r entry seed half <<< "$fold"
  # the halves of extra and the teacher, once per entry, before the folds run side by side
  if [ -z "${prepared[$entry]:-}" ]; then
    SEEDS=" " TRAIN_ONLY=1 WORK=$work ENTRY=$entry bash bench/scripts/cross_fit.sh > /dev/null
    prepared[$entry]=1
  fi
  left=$((LIMIT - 60 - $(date +%s) + T0))
  ENTRY=$entry SEEDS=$seed FOLDS=$half TRAIN_ONLY=1 WORK=$work \
    FOLD_BUDGET_S=$((left - ${START_S:-90})) timeout $((left + 30)) \
    bash bench/scripts/cross_fit.sh > "$logs/$entry-s$seed-$half.log" 2>&1 &
  names+=("$entry${TAG:+-$TAG}-s$seed-fold-$half")
done
wait
for log in "$logs"/*.log; do echo "== $(basename "$log"): $(tail -c 300 "$log" | tr '\r' '\n' | tail -n 1)"; done
python3 bench/scripts/pack_folds.py "$work/store" "$out" "${names[@]}"
tar cf "$out/logs.tar" -C "$work" logs
echo "done in $(($(date +%s) - T0)) s"
