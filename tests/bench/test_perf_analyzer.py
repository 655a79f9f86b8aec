"""perf_analyzer's per-level CSVs become one result record, and a doc table is drawn from it."""

from __future__ import annotations

import json
from pathlib import Path

from app.bench.perf_analyzer import read_levels, summarize, write_summary
from app.bench.service_tables import perf_analyzer_table

HEADER = (
    "Concurrency,Inferences/Second,Client Send,Client Recv,"
    "p50 latency,p90 latency,p95 latency,p99 latency\n"
)
ENV = {"device": "Test GPU", "torch_version": "2.x"}


def write_level(
    folder: Path, model: str, protocol: str, input_: str, c: int, rate: float, batch: int = 0
) -> None:
    """One level's CSV as perf_analyzer.sh names it; ``batch`` 0 names it as runs did before
    the images a request were in the name."""
    row = f"{c},{rate},0,0,20000,25000,27000,30000\n"
    part = f"-b{batch}" if batch else ""
    (folder / f"pa-{model}-{protocol}-{input_}{part}-c{c}.csv").write_text(HEADER + row)


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
        {"protocol": "http", "input": "uint8", "batch": 1, "concurrency": 64, "speedup": 1.5}
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


def test_levels_of_several_images_a_request_pair_only_with_their_own_batch(tmp_path: Path) -> None:
    folder = tmp_path / "bench/results/v2/run"
    folder.mkdir(parents=True)
    write_level(folder, "dense", "http", "uint8", 64, 3000, batch=1)
    write_level(folder, "dense-merge-t5", "http", "uint8", 64, 3100, batch=1)
    write_level(folder, "dense", "http", "uint8", 64, 12000, batch=16)
    write_level(folder, "dense-merge-t5", "http", "uint8", 64, 18000, batch=16)
    record = summarize(folder, dense="dense", compressed="dense-merge-t5", dtype="bf16", env=ENV)
    (folder / "record.json").write_text(json.dumps(record))

    lines = perf_analyzer_table({"files": ["v2/run/record.json"]}, tmp_path)

    assert [(r["batch"], round(r["speedup"], 3)) for r in record["ratios"]] == [
        (1, 1.033),
        (16, 1.5),
    ]
    assert record["batch"] == [1, 16]
    assert "images a request as the column says" in lines[0]
    assert "| protocol | input | images/request | concurrency |" in lines[2]
    assert [line for line in lines if line.startswith("| http")] == [
        "| http | UINT8 | 1 | 64 | 3,000 (30 ms) | 3,100 (30 ms) | 1.03× |",
        "| http | UINT8 | 16 | 64 | 12,000 (30 ms) | 18,000 (30 ms) | 1.50× |",
    ]


def test_the_summary_has_a_line_a_level_in_perf_analyzers_units(tmp_path: Path) -> None:
    write_level(tmp_path, "dense", "grpc", "bytes", 64, 1000.5, batch=16)

    path = write_summary(tmp_path, read_levels(tmp_path))

    assert path.read_text().splitlines() == [
        "model,protocol,input,batch,concurrency,infer_per_sec,p50_us,p99_us",
        "dense,grpc,bytes,16,64,1000.5,20000,30000",
    ]
