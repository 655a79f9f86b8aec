"""Derived (training-free) entries and declared manifests: no weights file of their own,
built from the teacher's at load; what a machine adds never rewrites a declared manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants

from app.jobs.compress import run_training_free
from app.store import ModelStore, Source
from app.store.errors import StoreError, WeightsCorrupt, WeightsMissing
from app.store.manifest import Manifest, Teacher
from app.store.store import tensor_digest
from app.vit.builder import compress, resolve_config
from tests.helpers import add_tiny_entry, tiny_manifest


@pytest.fixture
def store(tmp_path) -> ModelStore:
    store = ModelStore(tmp_path / "store")
    add_tiny_entry(store, "tiny", seed=1)
    run_training_free(store, "tiny", resolve_config("merge=2"), None, "tiny-m2", speed_arch=None)
    return store


def test_a_derived_entry_is_its_teacher_with_the_config_applied(store):
    assert not (store.root / "tiny-m2" / "model.safetensors").exists()
    manifest = store.manifest("tiny-m2")
    assert manifest.source.kind == "derived"
    teacher_state = store.load("tiny").module.state_dict()
    assert manifest.teacher == Teacher(name="tiny", sha256=tensor_digest(teacher_state))
    expected = compress(store.load("tiny").module, resolve_config("merge=2")).eval()
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(store.load("tiny-m2").module(x), expected(x))


def test_a_derived_entry_is_absent_while_its_teacher_is(store):
    store.weights_path("tiny").unlink()
    assert not store.has_weights("tiny-m2")
    with pytest.raises(WeightsMissing, match="built from tiny"):
        store.load("tiny-m2")


def test_other_teacher_weights_are_refused(store):
    add_tiny_entry(store, "tiny", seed=2)  # same architecture, other weights
    with pytest.raises(WeightsCorrupt, match="not the ones this entry was measured with"):
        store.load("tiny-m2")


def test_only_training_free_configs_can_be_derived():
    with pytest.raises(ValueError, match="training-free"):
        tiny_manifest(
            "glad",
            variant="compressed",
            compression=resolve_config("static=0"),
            source=Source(kind="derived", ref="tiny"),
            teacher=Teacher(name="tiny", sha256="0" * 64),
        )


def test_a_borrowed_speed_figure_must_say_so():
    figure = {
        "architecture": "deit_small_patch16_224",
        "device": "NVIDIA H200",
        "mode": "compiled",
        "dtype": "bfloat16",
        "speedup": {"256": 1.85},
    }
    with pytest.raises(ValueError, match="borrowed"):
        tiny_manifest(figures={"speed": [figure]})
    assert tiny_manifest(figures={"speed": [{**figure, "borrowed": True}]}).figures.speed


def test_weights_written_under_a_declared_manifest_go_beside_it(store, tmp_path):
    declared = store.root / "tiny" / "manifest.json"
    before = declared.read_bytes()
    add_tiny_entry(store, "tiny", seed=5)
    assert declared.read_bytes() == before
    local = json.loads((store.root / "tiny" / "local.json").read_text())
    assert store.verify("tiny").weights.sha256 == local["sha256"]


def test_a_declared_manifest_is_never_replaced_by_another_model(store):
    other = tiny_manifest(
        "tiny", architecture_kwargs={**store.manifest("tiny").architecture_kwargs, "depth": 1}
    )
    with pytest.raises(StoreError, match="declared .* as another model"):
        store.write_entry(other, {})
    with pytest.raises(StoreError, match="already declared"):
        store.declare(store.manifest("tiny-m2"))


def test_offline_hint_says_when_no_weights_can_be_had(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    store = ModelStore(tmp_path / "s")
    store.write_manifest(
        tiny_manifest("tiny", source=Source(kind="timm-pretrained", ref="timm/not-cached"))
    )
    with pytest.raises(WeightsMissing, match="no weights can be had here") as caught:
        store.load("tiny")
    assert "store pull" in str(caught.value)  # only as what to run where the hub is reachable


def test_a_missing_distilled_entry_points_to_build_and_to_a_training_free_one(store):
    command = "vitserve compress --teacher tiny --config 'merge=3' --images x --out tiny-d"
    store.write_manifest(
        tiny_manifest(
            "tiny-d",
            variant="compressed",
            compression=resolve_config("merge=3"),
            source=Source(kind="compress", ref="tiny", details={"command": command}),
        )
    )
    with pytest.raises(WeightsMissing) as caught:
        store.load("tiny-d")
    assert "vitserve store build tiny-d" in str(caught.value)
    assert "training-free entry now, no build: tiny-m2" in str(caught.value)


DECLARED = ModelStore(Path(__file__).resolve().parents[2] / "model_store")


@pytest.mark.parametrize(
    "name", [n for n in DECLARED.names() if DECLARED.manifest(n).source.kind == "derived"]
)
def test_declared_derived_entries_pin_the_dense_teacher(name):
    manifest: Manifest = DECLARED.manifest(name)
    teacher = DECLARED.manifest(manifest.teacher.name)
    assert teacher.source.kind == "timm-pretrained" and manifest.compression.training_free


def test_the_teacher_pin_is_its_tensors_not_its_file(store, tmp_path):
    """Another safetensors version writes the same weights as another file: still the same
    teacher. Other values are another teacher."""
    from safetensors.torch import load_file, save_file

    path = store.weights_path("tiny")
    state = load_file(path)
    rewritten = tmp_path / "rewritten.safetensors"
    save_file(state, rewritten, metadata={"written_by": "another version"})
    assert rewritten.read_bytes() != path.read_bytes()
    assert tensor_digest(load_file(rewritten)) == store.manifest("tiny-m2").teacher.sha256
    state["head.bias"] = state["head.bias"] + 1
    assert tensor_digest(state) != store.manifest("tiny-m2").teacher.sha256
