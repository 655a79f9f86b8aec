#!/usr/bin/env bash
# Cross-fitted fidelity of a distilled entry whose recipe trains on imagenet-extra, so that
# extra is no held-out set for the entry itself: its recorded recipe runs twice, each time
# with half of extra (alternate files by name) in place of all of it, and every photo of
# dev + extra is scored by the fold that did not train on it (app.bench.fidelity
# --cross-fit); the pooled figure goes into the entry's manifest (--record-in).
#   ENTRY=deit_tiny-merge-t5 SEEDS="0 1" bash bench/scripts/cross_fit.sh
# (2 folds x ~12 min a seed on 2 cores). The folds' recipe is the manifest's own command,
# run as recorded (its device, steps) with each seed of SEEDS (default: the recorded one).
# On a machine where the photos lie elsewhere (a GPU machine), IMAGES and HF_HUB_CACHE name
# them, and TRAIN_ONLY=1 trains the folds alone (no dev photos needed): copy
# $WORK/store/<entry>-s<seed>-fold-{a,b} back into the same WORK and run this again here
# to score them. A recipe under test: OPTIONS='{"merged_features":"aligned"}' TAG=aligned
# (FOLDS=a: one fold only, a quick look before both). Another schedule under the same recipe:
# CONFIG='merge=38@0,29@1,23@3,18@4,14@7;proportional=off' TAG=c50. Each fold checkpoints
# under WORK/checkpoints: FOLD_BUDGET_S (s of training) stops one there and exits 3, and the
# same command again resumes it.
set -euo pipefail
cd "$(dirname "$0")/../.."
entry=${ENTRY:-deit_tiny-merge-t5}
images=${IMAGES:-../shared/images}
work=${WORK:-/tmp/cross-fit}
mkdir -p "$work/store"
python3 - "$images/imagenet-extra" "$work" <<'PY'
import csv, os, sys
src, work = os.path.abspath(sys.argv[1]), sys.argv[2]
rows = sorted(csv.DictReader(open(os.path.join(src, "labels.csv"))), key=lambda r: r["file"])
for k, fold in enumerate("ab"):
    folder = os.path.join(work, f"extra-{fold}")
    os.makedirs(folder, exist_ok=True)
    part = rows[k::2]
    for row in part:
        link = os.path.join(folder, row["file"])
        if not os.path.lexists(link):
            os.symlink(os.path.join(src, row["file"]), link)
    labels = os.path.join(folder, "labels.csv")
    if os.path.exists(labels):  # written once: folds running side by side read it
        continue
    with open(labels + ".tmp", "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(part)
    os.replace(labels + ".tmp", labels)
PY
# the teacher and the recorded seed (one line each)
{ read -r teacher; read -r recorded; } < <(python3 - "model_store/$entry/manifest.json" <<'PY'
import json, sys
source = json.load(open(sys.argv[1]))["source"]
print(source["ref"], source["details"]["seed"], sep="\n")
PY
)
[ -d "$work/store/$teacher" ] || cp -r "model_store/$teacher" "$work/store/"
# a fresh clone has the teacher's manifest only: its weights come from the hub cache
HF_HUB_CACHE=${HF_HUB_CACHE:-../shared/hf-cache} HF_HUB_OFFLINE=1 python3 - \
  "$work/store" "$teacher" <<'PY'
import sys
from app.store import ModelStore
from app.store.pull import pull
store, teacher = ModelStore(sys.argv[1]), sys.argv[2]
if not store.has_weights(teacher):
    pull(store, store.manifest(teacher).architecture, name=teacher)
PY
seeds=${SEEDS:-$recorded}
# OPTIONS (JSON merged into the recipe's) or CONFIG tries another recipe under its own TAG;
# its figure is written beside the others, not into the entry's manifest
recipe=$entry${TAG:+-$TAG}
folds=(); cut_off=()
for seed in $seeds; do
  for fold in ${FOLDS:-a b}; do
    name=$recipe-s$seed-fold-$fold
    folds+=("$name")
    [ -f "$work/store/$name/manifest.json" ] && continue
    command=$(python3 -m app.bench.cross_fit --entry "$entry" --seed "$seed" \
      --extra "$work/extra-$fold" --out "$name" --images "$images" \
      ${TRAIN_ONLY:+--train-only} ${OPTIONS:+--options "$OPTIONS"} ${CONFIG:+--config "$CONFIG"})
    echo "== seed $seed, fold $fold: $command --store $work/store"
    # checkpoints under WORK: a fold cut off (FOLD_BUDGET_S, a killed run) resumes where it
    # stopped when this runs again with the same WORK (a warm GPU machine keeps /tmp)
    bash -c "$command --store $work/store --checkpoint-dir $work/checkpoints/$name --resume \
      ${FOLD_BUDGET_S:+--time-budget $FOLD_BUDGET_S}"
    # a fold its budget cut short is no fold: its entry goes, so the next run resumes it
    if ! python3 - "$work/store/$name" <<'PY'
import json, shutil, sys
from pathlib import Path
entry = Path(sys.argv[1])
details = json.loads((entry / "manifest.json").read_text())["source"]["details"]
if details.get("stopped", "completed") != "completed":
    print(f"{entry.name}: stopped at step {details['steps']} ({details['stopped']})")
    shutil.rmtree(entry)
    sys.exit(1)
PY
    then
      cut_off+=("$name")
    fi
  done
done
if ((${#cut_off[@]})); then
  echo "cut off by FOLD_BUDGET_S, their checkpoints kept: ${cut_off[*]}; run again to resume"
  exit 3
fi
[ -n "${TRAIN_ONLY:-}" ] && exit 0
record=()
[ -z "${OPTIONS:-}${CONFIG:-}" ] && record=(--record-in "model_store/$entry/manifest.json")
HF_HUB_CACHE=${HF_HUB_CACHE:-../shared/hf-cache} HF_HUB_OFFLINE=1 python3 -m app.bench.fidelity \
  --store "$work/store" --teacher "$teacher" \
  --images "$images/imagenet-dev" "$work/extra-a" "$work/extra-b" \
  --entries "${folds[@]}" --cross-fit "$recipe" --seeds $seeds "${record[@]}"
