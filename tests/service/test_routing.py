"""A/B routing and the experiment settings: picks, stickiness, outages, validation."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.api.app import create_app
from app.config import Settings
from app.experiments.routing import AbRouter, RoutingConfigError, pick, sticky_point
from app.serving.metrics import Metrics
from app.store import ModelStore
from tests.helpers import add_tiny_entry
from tests.promtext import parse, value


def test_pick_maps_slices_of_the_unit_interval_to_weights():
    weights = {"a": 1.0, "zero": 0.0, "b": 3.0}
    assert [pick(weights, u)[0] for u in (0.0, 0.2499, 0.25, 0.5, 0.9999)] == [
        "a",
        "a",
        "b",
        "b",
        "b",
    ]
    assert pick(weights, 0.125)[1] == pytest.approx(0.5)  # halfway through a's slice
    assert pick(weights, 0.625)[1] == pytest.approx(0.5)  # halfway through b's
    with pytest.raises(ValueError):
        pick({"a": 0.0}, 0.5)


def test_sticky_point_is_stable_and_uniform():
    # a constant: the mapping must not change between releases or processes
    assert sticky_point("client-42") == pytest.approx(0.2122235446, abs=1e-9)
    points = [sticky_point(f"user-{i}") for i in range(20000)]
    assert all(0 <= p < 1 for p in points)
    assert sum(p < 0.25 for p in points) / len(points) == pytest.approx(0.25, abs=0.015)


def test_random_routing_uses_the_weights():
    rng = itertools.cycle([i / 100 for i in range(100)]).__next__
    router = AbRouter({"a": 0.9, "b": 0.1}, None, Metrics(), rng=rng)
    picks = [router.choose(None, lambda _: True) for _ in range(100)]
    assert picks.count("b") == 10


def test_a_variant_that_is_not_ready_is_skipped_and_only_its_clients_move():
    metrics = Metrics()
    router = AbRouter({"a": 0.5, "b": 0.3, "c": 0.2}, "X-Client", metrics)
    clients = [f"c{i}" for i in range(500)]
    healthy = {c: router.choose(c, lambda _: True) for c in clients}
    without_b = {c: router.choose(c, lambda name: name != "b") for c in clients}
    moved = {c for c in clients if healthy[c] != without_b[c]}
    assert moved == {c for c in clients if healthy[c] == "b"}
    assert set(without_b.values()) == {"a", "c"}
    samples = parse(metrics.scrape()[0].decode())
    assert value(samples, "vitserve_ab_skipped_total", model="b") == len(moved)
    assert router.choose("c1", lambda _: False) is None


def test_an_unready_variants_share_is_spread_in_proportion_to_the_weights():
    router = AbRouter({"a": 0.5, "b": 0.3, "c": 0.2}, "X-Client", Metrics())
    picks = Counter(router.choose(f"u{i}", lambda name: name != "b") for i in range(20000))
    # a gets 0.5 + 0.3·5/7, c gets 0.2 + 0.3·2/7
    assert picks["a"] / 20000 == pytest.approx(0.5 + 0.3 * 5 / 7, abs=0.015)
    assert picks["c"] / 20000 == pytest.approx(0.2 + 0.3 * 2 / 7, abs=0.015)


def test_all_zero_weights_are_refused():
    with pytest.raises(RoutingConfigError):
        AbRouter({"a": 0.0}, None, Metrics())


@pytest.mark.parametrize(
    "weights",
    [{"a": -0.1, "b": 1.0}, {"a": 0.0, "b": 0.0}, {}, {"a": math.inf}, {"a": math.nan}],
)
def test_settings_refuse_weights_that_are_not_a_distribution(weights):
    with pytest.raises(ValidationError, match="A/B weights"):
        Settings(ab_weights=weights)


def test_settings_read_the_experiments_from_json_env(monkeypatch):
    monkeypatch.setenv("VITSERVE_AB_WEIGHTS", '{"a": 0.9, "b": 0.1}')
    monkeypatch.setenv("VITSERVE_AB_STICKY_HEADER", "X-Client-Id")
    monkeypatch.setenv("VITSERVE_SHADOW", '{"a": "b"}')
    s = Settings()
    assert (s.ab_weights, s.ab_sticky_header, s.shadow) == (
        {"a": 0.9, "b": 0.1},
        "X-Client-Id",
        {"a": "b"},
    )
    with pytest.raises(ValidationError, match="cannot shadow itself"):
        Settings(shadow={"a": "a"})


@pytest.mark.parametrize(
    "setting,message",
    [
        ({"ab_weights": {"tiny": 0.5, "nope": 0.5}}, "VITSERVE_AB_WEIGHTS names models"),
        ({"shadow": {"tiny": "nope"}}, "VITSERVE_SHADOW names models"),
    ],
)
def test_unknown_models_in_the_experiments_stop_the_server_at_start(tmp_path, setting, message):
    store = ModelStore(tmp_path)
    add_tiny_entry(store, "tiny")
    settings = Settings(
        store_dir=store.root, default_model="tiny", auto_pull=False, device="cpu", **setting
    )
    with pytest.raises(RoutingConfigError, match=message) as info, TestClient(create_app(settings)):
        pass
    assert "['nope']" in str(info.value) and "served: ['tiny']" in str(info.value)
