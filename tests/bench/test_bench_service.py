"""``vitserve bench service`` end to end with tiny models: short, but the real path."""

from __future__ import annotations

import json

import pytest

from app.bench.decode_ceiling import decode_ceiling, stage_times
from app.bench.images import load_images, photo_like_jpeg
from app.bench.service import build_parser, main, median_speedups, server_env, speedups
from app.bench.service_levels import Level, batch_totals
from app.config import Settings
from app.store import ModelStore
from app.vit.builder import compress
from app.vit.config import CompressionConfig
from tests.helpers import TINY_PREPROCESSING, add_tiny_entry, tiny_manifest

RESULT_KEYS = {
    "device",
    "torch_version",
    "date",
    "batch",
    "dtype",
    "speedup",
    "speedups",
    "median_speedups",
    "decode_ceiling_img_s",
    "decode_ceiling_processes",
    "decode_stage_steps",
    "best_img_s",
    "levels",
    "plots",
}
LEVEL_KEYS = {
    *("img_s", "p50_ms", "p95_ms", "p99_ms", "mean_batch", "decode_ms", "queue_ms"),
    *("inference_ms", "device_us_per_image", "other_ms", "nvjpeg_share", "cpu_busy", "gpu_busy"),
}


def test_batch_totals_reads_one_models_histogram():
    text = (
        'vitserve_batch_size_sum{model="a"} 12.0\n'
        'vitserve_batch_size_count{model="a"} 3.0\n'
        'vitserve_batch_size_sum{model="b"} 5.0\n'
    )
    assert batch_totals(text, "a") == (12.0, 3.0)
    assert batch_totals(text, "c") == (0.0, 0.0)


def test_median_speedups_compare_repeated_levels_concurrency_by_concurrency():
    def level(model: str, concurrency: int, img_s: float, offered: float | None = None) -> Level:
        fields = dict.fromkeys(Level.__dataclass_fields__)
        return Level(**{**fields, "model": model, "concurrency": concurrency, "img_s": img_s,
                        "offered_img_s": offered})  # fmt: skip

    levels = [level("dense", 4, v) for v in (30.0, 38.0, 31.0)] + [
        *(level("merged", 4, v) for v in (48.0, 65.0, 45.0)),
        level("merged", 8, 70.0),  # no dense level at 8: no ratio there
        level("merged", 4, 999.0, offered=20.0),  # open loop: not a repeat
    ]
    assert median_speedups(levels, "dense") == {"merged": {4: 48.0 / 31.0}}


def test_speedups_are_relative_to_the_reference():
    assert speedups({"dense": 100.0, "glad": 150.0}, "dense") == {"glad": 1.5}
    assert speedups({"dense": 0.0, "glad": 1.0}, "dense") == {"glad": None}


