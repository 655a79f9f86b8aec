"""What every docs table is drawn with: a result file written and read, named and laid out as
markdown."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

Table = Mapping[str, Any]  # one [[table]] of bench/results/current.toml


def write_result(folder: Path, prefix: str, result: Mapping[str, Any]) -> Path:
    """``result`` as ``<folder>/<prefix>-<local time>.json``, the name results go by."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def load_result(repo: Path, name: str) -> dict[str, Any]:
    return json.loads((repo / "bench/results" / name).read_text())


def stamp(name: str) -> str:
    """A result file's short name in a table's source column."""
    return Path(name).stem


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def torch_versions(results: Sequence[Mapping[str, Any]]) -> str:
    return ", ".join(sorted({r["torch_version"] for r in results if "torch_version" in r}))
