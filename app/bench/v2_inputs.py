"""perf_analyzer's ``--input-data`` files for the v2 protocol's image inputs.

``python -m app.bench.v2_inputs --images DIR --out DIR`` writes, for the first ``--count``
images of DIR (a photo folder such as imagenet-dev):

- ``bytes.json``: the JPEG files as sent (input ``IMAGE``, BYTES [1]); perf_analyzer wants
  a BYTES element base64-encoded with its 4-byte length prefix;
- ``uint8.json``: the same photos decoded to RGB and brought to ``--size`` by the model's
  resize and centre crop (input ``PIXELS``, UINT8 [size, size, 3]): what a client that
  decodes and sizes its own images sends, so the service's decode drops out of the path.
"""

from __future__ import annotations

import argparse
import base64
import json
from pathlib import Path

import numpy as np
from PIL import Image
from torchvision import transforms
from tqdm import tqdm

from app.api.v2.tensors import serialize_bytes
from app.train.data import list_images


def b64(data: bytes) -> dict[str, str]:
    return {"b64": base64.b64encode(data).decode()}


def bytes_entry(jpeg: bytes) -> dict:
    element = np.empty(1, dtype=object)
    element[0] = jpeg
    return {"IMAGE": {"content": b64(serialize_bytes(element)), "shape": [1]}}


def uint8_entry(path: Path, size: int) -> dict:
    """The photo as a client-side decode + the eval transform's geometry (bicubic resize of
    the shorter side to size/0.9 as DeiT's crop_pct, centre crop) would leave it."""
    resize_crop = transforms.Compose(
        [
            transforms.Resize(int(size / 0.9), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(size),
        ]
    )
    with Image.open(path) as image:
        crop = resize_crop(image.convert("RGB"))
    pixels = np.asarray(crop, dtype=np.uint8)
    return {"PIXELS": {"content": b64(pixels.tobytes()), "shape": list(pixels.shape)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--size", type=int, default=224, help="side of the UINT8 images")
    args = parser.parse_args()
    files = list_images(args.images)[: args.count]
    if not files:
        raise SystemExit(f"no images in {args.images}")
    args.out.mkdir(parents=True, exist_ok=True)
    entries = {"bytes": [], "uint8": []}
    for path in tqdm(files, desc="input data", unit="image"):
        entries["bytes"].append(bytes_entry(path.read_bytes()))
        entries["uint8"].append(uint8_entry(path, args.size))
    for kind, data in entries.items():
        (args.out / f"{kind}.json").write_text(json.dumps({"data": data}))
    print(f"{len(files)} images -> {args.out}/bytes.json, {args.out}/uint8.json")


if __name__ == "__main__":
    main()
