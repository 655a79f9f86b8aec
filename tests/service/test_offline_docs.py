"""/docs and /redoc work offline: their pages load Swagger UI and ReDoc from the server.

FastAPI's default pages fetch them from a CDN, so on a machine without internet they are
blank; here every script, stylesheet and icon a page names must be served by the app."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from app.api.app import create_app
from app.config import Settings

ASSET = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']""")
CONTENT_TYPES = {".js": "javascript", ".css": "text/css", ".png": "image/png"}


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> TestClient:
    # No `with`: the lifespan (model loading) never runs; the docs do not need it.
    return TestClient(create_app(Settings(store_dir=tmp_path_factory.mktemp("store"))))


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_only_local_assets(client: TestClient, page: str) -> None:
    response = client.get(page)
    assert response.status_code == 200
    assets = ASSET.findall(response.text)
    assert any(a.endswith(".js") for a in assets), assets  # the UI itself, not just an icon
    for url in assets:
        assert url.startswith("/") and not url.startswith("//"), f"{page} loads {url} remotely"
        served = client.get(url)
        assert served.status_code == 200, url
        suffix = url[url.rfind(".") :]
        assert CONTENT_TYPES[suffix] in served.headers["content-type"], url
        assert len(served.content) > 0


def test_docs_point_at_the_apps_own_openapi(client: TestClient) -> None:
    assert "/openapi.json" in client.get("/docs").text
    assert client.get("/openapi.json").json()["info"]["title"] == "vitserve"
