"""The engine's ceiling: the batcher, decode stage and runner timed in one process."""

from __future__ import annotations

import json

from app.bench.engine_ceiling import main, speedups
from app.store import ModelStore
from tests.helpers import add_tiny_entry, image_bytes


def test_each_model_input_and_batch_gets_a_row_and_the_second_model_a_ratio(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("VITSERVE_DECODE_WORKERS", "1")  # a setting around the command
    store = ModelStore(tmp_path / "store")
    add_tiny_entry(store, "a", seed=0)
    add_tiny_entry(store, "b", seed=1)
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(6):
        (photos / f"{i}.jpg").write_bytes(image_bytes(size=(80, 60), seed=i))
    main(
        ["--store", str(store.root), "--models", "a", "b", "--images", str(photos),
         "--device", "cpu", "--batches", "4", "--seconds", "0.5", "--warmup", "0.2",
         "--in-flight", "32", "--out", str(tmp_path / "out")]
    )  # fmt: skip
    result = json.loads(next((tmp_path / "out").glob("engine-ceiling-*.json")).read_text())
    rows = {(r["model"], r["kind"]): r for r in result["rows"]}
    assert set(rows) == {(m, k) for m in "ab" for k in ("jpeg", "pixels")}
    for row in rows.values():
        assert row["img_s"] > 0 and 1 <= row["mean_batch"] <= 4
        assert row["forward_ms_per_batch"] > 0 and row["model_alone_ms"] > 0
        # who decoded: Pillow on a CPU, no one for pixels the client decoded
        assert row.get("pillow_share") == (1.0 if row["kind"] == "jpeg" else None)
    assert set(result["speedup"]) == {"jpeg b4 t2", "pixels b4 t2"}
    assert result["device_type"] == "cpu" and result["batch"] == [4]
    assert result["server"]["VITSERVE_DECODE_WORKERS"] == "1"  # recorded with the figures
    assert "| a | jpeg (pillow 100%) | 4 | 2 |" in capsys.readouterr().out


def test_the_ratio_pairs_rows_of_the_same_input_batch_and_threads():
    row = lambda model, kind, img_s: {  # noqa: E731
        "model": model, "kind": kind, "batch": 32, "decode_threads": 2, "img_s": img_s,
    }  # fmt: skip
    rows = [row("d", "jpeg", 100.0), row("d", "pixels", 200.0), row("c", "pixels", 300.0)]
    assert speedups(rows, ["d", "c"]) == {"pixels b32 t2": 1.5}
    assert speedups(rows, ["d"]) is None
