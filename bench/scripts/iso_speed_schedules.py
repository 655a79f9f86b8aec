"""Merge schedules that should run as fast as a reference one, from a cost model fitted to
measured speeds: the served time of a merge config relative to dense, as a linear function
of the work its blocks keep (``block_cost``: attention on the tokens each block takes in,
the MLP on those it keeps), its number of merging blocks and, with proportional attention,
that number again (the mask's cost), plus a constant (patch embedding, head, launches).

It prints the fit against every measured config, then, for 3 to 8 merging blocks spread
over the first blocks, decreasing merge sizes scaled until the predicted time equals the
reference's. The candidates are a prediction: time the ones worth keeping.

    python3 bench/scripts/iso_speed_schedules.py \\
      bench/results/models/models-nvidia-h200-20261207-041417.json \\
      bench/results/models/models-nvidia-h200-20261207-042000.json \\
      --reference 'merge=55@0,55@4,43@8;proportional=off'
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from app.bench.compression_tables import ARCH_SHAPES, block_cost
from app.vit.builder import resolve_config
from app.vit.config import CompressionConfig

FEATURES = ("work", "merges", "merges_proportional", "1")


def features(config: CompressionConfig, arch: str) -> list[float]:
    """[work kept, merging blocks, merging blocks with proportional attention, 1]."""
    merges = sum(1 for r in config.merge_r(ARCH_SHAPES[arch][1]) if r > 0)
    proportional = merges if config.proportional_attention else 0
    return [block_cost(str(config), arch), merges, proportional, 1.0]


def measured(files: list[Path], arch: str, batch: int) -> dict[str, float]:
    """Speed-up of every pure merge config timed at ``batch`` in served mode (graphs)."""
    speedups = {}
    for path in files:
        for row in json.loads(path.read_text())["rows"]:
            served = row.get("cuda_graphs") and not row["compiled"]
            if row["arch"] == arch and row["batch"] == batch and served:
                config = resolve_config(row["config"])
                if config is not None and config.merge_schedule and not config.token_schedule:
                    speedups[str(config)] = row["speedup"]
    return speedups


def schedule(blocks: list[int], sizes: list[int]) -> CompressionConfig:
    merges = ",".join(f"{r}@{b}" for b, r in zip(blocks, sizes, strict=True))
    return CompressionConfig.parse(f"merge={merges};proportional=off")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="app.bench.models result files")
    parser.add_argument("--reference", required=True, help="the config to match in speed")
    parser.add_argument("--arch", default="deit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()

    speedups = measured(args.files, args.arch, args.batch)
    configs = [CompressionConfig.parse(c) for c in speedups]
    X = np.array([features(c, args.arch) for c in configs])
    coef = np.linalg.lstsq(X, 1 / np.array(list(speedups.values())), rcond=None)[0]
    terms = (f"{c:.4f}*{n}" for c, n in zip(coef, FEATURES, strict=True))
    print("time vs dense = " + " + ".join(terms))
    print(f"{'config':58} {'measured':>9} {'fitted':>7}")
    for config, x in zip(speedups, X, strict=True):
        print(f"{config:58} {speedups[config]:8.3f}x {1 / (x @ coef):6.3f}x")

    def predicted_time(config: CompressionConfig) -> float:
        try:
            return float(np.array(features(config, args.arch)) @ coef)
        except ValueError:  # merges more tokens than a block has: too much, scale down
            return 0.0

    target = predicted_time(CompressionConfig.parse(args.reference))
    print(f"\nschedules predicted as fast as {args.reference} ({1 / target:.3f}x):")
    for k in range(3, 9):
        for last in (6, 8, 9, 10):
            blocks = sorted({round(x) for x in np.linspace(0, last, k)})
            if len(blocks) < k:
                continue
            for ratio in (0.6, 0.8, 1.0):
                shape = ratio ** np.arange(k)
                lo, hi = 1.0, 98.0  # a bipartite merge takes at most half the tokens
                for _ in range(30):  # the smallest scale whose schedule is fast enough
                    mid = (lo + hi) / 2
                    sizes = [max(1, round(mid * s)) for s in shape]
                    fast_enough = predicted_time(schedule(blocks, sizes)) <= target
                    lo, hi = (lo, mid) if fast_enough else (mid, hi)
                sizes = [max(1, round(hi * s)) for s in shape]
                config = schedule(blocks, sizes)
                if time := predicted_time(config):  # 0: no scale of this shape fits the tokens
                    print(f"{1 / time:.3f}x  {config}")


if __name__ == "__main__":
    main()
