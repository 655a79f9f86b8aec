"""Per-layer benchmark: block and aggregation timings that explain a whole-model speedup."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from app.bench.arch import ArchModels, fmt, randomize_compressed_layers, release
from app.timing import Failure, Timing, prepare, time_interleaved
from app.vit.builder import CompressedViT
from app.vit.merge import MergeBlock, MergeState
from app.vit.static_attention import StaticAttention


def _ms(result: Timing | Failure) -> float | None:
    return result.median_ms if isinstance(result, Timing) else None


class MergeBlockAlone(nn.Module):
    """A merging block timed on its own: ``sized`` gives it token sizes (all 1), as every
    block after the first merge has, so its attention carries the proportional bias."""

    def __init__(self, block: MergeBlock, sized: bool) -> None:
        super().__init__()
        self.block, self.sized = block, sized

    def forward(self, x_BNC: torch.Tensor) -> torch.Tensor:
        state = MergeState()
        if self.sized:
            state.set_sizes(x_BNC.new_ones(*x_BNC.shape[:2], 1))
        return self.block(x_BNC, state)


def merge_keys(model: CompressedViT) -> dict[int, tuple[str, int, int, bool]]:
    """Block index → (timing key, tokens in, r, sized) for each merging block of ``model``."""
    keys, merged = {}, False
    for i, block in model.merge_blocks().items():
        n, sized = model.tokens_per_block[i], merged and block.proportional
        keys[i] = (f"merge_block@{n}-r{block.r}{'+sizes' if sized else ''}", n, block.r, sized)
        merged = merged or block.r > 0
    return keys


def per_layer_bench(
    models: ArchModels,
    names: Mapping[str, str],
    *,
    device: torch.device,
    dtype: str,
    batch: int,
    warmup: int,
    repeats: int,
) -> dict[str, Any]:
    """Block-level timings (eager) and, per config, the blocks-only prediction.

    Timed in groups of equal input shape, interleaved within each group: the dense block
    and the static block at every token count they are needed, and every aggregation stage.
    A config's prediction sums, along its ``tokens_per_block``, the dense, static or
    merging block time at that count plus the aggregation before it (a merging block is
    timed whole: matching, merge and, after the first merge, proportional attention);
    ``cost_share`` is each block's predicted time over the dense model's blocks total
    (patch embedding and head excluded).
    """
    depth = len(models.dense.blocks)
    full = models.num_tokens
    dense_counts, static_counts, stages = {full}, {full}, {}
    merges: dict[str, tuple[int, int, bool]] = {}
    for model in models.compressed.values():
        merging = merge_keys(model)
        for i, n in enumerate(model.tokens_per_block):
            if i in merging:
                key, *spec = merging[i]
                merges[key] = tuple(spec)
            else:
                (static_counts if i in model.compression.static_layers else dense_counts).add(n)
        for agg in model.aggregations().values():
            stages[(agg.num_tokens_in, agg.num_tokens_out)] = agg

    block = copy.deepcopy(models.dense.blocks[0])
    timings: dict[str, float | None] = {}
    errors: dict[str, str] = {}
    counts = dense_counts | static_counts | {n_in for n_in, _ in stages}
    counts |= {n for n, _, _ in merges.values()}
    for n in sorted(counts, reverse=True):
        group: dict[str, nn.Module] = {}
        if n in dense_counts:
            group[f"dense_block@{n}"] = copy.deepcopy(block)
        if n in static_counts:
            static = copy.deepcopy(block)
            static.attn = StaticAttention.from_dense(block.attn, n)
            randomize_compressed_layers(static, seed=n)
            group[f"static_block@{n}"] = static
        for (n_in, n_out), agg in stages.items():
            if n_in == n:
                group[f"aggregation@{n_in}->{n_out}"] = copy.deepcopy(agg)
        for key, (n_in, r, sized) in merges.items():
            if n_in == n:
                group[key] = MergeBlockAlone(MergeBlock(copy.deepcopy(block), r), sized)
        prepared = {
            k: prepare(m, device=device, dtype=dtype, compiled=False) for k, m in group.items()
        }
        results = time_interleaved(
            prepared,
            batch_size=batch,
            device=device,
            dtype=dtype,
            warmup=warmup,
            repeats=repeats,
            input_shape=(n, models.dense.embed_dim),
        )
        for key, result in results.items():
            timings[key] = _ms(result)
            if isinstance(result, Failure):
                errors[key] = result.error
        release(device, compiled=False)

    dense_ms, static_ms = timings[f"dense_block@{full}"], timings[f"static_block@{full}"]
    return {
        "arch": models.arch,
        "dtype": dtype,
        "batch": batch,
        "compiled": False,
        "tokens": full,
        "depth": depth,
        "embed_dim": models.dense.embed_dim,
        "timings_ms": timings,
        "static_layer_speedup": dense_ms / static_ms if dense_ms and static_ms else None,
        "configs": [
            _predict(model, names[text], timings, full) for text, model in models.compressed.items()
        ],
        "errors": errors,
    }


def _predict(
    model: CompressedViT, name: str, timings: Mapping[str, float | None], full: int
) -> dict[str, Any]:
    """Blocks-only cost of ``model`` predicted from the per-layer timings."""
    static_layers = set(model.compression.static_layers)
    aggregations = model.aggregations()
    merging = merge_keys(model)
    block_ms: list[float | None] = []
    for i, n in enumerate(model.tokens_per_block):
        kind = "static" if i in static_layers else "dense"
        ms = timings[merging[i][0] if i in merging else f"{kind}_block@{n}"]
        if i in aggregations and ms is not None:
            agg = aggregations[i]
            agg_ms = timings[f"aggregation@{agg.num_tokens_in}->{agg.num_tokens_out}"]
            ms = None if agg_ms is None else ms + agg_ms
        block_ms.append(ms)
    dense_one = timings[f"dense_block@{full}"]
    known = dense_one is not None and all(ms is not None for ms in block_ms)
    dense_total = dense_one * len(block_ms) if known else None
    return {
        "config": str(model.compression),
        "name": name,
        "tokens_per_block": model.tokens_per_block,
        "block_ms": block_ms,  # aggregation before a block included in that block
        "cost_share": [ms / dense_total for ms in block_ms] if known else None,
        "predicted_speedup_blocks": dense_total / sum(block_ms) if known else None,
    }


def format_per_layer(
    sections: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]]
) -> str:
    """Static layer speedup, aggregation costs, and each config's blocks-only prediction
    beside the whole-model speedup measured at the same (arch, dtype, batch), eager."""
    measured = {
        (r["arch"], r["dtype"], r["batch"], r["config"]): r["speedup"]
        for r in rows
        if not r["compiled"] and not r.get("cuda_graphs")
    }
    lines = []
    for s in sections:
        lines.append(
            f"{s['arch']} {s['dtype']} batch {s['batch']}: static block speedup at "
            f"{s['tokens']} tokens {fmt(s['static_layer_speedup'], '.3f')}x"
        )
        for key, ms in s["timings_ms"].items():
            lines.append(f"  {key:<28} {fmt(ms, '.4f')} ms")
        for c in s["configs"]:
            got = measured.get((s["arch"], s["dtype"], s["batch"], c["config"]))
            lines.append(
                f"  {c['name']:<28} predicted (blocks) "
                f"{fmt(c['predicted_speedup_blocks'], '.3f')}x, measured {fmt(got, '.3f')}x"
            )
    return "\n".join(lines)
