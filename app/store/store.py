"""Reading and writing store entries.

Model names from requests are only ever looked up in the listing of the store folder,
never joined into a path, and weights are read only through safetensors (no pickle).

A manifest that exists is *declared* (committed, or written once when the entry was
made) and is never rewritten: what a machine adds later (the checksum of weights it
pulled or built, the raw record of its run) goes beside it in ``local.json``, which git
ignores. A *derived* entry has no weights file: it is built at load from its teacher's.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from app.store.errors import (
    ManifestInvalid,
    StoreError,
    UnknownModel,
    WeightsCorrupt,
    WeightsMissing,
)
from app.store.hints import how_to_fetch
from app.store.manifest import MANIFEST_FILE, Manifest
from app.vit.builder import compress, create_model

LOCAL_FILE = "local.json"
# What must agree between a declared manifest and weights written under its name.
MODEL_FIELDS = ("architecture", "architecture_kwargs", "compression", "num_classes")


def tensor_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 of a state dict's contents (names, dtypes, shapes, values in name order),
    whatever file they were read from."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class LoadedModel:
    manifest: Manifest
    module: nn.Module


class ModelStore:
    """A folder of entries ``<root>/<name>/{manifest.json, model.safetensors}``."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    # ---- listing -------------------------------------------------------------------------
    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / MANIFEST_FILE).is_file())

    def entry_dir(self, name: str) -> Path:
        """The folder of a *listed* entry; unknown names raise, so a name is never a path."""
        listed = self.names()
        if name not in listed:
            raise UnknownModel(f"no model {name!r} in store {self.root} (have: {listed})")
        return self.root / name

    def manifest(self, name: str) -> Manifest:
        path = self.entry_dir(name) / MANIFEST_FILE
        try:
            manifest = Manifest.model_validate_json(path.read_text())
        except (ValidationError, ValueError) as exc:
            raise ManifestInvalid(f"{path}: invalid manifest: {exc}") from exc
        if manifest.name != name:
            raise ManifestInvalid(f"{path}: manifest name {manifest.name!r} != folder {name!r}")
        local = self.local_record(name)
        if local:
            manifest = manifest.model_copy(
                update={
                    "weights": manifest.weights.model_copy(update={"sha256": local["sha256"]}),
                    "metrics": local.get("metrics") or manifest.metrics,
                }
            )
        return manifest

    def declared_manifest(self, name: str) -> Manifest:
        """The manifest file as written, without this machine's ``local.json``."""
        path = self.entry_dir(name) / MANIFEST_FILE
        return Manifest.model_validate_json(path.read_text())

    def local_record(self, name: str) -> dict | None:
        """This machine's record of the entry's weights: ``{"sha256", "metrics"}``."""
        path = self.entry_dir(name) / LOCAL_FILE
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
            if not isinstance(record.get("sha256"), str):
                raise ValueError("no sha256")
        except (ValueError, AttributeError) as exc:
            raise ManifestInvalid(f"{path}: unreadable local record: {exc}") from exc
        return record

    def weights_path(self, name: str) -> Path:
        return self.entry_dir(name) / self.manifest(name).weights.file

    def has_weights(self, name: str) -> bool:
        """Weights at hand: the entry's file, or for a derived entry its teacher's."""
        manifest = self.manifest(name)
        if manifest.teacher is not None:
            teacher = manifest.teacher.name
            return teacher in self.names() and self.has_weights(teacher)
        return self.weights_path(name).is_file()

    def derived_from(self, name: str) -> list[str]:
        """Entries built from ``name``'s weights (training-free variants)."""
        out = []
        for other in self.names():
            try:
                teacher = self.manifest(other).teacher
            except StoreError:
                continue
            if teacher is not None and teacher.name == name:
                out.append(other)
        return out

    # ---- verification and loading ----------------------------------------------------------
    def verify(self, name: str) -> Manifest:
        """Manifest valid, weights present, checksum matching; raises a StoreError otherwise.

        A derived entry verifies its teacher and that the teacher's checksum is the one it
        was measured with."""
        manifest = self.manifest(name)
        if manifest.teacher is not None:
            self._verify_teacher(manifest)
            return manifest
        path = self.entry_dir(name) / manifest.weights.file
        if not path.is_file():
            raise WeightsMissing(
                f"{name}: weights file {path} is missing; {how_to_fetch(manifest, self)}"
            )
        if manifest.weights.sha256 is None:
            raise WeightsCorrupt(f"{name}: manifest has no sha256 for {path}; re-pull or import")
        actual = sha256_of(path)
        if actual != manifest.weights.sha256:
            raise WeightsCorrupt(
                f"{name}: checksum mismatch for {path}: manifest {manifest.weights.sha256[:12]}…, "
                f"file {actual[:12]}…; the file was changed or damaged — pull it again"
            )
        return manifest

    def _verify_teacher(self, manifest: Manifest) -> Manifest:
        teacher = manifest.teacher
        assert teacher is not None
        if teacher.name not in self.names():
            raise WeightsMissing(
                f"{manifest.name}: built from {teacher.name!r}, which is not in store {self.root}"
            )
        try:
            teacher_manifest = self.verify(teacher.name)
        except WeightsMissing as exc:
            raise WeightsMissing(
                f"{manifest.name}: built from {teacher.name} at load, whose weights are missing "
                f"({exc})"
            ) from exc
        if teacher_manifest.architecture != manifest.architecture:
            raise ManifestInvalid(
                f"{manifest.name}: teacher {teacher.name} is a {teacher_manifest.architecture}, "
                f"not a {manifest.architecture}"
            )
        path = self.entry_dir(teacher.name) / teacher_manifest.weights.file
        actual = tensor_digest(load_file(path))
        if actual != teacher.sha256:
            raise WeightsCorrupt(
                f"{manifest.name}: teacher {teacher.name}'s weights (tensor digest "
                f"{actual[:12]}…) are not the ones this entry was measured with "
                f"({teacher.sha256[:12]}…)"
            )
        return teacher_manifest

    def load(self, name: str) -> LoadedModel:
        """Verify, rebuild the architecture, and load the weights strictly (CPU, fp32, eval).

        A derived entry is its teacher's module with the config applied (no file of its own)."""
        manifest = self.verify(name)
        if manifest.teacher is not None:
            teacher = self.load(manifest.teacher.name)
            assert manifest.compression is not None  # the manifest's validator holds it
            return LoadedModel(manifest, compress(teacher.module, manifest.compression).eval())
        path = self.entry_dir(name) / manifest.weights.file
        try:
            state = load_file(path)
        except (SafetensorError, OSError) as exc:
            raise WeightsCorrupt(f"{name}: cannot read {path} as safetensors: {exc}") from exc
        module = build_module(manifest)
        load_state_strict(module, state, name)
        return LoadedModel(manifest, module.eval())

    # ---- writing ---------------------------------------------------------------------------
    def write_entry(self, manifest: Manifest, state_dict: dict[str, torch.Tensor]) -> Path:
        """Save weights as safetensors and record their sha256: in a new manifest, or, where
        the entry is already declared, in ``local.json`` beside the untouched manifest."""
        entry = self.root / manifest.name
        declared = self.check_declared(manifest)
        entry.mkdir(parents=True, exist_ok=True)
        weights = entry / manifest.weights.file
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
        # One metadata key only: safetensors writes the metadata map in hash order, which
        # varies from call to call, so two keys made the same tensors two files (two sha256).
        save_file(tensors, weights, metadata={"format": "pt"})
        self.record_weights(manifest, declared)
        return entry

    def record_weights(self, manifest: Manifest, declared: Manifest | None) -> None:
        """The checksum of the entry's (just written) weights file, where it belongs."""
        entry = self.root / manifest.name
        sha = sha256_of(entry / manifest.weights.file)
        if declared is None:
            self.write_manifest(
                manifest.model_copy(
                    update={"weights": manifest.weights.model_copy(update={"sha256": sha})}
                )
            )
        else:
            record = {"sha256": sha, "metrics": manifest.metrics}
            (entry / LOCAL_FILE).write_text(json.dumps(record, indent=2) + "\n")

    def check_declared(self, manifest: Manifest) -> Manifest | None:
        """The existing manifest of this name, if any, after checking that ``manifest``
        describes the same model (a different one would be served under a wrong manifest)."""
        path = self.root / manifest.name / MANIFEST_FILE
        if not path.is_file():
            return None
        declared = self.declared_manifest(manifest.name)
        differ = [f for f in MODEL_FIELDS if getattr(declared, f) != getattr(manifest, f)]
        if declared.teacher is not None:
            differ.append("kind: the declared entry is derived (it has no weights file)")
        if differ:
            raise StoreError(
                f"{manifest.name} is declared in {path} as another model ({', '.join(differ)} "
                "differ); choose another name"
            )
        return declared

    def declare(self, manifest: Manifest) -> None:
        """Write the manifest of a new entry; an existing one is never replaced."""
        if (self.root / manifest.name / MANIFEST_FILE).is_file():
            raise StoreError(
                f"{manifest.name} is already declared in {self.root}; its manifest stays as "
                "it is: choose another name (or delete the entry first)"
            )
        self.write_manifest(manifest)

    def write_manifest(self, manifest: Manifest) -> None:
        entry = self.root / manifest.name
        entry.mkdir(parents=True, exist_ok=True)
        text = json.dumps(manifest.model_dump(mode="json", exclude_defaults=False), indent=2)
        (entry / MANIFEST_FILE).write_text(text + "\n")


def build_module(manifest: Manifest) -> nn.Module:
    """The architecture a manifest names, with random weights (to be overwritten)."""
    return create_model(
        manifest.architecture,
        manifest.compression,
        num_classes=manifest.num_classes,
        **manifest.architecture_kwargs,
    )


def load_state_strict(module: nn.Module, state: dict[str, torch.Tensor], name: str) -> None:
    """Every tensor present, none extra, every shape equal; otherwise WeightsCorrupt."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k}: file {tuple(state[k].shape)} != model {tuple(expected[k].shape)}"
        for k in expected.keys() & state.keys()
        if state[k].shape != expected[k].shape
    ]
    if missing or unexpected or wrong:
        problems = []
        if missing:
            problems.append(f"missing {missing[:5]}{'…' if len(missing) > 5 else ''}")
        if unexpected:
            problems.append(f"unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}")
        if wrong:
            problems.append("wrong shapes " + "; ".join(wrong[:5]))
        raise WeightsCorrupt(f"{name}: weights do not fit the architecture: {', '.join(problems)}")
    module.load_state_dict(state, strict=True)
