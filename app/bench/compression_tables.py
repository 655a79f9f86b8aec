"""The compression docs' tables: model speed, merging kernels, fidelity, fronts and the
store's variants, each drawn from result files (and manifests) by :mod:`app.bench.report`."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from app.bench.fidelity import pooled
from app.bench.models import mode_name
from app.bench.tables import Table, load_result, markdown, stamp, torch_versions
from app.vit.builder import PRESETS
from app.vit.config import CompressionConfig

MODES = ("eager", "graphs", "compiled", "compiled+graphs")
# (width, depth, tokens) of the networks whose block cost a table reports
ARCH_SHAPES = {
    "deit_tiny_patch16_224": (192, 12, 197),
    "deit_small_patch16_224": (384, 12, 197),
    "deit_base_patch16_224": (768, 12, 197),
}
ARCH_NAMES = {
    "deit_tiny_patch16_224": "DeiT-Ti",
    "deit_small_patch16_224": "DeiT-S",
    "deit_base_patch16_224": "DeiT-B",
}


def _arch(name: str) -> str:
    return ARCH_NAMES.get(name, name)


def models_table(table: Table, repo: Path) -> list[str]:
    """Speed-up over dense per config, one column per (model, mode) measured (the table's
    ``modes`` and ``batches`` only, if it names them), and per batch when the files hold
    several; a later file overrides an earlier one's cell. Dense's images/s is its own row."""
    results = [load_result(repo, f) for f in table["files"]]
    modes = table.get("modes", MODES)  # a table may keep only some modes' columns
    wanted = table.get("batches")
    measured = [
        (name, row)
        for name, result in zip(table["files"], results, strict=True)
        for row in result["rows"]
        if not row.get("error")
        and row.get("speedup") is not None
        and mode_name(row["compiled"], row.get("cuda_graphs", False)) in modes
        and (wanted is None or row["batch"] in wanted)
    ]
    batches = sorted({row["batch"] for _, row in measured})
    dtypes = {row["dtype"] for _, row in measured}
    devices = {result["device"] for result in results}
    cells: dict[str, dict[tuple[str, str, int], str]] = {}
    sources: dict[str, list[str]] = {}
    for name, row in measured:
        mode = mode_name(row["compiled"], row.get("cuda_graphs", False))
        column = (_arch(row["arch"]), mode, row["batch"] if len(batches) > 1 else 0)
        label = row["name"]
        value = f"{row['img_s']:,.0f} img/s" if label == "dense" else f"{row['speedup']:.2f}×"
        cells.setdefault(label, {})[column] = value
        if label != "dense" and stamp(name) not in sources.setdefault(label, []):
            sources[label].append(stamp(name))
    columns = sorted(
        {c for row in cells.values() for c in row}, key=lambda c: (c[0], MODES.index(c[1]), c[2])
    )
    order = ["dense"] + sorted(k for k in cells if k != "dense")
    rows = [
        [f"`{k}`" if k != "dense" else "dense"]
        + [cells[k].get(c, "–") for c in columns]
        + [", ".join(sources.get(k, ["each file's own"]))]
        for k in order
    ]
    caption = (
        f"Device: {', '.join(sorted(devices))} (torch {torch_versions(results)}); batch "
        f"{', '.join(map(str, batches))}; {', '.join(sorted(dtypes))}; random weights "
        "(speed does not depend on them). Each ratio is against dense timed in the same run and "
        "mode; dense's images/s is from the last listed file that measured its column."
    )
    header = (
        ["config"]
        + [f"{arch} {mode}" + (f" @{batch}" if batch else "") for arch, mode, batch in columns]
        + ["source"]
    )
    return [caption, "", *markdown(header, rows)]


def merge_steps_table(table: Table, repo: Path) -> list[str]:
    """One token-merging step per implementation (``app.bench.merge_matching``): median ms
    and the ratio against ToMe's argsorts timed in the same loop."""
    lines: list[str] = []
    for name in table["files"]:
        result = load_result(repo, name)
        rows = [
            [
                str(row["batch"]),
                row["step"],
                row["mode"],
                f"`{row['impl']}`",
                f"{row['median_ms']:.3f} ms",
                f"{row['speedup_vs_argsort']:.2f}×",
            ]
            for row in result["rows"]
            if not row.get("error")
        ]
        shape = result["shape"]
        caption = (
            f"Device: {result['device']} (torch {result['torch_version']}, Triton "
            f"{result['triton_version']}); {result['what']}; {shape['tokens']} tokens, width "
            f"{shape['width']}, {shape['heads']} heads, r = {shape['r']}; {result['dtype']}; "
            f"CUDA events, median per call. Source: `{stamp(name)}`."
        )
        header = ["batch", "step", "mode", "implementation", "median", "× argsort"]
        lines += [caption, "", *markdown(header, rows), ""]
    return lines[:-1]


