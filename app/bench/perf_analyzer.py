"""One JSON record of a ``bench/scripts/perf_analyzer.sh`` run, from its per-level CSVs.

perf_analyzer writes one CSV per level
(``pa-<model>-<protocol>-<input>-b<images a request>-c<concurrency>.csv``; runs before the
``-b`` part had one image a request) with no word of the device, the software or which
model is the reference. This gathers a run's CSVs into
``perf-analyzer-<device>-<stamp>.json`` beside them: every level's inferences/s and
latencies, each compressed/dense ratio taken within one protocol, input, images a request
and concurrency (the same server, minutes apart), and the run's environment, so a doc table
is drawn from a result file like every other figure (``vitserve report``'s
``perf_analyzer`` renderer).
"""

from __future__ import annotations

import argparse
import csv
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from app.bench.tables import write_result
from app.environment import device_slug, environment, server_settings

CSV_NAME = re.compile(
    r"pa-(?P<model>.+)-(?P<protocol>http|grpc)-(?P<input>[a-z0-9]+)(?:-b(?P<b>\d+))?-c(?P<c>\d+)"
)


def read_levels(folder: Path) -> list[dict[str, Any]]:
    """Every level perf_analyzer measured in ``folder`` (an unstable level wrote no CSV).
    Its ``infer_per_s`` counts images: perf_analyzer counts each of a request's ``-b``
    images as one inference."""
    levels = []
    for path in sorted(folder.glob("pa-*.csv")):
        match = CSV_NAME.fullmatch(path.stem)
        if match is None:
            continue
        rows = list(csv.DictReader(path.open()))
        if not rows:
            continue
        row = rows[0]
        levels.append(
            {
                "model": match["model"],
                "protocol": match["protocol"],
                "input": match["input"],
                "batch": int(match["b"] or 1),
                "concurrency": int(match["c"]),
                "infer_per_s": float(row["Inferences/Second"]),
                "p50_ms": float(row["p50 latency"]) / 1e3,
                "p99_ms": float(row["p99 latency"]) / 1e3,
            }
        )
    return levels


SUMMARY_FIELDS = ("model", "protocol", "input", "batch", "concurrency", "infer_per_s")


def write_summary(folder: Path, levels: Sequence[dict[str, Any]]) -> Path:
    """``summary.csv`` beside the levels' CSVs: one line a level, latencies in microseconds
    as perf_analyzer writes them."""
    path = folder / "summary.csv"
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow([*SUMMARY_FIELDS[:-1], "infer_per_sec", "p50_us", "p99_us"])
        for lv in levels:
            latencies = (round(lv["p50_ms"] * 1e3), round(lv["p99_ms"] * 1e3))
            writer.writerow([*(lv[k] for k in SUMMARY_FIELDS), *latencies])
    return path


def level_key(level: dict[str, Any]) -> tuple[str, str, int, int]:
    """What makes two models' levels comparable: protocol, input, images a request (1 in
    records from before the batch was recorded) and concurrency."""
    return level["protocol"], level["input"], level.get("batch", 1), level["concurrency"]


def ratios(levels: Sequence[dict[str, Any]], dense: str, compressed: str) -> list[dict[str, Any]]:
    """``compressed``'s inferences/s over ``dense``'s at each (protocol, input, images a
    request, concurrency) both were measured at."""
    by_key = {(lv["model"], *level_key(lv)): lv for lv in levels}
    out = []
    for (model, protocol, input_, batch, c), level in sorted(by_key.items()):
        other = by_key.get((compressed, protocol, input_, batch, c))
        if model == dense and other is not None:
            out.append(
                {
                    "protocol": protocol,
                    "input": input_,
                    "batch": batch,
                    "concurrency": c,
                    "speedup": other["infer_per_s"] / level["infer_per_s"],
                }
            )
    return out


def summarize(
    folder: Path, *, dense: str, compressed: str, dtype: str, env: dict[str, Any]
) -> dict[str, Any]:
    """The run's record: environment, levels, per-level ratios, and under ``speedup`` the
    ratio of the two models' best inferences/s over all levels. ``batch`` is the images a
    request of every level, a sorted list where the run had several."""
    levels = read_levels(folder)
    batches = sorted({lv["batch"] for lv in levels}) or [1]
    best = {
        model: max((lv["infer_per_s"] for lv in levels if lv["model"] == model), default=None)
        for model in (dense, compressed)
    }
    return {
        **env,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "client": "perf_analyzer",
        "batch": batches[0] if len(batches) == 1 else batches,
        "dtype": dtype,
        "reference": dense,
        "models": [dense, compressed],
        "levels": levels,
        "ratios": ratios(levels, dense, compressed),
        "speedup": best[compressed] / best[dense] if all(best.values()) else None,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m app.bench.perf_analyzer",
        description="Gather perf_analyzer.sh's CSVs into one JSON result beside them.",
    )
    parser.add_argument("folder", type=Path)
    parser.add_argument("--dense", required=True)
    parser.add_argument("--compressed", required=True)
    parser.add_argument("--dtype", default="bfloat16", help="the server's (VITSERVE_DTYPE)")
    parser.add_argument("--device", default="cuda", help="the device the server ran on")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    env = {
        **environment(device),
        # the script hands the caller's VITSERVE_* settings to the server it starts
        "server": server_settings(),
    }
    result = summarize(
        args.folder, dense=args.dense, compressed=args.compressed, dtype=args.dtype, env=env
    )
    write_summary(args.folder, result["levels"])
    write_result(args.folder, f"perf-analyzer-{device_slug(device)}", result)
    for row in result["ratios"]:
        print(
            f"{row['protocol']:5} {row['input']:6} b={row['batch']:<3} c={row['concurrency']:<4} "
            f"{args.compressed} / {args.dense}: {row['speedup']:.2f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
