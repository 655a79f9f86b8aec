"""Put the folds that bench/scripts/gpu_recipe_screen.sh sent back into a cross-fit store:
each ``<tag>-s<seed>-<fold>.bf16.safetensors.xz`` as float32 weights beside its manifest
(from the call's logs.tar), the manifest's checksum set to the file written. Then
bench/scripts/cross_fit.sh with the same WORK, TAG and OPTIONS scores them here.

    python3 bench/scripts/unpack_folds.py <the call's files> /tmp/cross-fit deit_tiny-merge-t5-gpu
"""

import hashlib
import io
import json
import lzma
import re
import sys
import tarfile
from pathlib import Path

from safetensors.torch import load, save_file

files, work, entry = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
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
    folder = work / "store" / name
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, folder / "model.safetensors")
    manifest = manifests[name]
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    manifest["weights"]["sha256"] = digest
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {folder}")