def proportional_sdpa_table(table: Table, repo: Path) -> list[str]:
    """``bench/scripts/gpu_proportional_sdpa.py``: SDPA alone per form of the log-size bias
    and backend (µs a call), then whole merged models per form and backend (× dense)."""
    result = load_result(repo, table["files"][0])
    sdpa = [row for row in result["rows"] if row["kind"] == "sdpa"]
    columns = list(dict.fromkeys((row["bias"], row["width"], row["backend"]) for row in sdpa))
    us = {(row["tokens"], row["bias"], row["width"], row["backend"]): row["us"] for row in sdpa}
    kernel_rows = [
        [str(n)] + [f"{us[(n, *c)]:.1f}" if us[(n, *c)] else "refused" for c in columns]
        for n in dict.fromkeys(row["tokens"] for row in sdpa)
    ]
    models = [row for row in result["rows"] if row["kind"] == "model"]
    archs = list(dict.fromkeys(row["arch"] for row in models))
    ratio = {(row["name"], row["arch"]): row["speedup"] for row in models}
    model_rows = [
        [f"`{name}`"] + [f"{ratio[(name, a)]:.2f}×" if ratio.get((name, a)) else "–" for a in archs]
        for name in dict.fromkeys(row["name"] for row in models)
        if name != "dense"
    ]
    caption = (
        f"Device: {result['device']} (torch {result['torch_version']}); {result['dtype']}; "
        f"batch {result['batch']}; CUDA events, median. Source: `{stamp(table['files'][0])}`."
    )
    header = ["tokens"] + [f"{bias} {width}-wide, {backend}" for bias, width, backend in columns]
    return [
        caption,
        "",
        "SDPA alone, 6 heads, µs a call (bias: none, an extra head column, an additive mask):",
        "",
        *markdown(header, kernel_rows),
        "",
        "Whole models from CUDA graphs, × dense in the same loop ([form backend]; "
        "[default] is the form of that day's code with SDPA's own choice):",
        "",
        *markdown(["config [form backend]", *archs], model_rows),
    ]


def scored_dtype(result: Mapping[str, Any]) -> str:
    """The dtype a fidelity file's models ran in: older files name none, and were all
    scored in float32 on a CPU."""
    return result.get("dtype", "float32")


def fidelity_table(table: Table, repo: Path) -> list[str]:
    """Agreement with the dense top-1 and top-1 accuracy per variant and image folder."""
    results = [load_result(repo, f) for f in table["files"]]
    folders = sorted({Path(f).name for r in results for f in r["folders"]})
    header = ["variant", "training", *[f"{f}: agreement / top-1" for f in folders]]
    header += ["all its photos: agreement (95% CI)", "source"]
    rows, devices, teachers = [], set(), set()
    for name, result in zip(table["files"], results, strict=True):
        devices.add(f"{result['device']} ({result['device_type']})")
        teachers.add(result["teacher"])
        for row in result["rows"]:
            cells = []
            for folder in folders:
                ev = row["eval"].get(folder)
                cells.append(
                    f"{ev['agreement_top1']:.1%} / {ev['student_top1_acc']:.1%}"
                    f" (n={ev['n_images']})"
                    if ev
                    else "–"
                )
            pool = row.get("pooled")
            pooled = (
                f"{_agreement_cell(pool['agreement_top1'], pool['agreement_ci95'])} "
                f"(n={pool['n_images']})"
                if pool
                else "–"
            )
            rows.append([f"`{row['name']}`", row["training"], *cells, pooled, stamp(name)])
    dense = {
        Path(f).name: ev["teacher_top1_acc"]
        for r in results
        for row in r["rows"]
        for f, ev in row["eval"].items()
    }
    dtypes = ", ".join(sorted({scored_dtype(r) for r in results}))
    caption = (
        f"Model: {', '.join(sorted(teachers))} (real weights) and its variants; mode eager, "
        f"{dtypes}; device {', '.join(sorted(devices))}; every variant on the same photos, "
        "batch size irrelevant to the figures. Dense top-1: "
        + ", ".join(f"{k} {v:.1%}" for k, v in sorted(dense.items()))
        + "."
    )
    return [caption, "", *markdown(header, rows)]


