"""Put the folds that bench/scripts/gpu_recipe_screen.sh sent back into a cross-fit store:
each ``<tag>-s<seed>-<fold>.bf16.safetensors.xz`` as float32 weights beside its manifest
(from the call's logs.tar), written by the store, which records their checksum. Then
bench/scripts/cross_fit.sh with the same WORK, TAG and OPTIONS scores them here.

    python3 bench/scripts/unpack_folds.py <the call's files> /tmp/cross-fit deit_tiny-merge-t5-gpu
"""

import io
import json
import lzma
import re
import sys
import tarfile
from pathlib import Path

from safetensors.torch import load

from app.store import Manifest, ModelStore

files, store, entry = Path(sys.argv[1]), ModelStore(Path(sys.argv[2]) / "store"), sys.argv[3]
with tarfile.open(files / "logs.tar") as outer:
    inner = outer.extractfile("logs/manifests.tar").read()
with tarfile.open(fileobj=io.BytesIO(inner)) as manifests_tar:
    manifests = {
        Path(m.name).parent.name: json.loads(manifests_tar.extractfile(m).read())
        for m in manifests_tar.getmembers()
        if m.isfile()
    }
PACKED = re.compile(r"(.+)-s(\d+)-([ab])\.bf16\.safetensors\.xz")
for packed in sorted(files.glob("*.bf16.safetensors.xz")):
    tag, seed, fold = PACKED.fullmatch(packed.name).groups()
    name = f"{entry}-{tag}-s{seed}-fold-{fold}"
    weights = {k: v.float() for k, v in load(lzma.decompress(packed.read_bytes())).items()}
    print(f"wrote {store.write_entry(Manifest.model_validate(manifests[name]), weights)}")
