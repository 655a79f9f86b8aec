"""POST /admin/reload: entries written while the server runs are served without a restart,
only for a caller holding VITSERVE_ADMIN_TOKEN, and not at all without one."""

from __future__ import annotations

import httpx
from fastapi.testclient import TestClient

from app.api.app import create_app
from app.bench.server import running_server
from app.config import Settings
from app.store import ModelStore
from tests.helpers import add_tiny_entry, image_bytes, serve_env

TOKEN = "s3cret-token"


def states(base: str) -> dict[str, str]:
    return {m["name"]: m["state"] for m in httpx.get(f"{base}/models").json()["models"]}


def test_reload_serves_entries_written_after_start(tmp_path):
    store = ModelStore(tmp_path / "store")
    add_tiny_entry(store, "tiny")
    add_tiny_entry(store, "late", seed=1)
    store.weights_path("late").unlink()  # declared, weights not yet built
    with running_server(serve_env(store, admin_token=TOKEN), timeout_s=120) as base:
        assert states(base) == {"tiny": "ready", "late": "absent"}
        add_tiny_entry(store, "late", seed=1)  # as `store build` would
        add_tiny_entry(store, "new", seed=2)  # as `compress` or an import would
        assert httpx.post(f"{base}/admin/reload").status_code == 401
        wrong = httpx.post(f"{base}/admin/reload", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        done = httpx.post(
            f"{base}/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60
        )
        assert done.json()["models"] == {"tiny": "ready", "late": "ready", "new": "ready"}
        reply = httpx.post(
            f"{base}/classify",
            params={"model": "new"},
            content=image_bytes("JPEG", (40, 40)),
            headers={"Content-Type": "image/jpeg"},
            timeout=30,
        )
        assert reply.status_code == 200 and reply.json()["model"] == "new"


def test_reload_is_off_without_a_token(tmp_path):
    store = ModelStore(tmp_path / "store")
    add_tiny_entry(store, "tiny")
    settings = Settings(store_dir=store.root, default_model="tiny", auto_pull=False, device="cpu")
    with TestClient(create_app(settings)) as client:
        assert client.post("/admin/reload").status_code == 404
