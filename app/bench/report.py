"""Write the docs' tables from ``bench/results/`` (#24), so no figure is typed by hand.

``bench/results/current.toml`` names each table: the doc it goes in, how it is drawn, the
result files it is built from (chosen by hand: a newer run becomes current when it is
listed there, never by date) and the command that reproduces them. A table replaces what
stands between ``<!-- report:ID -->`` and ``<!-- /report:ID -->`` in its doc; the prose
around the markers is left alone. ``--check`` writes nothing and fails when a doc differs
from what would be written, which is what the up-to-date test runs.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from app.bench.fidelity import pooled
from app.bench.models import mode_name
from app.config import Settings
from app.vit.builder import PRESETS
from app.vit.config import CompressionConfig

REPO = Path(__file__).resolve().parents[2]
INDEX = Path("bench/results/current.toml")
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

Table = Mapping[str, Any]


def _load(repo: Path, name: str) -> dict[str, Any]:
    return json.loads((repo / "bench/results" / name).read_text())


def _stamp(name: str) -> str:
    """A result file's short name in a table's source column."""
    return Path(name).stem


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _arch(name: str) -> str:
    return ARCH_NAMES.get(name, name)


def _torch(results: Sequence[Mapping[str, Any]]) -> str:
    return ", ".join(sorted({r["torch_version"] for r in results if "torch_version" in r}))


def models_table(table: Table, repo: Path) -> list[str]:
    """Speed-up over dense per config, one column per (model, mode) measured (the table's
    ``modes`` only, if it names them), and per batch when the files hold several; a later
    file overrides an earlier one's cell. Dense's images/s is its own row."""
    results = [_load(repo, f) for f in table["files"]]
    modes = table.get("modes", MODES)  # a table may keep only some modes' columns
    measured = [
        (name, row)
        for name, result in zip(table["files"], results, strict=True)
        for row in result["rows"]
        if not row.get("error")
        and row.get("speedup") is not None
        and mode_name(row["compiled"], row.get("cuda_graphs", False)) in modes
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
        if label != "dense" and _stamp(name) not in sources.setdefault(label, []):
            sources[label].append(_stamp(name))
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
        f"Device: {', '.join(sorted(devices))} (torch {_torch(results)}); batch "
        f"{', '.join(map(str, batches))}; {', '.join(sorted(dtypes))}; random weights "
        "(speed does not depend on them). Each ratio is against dense timed in the same run and "
        "mode; dense's images/s is from the last listed file that measured its column."
    )
    header = (
        ["config"]
        + [f"{arch} {mode}" + (f" @{batch}" if batch else "") for arch, mode, batch in columns]
        + ["source"]
    )
    return [caption, "", *_markdown(header, rows)]


def _service_mode(result: Mapping[str, Any]) -> str:
    server = result.get("server", {})
    compiled = server.get("VITSERVE_COMPILE", "false").lower() in {"1", "true"}
    graphs = result["device_type"] == "cuda" and server.get("VITSERVE_CUDA_GRAPHS", "true") in {
        "1",
        "true",
    }
    return mode_name(compiled, graphs)


def service_table(table: Table, repo: Path) -> list[str]:
    """End to end through HTTP: best images/s over the concurrency levels, the ratio to the
    run's reference model, and p99 latency at half that load."""
    header = [
        "model",
        "device",
        "mode",
        "server",
        "images/request",
        "max batch",
        "images/s (best)",
        "× reference",
        "p99 at half load",
        "source",
    ]
    rows = []
    results = [_load(repo, f) for f in table["files"]]
    for name, result in zip(table["files"], results, strict=True):
        server = result.get("server", {})
        workers = server.get("VITSERVE_WORKERS", "1")
        engines = result.get("decode_ceiling_processes")
        if isinstance(engines, dict):  # since the engine: who decodes and runs the models
            where = (
                f"{workers} HTTP worker(s), {engines['processes']} engine(s) × "
                f"{engines['threads']} decode threads"
            )
            paths = {s["path"] for s in result.get("decode_stage_steps", {}).values()}
            if paths:  # how the decode stage turned JPEGs into the batch
                where += f", decode: {', '.join(sorted(paths))}"
            where += set_up_label(server)
        else:
            where = f"{workers} process(es), models in each (before the engine)"
        for model, best in result["best_img_s"].items():
            if model in table.get("exclude", ()):
                continue
            ratio = 1.0 if model == result["reference"] else result["speedups"].get(model)
            half = result.get("half_load", {}).get(model, {})
            rows.append(
                [
                    f"`{model}`",
                    f"{result['device']} ({result['dtype']})",
                    _service_mode(result),
                    where,
                    str(result["images_per_request"]),
                    server.get("VITSERVE_MAX_BATCH_SIZE", "32"),
                    f"{best:,.1f}" if best < 100 else f"{best:,.0f}",
                    f"{ratio:.2f}×" if ratio else "–",
                    f"{half['p99_ms']:.0f} ms" if half else "–",
                    _stamp(name),
                ]
            )
    caption = (
        f"Random-weight models (speed only), real JPEGs; torch {_torch(results)}. "
        "Client: closed loop over the listed concurrency levels, then Poisson arrivals at half "
        "the best rate for the p99."
    )
    return [caption, "", *_markdown(header, rows)]


