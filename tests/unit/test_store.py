"""The model store: entries round-trip, and every broken entry is refused with a reason."""

from __future__ import annotations

import json
import pickle
import re
import shlex
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from app.store import ModelStore, Source
from app.store.errors import (
    ManifestInvalid,
    StoreError,
    UnknownModel,
    WeightsCorrupt,
    WeightsMissing,
)
from app.store.pull import import_checkpoint
from app.store.store import build_module
from app.vit.builder import resolve_config
from tests.helpers import TINY_ARCH, add_tiny_entry, tiny_manifest


@pytest.fixture
def store(tmp_path) -> ModelStore:
    return ModelStore(tmp_path / "store")


def test_round_trip_gives_identical_logits(store):
    manifest = add_tiny_entry(store, seed=3)
    torch.manual_seed(3)
    original = build_module(manifest).eval()
    loaded = store.load("tiny")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded.module(x), original(x))
    assert loaded.manifest.weights.sha256 and len(loaded.manifest.weights.sha256) == 64
    assert store.names() == ["tiny"]


def test_the_same_weights_make_the_same_file(store):
    """A rebuild or resumed build is checked by the file's sha256, so equal tensors must give
    equal bytes every time (the order safetensors writes a metadata map in is random)."""
    add_tiny_entry(store, "tiny", seed=0)
    state = store.load("tiny").module.state_dict()
    digests = set()
    for _ in range(16):  # two orders of two keys would all agree once in 2**15 tries
        store.write_entry(store.manifest("tiny"), state)
        digests.add(store.manifest("tiny").weights.sha256)
    assert len(digests) == 1


def test_checksum_mismatch_is_refused(store):
    add_tiny_entry(store)
    path = store.weights_path("tiny")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsCorrupt, match="checksum mismatch"):
        store.load("tiny")


@pytest.mark.parametrize(
    "source,command",
    [
        (Source(kind="timm-pretrained", ref="timm/x"), "vitserve store pull vit_tiny_patch16_224"),
        (Source(kind="import", ref="w.pth"), "vitserve store import"),
        (
            Source(kind="compress", ref="tiny", details={"command": "vitserve compress --x"}),
            "vitserve compress --x",
        ),
        (
            Source(kind="random", details={"command": "vitserve store random x --name y"}),
            "vitserve store random x --name y",
        ),
    ],
)
def test_missing_weights_say_how_to_fetch_them(store, source, command):
    add_tiny_entry(store, source=source)
    store.weights_path("tiny").unlink()
    with pytest.raises(WeightsMissing, match=re.escape(command)):
        store.load("tiny")


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda m: "{not json",
        lambda m: json.dumps({**m, "schema_version": 2}),
        lambda m: json.dumps({**m, "variant": "compressed"}),  # compressed without config
        lambda m: json.dumps({**m, "name": "other"}),  # folder and manifest disagree
        lambda m: json.dumps({**m, "weights": {"file": "../../etc/passwd"}}),
        lambda m: json.dumps({**m, "unexpected_field": 1}),
    ],
    ids=["not-json", "schema-version", "variant", "name", "weights-path", "extra-field"],
)
def test_bad_manifest_is_refused(store, corrupt):
    add_tiny_entry(store)
    path = store.root / "tiny" / "manifest.json"
    path.write_text(corrupt(json.loads(path.read_text())))
    with pytest.raises(ManifestInvalid):
        store.load("tiny")


def test_wrong_tensor_shapes_are_refused(store):
    add_tiny_entry(store)
    path = store.weights_path("tiny")
    bigger = build_module(
        tiny_manifest(
            architecture_kwargs={
                "img_size": 32,
                "patch_size": 8,
                "embed_dim": 48,
                "depth": 2,
                "num_heads": 2,
            }
        )
    )
    save_file(bigger.state_dict(), path)
    manifest = store.manifest("tiny")
    from app.store.store import sha256_of

    store.write_manifest(
        manifest.model_copy(
            update={"weights": manifest.weights.model_copy(update={"sha256": sha256_of(path)})}
        )
    )
    with pytest.raises(WeightsCorrupt, match="do not fit"):
        store.load("tiny")


