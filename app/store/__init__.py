"""Model store: one folder per model, ``manifest.json`` + ``model.safetensors``."""

from app.store.errors import StoreError
from app.store.manifest import Manifest, Preprocessing, Source, WeightsInfo
from app.store.store import ModelStore

__all__ = ["Manifest", "ModelStore", "Preprocessing", "Source", "StoreError", "WeightsInfo"]
