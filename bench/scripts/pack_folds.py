"""Pack cross-fitting folds for the trip back from a GPU machine, whose files come back one
by one, at most eight and 16 MiB each: every fold's weights in bfloat16, xz-compressed, as
``<fold>.bf16.safetensors.xz`` (about 8 MB for DeiT-Tiny), its manifest in the file's
metadata, so that one file is one fold. bench/scripts/unpack_folds.py undoes it.

    python3 bench/scripts/pack_folds.py /tmp/cross-fit/store "$OUT" deit_tiny-merge-t6-s0-fold-a ...
"""

import lzma
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import load_file, save

store, out, folds = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]


def pack(fold: str) -> str:
    weights = load_file(store / fold / "model.safetensors")
    manifest = (store / fold / "manifest.json").read_text()
    half = save(
        {k: v.to(torch.bfloat16).contiguous() for k, v in weights.items()},
        metadata={"manifest": manifest},
    )
    packed = out / f"{fold}.bf16.safetensors.xz"
    packed.write_bytes(lzma.compress(half, preset=6))  # lzma lets go of the GIL: threads pay
    return f"{packed.name}: {packed.stat().st_size / 2**20:.1f} MiB"


done = [f for f in folds if (store / f / "model.safetensors").is_file()]
with ThreadPoolExecutor() as pool:
    print(*pool.map(pack, done), sep="\n")
print(f"packed {len(done)} of {len(folds)} folds; missing: {sorted(set(folds) - set(done))}")