@pytest.mark.parametrize("name", ["../tiny", "tiny/../tiny", "/etc", "TINY", ""])
def test_names_are_looked_up_never_used_as_paths(store, name):
    add_tiny_entry(store)
    with pytest.raises(UnknownModel):
        store.load(name)


def test_import_safetensors_and_weights_only_pth(store, tmp_path):
    module = build_module(tiny_manifest())
    st_file, pth_file = tmp_path / "w.safetensors", tmp_path / "w.pth"
    save_file(module.state_dict(), st_file)
    torch.save({"model": module.state_dict(), "epoch": 3}, pth_file)
    kwargs = tiny_manifest().architecture_kwargs
    for file, name in ((st_file, "from-st"), (pth_file, "from-pth")):
        manifest = import_checkpoint(store, file, TINY_ARCH, name=name, architecture_kwargs=kwargs)
        assert manifest.source.kind == "import"
        x = torch.randn(1, 3, 32, 32)
        assert torch.equal(store.load(name).module(x), module.eval()(x))


class _WritesAFile:
    """Unpickling this calls open(...).write(...): a pickle that runs code."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (exec, (f"open({self.target!r}, 'w').write('pwned')",))


def test_a_pickle_is_never_executed(store, tmp_path):
    marker = tmp_path / "pwned.txt"
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"head.weight": _WritesAFile(str(marker))}))
    with pytest.raises(StoreError, match="weights-only"):
        import_checkpoint(store, evil, TINY_ARCH, name="evil")
    assert not marker.exists()
    assert "evil" not in store.names()


def test_a_pickle_dropped_into_the_store_is_not_read(store, tmp_path):
    """The store reads only the safetensors file its manifest names; a .pth beside is inert."""
    add_tiny_entry(store)
    marker = tmp_path / "pwned.txt"
    (store.root / "tiny" / "model.pth").write_bytes(pickle.dumps(_WritesAFile(str(marker))))
    store.load("tiny")
    manifest = store.root / "tiny" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["weights"]["file"] = "model.pth"
    manifest.write_text(json.dumps(data))
    with pytest.raises(ManifestInvalid):
        store.load("tiny")
    assert not marker.exists()


@pytest.mark.parametrize("config", [None, "tome-r8"])
def test_random_entries_serve_speed_tests_where_no_weights_exist(store, config):
    from app.store.pull import random_entry

    manifest = random_entry(store, "vit_tiny_patch16_224", name="r", config=config, seed=3)
    assert manifest.source.kind == "random" and "random" in manifest.description
    assert manifest.variant == ("compressed" if config else "dense")
    assert "--seed 3" in manifest.source.details["command"]
    random_entry(store, "vit_tiny_patch16_224", name="r2", config=config, seed=3)
    first, again = store.load("r").module.state_dict(), store.load("r2").module.state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)  # seeded


DECLARED = ModelStore(Path(__file__).resolve().parents[2] / "model_store")


@pytest.mark.parametrize(
    "name", [n for n in DECLARED.names() if DECLARED.manifest(n).source.kind == "compress"]
)
def test_declared_compressed_entries_say_how_they_were_made(name):
    """The repo's store declares distilled entries without their weights: each manifest's
    command must make exactly that entry, with the config the manifest describes."""
    manifest = DECLARED.manifest(name)
    command = shlex.split(manifest.source.details["command"])
    args = dict(zip(command, command[1:], strict=False))
    assert args["--out"] == name
    assert resolve_config(args["--config"]) == manifest.compression
    assert args["--teacher"] == manifest.source.ref
    assert manifest.figures.fidelity, "a distilled entry states its measured fidelity"
    for fidelity in manifest.figures.fidelity:  # each over its own photos, with its seeds
        assert fidelity.ci95[0] <= fidelity.agreement_top1 <= fidelity.ci95[1]
        assert fidelity.n_images >= 250 and fidelity.seeds
    speed = manifest.figures.speed
    assert speed and all(f.borrowed for f in speed if f.architecture != manifest.architecture)