BLOCK_COST = "N_in·(4d² + 2·N_in·d) + N_out·8d²"


def block_cost(config: str, arch: str) -> float | None:
    """The work a merge or token config leaves in the blocks, relative to dense: per block
    :data:`BLOCK_COST` (attention on the tokens it takes in, the MLP on those it keeps).
    None for static attention, whose cost this count does not model."""
    cfg = CompressionConfig.parse(config)
    if cfg.static_layers or arch not in ARCH_SHAPES:
        return None
    d, depth, tokens = ARCH_SHAPES[arch]
    taken = cfg.tokens_per_block(depth, tokens)
    kept = [n - r for n, r in zip(taken, cfg.merge_r(depth), strict=True)]

    def cost(n_in: int, n_out: int) -> int:
        return n_in * (4 * d * d + 2 * n_in * d) + n_out * 8 * d * d

    return sum(map(cost, taken, kept)) / (depth * cost(tokens, tokens))


def _variant_label(row: Mapping[str, Any]) -> str:
    """A row's name, or, for a row named by its config, the preset that config is."""
    if row["name"] != row["config"]:
        return row["name"]
    config = str(CompressionConfig.parse(row["config"]))
    presets = {str(CompressionConfig.parse(v)): k for k, v in PRESETS.items() if v}
    return presets.get(config, row["config"])


def pooled_table(table: Table, repo: Path) -> list[str]:
    """Agreement with dense top-1 pooled over the table's ``folders``, with its 95% Wilson
    interval, and top-1, one row per config. Pooled from each row's per-folder counts (a row
    without them: its file's own pooled block); a row not scored on every folder is left
    out; a config in a later file replaces an earlier one's row."""
    want = sorted(table["folders"])
    trainings = table.get("training")
    rows: dict[tuple[str, str], tuple[dict[str, Any], Mapping[str, Any], str]] = {}
    dense, photos, devices, teachers, torch_versions = set(), set(), set(), set(), set()
    dtypes = set()
    for name in table["files"]:
        result = load_result(repo, name)
        for row in result["rows"]:
            if trainings and row["training"] not in trainings:
                continue
            evals = {f: row["eval"][f] for f in want if f in row["eval"]}
            pool = pooled(evals) if len(evals) == len(want) else row.get("pooled")
            if not pool or sorted(pool["folders"]) != want:
                continue
            key = (str(CompressionConfig.parse(row["config"])), row["training"])
            rows[key] = (pool, row, stamp(name))
            dense.add(f"{pool['teacher_top1_acc']:.1%}")
            photos.add(f"{pool['n_images']:,}")
            devices.add(
                f"{result['device']} ({result['device_type']}, {result['threads']} threads)"
            )
            teachers.add(result["teacher"])
            torch_versions.add(result["torch_version"])
            dtypes.add(scored_dtype(result))
    lines = []
    for pool, row, source in sorted(rows.values(), key=lambda v: -v[0]["agreement_top1"]):
        costs = {block_cost(row["config"], t) for t in teachers}
        cost = costs.pop() if len(costs) == 1 else None
        lines.append(
            [
                f"`{_variant_label(row)}`",
                f"`{row['config']}`",
                row["training"],
                _agreement_cell(pool["agreement_top1"], pool["agreement_ci95"]),
                f"{pool['student_top1_acc']:.1%}" if pool["student_top1_acc"] else "–",
                f"{cost:.2f}" if cost is not None else "–",
                source,
            ]
        )
    header = ["variant", "config", "training", "agreement [95% CI]", "top-1", "block cost"]
    caption = (
        f"Model: {', '.join(sorted(teachers))} (real weights); {', '.join(sorted(dtypes))}, "
        "eager; device "
        f"{', '.join(sorted(devices))}; torch {', '.join(sorted(torch_versions))}. Agreement "
        f"with dense top-1 over {' + '.join(want)} pooled ({', '.join(sorted(photos))} "
        "photos), its "
        "95% Wilson score interval in brackets; top-1 over the same labelled photos (dense: "
        f"{', '.join(sorted(dense))}). Block cost: `{BLOCK_COST}` per "
        "block (d the width), summed and divided by dense's: the work a config leaves, not a "
        "measured speed."
    )
    return [caption, "", *markdown([*header, "source"], lines)]


