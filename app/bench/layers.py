"""Per-layer benchmark: block and aggregation timings that explain a whole-model speedup."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from app.bench.arch import ArchModels, fmt, randomize_compressed_layers, release
from app.bench.timing import Failure, Timing, prepare, time_interleaved
from app.vit.builder import CompressedViT
from app.vit.static_attention import StaticAttention


def _ms(result: Timing | Failure) -> float | None:
    return result.median_ms if isinstance(result, Timing) else None


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
    A config's prediction sums, along its ``tokens_per_block``, the dense or static block
    time at that count plus the aggregation before it; ``cost_share`` is each block's
    predicted time over the dense model's blocks total (patch embedding and head excluded).
    """
    depth = len(models.dense.blocks)
    full = models.num_tokens
    dense_counts, static_counts, stages = {full}, {full}, {}
    for model in models.compressed.values():
        for i, n in enumerate(model.tokens_per_block):
            (static_counts if i in model.compression.static_layers else dense_counts).add(n)
        for agg in model.aggregations().values():
            stages[(agg.num_tokens_in, agg.num_tokens_out)] = agg

    block = copy.deepcopy(models.dense.blocks[0])
    timings: dict[str, float | None] = {}
    errors: dict[str, str] = {}
    for n in sorted(dense_counts | static_counts | {n_in for n_in, _ in stages}, reverse=True):
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
    block_ms: list[float | None] = []
    for i, n in enumerate(model.tokens_per_block):
        ms = timings[f"{'static' if i in static_layers else 'dense'}_block@{n}"]
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
        if not r["compiled"]
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
