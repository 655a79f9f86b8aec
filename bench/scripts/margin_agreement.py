"""Where students disagree with the teacher: agreement by the teacher's own margin (its top-1
minus top-2 probability), in quartiles over dev + extra. A student that misses mostly where
the teacher is nearly tied loses photos whose top-1 a resampling of the photo would flip for
the teacher itself, so its shortfall there bounds what more training can win.

Each cross-fitted recipe is scored as its fidelity figure is (app.bench.fidelity.cross_fitted):
every photo by the folds whose manifests say they did not train on its folder, the mean of
theirs. Training-free configs are built from the teacher.

    HF_HUB_CACHE=../shared/hf-cache HF_HUB_OFFLINE=1 python3 bench/scripts/margin_agreement.py \\
      --work /tmp/cross-fit --recipes deit_tiny-merge-t5-gpu-dv:0,1,2 \\
      --configs tome-r13 'merge=55@0,55@4,43@8;proportional=off' --out bench/results/fidelity
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from app.bench.fidelity import trained_on
from app.bench.tables import write_result
from app.environment import environment
from app.store import ModelStore
from app.train.data import list_images
from app.train.evaluate import logits
from app.vit.builder import compress, resolve_config

QUARTILES = 4


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True, help="cross_fit.sh's WORK")
    p.add_argument("--dev", type=Path, default=Path("../shared/images/imagenet-dev"))
    p.add_argument("--teacher", default="deit_tiny_patch16_224")
    p.add_argument("--recipes", nargs="*", default=[], help="RECIPE:SEED,SEED,...")
    p.add_argument("--configs", nargs="*", default=[])
    p.add_argument("--out", type=Path, default=Path("bench/results/fidelity"))
    args = p.parse_args()
    store = ModelStore(args.work / "store")
    teacher_loaded = store.load(args.teacher)
    teacher, config = teacher_loaded.module, teacher_loaded.manifest.preprocessing
    data_config = config.timm_data_config()
    folders = [args.dev, args.work / "extra-a", args.work / "extra-b"]
    photos = {folder.name: list_images(folder) for folder in folders}

    def top1(model: torch.nn.Module, seen: set[str] = frozenset()) -> dict[str, torch.Tensor]:
        return {
            name: logits(model, files, data_config).argmax(1)
            for name, files in photos.items()
            if name not in seen
        }

    t_logits = {name: logits(teacher, files, data_config) for name, files in photos.items()}
    t_top1 = {name: lg.argmax(1) for name, lg in t_logits.items()}
    margin_N = torch.cat(
        [lg.softmax(1).topk(2).values.diff(dim=1).neg().squeeze(1) for lg in t_logits.values()]
    )
    edges = torch.quantile(margin_N, torch.linspace(0, 1, QUARTILES + 1)[1:-1])
    quartile_N = torch.bucketize(margin_N, edges)

    def by_quartile(agree_N: torch.Tensor) -> list[float]:
        return [round(agree_N[quartile_N == q].mean().item(), 4) for q in range(QUARTILES)]

    rows = []
    for text in args.configs:
        preds = top1(compress(teacher, resolve_config(text)))
        agree = torch.cat([(preds[n] == t_top1[n]).float() for n in photos])
        rows.append(
            {"name": text, "training": "training-free", "by_margin_quartile": by_quartile(agree)}
        )
    for spec in args.recipes:
        recipe, seeds = spec.split(":")
        for seed in seeds.split(","):
            held_out: dict[str, list[torch.Tensor]] = {name: [] for name in photos}
            for part in "ab":
                fold = store.load(f"{recipe}-s{seed}-fold-{part}")
                for name, preds in top1(fold.module, trained_on(fold.manifest)).items():
                    held_out[name].append((preds == t_top1[name]).float())
            agree = torch.cat([torch.stack(held_out[name]).mean(0) for name in photos])
            rows.append(
                {
                    "name": f"{recipe}-s{seed}",
                    "training": "cross-fitted",
                    "by_margin_quartile": by_quartile(agree),
                    "agreement_top1": round(agree.mean().item(), 4),
                }
            )
    for row in rows:
        print(
            f"{row['name'][:48]:48s} "
            + "  ".join(f"{100 * a:5.1f}%" for a in row["by_margin_quartile"])
        )
    result = {
        **environment("cpu"),
        "teacher": args.teacher,
        "photos": {name: len(files) for name, files in photos.items()},
        "margin_quartile_edges": [round(e, 4) for e in edges.tolist()],
        "method": "teacher margin = top-1 minus top-2 probability on the eval transform; "
        "quartiles over dev + extra; agreement of each row's top-1 with the teacher's per quartile",
        "rows": rows,
    }
    write_result(args.out, "margin-agreement-cpu", result)


if __name__ == "__main__":
    main()
