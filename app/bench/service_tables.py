"""The service's tables in the docs: end-to-end runs, LitServe beside them, set-up A/Bs,
the decode stage and its decoders, and perf_analyzer through the v2 protocol."""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from app.bench.models import mode_name
from app.bench.perf_analyzer import level_key
from app.bench.tables import Table, load_result, markdown, stamp, torch_versions


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
    results = [load_result(repo, f) for f in table["files"]]
    for name, result in zip(table["files"], results, strict=True):
        server = result.get("server", {})
        where = engine_set_up(result)
        if where:
            paths = {s["path"] for s in result.get("decode_stage_steps", {}).values()}
            if paths:  # how the decode stage turned JPEGs into the batch
                where += f", decode: {', '.join(sorted(paths))}"
            where += set_up_label(server)
        else:
            workers = server.get("VITSERVE_WORKERS", "1")
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
                    stamp(name),
                ]
            )
    caption = (
        f"Random-weight models (speed only), real JPEGs; torch {torch_versions(results)}. "
        "Client: closed loop over the listed concurrency levels, then Poisson arrivals at half "
        "the best rate for the p99."
    )
    return [caption, "", *markdown(header, rows)]


def baseline_table(table: Table, repo: Path) -> list[str]:
    """Ours and the LitServe baseline at each concurrency level of one run."""
    header = ["server", "model", "device", "mode", "images/request", "concurrency", "images/s"]
    header += ["p99", "source"]
    rows = []
    for name in table["files"]:
        result = load_result(repo, name)
        server = result.get("server", {})
        lit = result["litserve"]
        engines = result.get("decode_ceiling_processes")
        vitserve = f"vitserve, {server.get('VITSERVE_WORKERS', '1')} processes"
        if isinstance(engines, dict):
            vitserve = (
                f"vitserve, {server.get('VITSERVE_WORKERS', '1')} HTTP workers + "
                f"{engines['processes']} engine(s)"
            )
        litserve = f"LitServe, {lit['workers_per_device']} workers"
        if lit.get("api_servers", 1) > 1:
            litserve += f" × 1 thread, {lit['api_servers']} API servers"
        if lit.get("decode_threads"):
            litserve += f", decode in batch() on {lit['decode_threads']} threads"
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
                    stamp(name),
                ]
            )
    caption = (
        "Each server at the set-up named, same client, images and run. The set-ups differ "
        "in processes and batching, so the ratio is of these set-ups, not of the frameworks."
    )
    return [caption, "", *markdown(header, rows)]


def setups_table(table: Table, repo: Path) -> list[str]:
    """Every level of runs that differ in set-up only: throughput, latency, the batch the
    server formed, the GPU's busy share and the cores each side kept busy."""
    header = ["set-up", "model", "concurrency", "images/s", "p50", "p99", "mean batch"]
    header += ["GPU busy", "cores client / HTTP / engine", "source"]
    rows = []
    results = [load_result(repo, name) for name in table["files"]]
    for name, result in zip(table["files"], results, strict=True):
        setup = f"{engine_set_up(result)}{set_up_label(result.get('server', {}))}"
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
                    stamp(name),
                ]
            )
    first = results[0]
    caption = (
        f"{first['device']}, {first['dtype']}, torch {first['torch_version']}; "
        f"{first['images_per_request']} image a request, real JPEGs; closed loop, one level "
        "after another."
    )
    return [caption, "", *markdown(header, rows)]


def worker_cpu_table(table: Table, repo: Path) -> list[str]:
    """CPU time per request of each side, from runs of the same set-up at two or more
    commits (each run records its code), or under two HTTP servers: what a change to the
    request path saved. The median row of each is the figure to read; single runs spread."""
    header = ["code", "run", "images/s", "CPU ms a request: HTTP worker", "engine", "client"]
    results = [load_result(repo, name) for name in table["files"]]
    by_arm: dict[str, list[list[float]]] = {}  # a commit, with its HTTP server if not uvicorn
    rows = []
    for name, result in zip(table["files"], results, strict=True):
        (level,) = [lv for lv in result["levels"] if not lv.get("offered_img_s")]
        requests_s = level["img_s"] / result["images_per_request"]
        cores = level["cores"]
        figures = [level["img_s"]] + [
            1000 * cores[side] / requests_s for side in ("server", "engine", "client")
        ]
        arm = f"`{result['code']}`{set_up_label(result.get('server', {}))}"
        by_arm.setdefault(arm, []).append(figures)
        rows.append([arm, stamp(name), *_cpu_cells(figures)])
    for arm, runs in by_arm.items():
        medians = [statistics.median(column) for column in zip(*runs, strict=True)]
        cells = [f"**{cell}**" for cell in _cpu_cells(medians)]
        rows.append([arm, f"**median of {len(runs)}**", *cells])
    first = results[0]
    caption = (
        f"{engine_set_up(first)}, {first['device']}, {first['dtype']}, torch "
        f"{torch_versions(results)}; `{first['reference']}`, {first['images_per_request']} "
        f"image(s) a request, {first['images']} real JPEGs, concurrency "
        f"{first['levels'][0]['concurrency']}, {first['seconds_per_level']:.0f} s a run; the "
        "runs of each commit or HTTP server alternate with the other's. CPU time is each "
        "side's processes' own, over the level, per request served."
    )
    return [caption, "", *markdown(header, rows)]


def _cpu_cells(figures: list[float]) -> list[str]:
    img_s, *per_request = figures
    return [f"{img_s:,.0f}", *(f"{ms:.3f}" for ms in per_request)]


