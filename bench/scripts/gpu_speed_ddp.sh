#!/usr/bin/env bash
# Device call on nvidia-h200-x4: model speed with CUDA graphs (torch.compile reduce-overhead),
# token-merging speed eager + compiled, and distillation scaling 1 GPU vs 2 GPUs (torchrun DDP).
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_CACHE=$PWD/.carry/hf-cache HF_HUB_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
out=${OUT:-runs}; mkdir -p "$out"
glad="glad-t3 glad-s2-t2 glad-s3-t2 glad-s3-t3 static=0-1;tokens=99@2,50@5,26@8"
merge="tome-r8 tome-r13 tome-r16 hybrid-s2-r16 hybrid-s2-r24-16"
bench() {  # gpu arch log-name extra-args...
  local gpu=$1 arch=$2 name=$3; shift 3
  CUDA_VISIBLE_DEVICES=$gpu python3 -m app.bench.models --archs "$arch" --dtypes bfloat16 \
    --batches 256 --device cuda --warmup 5 --repeats 30 --no-progress --no-per-layer \
    --out-dir "$out" "$@" > "$out/$name.log" 2>&1
}
IFS=' ' read -r -a G <<< "$glad"; IFS=' ' read -r -a M <<< "$merge"
bench 0 deit_small_patch16_224 graphs-s --compile on --compile-mode reduce-overhead --configs "${G[@]}" "${M[@]}" &
bench 1 deit_base_patch16_224 graphs-b --compile on --compile-mode reduce-overhead --configs "${G[@]}" "${M[@]}" &
(bench 2 deit_small_patch16_224 merge-s --compile both --configs "${M[@]}";
 bench 2 deit_base_patch16_224 merge-b --compile both --configs "${M[@]}") &
python3 -m app store pull deit_tiny_patch16_224 --store /tmp/store > /dev/null
common=(--store /tmp/store --teacher deit_tiny_patch16_224 --config glad-t3
  --images .carry/images/imagenet-train --extra-images .carry/images/imagenet-extra
  --eval-images .carry/images/imagenet-dev-256 --seed 0 --steps 600)
wait  # benchmarks first, alone on the machine
CUDA_VISIBLE_DEVICES=3 python3 -m app compress "${common[@]}" --out ddp-1gpu \
  --options '{"num_workers": 14, "log_every": 50}' > "$out/ddp-1gpu.log" 2>&1
CUDA_VISIBLE_DEVICES=2,3 torchrun --standalone --nproc_per_node=2 -m app compress "${common[@]}" \
  --out ddp-2gpu --options '{"num_workers": 14, "log_every": 50}' > "$out/ddp-2gpu.log" 2>&1
for f in "$out"/*.log; do echo "== $f"; grep -v "it/s\]\|step/s\]" "$f" | tail -n 22; done
grep -ho "distill: 100%[^]]*]" "$out"/ddp-*.log | tail -4
tar czf "$out/logs.tgz" -C "$out" $(cd "$out" && ls *.log) && rm "$out"/*.log
tar czf "$out/ddp-manifests.tgz" -C /tmp/store ddp-1gpu/manifest.json ddp-2gpu/manifest.json