def baseline_table(table: Table, repo: Path) -> list[str]:
    """Ours and the LitServe baseline at each concurrency level of one run."""
    header = ["server", "model", "device", "mode", "images/request", "concurrency", "images/s"]
    header += ["p99", "source"]
    rows = []
    for name in table["files"]:
        result = _load(repo, name)
        server = result.get("server", {})
        lit = result["litserve"]
        engines = result.get("decode_ceiling_processes")
        vitserve = f"vitserve, {server.get('VITSERVE_WORKERS', '1')} processes"
        if isinstance(engines, dict):
            vitserve = f"vitserve, {server.get('VITSERVE_WORKERS', '1')} HTTP workers + engine"
        litserve = f"LitServe, {lit['workers_per_device']} workers"
        if lit.get("api_servers", 1) > 1:
            litserve += f" × 1 thread, {lit['api_servers']} API servers"
        batches = {True: result["batch"], False: lit["max_batch_size"]}
        for level in result["levels"]:
            ours = not level["model"].startswith("litserve:")
            who = (
                f"{vitserve}, batch ≤ {batches[ours]}"
                if ours
                else f"{litserve}, batch ≤ {batches[ours]}"
            )

            rows.append(
                [
                    who,
                    f"`{level['model'].removeprefix('litserve:')}`",
                    f"{result['device']} ({result['dtype']})",
                    _service_mode(result) if ours else "eager",
                    str(result["images_per_request"]),
                    str(level["concurrency"]),
                    f"{level['img_s']:,.0f}",
                    f"{level['p99_ms']:.0f} ms",
                    _stamp(name),
                ]
            )
    caption = (
        "Each server at the set-up named, same client, images and run. The set-ups differ "
        "in processes and batching, so the ratio is of these set-ups, not of the frameworks."
    )
    return [caption, "", *_markdown(header, rows)]


def setups_table(table: Table, repo: Path) -> list[str]:
    """Every level of runs that differ in set-up only: throughput, latency, the batch the
    server formed, the GPU's busy share and the cores each side kept busy."""
    header = ["set-up", "model", "concurrency", "images/s", "p50", "p99", "mean batch"]
    header += ["GPU busy", "cores client / HTTP / engine", "source"]
    rows = []
    for name in table["files"]:
        result = _load(repo, name)
        server = result.get("server", {})
        threads = server.get("VITSERVE_DECODE_THREADS", "?")
        setup = f"{threads} decode threads{set_up_label(server)}"
        for level in result["levels"]:
            if level.get("offered_img_s"):
                continue  # the half-load level: a latency figure, not a set-up's capacity
            cores = level.get("cores") or {}
            busy = level.get("gpu_busy")
            rows.append(
                [
                    setup,
                    f"`{level['model']}`",
                    str(level["concurrency"]),
                    f"{level['img_s']:,.0f}",
                    f"{level['p50_ms']:.0f} ms",
                    f"{level['p99_ms']:.0f} ms",
                    f"{level['mean_batch']:.1f}" if level.get("mean_batch") else "–",
                    "–" if busy is None else f"{100 * busy:.0f}%",
                    " / ".join(f"{cores.get(k, 0):.1f}" for k in ("client", "server", "engine")),
                    _stamp(name),
                ]
            )
    first = _load(repo, table["files"][0])
    caption = (
        f"{first['device']}, {first['dtype']}, torch {first['torch_version']}; "
        f"{first['images_per_request']} image a request, real JPEGs; closed loop, one level "
        "after another."
    )
    return [caption, "", *_markdown(header, rows)]


