"""`vitserve store build`: a distilled entry's recorded recipe, run again, resumable."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from app.cli import main
from app.store import ModelStore, Source
from app.store.build import build_argv
from app.vit.builder import resolve_config
from tests.helpers import add_tiny_entry, tiny_manifest


@pytest.fixture
def store(tmp_path) -> ModelStore:
    """A teacher and a declared distilled entry whose manifest records a 4-step CPU recipe."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(4):
        Image.new("RGB", (40, 40), (60 * i, 90, 200 - 40 * i)).save(photos / f"{i}.jpg")
    store = ModelStore(tmp_path / "store")
    add_tiny_entry(store, "tiny", seed=0)
    command = (
        "VITSERVE_UNUSED=1 vitserve compress --teacher tiny --config 'merge=2' "
        f"--images {photos.name} --out tiny-d --seed 0 --steps 4 --batch-size 2 "
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
    return store


def test_the_build_runs_the_recorded_command_with_resumable_checkpoints(store):
    env, argv = build_argv(store, "tiny-d", checkpoint_every=2)
    assert env == {"VITSERVE_UNUSED": "1"}
    assert argv[argv.index("--steps") + 1] == "4" and "--resume" in argv
    assert json.loads(argv[argv.index("--options") + 1]) == {
        "views": 1,
        "num_workers": 0,
        "checkpoint_every": 2,
    }


def build(store: ModelStore) -> None:
    with pytest.raises(SystemExit) as done:
        main(["store", "build", "tiny-d", "--store", str(store.root), "--device", "cpu"])
    assert done.value.code == 0


def test_store_build_makes_the_declared_entry_and_leaves_its_manifest(store):
    declared = (store.root / "tiny-d" / "manifest.json").read_bytes()
    build(store)
    assert (store.root / "tiny-d" / "manifest.json").read_bytes() == declared
    assert store.verify("tiny-d").weights.sha256  # recorded in local.json, verified
    assert (store.root / "tiny-d" / "checkpoints" / "last.pt").is_file()
    store.load("tiny-d")


def test_an_entry_without_a_recipe_is_refused(store, capsys):
    with pytest.raises(SystemExit) as done:
        main(["store", "build", "tiny", "--store", str(store.root)])
    assert done.value.code == 2 and "records no recipe" in capsys.readouterr().err
