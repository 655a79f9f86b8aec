"""A new user's first start: a fresh copy of the committed store and the offline hub cache,
no other step, serve dense DeiT-Tiny and a ready compressed variant side by side, whose
agreement with dense through the server is what its manifest says; and the start leaves
every committed file as it was."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import httpx
import pytest

from app.bench.server import running_server
from tests.helpers import DEV_IMAGES, HF_CACHE, REPO, SHARED, require_shared

DENSE = "deit_tiny_patch16_224"
EXTRA_IMAGES = SHARED / "images" / "imagenet-extra"
PHOTOS_A_REQUEST = 16


class CleanStart(NamedTuple):
    base: str
    store: Path
    committed: dict[Path, bytes]


@pytest.fixture(scope="module")
def clean_start(tmp_path_factory) -> Iterator[CleanStart]:
    require_shared(HF_CACHE, DEV_IMAGES)
    store = tmp_path_factory.mktemp("clean") / "model_store"
    for manifest in (REPO / "model_store").glob("*/manifest.json"):  # what git holds
        (store / manifest.parent.name).mkdir(parents=True)
        shutil.copyfile(manifest, store / manifest.parent.name / "manifest.json")
    committed = {p: p.read_bytes() for p in store.glob("*/manifest.json")}
    env = {
        "VITSERVE_STORE_DIR": str(store),
        "VITSERVE_DEVICE": "cpu",
        "VITSERVE_MAX_BATCH_SIZE": "16",
        "HF_HUB_CACHE": str(HF_CACHE),
        "HF_HUB_OFFLINE": "1",
    }
    with running_server(env, timeout_s=300) as base:
        yield CleanStart(base, store, committed)


def served_models(base: str) -> list[dict]:
    return httpx.get(f"{base}/models", timeout=10).json()["models"]


def ready_compressed(models: list[dict]) -> list[dict]:
    return [
        m
        for m in models
        if m["state"] == "ready" and m["variant"] == "compressed" and m["architecture"] == DENSE
    ]


def test_a_clean_store_serves_a_compressed_deit_tiny_after_start(clean_start):
    base = clean_start.base
    models = served_models(base)
    ready = [m["name"] for m in ready_compressed(models)]
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
    # the start leaves the committed manifests as they were; the pulled weights' checksum
    # goes beside them
    assert {p: p.read_bytes() for p in clean_start.store.glob("*/manifest.json")} == (
        clean_start.committed
    )
    assert (clean_start.store / DENSE / "local.json").is_file()


def test_the_ready_entries_agree_with_dense_as_their_manifests_say_and_one_reaches_90(
    clean_start,
):
    """Through the server as a user calls it (/compare, 16 photos a request), over dev +
    extra: each ready entry that claims >= 90% agreement reproduces its manifest's figure
    to within a point (the server decodes as the figure's evaluation did, in float32 on the
    CPU), and the best of them is >= 90%."""
    require_shared(EXTRA_IMAGES)
    claims = {}
    for m in ready_compressed(served_models(clean_start.base)):
        pooled = [f for f in m["figures"].get("fidelity", []) if f["n_images"] >= 1500]
        if pooled and pooled[0]["agreement_top1"] >= 0.90:
            claims[m["name"]] = pooled[0]["agreement_top1"]
    assert claims, "no ready entry claims >= 90% agreement over dev + extra"
    photos = sorted(DEV_IMAGES.glob("*.JPEG")) + sorted(EXTRA_IMAGES.glob("*.JPEG"))
    names = list(claims)
    agreeing = dict.fromkeys(names, 0)
    with httpx.Client(timeout=120) as client:
        for start in range(0, len(photos), PHOTOS_A_REQUEST):
            chunk = photos[start : start + PHOTOS_A_REQUEST]
            answer = client.post(
                f"{clean_start.base}/compare",
                params={"models": ",".join([DENSE, *names])},
                files=[("file", (p.name, p.read_bytes(), "image/jpeg")) for p in chunk],
            )
            assert answer.status_code == 200, answer.text
            for pair in answer.json()["agreement"]:
                summary = pair["summary"]
                agreeing[pair["candidate"]] += round(summary["top1_agreement"] * summary["images"])
    measured = {name: agreeing[name] / len(photos) for name in names}
    for name, claimed in claims.items():
        assert abs(measured[name] - claimed) <= 0.01, (name, measured[name], claimed)
    assert max(measured.values()) >= 0.90, measured