def decode_table(table: Table, repo: Path) -> list[str]:
    """The decode stage per image, each step timed alone."""
    header = ["path", "device", "batch", "probe", "decode", "resize + crop", "normalise", "all"]
    rows = []
    for name in table["files"]:
        result = _load(repo, name)
        for row in result["rows"]:
            steps = row["ms_per_image"]
            rows.append(
                [row["path"], result["device"], str(row["batch"])]
                + [
                    f"{steps[k]:.3f} ms"
                    for k in ("probe", "decode", "resize_crop", "normalize")
                    if k in steps
                ]
                + [f"{sum(steps.values()):.3f} ms"]
            )
    caption = f"Milliseconds per image, model: none (the stage alone); source: {table['files']}."
    return [caption, "", *_markdown(header, rows)]


def set_up_label(server: dict[str, str]) -> str:
    """The decode and HTTP set-up a run recorded (runs before these switches recorded none)."""
    said = []
    if server.get("VITSERVE_NVIMGCODEC_DECODE") == "true":  # a set-up since removed
        said.append("nvImageCodec decodes all")
    elif "VITSERVE_HARDWARE_DECODE" in server:
        on = server["VITSERVE_HARDWARE_DECODE"] != "false"
        said.append(f"JPEG engines {'on' if on else 'off'}")
    if server.get("VITSERVE_HTTP_SERVER", "uvicorn") != "uvicorn":
        said.append(server["VITSERVE_HTTP_SERVER"])
    return "".join(f", {s}" for s in said)


def decoders_table(table: Table, repo: Path) -> list[str]:
    """Images a second per JPEG decoder backend, one column per (batch, step), and how far
    its crops land from the eval transform's (``app.bench.jpeg_decoders``)."""
    lines: list[str] = []
    for name in table["files"]:
        result = _load(repo, name)
        columns = list(dict.fromkeys((row["batch"], row["step"]) for row in result["rows"]))
        # results before --threads ran every decoder on one thread
        rates = {
            (r["decoder"], r.get("threads", 1), r["batch"], r["step"]): r["img_s"]
            for r in result["rows"]
        }
        header = ["decoder", *(f"{step} @{batch}" for batch, step in columns)]
        header.append("crop vs eval transform: max / mean / p99.9 grey levels")
        rows = []
        for decoder, threads in dict.fromkeys((d, k) for d, k, _, _ in rates):
            cells = [f"`{decoder}`" + (f" × {threads} threads" if threads > 1 else "")]
            for batch, step in columns:
                img_s = rates.get((decoder, threads, batch, step))
                cells.append("–" if img_s is None else f"{img_s:,.0f} img/s")
            diff = result["fidelity"].get(decoder) if threads == 1 else None
            cells.append(
                f"{diff['max']:.0f} / {diff['mean']:.3f} / {diff['p99_9']:.0f}" if diff else "–"
            )
            rows.append(cells)
        caption = (
            f"Device: {result['device']} (torch {result['torch_version']}); "
            f"{result['photos']} baseline RGB JPEGs of `{Path(result['folder']).name}`, "
            "one Python thread per decoder (or the threads named, one decoder and CUDA "
            "stream each), each batch synchronised; crops are the eval transform's resize "
            f"and centre crop on the decoder's device. Source: `{_stamp(name)}`."
        )
        lines += [caption, "", *_markdown(header, rows), ""]
    return lines[:-1]


