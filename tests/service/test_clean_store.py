"""A new user's first start: a fresh copy of the committed store and the offline hub cache,
no other step, serve dense DeiT-Tiny and a ready compressed variant side by side; and the
start leaves every committed file as it was."""

from __future__ import annotations

import shutil

import httpx

from app.bench.server import running_server
from tests.helpers import DEV_IMAGES, HF_CACHE, REPO, require_shared

DENSE = "deit_tiny_patch16_224"


def test_a_clean_store_serves_a_compressed_deit_tiny_after_start(tmp_path):
    require_shared(HF_CACHE, DEV_IMAGES)
    store = tmp_path / "model_store"
    for manifest in (REPO / "model_store").glob("*/manifest.json"):  # what git holds
        (store / manifest.parent.name).mkdir(parents=True)
        shutil.copyfile(manifest, store / manifest.parent.name / "manifest.json")
    committed = {p: p.read_bytes() for p in store.glob("*/manifest.json")}
    env = {
        "VITSERVE_STORE_DIR": str(store),
        "VITSERVE_DEVICE": "cpu",
        "VITSERVE_MAX_BATCH_SIZE": "8",
        "HF_HUB_CACHE": str(HF_CACHE),
        "HF_HUB_OFFLINE": "1",
    }
    with running_server(env, timeout_s=300) as base:
        models = httpx.get(f"{base}/models", timeout=10).json()["models"]
        ready = [
            m["name"]
            for m in models
            if m["state"] == "ready" and m["variant"] == "compressed" and m["architecture"] == DENSE
        ]
        assert ready, [(m["name"], m["state"], m["reason"]) for m in models]
        photo = sorted(DEV_IMAGES.glob("*.JPEG"))[0].read_bytes()
        compare = httpx.post(
            f"{base}/compare",
            params={"models": f"{DENSE},{ready[0]}"},
            content=photo,
            headers={"Content-Type": "image/jpeg"},
            timeout=60,
        )
        assert compare.status_code == 200, compare.text
        assert [v["model"] for v in compare.json()["variants"]] == [DENSE, ready[0]]
        absent = {m["name"]: m for m in models if m["state"] == "absent"}
        for m in absent.values():  # every absent entry says what would make it
            assert m["reason"] and ("store build" in m["reason"] or "no weights" in m["reason"])
    assert {p: p.read_bytes() for p in store.glob("*/manifest.json")} == committed
    assert (store / DENSE / "local.json").is_file()  # the pulled weights' checksum, beside