def front_table(table: Table, repo: Path) -> list[str]:
    """The points of a Pareto front JSON (speed of one slice, fidelity of DeiT-Tiny)."""
    lines = []
    for name in table["files"]:
        front = load_result(repo, name)
        s = front["slice"]
        lines += [
            f"Speed: {_arch(s['arch'])}, {mode_name(s['compiled'], s['cuda_graphs'])}, batch "
            f"{s['batch']}, {s['dtype']}, {front['device']}; fidelity: DeiT-Tiny variants "
            f"(agreement with dense top-1). Source: `{name}`.",
            "",
        ]
        rows = [
            [
                p["label"],
                f"{p['speedup']:.2f}×",
                _agreement_cell(p["agreement_top1"], p.get("agreement_ci95")),
            ]
            + ["yes" if p["on_front"] else ""]
            for p in sorted(front["points"], key=lambda p: -p["speedup"])
            if p["on_front"] or not table.get("front_only", False)
        ]
        lines += [*markdown(["point", "speed-up", "agreement", "on the front"], rows), ""]
    return lines[:-1]


def _agreement_cell(agreement: float, ci95: Sequence[float] | None) -> str:
    """An agreement and, where there is one, its 95% interval: ``84.9% [83.0%, 86.6%]``."""
    interval = f" [{ci95[0]:.1%}, {ci95[1]:.1%}]" if ci95 else ""
    return f"{agreement:.1%}{interval}"


def _speed_cell(speed: dict) -> str:
    """One speed figure: its network (labelled when borrowed), mode, device, per batch."""
    per_batch = ", ".join(
        f"{v:.2f}× @{b}" for b, v in sorted(speed["speedup"].items(), key=lambda kv: int(kv[0]))
    )
    arch = _arch(speed["architecture"])
    whose = f"{arch} (borrowed: not this entry's network)" if speed.get("borrowed") else arch
    return f"{whose}, {speed['mode']}, {speed['device']}: {per_batch}"


def variants_table(table: Table, repo: Path) -> list[str]:
    """The store's declared entries with the figures their manifests declare."""
    header = ["entry", "variant", "weights", "agreement with dense [95% CI] (photos)", "top-1"]
    header += ["speed-up over dense: network, mode, device: × @batch"]
    rows = []
    for path in sorted((repo / "model_store").glob("*/manifest.json")):
        m = json.loads(path.read_text())
        figures = m.get("figures", {})
        # the figure over the most photos: the narrowest interval the manifest has
        fid = max(figures.get("fidelity") or [{}], key=lambda f: f.get("n_images", 0))
        if fid:
            seeds = f", {len(fid['seeds'])} seed(s)" if fid.get("seeds") else ""
            if fid.get("method") == "cross-fitted":
                folds, n_seeds = len(fid["folds"]), len(fid.get("seeds") or [1])
                if folds % n_seeds:  # some seed lacks a fold: say how many there are
                    seeds += f", cross-fitted: {folds} folds over the seeds"
                else:
                    per_seed = folds // n_seeds
                    seeds += f", cross-fitted: {per_seed} fold{'s' if per_seed != 1 else ''} a seed"
            agreement = (
                f"{_agreement_cell(fid['agreement_top1'], fid['ci95'])} "
                f"({fid['n_images']}, {' + '.join(fid['eval_sets'])}{seeds})"
            )
        else:
            agreement = "100% (itself)" if m["variant"] == "dense" else "–"
        top1 = f"{fid['student_top1_acc']:.1%}" if fid.get("student_top1_acc") else "–"
        weights = {
            "derived": "built from dense at load",
            "compress": "`vitserve store build`",
            "timm-pretrained": "pulled (timm / HF hub)",
        }
        source = weights.get(m["source"]["kind"], m["source"]["kind"])
        speed = "<br>".join(_speed_cell(sp) for sp in figures.get("speed", [])) or "–"
        rows.append([f"`{m['name']}`", m["variant"], source, agreement, top1, speed])
    caption = (
        "Generated from `model_store/*/manifest.json` (`figures`): agreement with the dense "
        "model's top-1 and its 95% Wilson interval on the photos named; speed-up per batch "
        "size on the network and device named. A figure timed on another network says "
        "*borrowed*: it is not this entry's speed."
    )
    return [caption, "", *markdown(header, rows)]
