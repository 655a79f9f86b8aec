"""What `vitserve serve` hands the HTTP server: no line per request unless asked for."""

from __future__ import annotations

from app.config import Settings
from app.serve import uvicorn_options


def test_the_access_log_is_off_by_default_and_on_when_set(monkeypatch):
    monkeypatch.delenv("VITSERVE_ACCESS_LOG", raising=False)
    assert uvicorn_options(Settings())["access_log"] is False
    monkeypatch.setenv("VITSERVE_ACCESS_LOG", "true")
    assert uvicorn_options(Settings())["access_log"] is True


def test_uvicorn_drains_past_the_request_deadline_on_the_configured_address():
    options = uvicorn_options(Settings(host="0.0.0.0", port=9001, request_timeout_s=2))
    assert (options["host"], options["port"], options["timeout_graceful_shutdown"]) == (
        "0.0.0.0",
        9001,
        7,
    )
