"""`vitserve compress`: token merging becomes a store entry with no training data."""

from __future__ import annotations

import pytest

from app.cli import main
from app.store import ModelStore
from tests.helpers import add_tiny_entry


@pytest.fixture
def store(tmp_path) -> ModelStore:
    store = ModelStore(tmp_path / "store")
    add_tiny_entry(store, "tiny")
    return store


def compress(store: ModelStore, *args: str) -> int:
    """Exit status of `vitserve compress --store S --teacher tiny ARGS`."""
    with pytest.raises(SystemExit) as done:
        main(["compress", "--store", str(store.root), "--teacher", "tiny", *args])
    return done.value.code


def test_merge_family_needs_no_training_data(store, capsys):
    args = ("--family", "merge", "--r", "2", "--device", "cpu")
    assert compress(store, *args, "--speed-arch", "vit_tiny_patch16_224") == 0
    entry = store.load("tiny-merge2")
    assert entry.manifest.variant == "compressed"
    assert str(entry.manifest.compression) == "merge=2"
    assert entry.manifest.source.details["steps"] == 0
    assert entry.manifest.metrics["speed"]["speedup"] > 0
    assert "training-free" in capsys.readouterr().out


def test_speed_can_be_left_to_the_benchmark(store):
    """Several jobs sharing a GPU would time each other: `--speed-arch none` skips it."""
    assert compress(store, "--family", "merge", "--r", "2", "--speed-arch", "none") == 0
    assert "speed" not in store.load("tiny-merge2").manifest.metrics


def test_the_reproduce_command_carries_every_option_that_changes_the_result():
    from pathlib import Path

    from app.jobs.compress import reproduce_command
    from app.train.options import DistillOptions
    from app.vit.config import CompressionConfig

    opts = DistillOptions(steps=1000, lr=1e-4, hard_weight=0.5, num_workers=3, log_every=7)
    command = reproduce_command(
        "tiny", CompressionConfig.parse("merge=2"), Path("train"), [], Path("dev"), "out", opts
    )
    assert "--steps 1000" in command and "--seed 0" in command
    assert """--options '{"lr":0.0001,"hard_weight":0.5}'""" in command  # not the loader knobs


def test_learned_configs_refuse_to_skip_training(store):
    assert compress(store, "--config", "static=0", "--device", "cpu") == 2
    assert store.names() == ["tiny"]


def test_family_must_match_the_config(store):
    assert compress(store, "--family", "glad", "--r", "2") == 2
    assert store.names() == ["tiny"]
