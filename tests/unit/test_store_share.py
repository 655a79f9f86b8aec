"""Sharing built entries: a tar archive and a Hub repo carry an entry whole, verified."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants

from app.store import ModelStore
from app.store.errors import StoreError, WeightsCorrupt
from app.store.share import export_archive, import_archive, pull_entry, push
from tests.helpers import add_tiny_entry


@pytest.fixture
def source(tmp_path) -> ModelStore:
    store = ModelStore(tmp_path / "built")
    add_tiny_entry(store, "tiny", seed=4)
    return store


def logits(store: ModelStore, name: str) -> torch.Tensor:
    torch.manual_seed(0)
    return store.load(name).module(torch.randn(2, 3, 32, 32))


def test_an_exported_entry_imports_elsewhere_with_the_same_outputs(source, tmp_path):
    archive = export_archive(source, "tiny", tmp_path / "tiny.tar")
    other = ModelStore(tmp_path / "other")
    manifest = import_archive(other, archive)
    assert manifest.weights.sha256 == source.manifest("tiny").weights.sha256
    assert torch.equal(logits(other, "tiny"), logits(source, "tiny"))


def test_import_beside_a_declared_manifest_keeps_it_byte_identical(source, tmp_path):
    archive = export_archive(source, "tiny", tmp_path / "tiny.tar")
    declared = ModelStore(tmp_path / "declared")
    (declared.root / "tiny").mkdir(parents=True)
    shutil.copyfile(
        source.root / "tiny" / "manifest.json", declared.root / "tiny" / "manifest.json"
    )
    before = (declared.root / "tiny" / "manifest.json").read_bytes()
    import_archive(declared, archive)
    assert (declared.root / "tiny" / "manifest.json").read_bytes() == before
    assert (declared.root / "tiny" / "local.json").is_file()


def tar_with(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize(
    "member", ["../evil/manifest.json", "/etc/manifest.json", "tiny/../../x", "tiny/sub/x", "x"]
)
def test_archive_paths_out_of_the_entry_are_refused(tmp_path, member):
    archive = tar_with(tmp_path / "bad.tar", {member: b"{}"})
    store = ModelStore(tmp_path / "store")
    with pytest.raises(StoreError, match="refused|exactly one"):
        import_archive(store, archive)
    assert not (tmp_path / "evil").exists() and store.names() == []


def test_links_in_an_archive_are_refused(tmp_path):
    with tarfile.open(tmp_path / "link.tar", "w") as tar:
        info = tarfile.TarInfo("tiny/model.safetensors")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(StoreError, match="refused"):
        import_archive(ModelStore(tmp_path / "store"), tmp_path / "link.tar")


def test_damaged_weights_in_an_archive_are_refused(source, tmp_path):
    archive = export_archive(source, "tiny", tmp_path / "tiny.tar")
    with tarfile.open(archive) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    weights = bytearray(members["tiny/model.safetensors"])
    weights[-1] ^= 0xFF
    members["tiny/model.safetensors"] = bytes(weights)
    store = ModelStore(tmp_path / "store")
    with pytest.raises(WeightsCorrupt):
        import_archive(store, tar_with(tmp_path / "damaged.tar", members))
    assert store.names() == []


class HubCacheAsRemote:
    """Stands in for the Hub: an upload becomes a commit laid out as the HF cache lays out
    a download (refs/main -> snapshots/<commit>/...), so a pull can read it offline."""

    def __init__(self, cache: Path) -> None:
        self.cache, self.commits = cache, 0

    def create_repo(self, repo_id: str, exist_ok: bool = False) -> None:
        (self.cache / f"models--{repo_id.replace('/', '--')}" / "refs").mkdir(
            parents=True, exist_ok=exist_ok
        )

    def upload_folder(self, *, repo_id: str, folder_path: str, commit_message: str) -> str:
        self.commits += 1
        commit = f"{self.commits:040x}"
        repo = self.cache / f"models--{repo_id.replace('/', '--')}"
        shutil.copytree(folder_path, repo / "snapshots" / commit)
        (repo / "refs" / "main").write_text(commit)
        return f"https://hub.invalid/{repo_id}/commit/{commit}"


def test_push_then_pull_entry_through_an_offline_hub_cache(source, tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    hub = HubCacheAsRemote(cache)
    assert push(source, "tiny", "team/vit-models", api=hub).endswith("0" * 39 + "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    other = ModelStore(tmp_path / "other")
    manifest = pull_entry(other, "tiny", "team/vit-models")
    assert manifest.weights.sha256 == source.manifest("tiny").weights.sha256
    assert torch.equal(logits(other, "tiny"), logits(source, "tiny"))
    with pytest.raises(StoreError, match="no entry 'absent'"):
        pull_entry(other, "absent", "team/vit-models")
