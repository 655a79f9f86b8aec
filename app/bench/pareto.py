"""Speed vs fidelity: which compression configs are worth serving.

A config is only interesting if no other config is both faster and closer to the dense
model; the plot shows every measured config, the Pareto front through the undominated
ones, and the two target bars (2.0x at 80 % agreement, 2.2x at 85 %) as corners of the
region a config must reach. Speed comes from a ``run_models_bench`` JSON (ratios from one
run); fidelity from the store manifests the compress job wrote, or from a
``python -m app.bench.fidelity`` report (every variant on the same images). Fidelity is
keyed by variant, not config: a distilled model and the training-free one of the same
config run at the same speed and are two points.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from app.bench.fidelity import pooled
from app.bench.pareto_plot import TARGETS, ParetoPoint, draw_front, pareto_front
from app.store import ModelStore, StoreError
from app.timing import dtype_name
from app.vit.builder import resolve_config

log = logging.getLogger(__name__)

POOLED = "pooled"  # --folder: every folder a variant was scored on, as one sample


def collect_fidelity(store_root: Path | str, *, arch: str | None = None) -> dict[str, dict]:
    """``{entry: {'config', 'agreement_top1', 'top1', 'model', 'architecture'}}`` from the
    compressed entries whose manifest declares a fidelity figure (the first of
    ``figures.fidelity``, else the raw ``metrics.fidelity``); ``arch`` filters by dense
    architecture. Unreadable manifests are skipped with a warning, not fatal: one broken
    entry should not hide the others.
    """
    store = ModelStore(store_root)
    out: dict[str, dict] = {}
    for name in store.names():
        try:
            manifest = store.manifest(name)
        except StoreError as exc:
            log.warning("skipping %s: %s", name, exc)
            continue
        declared = manifest.figures.fidelity
        fidelity = declared[0].model_dump() if declared else manifest.metrics.get("fidelity")
        if manifest.compression is None or not isinstance(fidelity, dict):
            continue
        if arch is not None and manifest.architecture != arch:
            continue
        if "agreement_top1" not in fidelity:
            log.warning("skipping %s: metrics.fidelity has no agreement_top1", name)
            continue
        out[name] = {
            "config": str(manifest.compression),
            "agreement_top1": fidelity["agreement_top1"],
            "top1": fidelity.get("student_top1_acc"),
            "model": name,
            "architecture": manifest.architecture,
        }
    return out


def fidelity_from_report(
    report: Mapping[str, Any], folder: str, *, min_photos: int = 0
) -> dict[str, dict]:
    """``{variant (training): {'config', 'agreement_top1', 'top1'}}`` on ``folder`` from an
    ``app.bench.fidelity`` report (variants not evaluated there are left out).

    ``folder`` :data:`POOLED`: every folder a variant was scored on as one sample (a
    cross-fitted row's own pooled figure), with its 95% interval (``ci95``); variants
    scored on fewer than ``min_photos`` photos (a single fold) are left out."""
    out = {}
    for row in report["rows"]:
        if folder == POOLED:
            pool = row.get("pooled") or pooled(row["eval"])
            if pool is None or pool["n_images"] < min_photos:
                continue
            figure = {
                "agreement_top1": pool["agreement_top1"],
                "top1": pool["student_top1_acc"],
                "ci95": tuple(pool["agreement_ci95"]),
                "n_images": pool["n_images"],
            }
        elif folder in row["eval"]:
            ev = row["eval"][folder]
            figure = {"agreement_top1": ev["agreement_top1"], "top1": ev.get("student_top1_acc")}
        else:
            continue
        out[f"{row['name']} ({row['training']})"] = {"config": row["config"], **figure}
    return out


def _load(speed_json: Path | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(speed_json, Mapping):
        return speed_json
    return json.loads(Path(speed_json).read_text())


def speed_points(
    report: Mapping[str, Any],
    fidelity: Mapping[str, Mapping[str, Any]],
    *,
    arch: str,
    dtype: str,
    batch: int,
    compiled: bool,
    cuda_graphs: bool = False,
) -> tuple[list[ParetoPoint], list[str]]:
    """A point per fidelity entry whose config has a speed row in the slice, plus the
    speed rows no entry gives fidelity for. ``fidelity`` maps a label to its figures and
    ``config`` (a label without one is itself the config: a preset name or config text).
    Dense is the point (1, 1): agreement with itself is total."""
    rows = {
        row["config"]: row
        for row in report["rows"]
        if (row["arch"], row["dtype"], row["batch"], row["compiled"])
        == (arch, dtype_name(dtype), batch, compiled)
        and row.get("cuda_graphs", False) == cuda_graphs
        and row["config"] != "dense"
        and row["speedup"] is not None
    }
    points = [ParetoPoint(1.0, 1.0, "dense")]
    measured = set()
    for label, fid in fidelity.items():
        config = str(resolve_config(fid.get("config", label)))
        row = rows.get(config)
        if row is None:
            continue
        measured.add(config)
        agreement = float(fid["agreement_top1"])
        if not 0.0 <= agreement <= 1.0:
            raise ValueError(f"{label}: agreement_top1 {agreement} is not a fraction")
        top1 = fid.get("top1")
        text = label if top1 is None else f"{label} (top-1 {100 * top1:.1f}%)"
        ci95 = tuple(fid["ci95"]) if fid.get("ci95") else None
        points.append(ParetoPoint(float(row["speedup"]), agreement, text, ci95))
    missing = [row["name"] for config, row in rows.items() if config not in measured]
    return points, missing


def plot_pareto(
    speed_json: Path | Mapping[str, Any],
    fidelity: Mapping[str, Mapping[str, Any]],
    out_png: Path,
    *,
    arch: str,
    dtype: str,
    batch: int,
    compiled: bool,
    cuda_graphs: bool = False,
) -> Path:
    """Scatter speedup (x) vs top-1 agreement (y, %) for one (arch, dtype, batch, compiled)
    slice of a speed report, draw the Pareto front and the target corners; write a PNG."""
    report = _load(speed_json)
    slice_ = {
        "arch": arch,
        "dtype": dtype,
        "batch": batch,
        "compiled": compiled,
        "cuda_graphs": cuda_graphs,
    }
    points, missing = speed_points(report, fidelity, **slice_)
    return draw_front(points, missing, out_png, device=report["device"], **slice_)


def fidelity_from_distill(report: Mapping[str, Any]) -> dict[str, dict]:
    """``{entry: {'config', 'agreement_top1', 'top1'}}`` from a distillation summary
    (``bench/scripts/gpu_distill.sh``'s JSON: one row per distilled entry)."""
    return {
        row["entry"]: {
            "config": row["config"],
            "agreement_top1": row["agreement_top1"],
            "top1": row.get("student_top1_acc"),
        }
        for row in report["rows"]
    }


def load_fidelity(path: Path, folder: str, *, min_photos: int = 0) -> dict[str, dict]:
    """Fidelity from either kind of JSON: an ``app.bench.fidelity`` report (its rows have
    ``eval`` per folder) or a distillation summary."""
    report = json.loads(path.read_text())
    rows = report.get("rows", [])
    if rows and "eval" in rows[0]:
        return fidelity_from_report(report, folder, min_photos=min_photos)
    return fidelity_from_distill(report)


def write_front(
    speed_reports: Sequence[Mapping[str, Any]],
    fidelity: Mapping[str, Mapping[str, Any]],
    out_png: Path,
    *,
    targets: Sequence[tuple[float, float]] = TARGETS,
    overlay_compiled: bool = False,
    **slice_: Any,
) -> dict[str, Any]:
    """PNG plus a JSON-ready summary: every point (``speedup``, agreement, top-1, on the
    front or not). Rows of several speed reports are pooled; each ratio still comes from
    its own run, and a config timed in several keeps the first report's row.
    ``overlay_compiled``: the same batch compiled and replayed from CUDA graphs, drawn as a
    second front and listed under ``overlay``."""
    rows: dict[tuple, dict] = {}
    for report in speed_reports:
        for row in report["rows"]:
            key = (row["arch"], row["config"], row["dtype"], row["batch"], row["compiled"])
            rows.setdefault((*key, row.get("cuda_graphs", False)), row)
    report = {"device": speed_reports[0]["device"], "rows": list(rows.values())}
    points, missing = speed_points(report, fidelity, **slice_)
    overlay: list[ParetoPoint] = []
    if overlay_compiled:
        compiled_slice = {**slice_, "compiled": True, "cuda_graphs": True}
        overlay = speed_points(report, fidelity, **compiled_slice)[0]
    draw_front(
        points,
        missing,
        out_png,
        device=report["device"],
        targets=targets,
        overlay=overlay,
        **slice_,
    )
    return {
        "slice": {k: dtype_name(v) if k == "dtype" else v for k, v in slice_.items()},
        "device": report["device"],
        "targets": [{"speedup": s, "agreement_top1": a} for s, a in targets],
        "points": _points_summary(points),
        "no_fidelity": missing,
        "png": str(out_png),
        **(
            {"overlay": {"mode": "compiled + CUDA graphs", "points": _points_summary(overlay)}}
            if overlay
            else {}
        ),
    }


def _points_summary(points: Sequence[ParetoPoint]) -> list[dict[str, Any]]:
    """Every point by speed, JSON-ready, with whether it is on its own set's front."""
    front = set(pareto_front(points))
    return [
        {
            "label": p.label,
            "speedup": p.speedup,
            "agreement_top1": p.agreement,
            "agreement_ci95": list(p.ci95) if p.ci95 else None,
            "on_front": p in front,
        }
        for p in sorted(points, key=lambda p: p.speedup)
    ]


def redraw_from(args: argparse.Namespace, front: Mapping[str, Any]) -> None:
    """Fill ``args`` from a front's JSON, so that a front takes a new fidelity file (a
    variant scored since) without its command typed again; it is written over in place."""
    cut = front["slice"]
    args.speed = [Path(p) for p in front["speed_json"]]
    args.fidelity = [Path(p) for p in front["fidelity_json"]] + [
        p for p in args.fidelity if str(p) not in front["fidelity_json"]
    ]
    args.arch, args.dtype, args.batch = cut["arch"], cut["dtype"], cut["batch"]
    args.eager = not cut["compiled"] and not cut["cuda_graphs"]
    args.cuda_graphs = cut["cuda_graphs"] and not cut["compiled"]
    args.compiled_graphs = cut["compiled"] and cut["cuda_graphs"]
    args.target = [(t["speedup"], t["agreement_top1"]) for t in front["targets"]]
    args.overlay_compiled = "overlay" in front
    args.out_png, args.out_json = Path(front["png"]), args.redraw
    drawn_with = front.get("fidelity_folder", {})  # fronts drawn before 2026-12-07 lack it
    args.folder = args.folder or drawn_with.get("folder")
    if args.min_photos is None:
        args.min_photos = drawn_with.get("min_photos")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m app.bench.pareto",
        description="Speed (a models-bench JSON) against fidelity: PNG of the front + JSON.",
    )
    parser.add_argument(
        "--redraw",
        type=Path,
        metavar="FRONT_JSON",
        help="draw a front again from its JSON (speed, fidelity, slice, targets, PNG, overlay, "
        "fidelity folder), with any --fidelity given added to its own",
    )
    parser.add_argument("--speed", nargs="+", type=Path, default=[], help="models JSONs")
    parser.add_argument("--fidelity", nargs="+", type=Path, default=[])
    parser.add_argument(
        "--folder",
        help=f"fidelity report folder, or {POOLED!r}: all its photos with a 95%% interval "
        "(default: imagenet-dev, or what the --redraw front was drawn with)",
    )
    parser.add_argument(
        "--min-photos", type=int, help=f"with {POOLED!r}: leave out smaller samples (default 0)"
    )
    parser.add_argument("--arch", default="deit_small_patch16_224")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch", type=int, default=256)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--eager", action="store_true", help="eager rows (default: compiled)")
    mode.add_argument("--cuda-graphs", action="store_true", help="CUDA-graph rows, as served")
    mode.add_argument(
        "--compiled-graphs", action="store_true", help="compiled models replayed from CUDA graphs"
    )
    parser.add_argument(
        "--target",
        nargs="+",
        type=lambda text: tuple(float(x) for x in text.split(":")),
        default=list(TARGETS),
        metavar="SPEEDUP:AGREEMENT",
        help="corners drawn as the region to reach (default: %(default)s); e.g. 1.5:0.9",
    )
    parser.add_argument(
        "--overlay-compiled",
        action="store_true",
        help="also draw the same batch compiled + CUDA graphs as a second front",
    )
    parser.add_argument("--out-png", type=Path)
    parser.add_argument("--out-json", type=Path)
    args = parser.parse_args(argv)
    if args.redraw:
        redraw_from(args, json.loads(args.redraw.read_text()))
    args.folder = args.folder or "imagenet-dev"
    args.min_photos = args.min_photos or 0
    if not (args.speed and args.fidelity and args.out_png and args.out_json):
        parser.error("--speed, --fidelity, --out-png and --out-json are needed (or --redraw)")
    fidelity: dict[str, dict] = {}
    for path in args.fidelity:
        fidelity.update(load_fidelity(path, args.folder, min_photos=args.min_photos))
    summary = write_front(
        [json.loads(p.read_text()) for p in args.speed],
        fidelity,
        args.out_png,
        arch=args.arch,
        dtype=args.dtype,
        batch=args.batch,
        compiled=not (args.eager or args.cuda_graphs),
        cuda_graphs=args.cuda_graphs or args.compiled_graphs,
        targets=args.target,
        overlay_compiled=args.overlay_compiled,
    )
    summary["speed_json"] = [str(p) for p in args.speed]
    summary["fidelity_json"] = [str(p) for p in args.fidelity]
    summary["fidelity_folder"] = {"folder": args.folder, "min_photos": args.min_photos}
    args.out_json.parent.mkdir(parents=True, exist_ok=True)
    args.out_json.write_text(json.dumps(summary, indent=1))
    width = max(len(p["label"]) for p in summary["points"])
    for p in summary["points"]:
        front = "front" if p["on_front"] else ""
        print(
            f"{p['label']:{width}s} {p['speedup']:6.2f}x {100 * p['agreement_top1']:5.1f}% {front}"
        )
    print(f"wrote {args.out_png} and {args.out_json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