@pytest.mark.timeout(300)
def test_bench_service_writes_json_and_plots_with_a_litserve_baseline(tmp_path, capsys):
    store = ModelStore(tmp_path / "store")
    add_tiny_entry(store, "tiny")
    cfg = CompressionConfig.parse("static=0;tokens=9@1")
    store.write_entry(
        tiny_manifest("tiny-glad", variant="compressed", compression=cfg),
        compress(store.load("tiny").module, cfg).state_dict(),
    )
    out = tmp_path / "results"
    argv = [
        *("--store", str(store.root), "--models", "tiny", "tiny-glad"),
        *("--concurrency", "1", "4", "--seconds", "1", "--warmup", "0.2"),
        *("--generated", "4", "--device", "cpu", "--ceiling-seconds", "0.3"),
        *("--out", str(out), "--start-timeout", "120", "--images-per-request", "2"),
        *("--client-processes", "2"),
        "--litserve",
    ]
    assert main(argv) == 0

    [path] = out.glob("service-*.json")
    result = json.loads(path.read_text())
    assert result.keys() >= RESULT_KEYS
    assert result["models"]["tiny-glad"]["variant"] == "compressed"
    assert result["speedup"] is not None and result["speedup"] > 0
    assert result["images_per_request"] == 2
    # 2 models + the LitServe baseline, 2 levels each, and ours at half load (open loop)
    assert len(result["levels"]) == 8
    ours = [lv for lv in result["levels"] if not lv["model"].startswith("litserve:")]
    half = result["half_load"]
    assert half.keys() == {"tiny", "tiny-glad"}
    for model, figures in half.items():
        best = result["best_img_s"][model]
        assert figures["offered_img_s"] == pytest.approx(best / 2)
        assert figures["p99_ms"] > 0 and figures["img_s"] < best
    for level in result["levels"]:
        assert level.keys() >= LEVEL_KEYS
        assert level["requests"] > 0 and not level["errors"], level
    for level in ours:
        assert level["mean_batch"] >= 1 and level["nvjpeg_share"] == 0  # CPU: Pillow only
        assert level["device_us_per_image"] > 0 and level["other_ms"] is not None
        assert 0 < level["cpu_busy"] <= 1  # the client and the server were working
    assert result["litserve"]["model"] == "litserve:tiny"
    assert result["litserve"]["ours_over_litserve"] > 0
    assert result["best_img_s"]["litserve:tiny"] > 0
    assert all(v > 0 for v in result["decode_ceiling_img_s"].values())
    for stage in result["decode_stage_steps"].values():
        assert stage["path"] == "cpu" and stage["images"] > 0
        assert all(ms > 0 for ms in stage["ms_per_image"].values())
    for png in result["plots"].values():
        assert (out / png).stat().st_size > 0
    printed = capsys.readouterr().out
    assert "img/s" in printed and "resize_crop" in printed


def test_the_decode_ceiling_runs_in_as_many_processes_as_the_server_has_workers():
    """Each worker process has its own decode stage; the ceiling is theirs together."""
    images = load_images(None, count=4)
    settings = Settings(decode_workers=1)
    common = {"device": "cpu", "batch_size": 4, "seconds": 0.3}
    one = decode_ceiling(TINY_PREPROCESSING, settings, images, **common)
    two = decode_ceiling(TINY_PREPROCESSING, settings, images, processes=2, **common)
    assert one > 0 and two > 0


def test_the_decode_stage_is_timed_step_by_step_and_bigger_photos_cost_more_to_decode():
    """The split of the service table's decode column: probe, decode, resize + crop and
    normalise, per image. Photos four times the pixels take longer to decode and resize."""
    settings = Settings(decode_workers=1)
    small = load_images(None, count=4)  # camera-like sizes up to 1024x768
    big = [(f"big{k}.jpg", photo_like_jpeg(k, size=(2048, 1536))) for k in range(4)]
    common = {"device": "cpu", "batch_size": 4, "repeats": 3}
    fast = stage_times(TINY_PREPROCESSING, settings, small, **common)
    slow = stage_times(TINY_PREPROCESSING, settings, big, **common)
    assert fast["path"] == slow["path"] == "cpu" and fast["images"] == 4
    assert list(fast["ms_per_image"]) == ["probe", "decode", "resize_crop", "normalize"]
    assert slow["ms_per_image"]["decode"] > fast["ms_per_image"]["decode"]


def test_settings_set_around_the_command_are_recorded_with_the_flags(monkeypatch) -> None:
    """A script sets the engine up in the environment the server inherits: the record says so."""
    monkeypatch.setenv("VITSERVE_ENGINES_PER_DEVICE", "3")
    monkeypatch.setenv("VITSERVE_MAX_BATCH_SIZE", "64")
    monkeypatch.setenv("VITSERVE_STORE_DIR", "/elsewhere")
    args = build_parser().parse_args(
        ["--store", "/s", "--models", "a", "--max-batch-size", "256", "--workers", "12"]
    )

    env = server_env(args)

    assert env["VITSERVE_ENGINES_PER_DEVICE"] == "3"
    assert env["VITSERVE_MAX_BATCH_SIZE"] == "256"  # a flag wins over the environment
    assert env["VITSERVE_WORKERS"] == "12"
    assert env["VITSERVE_STORE_DIR"] == "/s"  # and the bench's own store over the caller's
