"""Fidelity of many variants on the same images, in one run: the other axis of the front.

``python -m app.bench.fidelity --store S --teacher deit_tiny_patch16_224 --images DIR ...
--entries A B --configs tome-r13 ...`` evaluates store entries (distilled variants) and
configs built from the teacher on the spot -- token merging needs no training; static
attention is calibrated on ``--calibrate`` (the teacher's mean attention there), token maps
start as average pooling -- each against the teacher on every ``--images`` folder (top-1 with its
``labels.csv``). One JSON under ``bench/results/fidelity/`` holds every row, so the front compares
variants measured with the same images, preprocessing and device. A distilled entry is
only evaluated on folders it was not trained on (its manifest lists them). The teacher
runs once per folder (its logits are kept); each row also pools its folders into one
agreement with a 95% Wilson interval.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from app.bench.tables import write_result
from app.environment import environment
from app.store import ModelStore
from app.store.manifest import FidelityFigure, put_figure, rewrite_declared, wilson_interval
from app.timing import dtype_name
from app.train.data import EvalImages, eval_transform, list_images, read_labels
from app.train.evaluate import evaluate, logits
from app.vit.builder import calibrate, compress, resolve_config


def trained_on(manifest: Any) -> set[str]:
    """Folder names an entry was distilled on, from its manifest (empty if none)."""
    return {Path(d).name for d in manifest.source.details.get("train_dirs", [])}


def evaluate_all(
    store: ModelStore,
    teacher_name: str,
    folders: Sequence[Path],
    *,
    entries: Sequence[str] = (),
    configs: Sequence[str] = (),
    calibration: Path | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    teacher_loaded = store.load(teacher_name)
    teacher = teacher_loaded.module
    data_config = teacher_loaded.manifest.preprocessing.timm_data_config()
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    variants: list[tuple[str, str, str, torch.nn.Module, set[str]]] = []
    for name in entries:
        loaded = store.load(name)
        m = loaded.manifest
        variants.append((name, str(m.compression), "distilled", loaded.module, trained_on(m)))
    for text in configs:
        cfg = resolve_config(text)
        student, training = compress(teacher, cfg), "training-free"
        if cfg.static_layers:
            if calibration is None:
                raise ValueError(f"{text}: static attention needs --calibrate DIR")
            transform = eval_transform(data_config)
            batches = (
                x for x, _ in DataLoader(EvalImages(list_images(calibration), transform), 64)
            )
            calibrate(student, teacher, batches)
            training = "calibrated"
        skip = {calibration.name} if calibration and cfg.static_layers else set()
        variants.append((text, str(cfg), training, student, skip))
    files = {folder: list_images(folder) for folder in folders}
    teacher_logits = {
        folder: logits(teacher, files[folder], data_config, device=device, dtype=dtype)
        for folder in folders
    }
    rows = []
    for name, config, training, student, skip in tqdm(variants, desc="variants", unit="model"):
        results = {}
        for folder in folders:
            if folder.name in skip:
                continue
            fidelity = evaluate(
                teacher_logits[folder],
                student,
                files[folder],
                read_labels(folder),
                data_config,
                device=device,
                dtype=dtype,
            )
            results[folder.name] = fidelity.model_dump()
        row = {"name": name, "config": config, "training": training, "eval": results}
        rows.append({**row, "pooled": pooled(results)})
    return {
        **environment(device),
        "dtype": dtype_name(dtype),
        "teacher": teacher_name,
        "folders": [str(f) for f in folders],
        "rows": rows,
    }


def pooled(results: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """A row's folders as one sample: agreement with its 95% Wilson interval, top-1."""
    if not results:
        return None
    n = sum(r["n_images"] for r in results.values())
    agree = sum(round(r["agreement_top1"] * r["n_images"]) for r in results.values())
    labelled = sum(r["n_labelled"] for r in results.values())
    lo, hi = wilson_interval(agree, n)

    def accuracy(key: str) -> float | None:
        if not labelled:
            return None
        return sum((r[key] or 0.0) * r["n_labelled"] for r in results.values()) / labelled

    return {
        "folders": sorted(results),
        "n_images": n,
        "agreement_top1": agree / n,
        "agreement_ci95": [lo, hi],
        "ci_method": "Wilson score",
        "student_top1_acc": accuracy("student_top1_acc"),
        "teacher_top1_acc": accuracy("teacher_top1_acc"),
    }


