"""A real server with compare, A/B routing and shadow traffic set up, shared by the test
files that exercise those features and the monitoring stack on top of them (one process
start for all of them)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from app.bench.server import running_server
from app.store import ModelStore
from tests.helpers import TINY_PREPROCESSING, add_tiny_entry, serve_env, tiny_manifest

# "absent" has weight but no weights file: its share goes to the ready variants, so the
# expected split is tiny 0.6 + 0.2·0.75 = 0.75, tiny-b 0.2 + 0.2·0.25 = 0.25.
AB_WEIGHTS = {"tiny": 0.6, "tiny-b": 0.2, "absent": 0.2}
AB_EXPECTED = {"tiny": 0.75, "tiny-b": 0.25}
STICKY_HEADER = "X-Client-Id"
# tiny-c preprocesses differently from tiny, so its shadow copies are decoded anew.
SHADOW = {"tiny": "tiny-b", "tiny-c": "tiny"}
# 0.005 of the default 512-image queue: 2 images. A 3-image request's shadow copy never
# fits, which makes a queue_full drop deterministic.
SHADOW_QUEUE_FRACTION = 0.005


def add_near_copy(store: ModelStore, name: str, of: str, noise: float, seed: int) -> None:
    """A stand-in for a compressed variant: ``of`` with its head slightly perturbed, so the
    two agree on most images but not all (0.003 gives a mix on the tiny model)."""
    state = store.load(of).module.state_dict()
    generator = torch.Generator().manual_seed(seed)
    for key in ("head.weight", "head.bias"):
        state[key] = state[key] + noise * torch.randn(state[key].shape, generator=generator)
    store.write_entry(tiny_manifest(name), state)


@dataclass(frozen=True)
class ExperimentServer:
    base: str
    store: ModelStore


@pytest.fixture(scope="session")
def experiment_server(tmp_path_factory) -> ExperimentServer:
    store = ModelStore(tmp_path_factory.mktemp("experiment-store"))
    add_tiny_entry(store, "tiny", seed=0)
    add_near_copy(store, "tiny-b", of="tiny", noise=0.003, seed=1)
    add_tiny_entry(
        store,
        "tiny-c",
        seed=2,
        preprocessing=TINY_PREPROCESSING.model_copy(update={"crop_pct": 1.0}),
    )
    add_tiny_entry(store, "absent", seed=3)
    store.weights_path("absent").unlink()
    env = serve_env(
        store,
        max_delay_ms="2",
        ab_weights=json.dumps(AB_WEIGHTS),
        ab_sticky_header=STICKY_HEADER,
        shadow=json.dumps(SHADOW),
        shadow_queue_fraction=SHADOW_QUEUE_FRACTION,
    )
    with running_server(env, timeout_s=120) as base:
        yield ExperimentServer(base, store)
