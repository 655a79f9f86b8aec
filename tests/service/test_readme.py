"""The README's examples run as written (#26): a wrong model name or a bad flag fails here.

Every fenced ``bash`` block of the README runs, in order, against a real server on the real
DeiT-Tiny (``../shared``), from the repo root with ``cat.jpg`` and ``dog.png`` beside it. A
block right after ``<!-- readme-test: skip (reason) -->`` is not run (it installs, starts a
server of its own or needs a GPU); the model names of every block, run or not, must exist.
Two rewrites only: ``localhost:8000`` becomes the test server's address, and curl fails on
an HTTP error.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from app.bench.server import running_server
from app.store import ModelStore
from app.train.data import list_images
from tests.helpers import DEV_IMAGES, HF_CACHE, REPO, require_shared, serve_env

README = REPO / "README.md"
SKIP = re.compile(r"<!-- readme-test: skip \((?P<reason>[^)]+)\) -->\s*$")
FENCE = re.compile(r"^```bash\n(?P<body>.*?)^```$", re.DOTALL | re.MULTILINE)
MODEL_NAME = re.compile(r"\bdeit_[a-z0-9_]+(?:-[a-z0-9]+)*")
DENSE = "deit_tiny_patch16_224"


@dataclass(frozen=True)
class Block:
    line: int
    body: str
    skip: str | None  # the reason, for a block that is not run


def readme_blocks(text: str) -> list[Block]:
    blocks = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = SKIP.search(before)
        line = text.count("\n", 0, match.start()) + 1
        blocks.append(Block(line, match["body"], skip["reason"] if skip else None))
    return blocks


BLOCKS = readme_blocks(README.read_text())
DECLARED = {p.parent.name for p in (REPO / "model_store").glob("*/manifest.json")}


def test_the_readme_has_runnable_examples() -> None:
    assert sum(b.skip is None for b in BLOCKS) >= 3
    assert all(b.skip.strip() for b in BLOCKS if b.skip is not None)


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"line{b.line}")
def test_every_model_name_is_a_store_entry(block: Block) -> None:
    """What crashed a user's server: an A/B example naming a model that does not exist."""
    assert set(MODEL_NAME.findall(block.body)) <= DECLARED


def names_used(blocks: list[Block]) -> set[str]:
    return {n for b in blocks if b.skip is None for n in MODEL_NAME.findall(b.body)}


@pytest.fixture(scope="module")
def readme_store(tmp_path_factory) -> ModelStore:
    """The declared store with DeiT-Tiny pulled from the offline cache. A distilled merged
    entry the examples name gets the dense weights: merging adds no parameters, so that is
    its training-free build (its distilled weights need a GPU run)."""
    require_shared(HF_CACHE, DEV_IMAGES)
    root = tmp_path_factory.mktemp("readme-store")
    for name in DECLARED:
        (root / name).mkdir()
        shutil.copy(REPO / "model_store" / name / "manifest.json", root / name)
    store = ModelStore(root)
    env = {**os.environ, "HF_HUB_CACHE": str(HF_CACHE), "HF_HUB_OFFLINE": "1"}
    pulled = subprocess.run(
        [sys.executable, "-m", "app", "store", "pull", DENSE, "--store", str(root)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert pulled.returncode == 0, pulled.stderr
    dense_state = store.load(DENSE).module.state_dict()
    for name in names_used(BLOCKS) - {DENSE}:
        manifest = store.manifest(name)
        assert manifest.compression is not None and manifest.compression.family == "merge"
        if manifest.teacher is None:  # a derived entry is built from DENSE at load already
            store.write_entry(manifest, dense_state)
    return store


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """A stand-in for the repo root the README's commands run from (its entries linked),
    plus the two photos they send; what the commands write stays out of the repo."""
    folder = tmp_path_factory.mktemp("readme-cwd")
    for entry in REPO.iterdir():
        if entry.name != ".git":
            (folder / entry.name).symlink_to(entry)
    first, second = list_images(DEV_IMAGES)[:2]
    shutil.copy(first, folder / "cat.jpg")
    Image.open(second).convert("RGB").save(folder / "dog.png")
    return folder


@pytest.mark.slow
def test_the_readme_examples_run_against_a_real_server(readme_store, photos) -> None:
    models = sorted(names_used(BLOCKS) | {DENSE})
    env = serve_env(readme_store, default=DENSE, max_batch_size=4)
    env["VITSERVE_MODELS"] = "[" + ", ".join(f'"{m}"' for m in models) + "]"
    with running_server(env, timeout_s=300) as base:
        address = base.removeprefix("http://")
        shell_env = {**os.environ, **env, "PYTHONPATH": str(REPO)}
        for block in BLOCKS:
            if block.skip is not None:
                continue
            script = block.body.replace("localhost:8000", address)
            script = script.replace("curl -s ", "curl -sS --fail-with-body ")
            cli = f'vitserve() {{ "{sys.executable}" -m app "$@"; }}\n'
            done = subprocess.run(
                ["bash", "-e", "-o", "pipefail", "-c", cli + script],
                cwd=photos,
                env=shell_env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert done.returncode == 0, (
                f"README line {block.line}:\n{script}\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
            )