def merge_steps_table(table: Table, repo: Path) -> list[str]:
    """One token-merging step per implementation (``app.bench.merge_matching``): median ms
    and the ratio against ToMe's argsorts timed in the same loop."""
    lines: list[str] = []
    for name in table["files"]:
        result = _load(repo, name)
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
            f"CUDA events, median per call. Source: `{_stamp(name)}`."
        )
        header = ["batch", "step", "mode", "implementation", "median", "× argsort"]
        lines += [caption, "", *_markdown(header, rows), ""]
    return lines[:-1]


def fidelity_table(table: Table, repo: Path) -> list[str]:
    """Agreement with the dense top-1 and top-1 accuracy per variant and image folder."""
    results = [_load(repo, f) for f in table["files"]]
    folders = sorted({Path(f).name for r in results for f in r["folders"]})
    header = ["variant", "training"] + [f"{f}: agreement / top-1" for f in folders] + ["source"]
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
            rows.append([f"`{row['name']}`", row["training"], *cells, _stamp(name)])
    dense = {
        Path(f).name: ev["teacher_top1_acc"]
        for r in results
        for row in r["rows"]
        for f, ev in row["eval"].items()
    }
    caption = (
        f"Model: {', '.join(sorted(teachers))} (real weights) and its variants; mode eager, "
        f"float32; device {', '.join(sorted(devices))}; every variant on the same photos, "
        "batch size irrelevant to the figures. Dense top-1: "
        + ", ".join(f"{k} {v:.1%}" for k, v in sorted(dense.items()))
        + "."
    )
    return [caption, "", *_markdown(header, rows)]


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
    for name in table["files"]:
        result = _load(repo, name)
        for row in result["rows"]:
            if trainings and row["training"] not in trainings:
                continue
            evals = {f: row["eval"][f] for f in want if f in row["eval"]}
            pool = pooled(evals) if len(evals) == len(want) else row.get("pooled")
            if not pool or sorted(pool["folders"]) != want:
                continue
            key = (str(CompressionConfig.parse(row["config"])), row["training"])
            rows[key] = (pool, row, _stamp(name))
            dense.add(f"{pool['teacher_top1_acc']:.1%}")
            photos.add(f"{pool['n_images']:,}")
            devices.add(
                f"{result['device']} ({result['device_type']}, {result['threads']} threads)"
            )
            teachers.add(result["teacher"])
            torch_versions.add(result["torch_version"])
    lines = []
    for pool, row, source in sorted(rows.values(), key=lambda v: -v[0]["agreement_top1"]):
        lo, hi = pool["agreement_ci95"]
        costs = {block_cost(row["config"], t) for t in teachers}
        cost = costs.pop() if len(costs) == 1 else None
        lines.append(
            [
                f"`{_variant_label(row)}`",
                f"`{row['config']}`",
                row["training"],
                f"{pool['agreement_top1']:.1%} [{lo:.1%}, {hi:.1%}]",
                f"{pool['student_top1_acc']:.1%}" if pool["student_top1_acc"] else "–",
                f"{cost:.2f}" if cost is not None else "–",
                source,
            ]
        )
    header = ["variant", "config", "training", "agreement [95% CI]", "top-1", "block cost"]
    caption = (
        f"Model: {', '.join(sorted(teachers))} (real weights); float32, eager; device "
        f"{', '.join(sorted(devices))}; torch {', '.join(sorted(torch_versions))}. Agreement "
        f"with dense top-1 over {' + '.join(want)} pooled ({', '.join(sorted(photos))} "
        "photos), its "
        "95% Wilson score interval in brackets; top-1 over the same labelled photos (dense: "
        f"{', '.join(sorted(dense))}). Block cost: `{BLOCK_COST}` per "
        "block (d the width), summed and divided by dense's: the work a config leaves, not a "
        "measured speed."
    )
    return [caption, "", *_markdown([*header, "source"], lines)]