def cross_fitted(name: str, folds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One recipe's fidelity from its folds (``--cross-fit``): runs of the recipe each trained
    with a part of the photos held out, every photo scored by the folds that did not see it
    (k-fold cross-fitting). It is the estimate for the entry the full recipe trained on
    every part, whose own agreement on those photos would be read on its training data.
    Per folder: the mean over the folds that scored it."""
    per_folder: dict[str, list[dict[str, Any]]] = {}
    for row in folds:
        for folder, result in row["eval"].items():
            per_folder.setdefault(folder, []).append(result)

    def mean(results: list[dict[str, Any]], key: str) -> float | None:
        values = [r[key] for r in results]
        return None if None in values else sum(values) / len(values)

    results = {
        folder: {
            "n_images": found[0]["n_images"],
            "n_labelled": found[0]["n_labelled"],
            "folds": len(found),
            **{
                key: mean(found, key)
                for key in ("agreement_top1", "student_top1_acc", "teacher_top1_acc")
            },
        }
        for folder, found in sorted(per_folder.items())
    }
    configs = {row["config"] for row in folds}
    if len(configs) != 1:
        raise ValueError(f"folds of one recipe share a config; got {sorted(configs)}")
    return {
        "name": name,
        "config": configs.pop(),
        "training": "cross-fitted",
        "folds": [row["name"] for row in folds],
        "eval": results,
        "pooled": pooled(results),
    }


def per_seed(name: str, folds: Sequence[dict[str, Any]], seeds: Sequence[int]) -> dict[str, float]:
    """Each seed's own cross-fitted agreement over all photos, from its folds (named
    ``<recipe>-s<seed>-fold-<part>``, as ``bench/scripts/cross_fit.sh`` names them): the
    spread over seeds that the pooled figure averages away."""
    out = {}
    for seed in seeds:
        own = [row for row in folds if f"-s{seed}-fold-" in row["name"]]
        if own:
            out[str(seed)] = round(cross_fitted(name, own)["pooled"]["agreement_top1"], 4)
    return out


def record_figure(manifest_path: Path, row: dict[str, Any], source: str, measured: str) -> None:
    """Write ``row``'s pooled agreement into a manifest as a fidelity figure, replacing the
    one it had over the same photo sets (a figure from the result file, never typed)."""
    pool = row["pooled"]
    figure = FidelityFigure(
        eval_sets=pool["folders"],
        n_images=pool["n_images"],
        agreement_top1=round(pool["agreement_top1"], 4),
        ci95=tuple(round(x, 4) for x in pool["agreement_ci95"]),
        seeds=row.get("seeds"),
        measured=measured,
        source=source,
        method=row["training"],
        folds=row.get("folds"),
        student_top1_acc=pool["student_top1_acc"],
    ).model_dump(mode="json", exclude_none=True)
    raw = json.loads(manifest_path.read_text())
    figures = raw.setdefault("figures", {}).setdefault("fidelity", [])
    put_figure(figures, figure, lambda old: set(old["eval_sets"]) == set(pool["folders"]))
    rewrite_declared(manifest_path, raw)


def format_table(report: dict[str, Any]) -> str:
    folders = [Path(f).name for f in report["folders"]]
    head = (
        f"{'variant':34s} {'training':14s}"
        + "".join(f" {f[:22]:>22s}" for f in folders)
        + f" {'pooled (95% CI)':>24s}"
    )
    lines = [head, "-" * len(head)]
    for row in report["rows"]:
        cells = []
        for f in folders:
            r = row["eval"].get(f)
            acc = r and r["student_top1_acc"]
            cells.append(
                f" {'(trained on)':>22s}"
                if r is None
                else f" {100 * r['agreement_top1']:8.1f}% / {100 * acc if acc else 0:5.1f}%      "
            )
        pool = row.get("pooled")
        if pool:
            lo, hi = pool["agreement_ci95"]
            cells.append(
                f" {100 * pool['agreement_top1']:8.1f}% ({100 * lo:.1f}-{100 * hi:.1f})    "
            )
        lines.append(f"{row['name'][:34]:34s} {row['training']:14s}" + "".join(cells))
    lines.append(
        "per folder: top-1 agreement with the teacher / top-1 accuracy; pooled: all folders"
        " a row was scored on, agreement with its 95% Wilson interval"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m app.bench.fidelity", description=__doc__.split("\n")[0]
    )
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--teacher", required=True)
    p.add_argument("--images", type=Path, nargs="+", required=True, help="held-out folders")
    p.add_argument("--entries", nargs="*", default=[], help="store entries (distilled)")
    p.add_argument("--configs", nargs="*", default=[], help="configs built without training")
    p.add_argument("--calibrate", type=Path, help="folder for static attention's calibration")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--cross-fit",
        metavar="NAME",
        help="the --entries are folds of one recipe, each trained with part of the photos "
        "held out: add the row NAME scoring every photo by the folds that did not see it",
    )
    p.add_argument("--seeds", type=int, nargs="*", help="the folds' training seeds (--cross-fit)")
    p.add_argument(
        "--record-in",
        type=Path,
        metavar="MANIFEST",
        help="write the --cross-fit row's pooled figure into this manifest.json",
    )
    p.add_argument("--out-dir", type=Path, default=Path("bench/results/fidelity"))
    p.add_argument("--note", help="how the scored entries were made, kept in the result file")
    args = p.parse_args(argv)
    report = evaluate_all(
        ModelStore(args.store),
        args.teacher,
        args.images,
        entries=args.entries,
        configs=args.configs,
        calibration=args.calibrate,
        device=args.device,
    )
    if args.cross_fit:
        folds = [row for row in report["rows"] if row["name"] in args.entries]
        report["rows"].append(cross_fitted(args.cross_fit, folds) | {"seeds": args.seeds})
        report["per_seed_cross_fitted"] = per_seed(args.cross_fit, folds, args.seeds or [])
    if args.note:
        report["note"] = args.note
    print(format_table(report))
    if report.get("per_seed_cross_fitted"):
        print("per seed, cross-fitted:", report["per_seed_cross_fitted"])
    path = write_result(args.out_dir, f"fidelity-{report['device_type']}", report)
    if args.record_in and args.cross_fit:
        measured = (
            f"{report['device']} ({report['device_type']}), {report['dtype']}; "
            f"cross-fitted over folds {', '.join(report['rows'][-1]['folds'])}"
        )
        record_figure(args.record_in, report["rows"][-1], path.as_posix(), measured)
        print(f"recorded in {args.record_in}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