def decode_table(table: Table, repo: Path) -> list[str]:
    """The decode stage per image, each step timed alone."""
    header = ["path", "device", "batch", "probe", "decode", "resize + crop", "normalise", "all"]
    rows = []
    for name in table["files"]:
        result = load_result(repo, name)
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
    return [caption, "", *markdown(header, rows)]


def engine_set_up(result: Mapping[str, Any]) -> str | None:
    """Who serves a run through the engine: its HTTP workers and engines, and each engine's
    decode threads; None for a run before the engine (every worker held its models)."""
    engines = result.get("decode_ceiling_processes")
    if not isinstance(engines, dict):
        return None
    workers = result.get("server", {}).get("VITSERVE_WORKERS", "1")
    return (
        f"{workers} HTTP worker(s), {engines['processes']} engine(s) × "
        f"{engines['threads']} decode threads"
    )


def set_up_label(server: dict[str, str]) -> str:
    """The decode and HTTP set-up a run recorded (runs before these switches recorded none)."""
    said = []
    if server.get("VITSERVE_NVIMGCODEC_DECODE") == "true":  # a set-up since removed
        said.append("nvImageCodec decodes all")
    elif "VITSERVE_HARDWARE_DECODE" in server:
        on = server["VITSERVE_HARDWARE_DECODE"] != "false"
        said.append(f"JPEG engines {'on' if on else 'off'}")
    if server.get("VITSERVE_GPU_JPEG_DECODER") == "nvimgcodec":
        threads = server.get("VITSERVE_NVIMGCODEC_THREADS", "8")
        said.append(f"nvImageCodec CUDA decode on {threads} threads")
    if server.get("VITSERVE_HTTP_SERVER", "uvicorn") != "uvicorn":
        said.append(server["VITSERVE_HTTP_SERVER"])
    return "".join(f", {s}" for s in said)


def decoders_table(table: Table, repo: Path) -> list[str]:
    """Images a second per JPEG decoder backend, one column per (batch, step), and how far
    its crops land from the eval transform's (``app.bench.jpeg_decoders``)."""
    lines: list[str] = []
    for name in table["files"]:
        result = load_result(repo, name)
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
            f"and centre crop on the decoder's device. Source: `{stamp(name)}`."
        )
        lines += [caption, "", *markdown(header, rows), ""]
    return lines[:-1]


def perf_analyzer_table(table: Table, repo: Path) -> list[str]:
    """perf_analyzer's levels against ``/v2`` (``app.bench.perf_analyzer`` records), dense
    and compressed side by side with their ratio; ``concurrency`` in the table keeps only
    those levels, and the same call's ``bench service`` run, if named, adds its best rates.
    A run with several images a request gets a column for it."""
    lines = []
    keep = set(table.get("concurrency", []))
    for name in table["files"]:
        result = load_result(repo, name)
        dense, compressed = result["models"]
        by_key = {(lv["model"], *level_key(lv)): lv for lv in result["levels"]}
        keys = sorted({k[1:] for k in by_key if not keep or k[4] in keep})
        several = any(k[2] != 1 for k in keys)  # any level of more than one image
        rows = []
        for protocol, input_, batch, c in keys:
            a, b = (by_key.get((m, protocol, input_, batch, c)) for m in (dense, compressed))
            cells = [
                f"{lv['infer_per_s']:,.0f} ({lv['p99_ms']:.0f} ms)" if lv else "no stable window"
                for lv in (a, b)
            ]
            ratio = f"{b['infer_per_s'] / a['infer_per_s']:.2f}×" if a and b else "–"
            batch_cell = [str(batch)] if several else []
            rows.append([protocol, input_.upper(), *batch_cell, str(c), *cells, ratio])
        per_request = "images a request as the column says" if several else "one image a request"
        caption = (
            f"NVIDIA perf_analyzer against `/v2`, {per_request}: {result['device']}, "
            f"{result['dtype']}, torch {result['torch_version']}; `{dense}` against "
            f"`{compressed}` (random weights), one server, levels minutes apart. BYTES: the "
            "client's JPEGs; UINT8: the same photos decoded by the client, resized on the "
            f"server. Source: `{stamp(name)}`."
        )
        if settings := result.get("server"):
            given = ", ".join(f"`{k}={v}`" for k, v in settings.items())
            caption += f" Server: {given}."
        if "bench_service" in result:
            service = load_result(repo, result["bench_service"])
            best = service["best_img_s"]
            caption += (
                f" `vitserve bench service` in the same call (JPEGs, its own client): "
                f"{best[dense]:,.0f} against {best[compressed]:,.0f} img/s "
                f"({best[compressed] / best[dense]:.2f}×, `{stamp(result['bench_service'])}`)."
            )
        header = [
            "protocol",
            "input",
            *(["images/request"] if several else []),
            "concurrency",
            f"`{dense}` infer/s (p99)",
            f"`{compressed}` infer/s (p99)",
            "×",
        ]
        lines += [caption, "", *markdown(header, rows), ""]
    return lines[:-1]


def levels_table(table: Table, repo: Path) -> list[str]:
    """Per-level ratios of one service run's closed-loop levels: each model's images/s over
    the reference's in the same level. The run alternates which model goes first, so the
    spread between levels is the noise the shared machine added."""
    lines = []
    for name in table["files"]:
        result = load_result(repo, name)
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
            f"level; torch {result['torch_version']}. Source: `{stamp(name)}`."
        )
        if "validity" in result:
            caption += f" The run's own note: {result['validity']}"
        lines += [caption, "", *markdown(header, rows), ""]
    return lines[:-1]
