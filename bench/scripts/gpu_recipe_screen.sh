#!/usr/bin/env bash
# Reproduces: a recipe screen for a distilled entry's config on one GPU machine (table
#   recipe-screen-3x55-off in docs/compression.md). Each recipe's fold a (three seeds side by
#   side, cross_fit.sh with TRAIN_ONLY=1) is scored there over extra-b, the half it left out;
#   the best, if its mean beats BASE, gets its fold b and a cross-fitted figure over extra,
#   and its six folds come back packed (bench/scripts/pack_folds.py).
#   Here, bench/scripts/unpack_folds.py puts them in WORK/store, and cross_fit.sh with the
#   same TAG and OPTIONS scores them over dev + extra: the figure of record.
# Takes: ~5 min of an H100 per recipe screened (three runs side by side), as many again for
#   the best one's fold b; LIMIT (s) bounds the whole call, recipes that no longer fit are
#   skipped. SCREEN_ONLY=1: no fold b (the best's fold a comes back).
#   RECIPES=recipes.txt ENTRY=deit_tiny-merge-t5-gpu CONFIG='merge=55@0,55@4,43@8;proportional=off' IMAGES=<its photos> \
#     HF_HUB_CACHE=<hub cache> OUT=<out> bash bench/scripts/gpu_recipe_screen.sh
# recipes.txt: one "TAG OPTIONS-JSON" a line, the JSON merged into the entry's recorded
# options (an "augment" replaces the recorded one whole).
# Carry (device): the wheels device_site.sh installs (WHEELS=<folder>), the photos, the cache.
set -uo pipefail
cd "$(dirname "$0")/../.."
T0=$(date +%s); LIMIT=${LIMIT:-540}
left() { echo $((LIMIT - $(date +%s) + T0)); }
source bench/scripts/device_site.sh || [ -n "${NO_WHEELS:-}" ] || exit 1  # NO_WHEELS: a dry run here
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
entry=${ENTRY:-deit_tiny-merge-t5-gpu}
work=${WORK:-/tmp/screen}; logs=$work/logs; out=${OUT:?the folder whose files come back}
mkdir -p "$logs" "$out"
run_folds() {  # TAG FOLD: three seeds side by side, in the background
  for seed in 0 1 2; do
    ENTRY=$entry CONFIG="${CONFIG:-}" TAG=$1 SEEDS=$seed FOLDS=$2 OPTIONS="${opts[$1]}" \
      TRAIN_ONLY=1 WORK=$work timeout $(($(left) - 45)) \
      bash bench/scripts/cross_fit.sh > "$logs/$1-s$seed-$2.log" 2>&1 &
  done
}
score() {  # OUT-DIR ARGS...: the folds over extra, on the GPU
  local dir=$1; shift
  timeout $(($(left) - 20)) python3 -m app.bench.fidelity --store "$work/store" \
    --teacher deit_tiny_patch16_224 --images "$work/extra-a" "$work/extra-b" --device "${DEVICE:-cuda}" \
    --out-dir "$dir" "$@" | grep -v "^evaluate\|^variants"
}
SEEDS=" " TRAIN_ONLY=1 WORK=$work ENTRY=$entry bash bench/scripts/cross_fit.sh  # halves, teacher
declare -A opts
tags=()
while read -r tag json; do
  [ -n "$tag" ] && opts[$tag]=$json && tags+=("$tag")
done < "${RECIPES:?one TAG OPTIONS-JSON a line}"
took=0; screened=()
for tag in "${tags[@]}"; do
  if [ "$took" -gt 0 ] && [ "$(left)" -lt $((2 * took + 70)) ]; then
    echo "-- no room for $tag"; continue
  fi
  t=$(date +%s); run_folds "$tag" a; wait; took=$(($(date +%s) - t)); screened+=("$tag")
  echo "== $tag, fold a: $took s, $(left) s left"
done
folds=()
for tag in "${screened[@]}"; do for seed in 0 1 2; do
  name=$entry-$tag-s$seed-fold-a
  [ -f "$work/store/$name/manifest.json" ] && folds+=("$name")
done; done
score "$logs/screen" --entries "${folds[@]}"
best=$(python3 - "$logs/screen" "${BASE:-0}" "$entry" <<'PY'
import glob, json, re, statistics, sys
rows = json.load(open(sorted(glob.glob(sys.argv[1] + "/*.json"))[-1]))["rows"]
by = {}
for r in rows:
    m = re.match(r".*?-s(\d)-fold-a$", r["name"])
    if m and "extra-b" in r["eval"]:
        tag = r["name"][len(sys.argv[3]) + 1 : m.start(1) - 2]
        by.setdefault(tag, []).append(r["eval"]["extra-b"]["agreement_top1"])
for tag, a in sorted(by.items(), key=lambda kv: -statistics.mean(kv[1])):
    seeds = " / ".join(f"{100 * x:.1f}" for x in a)
    print(f"{tag}: extra-b mean {100 * statistics.mean(a):.2f}% ({seeds})", file=sys.stderr)
full = {t: statistics.mean(a) for t, a in by.items() if len(a) == 3}
best = max(full, key=full.get, default=None)
print(best if best and full[best] > float(sys.argv[2]) else "none")
PY
)
echo "== best: $best, $(left) s left"
[ "$best" = none ] && exit 0
if [ -z "${SCREEN_ONLY:-}" ] && [ "$(left)" -gt $((took + 60)) ]; then
  run_folds "$best" b; wait
  names=(); for seed in 0 1 2; do for f in a b; do names+=("$entry-$best-s$seed-fold-$f"); done; done
  score "$logs/cross-fit" --entries "${names[@]}" --cross-fit "$entry-$best" --seeds 0 1 2
fi
python3 bench/scripts/pack_folds.py "$work/store" "$out" \
  $(for seed in 0 1 2; do for f in a b; do echo "$entry-$best-s$seed-fold-$f"; done; done)
tar cf "$out/logs.tar" -C "$work" logs
echo "done in $(($(date +%s) - T0)) s"
