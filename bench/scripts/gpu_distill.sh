#!/usr/bin/env bash
# Reproduces: the README's "The variants that ship" (table variants) and docs/compression.md,
#   "The recipes, and why": the weights of the declared distilled entries, e.g.
#   bench/scripts/gpu_distill.sh 'merge-t5::"steps": 800, "lr": 1e-4, "warmup": 50,
#   "augment": {"mix_prob": 0, "rand_augment": null, "crop_scale": [0.5, 1]}, "seed": 1'
#   (each manifest's source.details.command is the exact recipe).
# Takes: one nvidia-h200 call: ~2 min of training per 800-step job, BUDGET_S (default 330 s)
#   at most, plus the teacher pull and the evaluation.
# Device call: distil compressed DeiT-Tinys in parallel (one `vitserve compress` each,
# seeded), on imagenet-train + imagenet-extra; evaluate on the held-out dev copies.
# Usage: bench/scripts/gpu_distill.sh "<config>[::<DistillOptions JSON members>]" ...
#   e.g. bench/scripts/gpu_distill.sh glad-t3 'tome-r13::"steps": 1000, "lr": 1e-4'
# A job with its own options gets its index in the entry name (deit_tiny-tome-r13-job1);
# its seed is 0 unless its options name one.
# Jobs go round-robin over the visible GPUs. When jobs share a GPU they would time each
# other, so their speed is left to `vitserve bench models` (--speed-arch none); so does
# SPEED_ARCH=none (a merged model's compile takes minutes, longer than a call may have).
# WHEELS: the folder of wheels to install (default .whl; distillation needs only pydantic's).
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_CACHE=$PWD/.carry/hf-cache HF_HUB_OFFLINE=1
source bench/scripts/device_site.sh || exit 1
out=${OUT:-runs}; store=/tmp/store; mkdir -p "$out"
python3 -m app store pull deit_tiny_patch16_224 --store $store
workers=$(( $(nproc) / $# - 1 ))
gpus=$(nvidia-smi -L | wc -l)
speed=${SPEED_ARCH:-deit_small_patch16_224}; [ "$#" -gt "$gpus" ] && speed=none
i=0
for job in "$@"; do
  cfg=${job%%::*}; extra=""; [ "$job" != "$cfg" ] && extra="${job#*::}, "
  name="deit_tiny-$(echo "$cfg" | sed 's/@/at/g' | tr -c 'a-z0-9\n' '-' | tr -s '-' | sed 's/-$//')"
  [ "${#name}" -gt 58 ] && name="deit_tiny-cfg-$(echo "$cfg" | sha1sum | cut -c1-8)"  # 64-char names
  [ -n "$extra" ] && name="$name-job$i"  # one config may run with several recipes
  seed=(--seed 0); [[ "$extra" == *'"seed"'* ]] && seed=()  # a job's own seed wins
  CUDA_VISIBLE_DEVICES=$((i % gpus)) python3 -m app compress --store $store --teacher deit_tiny_patch16_224 \
    --config "$cfg" --images .carry/images/imagenet-train \
    --extra-images .carry/images/imagenet-extra --eval-images .carry/images/imagenet-dev-256 \
    --out "$name" "${seed[@]}" --time-budget "${BUDGET_S:-330}" --speed-arch $speed \
    --options "{${extra}\"num_workers\": $workers, \"log_every\": 100}" \
    > "$out/distill-$i.log" 2>&1 &
  i=$((i + 1))
done
wait
tail -n 25 "$out"/distill-*.log
mv "$out"/distill-*.log $store/
tar czf "$out/manifests-and-logs.tgz" -C $store $(cd $store && ls -d deit_tiny-*/manifest.json distill-*.log)
python3 - "$store" "$out" <<'PY'
import json, sys
from pathlib import Path
store, out = Path(sys.argv[1]), Path(sys.argv[2])
for m in sorted(store.glob("deit_tiny-*/manifest.json")):
    d = json.loads(m.read_text()); f = d["metrics"].get("fidelity", {}); s = d["metrics"].get("speed", {})
    print(f"{d['name']:48s} agree {f.get('agreement_top1', 0):.3f} top1 {f.get('student_top1_acc', 0):.3f}"
          f" speedup {s.get('speedup')} steps {d['source']['details']['steps']}")
# bf16 copies of the distilled weights: each under the 16 MB a returned file may have
from safetensors.torch import load_file, save_file
import torch
for w in sorted(store.glob("deit_tiny-*/model.safetensors")):
    state = {k: v.to(torch.bfloat16) for k, v in load_file(w).items()}
    save_file(state, out / f"{w.parent.name}.bf16.safetensors")
PY
