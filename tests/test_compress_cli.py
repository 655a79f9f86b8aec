"""`vitserve compress`: token merging becomes a store entry with no training data."""

from __future__ import annotations

import pytest

from app.cli import main
from app.store import ModelStore
from tests.helpers import add_tiny_entry


def test_merge_family_needs_no_training_data(tmp_path, capsys):
    store = ModelStore(tmp_path / "store")
    add_tiny_entry(store, "tiny")
    with pytest.raises(SystemExit) as done:
        main(
            [
                "compress",
                "--store",
                str(store.root),
                "--teacher",
                "tiny",
                "--family",
                "merge",
                "--r",
                "2",
                "--device",
                "cpu",
                "--speed-arch",
                "vit_tiny_patch16_224",
            ]
        )
    assert done.value.code == 0
    entry = store.load("tiny-merge2")
    assert entry.manifest.variant == "compressed"
    assert str(entry.manifest.compression) == "merge=2"
    assert entry.manifest.source.details["steps"] == 0
    assert entry.manifest.metrics["speed"]["speedup"] > 0
    assert "training-free" in capsys.readouterr().out


def test_learned_configs_refuse_to_skip_training(tmp_path):
    store = ModelStore(tmp_path / "store")
    add_tiny_entry(store, "tiny")
    with pytest.raises(SystemExit) as done:
        main(
            [
                "compress",
                "--store",
                str(store.root),
                "--teacher",
                "tiny",
                "--config",
                "static=0",
                "--device",
                "cpu",
            ]
        )
    assert done.value.code == 2
    assert "tiny-static0" not in store.names()


def test_family_must_match_the_config(tmp_path):
    store = ModelStore(tmp_path / "store")
    add_tiny_entry(store, "tiny")
    with pytest.raises(SystemExit) as done:
        main(
            [
                "compress",
                "--store",
                str(store.root),
                "--teacher",
                "tiny",
                "--family",
                "glad",
                "--r",
                "2",
            ]
        )
    assert done.value.code == 2