def levels_table(table: Table, repo: Path) -> list[str]:
    """Per-level ratios of one service run's closed-loop levels: each model's images/s over
    the reference's in the same level. The run alternates which model goes first, so the
    spread between levels is the noise the shared machine added."""
    lines = []
    for name in table["files"]:
        result = _load(repo, name)
        ref = result["reference"]
        closed: dict[str, list[float]] = {}
        for level in result["levels"]:  # per model, in the order the levels ran
            if level.get("offered_img_s") is None:
                closed.setdefault(level["model"], []).append(level["img_s"])
        header = ["model", "compression"] + [
            f"level {k + 1}: c={c}, {'reference first' if k % 2 == 0 else 'reference last'}"
            for k, c in enumerate(result["concurrency"])
        ]
        rows = [["`" + ref + "` (reference)", "–", *(f"{v:.1f} img/s" for v in closed[ref])]]
        for model, values in closed.items():
            if model != ref:
                ratios = (f"{v / r:.2f}×" for v, r in zip(values, closed[ref], strict=True))
                rows.append([f"`{model}`", f"`{result['models'][model]['compression']}`", *ratios])
        caption = (
            f"Through HTTP, one server serving every model: {result['device']} "
            f"({result['threads']} threads), {result['dtype']}, batches up to {result['batch']}, "
            f"{result['images_per_request']} photos of `{Path(result['images_dir']).name}` a "
            f"request, closed loop at concurrency c for {result['seconds_per_level']:.0f} s a "
            f"level; torch {result['torch_version']}. Source: `{_stamp(name)}`."
        )
        if "validity" in result:
            caption += f" The run's own note: {result['validity']}"
        lines += [caption, "", *_markdown(header, rows), ""]
    return lines[:-1]


