"""Creating store entries: timm's pretrained weights, a local checkpoint, or random weights."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from safetensors.torch import load_file

from app.store.errors import StoreError
from app.store.manifest import Manifest, Preprocessing, Source
from app.store.store import ModelStore, build_module, load_state_strict
from app.vit.builder import compress, resolve_config

PREPROCESSING_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")


def preprocessing_of(pretrained_cfg: dict) -> Preprocessing:
    return Preprocessing(
        **{k: pretrained_cfg[k] for k in PREPROCESSING_KEYS if k in pretrained_cfg}
    )


def pull(store: ModelStore, arch: str, *, name: str | None = None) -> Manifest:
    """Download (or read from the HF cache) timm's pretrained weights into a store entry.

    Uses timm's normal Hugging Face hub path, so ``HF_HUB_OFFLINE=1`` with a populated
    ``HF_HUB_CACHE`` works with no network.
    """
    try:
        model = timm.create_model(arch, pretrained=True)
    except Exception as exc:  # noqa: BLE001 - hub/network errors come in many types
        raise StoreError(
            f"cannot fetch pretrained weights for {arch!r}: {type(exc).__name__}: {exc}. "
            "Online: check the network. Offline: set HF_HUB_CACHE to a cache holding "
            "timm's weights and HF_HUB_OFFLINE=1 (e.g. HF_HUB_CACHE=../shared/hf-cache)."
        ) from exc
    cfg = model.pretrained_cfg
    manifest = Manifest(
        name=name or arch,
        architecture=arch,
        variant="dense",
        num_classes=model.num_classes,
        preprocessing=preprocessing_of(cfg),
        source=Source(
            kind="timm-pretrained",
            ref=cfg.get("hf_hub_id") or f"{arch}.{cfg.get('tag', '')}",
            details={"license": cfg.get("license")},
        ),
        description=f"{arch}, timm pretrained weights ({cfg.get('tag', 'default tag')})",
    )
    store.write_entry(manifest, model.state_dict())
    return store.manifest(manifest.name)


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, or of a .pth/.pt read with the weights-only unpickler."""
    if path.suffix == ".safetensors":
        return load_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - refused pickles raise UnpicklingError & co
        raise StoreError(f"{path}: not a weights-only checkpoint: {exc}") from exc
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise StoreError(f"{path}: expected a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def import_checkpoint(
    store: ModelStore,
    path: Path,
    arch: str,
    *,
    name: str | None = None,
    architecture_kwargs: dict | None = None,
) -> Manifest:
    """A local checkpoint of a timm architecture → a verified dense store entry."""
    path = Path(path)
    pretrained_cfg = timm.models.get_pretrained_cfg(arch)
    cfg = pretrained_cfg.to_dict() if pretrained_cfg else {}
    state = read_checkpoint(path)
    head = state.get("head.weight")
    manifest = Manifest(
        name=name or arch,
        architecture=arch,
        architecture_kwargs=architecture_kwargs or {},
        variant="dense",
        num_classes=head.shape[0] if head is not None else 1000,
        preprocessing=preprocessing_of(cfg),
        source=Source(kind="import", ref=str(path)),
        description=f"{arch}, imported from {path.name}",
    )
    module = build_module(manifest)
    load_state_strict(module, state, manifest.name)
    store.write_entry(manifest, module.state_dict())
    return store.manifest(manifest.name)


def random_entry(
    store: ModelStore, arch: str, *, name: str, config: str | None = None, seed: int = 0
) -> Manifest:
    """An entry with seeded random weights, dense or compressed by ``config``: what speed
    and load tests need for architectures whose trained weights are not at hand (their
    predictions mean nothing; the manifest says so)."""
    torch.manual_seed(seed)
    dense = timm.create_model(arch, pretrained=False)
    cfg = resolve_config(config) if config else None
    module = compress(dense, cfg) if cfg else dense
    command = f"vitserve store random {arch} --name {name} --seed {seed}"
    if config:
        command += f" --config '{config}'"
    pretrained_cfg = timm.models.get_pretrained_cfg(arch)
    manifest = Manifest(
        name=name,
        architecture=arch,
        variant="compressed" if cfg else "dense",
        compression=cfg,
        num_classes=dense.num_classes,
        preprocessing=preprocessing_of(pretrained_cfg.to_dict() if pretrained_cfg else {}),
        source=Source(kind="random", ref=None, details={"seed": seed, "command": command}),
        description=f"{arch}{f' ({cfg})' if cfg else ''}, random weights: speed tests only",
    )
    store.write_entry(manifest, module.state_dict())
    return store.manifest(name)
