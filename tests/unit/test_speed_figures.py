"""Manifests' speed figures are written from result files, never typed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.bench.speed_figures import update_store
from app.store import ModelStore
from app.store.manifest import SpeedFigure
from app.vit.config import CompressionConfig
from tests.helpers import TINY_ARCH, tiny_manifest

TOME = str(CompressionConfig.parse("merge=13"))
OTHER = str(CompressionConfig.parse("merge=4"))


def row(config: str, batch: int, speedup: float | None, **extra) -> dict:
    base = {"arch": TINY_ARCH, "config": config, "dtype": "float32", "batch": batch}
    base |= {"compiled": False, "cuda_graphs": False, "speedup": speedup, "error": None}
    return base | extra


def models_result(rows: list[dict]) -> dict:
    facts = {"device": "AMD EPYC", "device_type": "cpu", "threads": 2, "usable_cpus": 2}
    return facts | {"archs": [TINY_ARCH], "rows": rows}


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    store = ModelStore(tmp_path / "store")
    store.write_manifest(tiny_manifest("dense"))
    for name, config in [("tome", TOME), ("other", OTHER)]:
        compressed = tiny_manifest(
            name, variant="compressed", compression=CompressionConfig.parse(config)
        )
        compressed.figures.speed.append(
            SpeedFigure(architecture="deit_small_patch16_224", borrowed=True, device="GPU",
                        mode="compiled", dtype="bfloat16", speedup={256: 2.0})
        )  # fmt: skip
        store.write_manifest(compressed)
    return store


def write(tmp_path: Path, result: dict) -> Path:
    path = tmp_path / "result.json"
    path.write_text(json.dumps(result))
    return path


def speed(store: ModelStore, name: str) -> list[dict]:
    return json.loads((store.root / name / "manifest.json").read_text())["figures"]["speed"]


def test_an_entry_gets_its_own_config_per_batch_and_keeps_its_other_figures(store, tmp_path):
    rows = [row("dense", b, 1.0) for b in (1, 16)]
    rows += [row(TOME, 1, 1.1049), row(TOME, 16, 1.5371), row(TOME, 64, None, error="OOM")]
    written = update_store(store.root, write(tmp_path, models_result(rows)))
    assert written == {"tome": 1}  # neither dense nor the config the run did not time
    borrowed, mine = speed(store, "tome")
    assert borrowed["borrowed"] is True
    assert mine["architecture"] == TINY_ARCH and mine["borrowed"] is False
    assert mine["speedup"] == {"1": 1.105, "16": 1.537}  # a failed row is no number
    assert (mine["device"], mine["mode"]) == (
        "CPU, 2 cores (AMD EPYC)",
        "model alone, eager (as served on CPU)",
    )
    assert len(speed(store, "other")) == 1 and len(speed(store, "dense")) == 0


def test_a_new_run_replaces_the_figure_it_measured_again(store, tmp_path):
    update_store(store.root, write(tmp_path, models_result([row(TOME, 16, 1.2)])))
    update_store(store.root, write(tmp_path, models_result([row(TOME, 16, 1.6)])))
    assert [f["speedup"] for f in speed(store, "tome")] == [{"256": 2.0}, {"16": 1.6}]


def test_gpu_figures_are_the_mode_the_server_runs_cuda_graphs(store, tmp_path):
    gpu = {"device": "NVIDIA H200", "device_type": "cuda", "threads": None, "usable_cpus": 16}
    rows = [row(TOME, 256, 0.7, cuda_graphs=True, dtype="bfloat16"), row(TOME, 256, 0.5)]
    update_store(store.root, write(tmp_path, models_result(rows) | gpu))
    _, served = speed(store, "tome")  # the eager row is not how it is served: not written
    assert served["mode"] == "model alone, served: CUDA graphs, no compile"
    assert (served["device"], served["dtype"], served["speedup"]) == (
        "NVIDIA H200",
        "bfloat16",
        {"256": 0.7},
    )


def test_a_service_result_gives_the_end_to_end_figure(store, tmp_path):
    result = models_result([]) | {
        "levels": [],
        "batch": 32,
        "dtype": "float32",
        "images_per_request": 16,
        "concurrency": [4, 4],
        "models": {
            "d": {"architecture": TINY_ARCH, "variant": "dense", "compression": None},
            "t": {"architecture": TINY_ARCH, "variant": "compressed", "compression": TOME},
            "x": {"architecture": TINY_ARCH, "variant": "compressed", "compression": OTHER},
        },
        "speedups": {"t": 1.6512, "x": None},
    }
    assert update_store(store.root, write(tmp_path, result)) == {"tome": 1}
    figure = speed(store, "tome")[-1]
    assert figure["speedup"] == {"32": 1.651}
    assert figure["mode"].startswith("end to end through HTTP: 16 photos a request, 4 in flight")


def test_repeated_levels_give_the_median_figure_in_place_of_the_best(store, tmp_path):
    """Measured four times each, the figure is the median ratio, and it replaces the same
    set-up's earlier best-level figure rather than sitting beside it."""
    base = models_result([]) | {
        "levels": [],
        "batch": 32,
        "dtype": "float32",
        "images_per_request": 16,
        "models": {
            "d": {"architecture": TINY_ARCH, "variant": "dense", "compression": None},
            "t": {"architecture": TINY_ARCH, "variant": "compressed", "compression": TOME},
        },
        "speedups": {"t": 1.86},
    }
    update_store(store.root, write(tmp_path, base | {"concurrency": [4]}))
    repeated = base | {"concurrency": [4, 4, 4, 4], "median_speedups": {"t": {"4": 1.512}}}
    update_store(store.root, write(tmp_path, repeated))
    (figure,) = [f for f in speed(store, "tome") if f["mode"].startswith("end to end")]
    assert figure["speedup"] == {"32": 1.512}
    assert figure["mode"].endswith("one server, median of 4 levels of each")
