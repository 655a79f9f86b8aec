"""Write benchmark results into the store's manifests as their speed figures.

A manifest's speed figure is the entry's own network, timed with its own compression
config, dense beside it in the same run: the model alone (``app.bench.models``, per batch)
or end to end through HTTP (``app.bench.service``, median level against median level where
levels were repeated, else best against best). Typing
those numbers by hand is how a DeiT-S figure ends up shown as DeiT-Tiny's; this writes them
from the result files instead: every entry whose architecture and config a result timed
gets one figure per (device, mode, dtype), replacing the figure it had for the same.

    python -m app.bench.speed_figures bench/results/models/models-cpu-....json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from app.bench.models import mode_name
from app.bench.report import REPO
from app.store.manifest import (
    MANIFEST_FILE,
    Manifest,
    SpeedFigure,
    put_figure,
    rewrite_declared,
)


def device_label(result: Mapping[str, Any]) -> str:
    """'NVIDIA H200', or 'CPU, 2 cores (AMD EPYC)': a CPU figure depends on its cores."""
    if result["device_type"] == "cpu":
        cores = result.get("threads") or result["usable_cpus"]
        return f"CPU, {cores} cores ({result['device']})"
    return result["device"]


SERVED_MODE = {"cuda": "graphs", "cpu": "eager"}  # how the server runs a model by default
MODE_LABEL = {"graphs": "served: CUDA graphs, no compile", "eager": "eager (as served on CPU)"}


def figures_of(result: Mapping[str, Any], source: str) -> dict[tuple[str, str], list[SpeedFigure]]:
    """``{(architecture, config text): figures}``: one figure per (mode, dtype) the result
    timed in the mode the server runs on that device, its speed-up per batch. Failed rows
    are left out, never written as a number."""
    served = SERVED_MODE.get(result["device_type"], "eager")
    mode = f"model alone, {MODE_LABEL[served]}"
    grouped: dict[tuple[str, str, str], dict[int, float]] = {}
    for row in result["rows"]:
        if row["config"] == "dense" or row.get("speedup") is None or row.get("error"):
            continue
        if mode_name(row["compiled"], row.get("cuda_graphs", False)) != served:
            continue
        key = (row["arch"], row["config"], row["dtype"])
        grouped.setdefault(key, {})[int(row["batch"])] = round(float(row["speedup"]), 3)
    out: dict[tuple[str, str], list[SpeedFigure]] = {}
    for (arch, config, dtype), speedup in grouped.items():
        figure = SpeedFigure(
            architecture=arch,
            device=device_label(result),
            mode=mode,
            dtype=dtype,
            speedup=dict(sorted(speedup.items())),
            source=source,
        )
        out.setdefault((arch, config), []).append(figure)
    return out


def service_figures_of(
    result: Mapping[str, Any], source: str
) -> dict[tuple[str, str], list[SpeedFigure]]:
    """The same from a service result, keyed by the server's max batch (the mode says how
    the load was offered): each compressed model's median level against dense's where each
    was measured at least three times at the highest concurrency (a noisy host's best level
    reads high), else its best level against dense's best."""
    top = max(result["concurrency"])
    repeats = result["concurrency"].count(top)
    medians = {
        m: by_c.get(str(top), by_c.get(top))
        for m, by_c in result.get("median_speedups", {}).items()
    }
    use_median = repeats >= 3 and bool(medians)
    aggregate = f"median of {repeats} levels of each" if use_median else "best level of each"
    mode = (
        f"end to end through HTTP: {result['images_per_request']} photos a request, "
        f"{top} in flight, one server, {aggregate}"
    )
    out: dict[tuple[str, str], list[SpeedFigure]] = {}
    for name, best in result["speedups"].items():
        ratio = medians.get(name) if use_median else best
        model = result["models"][name]
        if ratio is None or not model.get("compression") or not model.get("architecture"):
            continue
        figure = SpeedFigure(
            architecture=model["architecture"],
            device=device_label(result),
            mode=mode,
            dtype=result["dtype"],
            speedup={int(result["batch"]): round(float(ratio), 3)},
            source=source,
        )
        out.setdefault((model["architecture"], model["compression"]), []).append(figure)
    return out


def _measured_as(mode: str) -> str:
    """A mode without how repeated levels were summarised: a median figure replaces an
    older best-level one of the same set-up."""
    return mode.split(", one server")[0]


def _same_measurement(a: Mapping[str, Any], b: SpeedFigure) -> bool:
    return (a["architecture"], a["device"], _measured_as(a["mode"]), a["dtype"]) == (
        b.architecture,
        b.device,
        _measured_as(b.mode),
        b.dtype,
    )


def update_store(store: Path, result_path: Path) -> dict[str, int]:
    """Write ``result_path``'s figures into every matching manifest under ``store``;
    ``{entry name: figures written}``. Other fields and figures stay as they were."""
    result = json.loads(result_path.read_text())
    try:
        source = result_path.resolve().relative_to(REPO).as_posix()
    except ValueError:
        source = result_path.name
    read = service_figures_of if "levels" in result else figures_of
    figures = read(result, source)
    written: dict[str, int] = {}
    for path in sorted(store.glob(f"*/{MANIFEST_FILE}")):
        raw = json.loads(path.read_text())
        manifest = Manifest.model_validate(raw)
        if manifest.compression is None:
            continue
        new = figures.get((manifest.architecture, str(manifest.compression)), [])
        if not new:
            continue
        speed = raw.setdefault("figures", {}).setdefault("speed", [])
        for figure in new:
            dumped = figure.model_dump(mode="json", exclude_none=True)
            put_figure(speed, dumped, lambda old, f=figure: _same_measurement(old, f))
        rewrite_declared(path, raw)
        written[manifest.name] = len(new)
    return written


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m app.bench.speed_figures", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "results", nargs="+", type=Path, help="app.bench.models or app.bench.service result JSONs"
    )
    parser.add_argument("--store", type=Path, default=REPO / "model_store")
    args = parser.parse_args(argv)
    for result in args.results:
        written = update_store(args.store, result)
        print(f"{result.name}: " + (", ".join(f"{k} ({v})" for k, v in written.items()) or "-"))


if __name__ == "__main__":
    main()