def front_table(table: Table, repo: Path) -> list[str]:
    """The points of a Pareto front JSON (speed of one slice, fidelity of DeiT-Tiny)."""
    lines = []
    for name in table["files"]:
        front = _load(repo, name)
        s = front["slice"]
        lines += [
            f"Speed: {_arch(s['arch'])}, {mode_name(s['compiled'], s['cuda_graphs'])}, batch "
            f"{s['batch']}, {s['dtype']}, {front['device']}; fidelity: DeiT-Tiny variants "
            f"(agreement with dense top-1). Source: `{name}`.",
            "",
        ]
        rows = [
            [p["label"], f"{p['speedup']:.2f}×", f"{p['agreement_top1']:.1%}"]
            + ["yes" if p["on_front"] else ""]
            for p in sorted(front["points"], key=lambda p: -p["speedup"])
            if p["on_front"] or not table.get("front_only", False)
        ]
        lines += [*_markdown(["point", "speed-up", "agreement", "on the front"], rows), ""]
    return lines[:-1]


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
            lo, hi = fid["ci95"]
            seeds = f", {len(fid['seeds'])} seed(s)" if fid.get("seeds") else ""
            if fid.get("method") == "cross-fitted":
                per_seed = len(fid["folds"]) // max(1, len(fid.get("seeds") or [1]))
                seeds += f", cross-fitted: {per_seed} folds a seed"
            agreement = (
                f"{fid['agreement_top1']:.1%} [{lo:.1%}, {hi:.1%}] "
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
    return [caption, "", *_markdown(header, rows)]


def settings_table(table: Table, repo: Path) -> list[str]:
    """Every setting of :class:`app.config.Settings`: variable, default, meaning."""
    rows = []
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        shown = "unset" if default is None else json.dumps(default, default=str)
        shown = shown.strip('"') if isinstance(default, str | Path) else shown
        rows.append([f"`VITSERVE_{name.upper()}`", f"`{shown}`", field.description or ""])
    return _markdown(["variable", "default", "meaning"], rows)


def perf_analyzer_table(table: Table, repo: Path) -> list[str]:
    """perf_analyzer's levels against ``/v2`` (``app.bench.perf_analyzer`` records), dense
    and compressed side by side with their ratio; ``concurrency`` in the table keeps only
    those levels, and the same call's ``bench service`` run, if named, adds its best rates."""
    lines = []
    keep = set(table.get("concurrency", []))
    for name in table["files"]:
        result = _load(repo, name)
        dense, compressed = result["models"]
        by_key = {
            (lv["model"], lv["protocol"], lv["input"], lv["concurrency"]): lv
            for lv in result["levels"]
        }
        keys = sorted({k[1:] for k in by_key if not keep or k[3] in keep})
        rows = []
        for protocol, input_, c in keys:
            cells = []
            for model in (dense, compressed):
                lv = by_key.get((model, protocol, input_, c))
                cells.append(
                    f"{lv['infer_per_s']:,.0f} ({lv['p99_ms']:.0f} ms)"
                    if lv
                    else "no stable window"
                )
            a, b = (
                by_key.get((dense, protocol, input_, c)),
                by_key.get((compressed, protocol, input_, c)),
            )
            ratio = f"{b['infer_per_s'] / a['infer_per_s']:.2f}×" if a and b else "–"
            rows.append([protocol, input_.upper(), str(c), *cells, ratio])
        caption = (
            f"NVIDIA perf_analyzer against `/v2`, one image a request: {result['device']}, "
            f"{result['dtype']}, torch {result['torch_version']}; `{dense}` against "
            f"`{compressed}` (random weights), one server, levels minutes apart. BYTES: the "
            "client's JPEGs; UINT8: the same photos decoded by the client, resized on the "
            f"server. Source: `{_stamp(name)}`."
        )
        if "bench_service" in result:
            service = _load(repo, result["bench_service"])
            best = service["best_img_s"]
            caption += (
                f" `vitserve bench service` in the same call (JPEGs, its own client): "
                f"{best[dense]:,.0f} against {best[compressed]:,.0f} img/s "
                f"({best[compressed] / best[dense]:.2f}×, `{_stamp(result['bench_service'])}`)."
            )
        header = [
            "protocol",
            "input",
            "concurrency",
            f"`{dense}` infer/s (p99)",
            f"`{compressed}` infer/s (p99)",
            "×",
        ]
        lines += [caption, "", *_markdown(header, rows), ""]
    return lines[:-1]


RENDERERS: dict[str, Callable[[Table, Path], list[str]]] = {
    "models": models_table,
    "service": service_table,
    "baseline": baseline_table,
    "setups": setups_table,
    "decode": decode_table,
    "decoders": decoders_table,
    "merge_steps": merge_steps_table,
    "fidelity": fidelity_table,
    "pooled": pooled_table,
    "levels": levels_table,
    "perf_analyzer": perf_analyzer_table,
    "front": front_table,
    "variants": variants_table,
    "settings": settings_table,
}


def render(table: Table, repo: Path) -> str:
    lines = RENDERERS[table["render"]](table, repo)
    if "command" in table:
        lines += ["", f"Reproduce: `{table['command']}`"]
    return "\n".join(lines)


def write_docs(repo: Path = REPO, *, check: bool = False) -> list[str]:
    """Replace every table's section in its doc; returns the docs that differ (with
    ``check``, nothing is written)."""
    index = tomllib.loads((repo / INDEX).read_text())
    docs: dict[str, str] = {}
    for table in index["table"]:
        doc = table["doc"]
        text = docs.get(doc) or (repo / doc).read_text()
        start, end = f"<!-- report:{table['id']} -->", f"<!-- /report:{table['id']} -->"
        pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
        if not pattern.search(text):  # a doc without the section: say so, never append
            raise ValueError(f"{doc} has no {start} ... {end} section")
        start_at, end_at = pattern.search(text).span()
        docs[doc] = f"{text[:start_at]}{start}\n{render(table, repo)}\n{end}{text[end_at:]}"
    stale = [doc for doc, text in docs.items() if (repo / doc).read_text() != text]
    if not check:
        for doc in stale:
            (repo / doc).write_text(docs[doc])
    return stale


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vitserve report", description=__doc__)
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if stale")
    args = parser.parse_args(argv)
    stale = write_docs(REPO, check=args.check)
    for doc in stale:
        print(f"{doc}: {'stale, run `vitserve report`' if args.check else 'written'}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
