"""``running_server``, which every test of a real server starts it with: where the code
inside fails, the failure comes with what the server logged, since the server's output is
otherwise a temporary file gone with it."""

from __future__ import annotations

import pytest

from app.bench.server import running_server
from app.store import ModelStore
from tests.helpers import add_tiny_entry, serve_env


def test_a_failure_inside_shows_the_servers_log_and_the_server_stops(tmp_path, capsys):
    store = ModelStore(tmp_path)
    add_tiny_entry(store, "tiny")
    env = serve_env(store, log_level="info")
    with (
        pytest.raises(AssertionError, match="a failing check"),
        running_server(env, timeout_s=120) as base,
    ):
        server = base.proc
        raise AssertionError("a failing check")
    assert server.poll() is not None
    err = capsys.readouterr().err
    assert "the server's log" in err and "model tiny ready" in err
