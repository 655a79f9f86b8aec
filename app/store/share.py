"""Sharing built entries: one tar archive, or a folder in a Hugging Face Hub repo.

Both carry ``NAME/manifest.json`` (with the weights' sha256 filled in) and, unless the
entry is derived, ``NAME/<weights file>``. Whatever arrives is untrusted: member names
are checked before anything is written (no paths out of the entry, no links), the
manifest is validated and the weights' checksum verified before the entry appears.
"""

from __future__ import annotations

import json
import shutil
import tarfile
import tempfile
from pathlib import Path

from huggingface_hub import HfApi, snapshot_download

from app.store.errors import StoreError, WeightsCorrupt
from app.store.manifest import MANIFEST_FILE, Manifest, check_model_name
from app.store.store import ModelStore, sha256_of


def stage_entry(store: ModelStore, name: str, folder: Path) -> Path:
    """Copy a verified entry to ``folder/NAME``: its manifest as this machine knows it (the
    weights' checksum included), and its weights file unless it is derived."""
    manifest = store.verify(name)
    out = folder / name
    out.mkdir(parents=True)
    text = json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n"
    (out / MANIFEST_FILE).write_text(text)
    if manifest.teacher is None:
        shutil.copyfile(store.entry_dir(name) / manifest.weights.file, out / manifest.weights.file)
    return out


def export_archive(store: ModelStore, name: str, out: Path) -> Path:
    """``NAME/manifest.json`` and ``NAME/model.safetensors`` in one uncompressed tar."""
    with tempfile.TemporaryDirectory() as tmp:
        staged = stage_entry(store, name, Path(tmp))
        with tarfile.open(out, "w") as tar:
            for path in sorted(staged.iterdir()):
                tar.add(path, arcname=f"{name}/{path.name}")
    return out


def _safe_members(tar: tarfile.TarFile) -> tuple[str, list[tarfile.TarInfo]]:
    """The entry name and the members, if every member is a plain file ``NAME/FILE``."""
    members = tar.getmembers()
    names = set()
    for m in members:
        parts = m.name.split("/")
        if not m.isfile() or len(parts) != 2 or m.name.startswith("/") or ".." in parts:
            raise StoreError(f"archive member {m.name!r} is not a plain NAME/FILE: refused")
        names.add(parts[0])
    if len(names) != 1:
        raise StoreError(f"an archive holds exactly one entry, this one {sorted(names)}")
    return check_model_name(names.pop()), members


def import_archive(store: ModelStore, archive: Path) -> Manifest:
    """An exported entry into ``store``, verified before it appears."""
    with tarfile.open(archive) as tar, tempfile.TemporaryDirectory() as tmp:
        name, members = _safe_members(tar)
        for m in members:  # checked above: plain files, one level below NAME
            source = tar.extractfile(m)
            assert source is not None
            with source, (Path(tmp) / Path(m.name).name).open("wb") as out:
                shutil.copyfileobj(source, out)
        return import_folder(store, Path(tmp), name)


def import_folder(store: ModelStore, folder: Path, name: str) -> Manifest:
    """``folder``'s manifest and weights as entry ``name``: new, or beside the manifest
    already declared under that name (which must describe the same model)."""
    try:
        manifest = Manifest.model_validate_json((folder / MANIFEST_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise StoreError(f"{folder}: no valid {MANIFEST_FILE}: {exc}") from exc
    if manifest.name != name:
        raise StoreError(f"manifest names {manifest.name!r}, the archive's folder {name!r}")
    extra = {p.name for p in folder.iterdir()} - {MANIFEST_FILE, manifest.weights.file}
    if extra:
        raise StoreError(f"unexpected files {sorted(extra)} beside the manifest: refused")
    if manifest.teacher is not None:
        if (folder / manifest.weights.file).exists():
            raise StoreError(f"{name} is derived: it has no weights file, yet one came")
        store.declare(manifest)
        return store.manifest(name)
    weights = folder / manifest.weights.file
    if not weights.is_file() or manifest.weights.sha256 is None:
        raise StoreError(f"{name}: weights file or its sha256 missing from what was sent")
    actual = sha256_of(weights)
    if actual != manifest.weights.sha256:
        raise WeightsCorrupt(
            f"{name}: weights sha256 {actual[:12]}… != manifest {manifest.weights.sha256[:12]}…"
        )
    declared = store.check_declared(manifest)
    entry = store.root / name
    entry.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(weights, entry / manifest.weights.file)
    store.record_weights(manifest, declared)
    store.load(name)  # tensors fit the architecture, or the import fails loudly
    return store.manifest(name)


def push(store: ModelStore, name: str, repo_id: str, *, api: HfApi | None = None) -> str:
    """Upload the entry to ``repo_id`` as folder ``NAME/`` (a repo holds many entries);
    returns the commit URL."""
    api = api or HfApi()
    with tempfile.TemporaryDirectory() as tmp:
        stage_entry(store, name, Path(tmp))
        api.create_repo(repo_id, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=tmp, commit_message=f"vitserve store push {name}"
        )
    return str(commit)


def pull_entry(
    store: ModelStore, name: str, repo_id: str, *, revision: str | None = None
) -> Manifest:
    """Entry ``NAME/`` of ``repo_id`` into ``store`` (from the hub cache when offline)."""
    check_model_name(name)
    try:
        snapshot = snapshot_download(repo_id, revision=revision, allow_patterns=[f"{name}/*"])
    except Exception as exc:  # noqa: BLE001 - hub/network/cache errors come in many types
        raise StoreError(
            f"cannot fetch {name} from {repo_id}: {type(exc).__name__}: {exc}"
        ) from exc
    folder = Path(snapshot) / name
    if not folder.is_dir():
        raise StoreError(f"{repo_id} has no entry {name!r} (no folder {name}/)")
    return import_folder(store, folder, name)
