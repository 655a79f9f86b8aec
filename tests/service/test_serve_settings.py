"""A bad setting stops ``vitserve serve`` with one clear line on stderr and exit 2.

Whatever the source (an environment variable, a flag, a model name that is not served)
and however many workers: with several, uvicorn's workers build the app, so a check left
to start-up would be one traceback per worker instead of one line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from app.store import ModelStore
from tests.helpers import REPO, add_tiny_entry, serve_env

BAD = {
    "A/B weights name a model not served": (
        {"VITSERVE_AB_WEIGHTS": '{"deit_tiny_glad": 1}'},
        [],
        "VITSERVE_AB_WEIGHTS names models that are not served: ['deit_tiny_glad']",
    ),
    "shadow names a model not served": (
        {"VITSERVE_SHADOW": '{"tiny": "nope"}'},
        [],
        "VITSERVE_SHADOW names models that are not served: ['nope']",
    ),
    "a number that is not one": (
        {"VITSERVE_MAX_BATCH_SIZE": "abc"},
        [],
        "max_batch_size (VITSERVE_MAX_BATCH_SIZE): Input should be a valid integer",
    ),
    "JSON that does not parse": (
        {"VITSERVE_AB_WEIGHTS": "{tiny: 1"},
        [],
        "ab_weights (VITSERVE_AB_WEIGHTS)",
    ),
    "a flag value out of range": ({}, ["--max-batch-size", "0"], "greater than or equal to 1"),
    "an unknown choice": ({}, ["--device", "gpu"], "argument --device: invalid choice: 'gpu'"),
    "an unknown flag": ({}, ["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
}


# Several workers matter where the app's start-up would have found the problem.
RUNS = [(case, 1) for case in BAD] + [("A/B weights name a model not served", 2)]


@pytest.mark.parametrize(("case", "workers"), RUNS)
def test_bad_setting_is_one_line_and_exit_2(tmp_path, case: str, workers: int) -> None:
    store = ModelStore(tmp_path / "store")
    add_tiny_entry(store, "tiny")
    env_update, flags, expected = BAD[case]
    env = {**os.environ, **serve_env(store), **env_update, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "app", "serve", "--port", "0", "--workers", str(workers), *flags],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert expected in lines[0]
