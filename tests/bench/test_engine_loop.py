"""The engine's CPU per image through its socket: a real engine, fed as a worker feeds it."""

from __future__ import annotations

import json

from app.bench.engine_loop import main
from app.store import ModelStore
from tests.helpers import add_tiny_entry


def test_each_input_gets_the_engines_cpu_per_image_its_forward_and_the_rate(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("VITSERVE_CPU_THREADS", "1")  # a setting around the command
    store = ModelStore(tmp_path / "store")
    add_tiny_entry(store, "tiny")
    main(
        ["--store", str(store.root), "--model", "tiny", "--inputs", "preprocessed", "pixels",
         "--concurrency", "8", "--seconds", "1", "--warmup", "0.5", "--max-batch-size", "4",
         "--out", str(tmp_path / "out")]
    )  # fmt: skip
    result = json.loads(next((tmp_path / "out").glob("engine-loop-cpu-*.json")).read_text())
    assert [(r["input"], r["concurrency"]) for r in result["rows"]] == [
        ("preprocessed", 8),
        ("pixels", 8),
    ]
    for row in result["rows"]:
        assert row["img_s"] > 0 and row["engine_us_per_image"] > 0
        assert 0 < row["engine_cores"] <= 2.5 and row["feeder_us_per_image"] > 0
        # the engine's own counters: the forward takes part of its time, batches of <= 4
        assert 0 < row["forward_cpu_us_per_image"] < row["engine_us_per_image"]
        assert row["forward_us_per_image"] > 0
        assert 1 <= row["mean_batch"] <= 4
    assert result["server"]["VITSERVE_CPU_THREADS"] == "1" and result["batch"] == 4
    assert "| preprocessed | 8 |" in capsys.readouterr().out
