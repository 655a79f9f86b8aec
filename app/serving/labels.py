"""Class names from timm's own ImageNet metadata (no hand-typed label lists)."""

from __future__ import annotations

from functools import lru_cache

from timm.data import ImageNetInfo


@lru_cache
def class_names(label_set: str) -> tuple[str, ...]:
    """Human-readable names, index-aligned with the model's logits (timm's ImageNet order)."""
    info = ImageNetInfo(label_set)
    return tuple(info.index_to_description(i) for i in range(info.num_classes()))
