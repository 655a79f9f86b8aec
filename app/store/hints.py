"""What to tell an operator whose entry has no weights: a command that can succeed here.

A hint that cannot work is worse than none: offline, ``store pull`` only works for weights
already in the hub cache, and a distillation of thousands of steps is a poor first advice
where a training-free entry of the same network serves now.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from huggingface_hub import constants, try_to_load_from_cache

from app.store.manifest import Manifest

if TYPE_CHECKING:
    from app.store.store import ModelStore

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def hub_weights_reachable(repo_id: str | None) -> bool:
    """Whether ``store pull`` can get this repo's weights: online, or in the offline cache."""
    if not constants.HF_HUB_OFFLINE:
        return True
    return repo_id is not None and any(
        isinstance(try_to_load_from_cache(repo_id, f), str) for f in WEIGHT_FILES
    )


def training_free_alternatives(manifest: Manifest, store: ModelStore) -> list[str]:
    """Derived entries of the same network whose teacher's weights are here."""
    out = []
    for name in store.names():
        if name == manifest.name:
            continue
        try:
            other = store.manifest(name)
            if (
                other.teacher is not None
                and other.architecture == manifest.architecture
                and store.has_weights(name)
            ):
                out.append(name)
        except Exception:  # noqa: BLE001 - a broken neighbour must not break the hint
            continue
    return out


def build_command(manifest: Manifest) -> str | None:
    """``vitserve store build NAME`` where the manifest records a recipe, else None."""
    if manifest.source.kind == "compress" and manifest.source.details.get("command"):
        return f"vitserve store build {manifest.name}"
    return None


def how_to_fetch(manifest: Manifest, store: ModelStore | None = None) -> str:
    """The command that (re)creates an entry's weights, from where they came from."""
    kind = manifest.source.kind
    if kind == "timm-pretrained":
        pull = f"`vitserve store pull {manifest.architecture} --name {manifest.name}`"
        if hub_weights_reachable(manifest.source.ref):
            return f"run {pull}"
        return (
            f"no weights can be had here: the hub is offline (HF_HUB_OFFLINE=1) and the cache "
            f"{constants.HF_HUB_CACHE} holds no copy of {manifest.source.ref}; run {pull} "
            "where the hub is reachable, or `vitserve store import-archive FILE.tar` an export"
        )
    if kind == "compress":
        command = manifest.source.details.get("command")
        text = (
            f"build them with `{build_command(manifest)}` (runs the recorded `{command}`)"
            if command
            else (
                f"re-run `vitserve compress --teacher {manifest.source.ref} "
                f"--config '{manifest.compression}' --out {manifest.name}` (see README)"
            )
        )
        alternatives = training_free_alternatives(manifest, store) if store else []
        if alternatives:
            text += f"; or serve a training-free entry now, no build: {', '.join(alternatives)}"
        return text
    if kind == "random":
        return f"re-create them with `{manifest.source.details['command']}`"
    if kind == "derived":
        teacher = manifest.teacher.name if manifest.teacher else "?"
        return f"it is built from {teacher}'s weights at load: fetch those"
    return f"import them again: `vitserve store import <checkpoint> --arch {manifest.architecture}`"
