"""The matching microbenchmark on CPU: every implementation that runs here, timed per step
against the argsort reference of the same loop, written as JSON with its environment."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from app.bench.merge_matching import REFERENCE, MergeStep, implementations, main


def test_every_cpu_implementation_merges_alike() -> None:
    """What is timed is the same work: each implementation's merged tokens are the
    reference's (random tokens: no tied scores)."""
    x_BNC = torch.randn(3, 17, 16, generator=torch.Generator().manual_seed(0))
    impls = implementations(torch.device("cpu"), "merge")
    assert list(impls) == [REFERENCE, "torch"]
    outputs = [MergeStep(*impl, 4, 2, "merge")(x_BNC) for impl in impls.values()]
    assert outputs[0].shape == (3, 13, 16)
    torch.testing.assert_close(outputs[1], outputs[0], atol=0, rtol=0)


def test_rows_per_batch_step_and_implementation(tmp_path: Path) -> None:
    report = main(
        ["--device", "cpu", "--dtype", "float32", "--batches", "1", "2", "--tokens", "17"]
        + ["--width", "16", "--heads", "2", "--r", "4", "--warmup", "0", "--repeats", "2"]
        + ["--no-progress", "--out-dir", str(tmp_path)]
    )
    rows = report["rows"]
    assert [(r["batch"], r["step"], r["impl"]) for r in rows] == [
        (b, s, i) for b in (1, 2) for s in ("matching", "merge") for i in (REFERENCE, "torch")
    ]
    assert all(r["error"] is None and r["mode"] == "eager" and r["median_ms"] > 0 for r in rows)
    assert all(r["speedup_vs_argsort"] == 1.0 for r in rows if r["impl"] == REFERENCE)
    written = json.loads(Path(report["path"]).read_text())
    assert written["rows"] == rows and written["torch_version"] == torch.__version__
