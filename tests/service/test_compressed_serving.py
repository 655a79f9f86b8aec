"""Compressed variants (static attention + token pyramid, token merging) are served like dense."""

from __future__ import annotations

import httpx
import pytest
import torch

from app.bench.server import running_server
from app.store import ModelStore
from app.store.store import build_module
from app.vit.builder import compress
from app.vit.config import CompressionConfig
from tests.helpers import add_tiny_entry, image_bytes, serve_env, tiny_manifest

# The tiny test ViT has 2 blocks and 17 tokens (16 patches + CLS).
CONFIGS = {"tiny-glad": "static=0;tokens=9@1", "tiny-tome": "merge=4"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    store = ModelStore(tmp_path_factory.mktemp("store"))
    dense_manifest = add_tiny_entry(store, "tiny")
    dense = store.load("tiny").module
    for name, text in CONFIGS.items():
        cfg = CompressionConfig.parse(text)
        manifest = tiny_manifest(name, variant="compressed", compression=cfg)
        store.write_entry(manifest, compress(dense, cfg).state_dict())
    env = serve_env(
        store,
        default=dense_manifest.name,
    )
    with running_server(env) as base:
        yield base, store


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_compressed_entry_round_trips_through_the_store(server, name):
    _, store = server
    loaded = store.load(name)
    rebuilt = build_module(loaded.manifest)
    rebuilt.load_state_dict(loaded.module.state_dict())
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(rebuilt.eval()(x), loaded.module(x))
    assert str(loaded.manifest.compression) == str(CompressionConfig.parse(CONFIGS[name]))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_compressed_variant_classifies_over_http(server, name):
    base, _ = server
    response = httpx.post(
        f"{base}/classify",
        params={"model": name, "top_k": 3},
        content=image_bytes("PNG", (48, 40)),
        headers={"content-type": "image/png"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == name and body["variant"] == "compressed"
    assert len(body["results"][0]["predictions"]) == 3
    models = {m["name"]: m for m in httpx.get(f"{base}/models").json()["models"]}
    assert models[name]["compression"] == str(CompressionConfig.parse(CONFIGS[name]))
