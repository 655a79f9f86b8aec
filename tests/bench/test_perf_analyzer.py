"""perf_analyzer's per-level CSVs become one result record, and a doc table is drawn from it."""

from __future__ import annotations

import json
from pathlib import Path

from app.bench.perf_analyzer import read_levels, summarize
from app.bench.service_tables import perf_analyzer_table

HEADER = (
    "Concurrency,Inferences/Second,Client Send,Client Recv,"
    "p50 latency,p90 latency,p95 latency,p99 latency\n"
)
ENV = {"device": "Test GPU", "torch_version": "2.x"}


def write_level(folder: Path, model: str, protocol: str, input_: str, c: int, rate: float) -> None:
    row = f"{c},{rate},0,0,20000,25000,27000,30000\n"
    (folder / f"pa-{model}-{protocol}-{input_}-c{c}.csv").write_text(HEADER + row)


def test_ratios_pair_levels_of_the_same_protocol_input_and_concurrency(tmp_path: Path) -> None:
    write_level(tmp_path, "dense", "http", "uint8", 64, 1000)
    write_level(tmp_path, "dense-merge-t5", "http", "uint8", 64, 1500)
    write_level(tmp_path, "dense", "grpc", "bytes", 64, 800)  # its compressed level was unstable
    (tmp_path / "summary.csv").write_text("not a level\n")

    levels = read_levels(tmp_path)
    result = summarize(
        tmp_path, dense="dense", compressed="dense-merge-t5", dtype="bfloat16", env=ENV
    )

    assert {(lv["model"], lv["protocol"]) for lv in levels} == {
        ("dense", "http"),
        ("dense-merge-t5", "http"),
        ("dense", "grpc"),
    }
    assert levels[0]["p99_ms"] == 30.0  # perf_analyzer writes microseconds
    assert result["ratios"] == [
        {"protocol": "http", "input": "uint8", "concurrency": 64, "speedup": 1.5}
    ]
    assert result["speedup"] == 1.5  # best compressed over best dense
    assert result["batch"] == 1 and result["device"] == "Test GPU"


def test_the_table_names_a_missing_level_and_keeps_the_asked_concurrency(tmp_path: Path) -> None:
    folder = tmp_path / "bench/results/v2/run"
    folder.mkdir(parents=True)
    for c in (64, 256):
        write_level(folder, "dense", "grpc", "bytes", c, 1000)
    write_level(folder, "dense-merge-t5", "grpc", "bytes", 64, 900)
    record = summarize(folder, dense="dense", compressed="dense-merge-t5", dtype="bf16", env=ENV)
    (folder / "record.json").write_text(json.dumps(record))

    lines = perf_analyzer_table({"files": ["v2/run/record.json"], "concurrency": [256]}, tmp_path)

    rows = [line for line in lines if line.startswith("| grpc")]
    assert rows == ["| grpc | BYTES | 256 | 1,000 (30 ms) | no stable window | – |"]
