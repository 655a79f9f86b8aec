"""Generated tables (#24): every committed figure matches the results it is drawn from."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from app.bench.report import INDEX, write_docs
from tests.helpers import REPO

MODELS_JSON = "models/models-cpu-amd-epyc-20261129-162538.json"


def test_committed_docs_match_their_results() -> None:
    """Fails when a doc's table was edited by hand, or a result or current.toml changed
    without `vitserve report` being run."""
    assert write_docs(REPO, check=True) == []


@pytest.fixture
def scratch_repo(tmp_path: Path) -> Path:
    """A repo of one doc with prose around a models table and a settings table."""
    (tmp_path / "bench/results/models").mkdir(parents=True)
    shutil.copy(REPO / "bench/results" / MODELS_JSON, tmp_path / "bench/results/models")
    (tmp_path / INDEX).write_text(
        '[[table]]\nid = "speed"\ndoc = "doc.md"\nrender = "models"\ncommand = "make it"\n'
        f'files = ["{MODELS_JSON}"]\n\n'
        '[[table]]\nid = "settings"\ndoc = "doc.md"\nrender = "settings"\n'
    )
    (tmp_path / "doc.md").write_text(
        "# Title\n\nProse before.\n\n<!-- report:speed -->\nold\n<!-- /report:speed -->\n\n"
        "Prose between.\n\n<!-- report:settings -->\n<!-- /report:settings -->\nProse after.\n"
    )
    return tmp_path


def test_tables_replace_only_their_sections(scratch_repo: Path) -> None:
    assert write_docs(scratch_repo) == ["doc.md"]
    text = (scratch_repo / "doc.md").read_text()
    for prose in ("# Title\n\nProse before.\n\n", "\n\nProse between.\n\n", "\nProse after.\n"):
        assert prose in text
    assert "| `merge-t5-c34` | 2.97× |" in text  # the JSON's own ratio, to two places
    assert "AMD EPYC" in text and "batch 16" in text and "DeiT-S eager" in text
    assert "Reproduce: `make it`" in text
    assert "| `VITSERVE_QUEUE_SIZE` | `512` |" in text
    assert write_docs(scratch_repo, check=True) == []


def test_a_hand_edited_figure_is_stale(scratch_repo: Path) -> None:
    write_docs(scratch_repo)
    doc = scratch_repo / "doc.md"
    doc.write_text(doc.read_text().replace("2.97×", "3.10×"))
    assert write_docs(scratch_repo, check=True) == ["doc.md"]
    assert "3.10×" in doc.read_text()  # a check writes nothing


def test_a_doc_without_its_section_is_an_error(scratch_repo: Path) -> None:
    (scratch_repo / "doc.md").write_text("no markers\n")
    with pytest.raises(ValueError, match="report:speed"):
        write_docs(scratch_repo)
