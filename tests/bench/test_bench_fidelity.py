"""``python -m app.bench.fidelity``: every variant against the teacher on the same folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.bench.fidelity import cross_fitted, main, per_seed, record_figure
from app.store import ModelStore
from app.store.manifest import Source, wilson_interval
from app.vit.builder import compress
from app.vit.config import CompressionConfig
from tests.helpers import add_tiny_entry, image_bytes, tiny_manifest


def photo_folder(path: Path, count: int, seed: int) -> Path:
    path.mkdir(parents=True)
    for i in range(count):
        (path / f"{i}.jpg").write_bytes(image_bytes("JPEG", (40, 36), seed=seed + i))
    return path


def test_entries_and_configs_on_shared_folders_skipping_trained_on(tmp_path, capsys):
    store = ModelStore(tmp_path / "store")
    add_tiny_entry(store, "tiny")
    train = photo_folder(tmp_path / "train", 4, seed=0)
    held_out = photo_folder(tmp_path / "held-out", 5, seed=10)
    cfg = CompressionConfig.parse("merge=2")
    store.write_entry(
        tiny_manifest(
            "tiny-merged",
            variant="compressed",
            compression=cfg,
            source=Source(kind="compress", ref="tiny", details={"train_dirs": [str(train)]}),
        ),
        compress(store.load("tiny").module, cfg).state_dict(),
    )
    out = tmp_path / "results"
    argv = [
        *("--store", str(store.root), "--teacher", "tiny"),
        *("--images", str(train), str(held_out), "--entries", "tiny-merged"),
        *("--configs", "merge=0", "static=0;merge=2@1", "--calibrate", str(train)),
        *("--out-dir", str(out)),
    ]
    assert main(argv) == 0
    [path] = out.glob("fidelity-*.json")
    rows = {row["name"]: row for row in json.loads(path.read_text())["rows"]}
    assert set(rows["tiny-merged"]["eval"]) == {"held-out"}  # never scored on its training set
    assert rows["tiny-merged"]["training"] == "distilled"
    assert rows["merge=0"]["eval"]["train"]["agreement_top1"] == 1.0  # r=0 is the dense model
    assert rows["merge=0"]["training"] == "training-free"
    pooled = rows["merge=0"]["pooled"]  # both folders as one sample, with its interval
    assert (pooled["n_images"], pooled["agreement_top1"]) == (9, 1.0)
    assert pooled["agreement_ci95"] == [pytest.approx(0.7008, abs=1e-4), 1.0]  # Wilson, 9/9
    assert rows["static=0;merge=2@1"]["training"] == "calibrated"
    assert set(rows["static=0;merge=2@1"]["eval"]) == {"held-out"}  # calibrated on train
    assert "(trained on)" in capsys.readouterr().out


def test_static_attention_without_calibration_photos_is_refused(tmp_path):
    store = ModelStore(tmp_path / "store")
    add_tiny_entry(store, "tiny")
    folder = photo_folder(tmp_path / "photos", 2, seed=0)
    argv = ["--store", str(store.root), "--teacher", "tiny", "--images", str(folder)]
    with pytest.raises(ValueError, match="needs --calibrate"):
        main([*argv, "--configs", "static=0", "--out-dir", str(tmp_path / "r")])


def test_wilson_interval_matches_the_closed_form() -> None:
    z2 = 1.959964**2
    assert wilson_interval(0, 10) == (0.0, pytest.approx(z2 / (10 + z2)))
    low, high = wilson_interval(1406, 1543)
    assert (round(low, 4), round(high, 4)) == (0.896, 0.9244)
    with pytest.raises(ValueError):
        wilson_interval(0, 0)


def test_cross_fitting_scores_every_photo_by_the_folds_that_did_not_see_it() -> None:
    """Fold a trained on extra-a, fold b on extra-b: extra-a is read from fold b, extra-b from
    fold a, and dev (seen by neither) is their mean; one pooled figure over all of them."""

    def result(agreement: float, n: int) -> dict:
        return {
            "n_images": n,
            "n_labelled": n,
            "agreement_top1": agreement,
            "student_top1_acc": 0.7,
            "teacher_top1_acc": 0.8,
        }

    fold_a = {
        "name": "a",
        "config": "merge=4",
        "eval": {"dev": result(0.8, 10), "extra-b": result(0.9, 20)},
    }
    fold_b = {
        "name": "b",
        "config": "merge=4",
        "eval": {"dev": result(0.6, 10), "extra-a": result(0.5, 20)},
    }
    row = cross_fitted("recipe", [fold_a, fold_b])

    assert row["training"] == "cross-fitted" and row["folds"] == ["a", "b"]
    assert row["eval"]["dev"]["agreement_top1"] == pytest.approx(0.7)
    assert row["eval"]["dev"]["folds"] == 2 and row["eval"]["extra-a"]["folds"] == 1
    pooled = row["pooled"]
    assert pooled["n_images"] == 50  # each photo once
    assert pooled["agreement_top1"] == pytest.approx((7 + 18 + 10) / 50)
    lo, hi = pooled["agreement_ci95"]
    assert lo < pooled["agreement_top1"] < hi

    with pytest.raises(ValueError, match="share a config"):
        cross_fitted("mixed", [fold_a, {**fold_b, "config": "merge=8"}])


def test_each_seed_gets_its_own_cross_fitted_figure() -> None:
    """Folds named as cross_fit.sh names them: seed 0's pair and seed 1's pair each give one
    figure over all photos; a seed without folds gives none."""

    def fold(name: str, part: str, agreement: float) -> dict:
        seen = {"a": "extra-b", "b": "extra-a"}[part]  # each fold scores the half it left out
        result = {"n_images": 10, "n_labelled": 10, "agreement_top1": agreement,
                  "student_top1_acc": 0.7, "teacher_top1_acc": 0.8}  # fmt: skip
        return {"name": f"{name}-fold-{part}", "config": "merge=4", "eval": {seen: result}}

    folds = [fold("r-s0", "a", 0.9), fold("r-s0", "b", 0.7), fold("r-s1", "a", 0.5),
             fold("r-s1", "b", 0.5)]  # fmt: skip
    assert per_seed("r", folds, [0, 1, 2]) == {"0": 0.8, "1": 0.5}


def test_a_cross_fitted_figure_is_written_from_the_result_and_replaces_its_own(tmp_path):
    """--record-in: the pooled figure goes into the manifest; a second run over the same
    photo sets replaces it, and a figure over other sets (the entry's own dev run) stays."""
    path = tmp_path / "manifest.json"
    manifest = tiny_manifest().model_dump(mode="json")
    dev_only = {"eval_sets": ["dev"], "n_images": 10, "agreement_top1": 0.8, "ci95": [0.5, 0.9]}
    manifest["figures"] = {"fidelity": [dev_only]}
    path.write_text(json.dumps(manifest))

    def row(agreement: float) -> dict:
        result = {"n_images": 20, "n_labelled": 20, "agreement_top1": agreement}
        result |= {"student_top1_acc": 0.7, "teacher_top1_acc": 0.8}
        fold = {"name": "a", "config": "merge=4", "eval": {"dev": result, "extra-b": result}}
        return cross_fitted("recipe", [fold]) | {"seeds": [0]}

    record_figure(path, row(0.9), "results/first.json", "CPU fp32")
    record_figure(path, row(0.85), "results/second.json", "CPU fp32")

    figures = json.loads(path.read_text())["figures"]["fidelity"]
    assert figures[0] == dev_only
    assert len(figures) == 2
    assert figures[1]["eval_sets"] == ["dev", "extra-b"] and figures[1]["n_images"] == 40
    assert figures[1]["agreement_top1"] == 0.85 and figures[1]["source"] == "results/second.json"
    assert figures[1]["method"] == "cross-fitted" and figures[1]["seeds"] == [0]
