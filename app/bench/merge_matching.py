"""What one token-merging step costs per matching implementation, alone: the question
behind a merged model that is slower than dense at batch 16-64.

Implementations: ToMe's two argsorts (the reference), the torch ranking by counting (every
device), the Triton kernels (CUDA); the first two merge in torch, ``triton`` with the merge
kernel, and ``triton-match`` (merge step only) pairs the Triton matching with the torch
merge, so the merge kernel's own gain shows. Each is timed on a DeiT block's tokens ``[B, N,
C]`` (random: the cost does not depend on the values) for two steps: ``matching`` (head-mean
keys, then the :class:`~app.vit.merge.Matching`) and ``merge`` (the matching plus the
size-weighted merge of the tokens, as a merging block runs it). Modes: eager, and on CUDA
replayed from a CUDA graph as the server runs models. All implementations of one (batch,
step, mode) are timed interleaved (:func:`app.timing.time_interleaved`); each ratio is
against the reference of that same loop.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from app.bench.arch import fmt
from app.bench.tables import write_result
from app.environment import device_slug, environment
from app.timing import Timing, default_counts, prepare, time_interleaved, timing_device
from app.vit.merge import (
    Matching,
    best_matches,
    check_merge,
    matching_positions,
    merge_kernels,
    merge_weighted_torch,
    rank_matches,
    rank_matches_sorted,
)

REFERENCE = "argsort"
STEPS = ("matching", "merge")
Matcher = Callable[[torch.Tensor, int], Matching]
Merger = Callable[[torch.Tensor, torch.Tensor | None, Matching], tuple[torch.Tensor, torch.Tensor]]


def _torch_matcher(rank: Callable) -> Matcher:
    def match(keys_BNK: torch.Tensor, r: int) -> Matching:
        best_BA, match_BA = best_matches(keys_BNK)
        return matching_positions(match_BA, *rank(best_BA, r), keys_BNK.shape[1])

    return match


def _triton_match(keys_BNK: torch.Tensor, r: int) -> Matching:
    best_BA, match_BA = merge_kernels.best_matches(keys_BNK)
    return Matching(*merge_kernels.matching_positions(best_BA, match_BA, r, keys_BNK.shape[1]))


def _triton_merge(
    x_BNC: torch.Tensor, size_BN1: torch.Tensor | None, matching: Matching
) -> tuple[torch.Tensor, torch.Tensor]:
    return merge_kernels.merge_tokens(
        x_BNC, size_BN1, matching.slot_pos, matching.src_pos, matching.dst_slot
    )


def implementations(device: torch.device, step: str) -> dict[str, tuple[Matcher, Merger]]:
    """The (matching, merge) pairs that run on ``device`` for ``step``, the reference first."""
    found = {
        REFERENCE: (_torch_matcher(rank_matches_sorted), merge_weighted_torch),
        "torch": (_torch_matcher(rank_matches), merge_weighted_torch),
    }
    if merge_kernels is not None and device.type == "cuda":
        found["triton"] = (_triton_match, _triton_merge)
        if step == "merge":
            found["triton-match"] = (_triton_match, merge_weighted_torch)
    return found


class MergeStep(nn.Module):
    """Tokens ``[B, N, C]`` -> a merging block's work after attention: keys averaged over
    ``heads`` (here: the token channels split into heads), the matching and, for
    ``step="merge"``, the size-weighted merge; returns a tensor so CUDA graphs can hold it."""

    def __init__(self, match: Matcher, merge: Merger, r: int, heads: int, step: str) -> None:
        super().__init__()
        if step not in STEPS:
            raise ValueError(f"step must be one of {STEPS}, not {step!r}")
        self.match, self.merge, self.r, self.heads, self.step = match, merge, r, heads, step

    def forward(self, x_BNC: torch.Tensor) -> torch.Tensor:
        keys_BNK = x_BNC.unflatten(-1, (self.heads, -1)).mean(dim=-2)
        matching = self.match(keys_BNK, self.r)
        if self.step == "matching":
            return matching.slot_pos
        return self.merge(x_BNC, None, matching)[0]


def bench_matching(
    *,
    batches: Sequence[int],
    tokens: int,
    width: int,
    heads: int,
    r: int,
    device: torch.device,
    dtype: str,
    modes: Sequence[str],
    warmup: int,
    repeats: int,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """One row per (batch, step, mode, implementation) with its median/p10/p90 ms and
    its speedup over the reference of the same interleaved loop."""
    check_merge(tokens, r)
    rows: list[dict[str, Any]] = []
    groups = [(b, s, m) for b in batches for s in STEPS for m in modes]
    for batch, step, mode in tqdm(groups, desc="matching groups", disable=not progress):
        models = {
            name: prepare(
                MergeStep(match, merge, r, heads, step),
                device=device,
                dtype=dtype,
                compiled=False,
                cuda_graphs=mode == "graphs",
            )
            for name, (match, merge) in implementations(device, step).items()
        }
        results = time_interleaved(
            models,
            batch_size=batch,
            device=device,
            dtype=dtype,
            warmup=warmup,
            repeats=repeats,
            input_shape=(tokens, width),
        )
        reference = results[REFERENCE]
        for name, result in results.items():
            row = {"impl": name, "step": step, "mode": mode, "batch": batch}
            if isinstance(result, Timing):
                ratio = (
                    reference.median_ms / result.median_ms
                    if isinstance(reference, Timing)
                    else None
                )
                row |= {
                    "median_ms": result.median_ms,
                    "p10_ms": result.p10_ms,
                    "p90_ms": result.p90_ms,
                    "speedup_vs_argsort": ratio,
                    "error": None,
                }
            else:
                row |= dict.fromkeys(("median_ms", "p10_ms", "p90_ms", "speedup_vs_argsort"))
                row["error"] = result.error
            rows.append(row)
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    head = (
        f"{'batch':>5} {'step':<8} {'mode':<6} {'impl':<12} {'ms':>8} {'p10':>8} {'p90':>8} "
        f"{'vs argsort':>10}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['batch']:>5} {r['step']:<8} {r['mode']:<6} {r['impl']:<12} "
            f"{fmt(r['median_ms'], '.4f'):>8} {fmt(r['p10_ms'], '.4f'):>8} "
            f"{fmt(r['p90_ms'], '.4f'):>8} {fmt(r['speedup_vs_argsort'], '.2f'):>10}"
            + (f"  ERROR {r['error'][:80]}" if r["error"] else "")
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m app.bench.merge_matching",
        description="Time token merging's matching per implementation (argsort, torch, triton).",
    )
    parser.add_argument("--batches", nargs="+", type=int, default=[16, 64, 256])
    parser.add_argument("--tokens", type=int, default=197, help="DeiT at 224 px: 197")
    parser.add_argument("--width", type=int, default=384, help="token channels (DeiT-S: 384)")
    parser.add_argument("--heads", type=int, default=6, help="DeiT-S: 6 (keys of width 64)")
    parser.add_argument("--r", type=int, default=13, help="tokens merged (ToMe r = 13)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--warmup", type=int, help="warm-up rounds (CUDA 10, CPU 3)")
    parser.add_argument("--repeats", type=int, help="timed calls per implementation")
    parser.add_argument("--out-dir", type=Path, default=Path("bench/results/kernels"))
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    args = parser.parse_args(argv)
    device = timing_device(args.device)
    default_warmup, default_repeats = default_counts(device)
    modes = ("eager", "graphs") if device.type == "cuda" else ("eager",)
    rows = bench_matching(
        batches=args.batches,
        tokens=args.tokens,
        width=args.width,
        heads=args.heads,
        r=args.r,
        device=device,
        dtype=args.dtype,
        modes=modes,
        warmup=default_warmup if args.warmup is None else args.warmup,
        repeats=default_repeats if args.repeats is None else args.repeats,
        progress=not args.no_progress,
    )
    report = {
        **environment(device),
        "what": "one token-merging step (head-mean keys, matching[, size-weighted merge])",
        "shape": {"tokens": args.tokens, "width": args.width, "heads": args.heads, "r": args.r},
        "dtype": args.dtype,
        "triton_version": merge_kernels.triton.__version__ if merge_kernels else None,
        "method": {
            "timer": "CUDA events per call" if device.type == "cuda" else "time.perf_counter",
            "statistic": "median (p10, p90) per call",
            "interleaved": "every implementation round-robin in one loop per (batch, step, mode)",
            "graphs": "mode graphs: the step replayed from one CUDA graph per batch size",
        },
        "rows": rows,
    }
    print(format_table(rows))
    path = write_result(args.out_dir, f"merge-matching-{device_slug(device)}", report)
    return {**report, "path": str(path)}


if __name__ == "__main__":
    main()
