"""`vitserve store build`: a distilled entry's recorded recipe, run again, resumable:
an interrupted build ends with the weights of an uninterrupted one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from app.cli import main
from app.store import ModelStore, Source
from app.store.build import RECIPE_FILE, build_argv, claim_checkpoints
from app.store.errors import StoreError
from app.vit.builder import resolve_config
from tests.helpers import REPO, add_tiny_entry, tiny_manifest

CHECKPOINT = Path("tiny-d") / "checkpoints" / "last.pt"


def declare_recipe(store: ModelStore, *, steps: int) -> None:
    """(Re)declare ``tiny-d`` as distilled from ``tiny`` by a ``steps``-step CPU recipe."""
    command = (
        "VITSERVE_UNUSED=1 vitserve compress --teacher tiny --config 'merge=2' "
        f"--images photos --out tiny-d --seed 0 --steps {steps} --batch-size 2 "
        '--speed-arch none --options \'{"views":1,"num_workers":0}\''
    )
    store.write_manifest(
        tiny_manifest(
            "tiny-d",
            variant="compressed",
            compression=resolve_config("merge=2"),
            source=Source(kind="compress", ref="tiny", details={"command": command}),
        )
    )


def recipe_store(root: Path, *, steps: int = 4) -> ModelStore:
    """A teacher and a declared distilled entry; its photos sit beside the store."""
    photos = root / "photos"
    photos.mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (40, 40), (60 * i, 90, 200 - 40 * i)).save(photos / f"{i}.jpg")
    store = ModelStore(root / "store")
    add_tiny_entry(store, "tiny", seed=0)
    declare_recipe(store, steps=steps)
    return store


@pytest.fixture
def store(tmp_path) -> ModelStore:
    return recipe_store(tmp_path)


def test_the_build_runs_the_recorded_command_with_resumable_checkpoints(store):
    env, argv = build_argv(store, "tiny-d", checkpoint_every=2)
    assert env == {"VITSERVE_UNUSED": "1"}
    assert argv[argv.index("--steps") + 1] == "4" and "--resume" in argv
    assert json.loads(argv[argv.index("--options") + 1]) == {
        "views": 1,
        "num_workers": 0,
        "checkpoint_every": 2,
    }


def build(store: ModelStore, *more: str) -> None:
    with pytest.raises(SystemExit) as done:
        main(["store", "build", "tiny-d", "--store", str(store.root), "--device", "cpu", *more])
    assert done.value.code == 0


def build_interrupted(store: ModelStore, *more: str) -> int:
    """Start ``store build`` and kill it and its training (as Ctrl-C would) as soon as it
    has written a checkpoint; returns the step that checkpoint holds."""
    argv = [sys.executable, "-m", "app", "store", "build", "tiny-d", "--store", str(store.root)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with subprocess.Popen(
        [*argv, "--device", "cpu", *more],
        env=env,
        start_new_session=True,
        stderr=subprocess.DEVNULL,
    ) as proc:
        while not (store.root / CHECKPOINT).is_file():
            assert proc.poll() is None, "the build ended before its first checkpoint"
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)
    return torch.load(store.root / CHECKPOINT, weights_only=True)["step"]


def weights(store: ModelStore) -> dict[str, torch.Tensor]:
    return load_file(store.weights_path("tiny-d"))


def test_an_interrupted_build_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path):
    steps = 60  # the kill lands long before the end
    straight = recipe_store(tmp_path / "straight", steps=steps)
    build(straight, "--checkpoint-every", "2")
    interrupted = recipe_store(tmp_path / "interrupted", steps=steps)
    stopped_at = build_interrupted(interrupted, "--checkpoint-every", "2")
    assert 0 < stopped_at < steps and not interrupted.weights_path("tiny-d").exists()
    build(interrupted, "--checkpoint-every", "2")
    assert torch.load(interrupted.root / CHECKPOINT, weights_only=True)["step"] == steps
    expected, resumed = weights(straight), weights(interrupted)
    assert expected.keys() == resumed.keys()
    for key, tensor in expected.items():
        assert torch.equal(resumed[key], tensor), key  # bit for bit, not merely close
    # and the same file: the checksum the build prints and verifies against
    assert interrupted.verify("tiny-d").weights.sha256 == straight.verify("tiny-d").weights.sha256


def test_checkpoints_of_another_recipe_are_refused_not_continued(store, capsys):
    """A 4-step run's last checkpoint continued as a 6-step one would be neither."""
    build(store)
    declare_recipe(store, steps=6)
    with pytest.raises(SystemExit) as done:
        main(["store", "build", "tiny-d", "--store", str(store.root), "--device", "cpu"])
    err = capsys.readouterr().err
    assert done.value.code == 2 and "checkpoints of another recipe (args differ)" in err
    shutil.rmtree(store.root / CHECKPOINT.parent)
    build(store)  # from scratch once the old checkpoints are gone
    assert torch.load(store.root / CHECKPOINT, weights_only=True)["step"] == 6


def test_store_build_makes_the_declared_entry_and_leaves_its_manifest(store):
    declared = (store.root / "tiny-d" / "manifest.json").read_bytes()
    build(store)
    assert (store.root / "tiny-d" / "manifest.json").read_bytes() == declared
    assert store.verify("tiny-d").weights.sha256  # recorded in local.json, verified
    assert (store.root / CHECKPOINT).is_file()
    store.load("tiny-d")
    built = store.weights_path("tiny-d").read_bytes()
    store.weights_path("tiny-d").unlink()
    build(store)  # from the finished run's last checkpoint, without training again
    assert store.weights_path("tiny-d").read_bytes() == built


def test_an_entry_without_a_recipe_is_refused(store, capsys):
    with pytest.raises(SystemExit) as done:
        main(["store", "build", "tiny", "--store", str(store.root)])
    assert done.value.code == 2 and "records no recipe" in capsys.readouterr().err


def test_a_folder_is_claimed_by_the_recipe_of_its_first_checkpoint(tmp_path):
    folder = tmp_path / "checkpoints"
    claim_checkpoints(folder, {"args": ["--steps", "4"]})  # no checkpoint yet: any recipe
    claim_checkpoints(folder, {"args": ["--steps", "6"]})
    (folder / "last.pt").write_bytes(b"")
    claim_checkpoints(folder, {"args": ["--steps", "6"]})
    with pytest.raises(StoreError, match=r"another recipe \(args differ\)"):
        claim_checkpoints(folder, {"args": ["--steps", "4"]})
    (folder / RECIPE_FILE).unlink()  # checkpoints of a vitserve that recorded no recipe
    with pytest.raises(StoreError, match="do not say which recipe"):
        claim_checkpoints(folder, {"args": ["--steps", "6"]})
