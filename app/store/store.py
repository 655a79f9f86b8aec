"""Reading and writing store entries.

Model names from requests are only ever looked up in the listing of the store folder,
never joined into a path, and weights are read only through safetensors (no pickle).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from app.store.errors import ManifestInvalid, UnknownModel, WeightsCorrupt, WeightsMissing
from app.store.manifest import MANIFEST_FILE, Manifest
from app.vit.builder import create_model


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
        return manifest

    def weights_path(self, name: str) -> Path:
        return self.entry_dir(name) / self.manifest(name).weights.file

    def has_weights(self, name: str) -> bool:
        return self.weights_path(name).is_file()

    # ---- verification and loading ----------------------------------------------------------
    def verify(self, name: str) -> Manifest:
        """Manifest valid, weights present, checksum matching; raises a StoreError otherwise."""
        manifest = self.manifest(name)
        path = self.entry_dir(name) / manifest.weights.file
        if not path.is_file():
            raise WeightsMissing(
                f"{name}: weights file {path} is missing; {how_to_fetch(manifest)}"
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

    def load(self, name: str) -> LoadedModel:
        """Verify, rebuild the architecture, and load the weights strictly (CPU, fp32, eval)."""
        manifest = self.verify(name)
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
        """Save weights as safetensors, record their sha256, and write the manifest."""
        entry = self.root / manifest.name
        entry.mkdir(parents=True, exist_ok=True)
        weights = entry / manifest.weights.file
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
        save_file(tensors, weights, metadata={"format": "pt", "model": manifest.name})
        manifest = manifest.model_copy(
            update={"weights": manifest.weights.model_copy(update={"sha256": sha256_of(weights)})}
        )
        self.write_manifest(manifest)
        return entry

    def write_manifest(self, manifest: Manifest) -> None:
        entry = self.root / manifest.name
        entry.mkdir(parents=True, exist_ok=True)
        text = json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n"
        (entry / MANIFEST_FILE).write_text(text)


def how_to_fetch(manifest: Manifest) -> str:
    """The command that (re)creates an entry's weights, from where they came from."""
    if manifest.source.kind == "timm-pretrained":
        return f"run `vitserve store pull {manifest.architecture} --name {manifest.name}`"
    if manifest.source.kind == "compress":
        command = manifest.source.details.get("command")
        return (
            f"reproduce them with `{command}`"
            if command
            else (
                f"re-run `vitserve compress --teacher {manifest.source.ref} "
                f"--config '{manifest.compression}' --out {manifest.name}` (see README)"
            )
        )
    if manifest.source.kind == "random":
        return f"re-create them with `{manifest.source.details['command']}`"
    return f"import them again: `vitserve store import <checkpoint> --arch {manifest.architecture}`"


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
