"""Put the folds that bench/scripts/pack_folds.py packed on a GPU machine into a
cross-fit store here: each ``<fold>.bf16.safetensors.xz`` as float32 weights beside its
manifest (from the file's metadata), written by the store, which records their checksum. Then
bench/scripts/cross_fit.sh with the same WORK (and TAG and OPTIONS, for a recipe under
test) scores them.

    python3 bench/scripts/unpack_folds.py <the call's files> /tmp/cross-fit
"""

import json
import lzma
import sys
from pathlib import Path

from safetensors.torch import load

from app.store import Manifest, ModelStore

files, store = Path(sys.argv[1]), ModelStore(Path(sys.argv[2]) / "store")
for packed in sorted(files.glob("*.bf16.safetensors.xz")):
    raw = lzma.decompress(packed.read_bytes())
    # safetensors: an 8-byte little-endian header length, then the JSON header
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    manifest = Manifest.model_validate_json(header["__metadata__"]["manifest"])
    weights = {k: v.float() for k, v in load(raw).items()}
    print(f"wrote {store.write_entry(manifest, weights)}")
