"""Write the docs' tables from ``bench/results/`` (#24), so no figure is typed by hand.

``bench/results/current.toml`` names each table: the doc it goes in, how it is drawn, the
result files it is built from (chosen by hand: a newer run becomes current when it is
listed there, never by date) and the command that reproduces them. A table replaces what
stands between ``<!-- report:ID -->`` and ``<!-- /report:ID -->`` in its doc; the prose
around the markers is left alone. ``--check`` writes nothing and fails when a doc differs
from what would be written, which is what the up-to-date test runs.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path

from app.bench.compression_tables import (
    fidelity_table,
    front_table,
    merge_steps_table,
    models_table,
    pooled_table,
    proportional_sdpa_table,
    variants_table,
)
from app.bench.engine_ceiling import ceiling_table
from app.bench.engine_loop import loop_table
from app.bench.service_tables import (
    baseline_table,
    decode_table,
    decoders_table,
    levels_table,
    perf_analyzer_table,
    service_table,
    setups_table,
    worker_cpu_table,
)
from app.bench.tables import Table, markdown
from app.config import Settings

REPO = Path(__file__).resolve().parents[2]
INDEX = Path("bench/results/current.toml")


def settings_table(table: Table, repo: Path) -> list[str]:
    """The settings of :class:`app.config.Settings` the table names (``settings``, in that
    order), or every one: variable, default, meaning."""
    fields = Settings.model_fields
    names = table.get("settings") or list(fields)
    if unknown := [n for n in names if n not in fields]:
        raise KeyError(f"table {table['id']!r} names settings that do not exist: {unknown}")
    rows = []
    for name in names:
        field = fields[name]
        default = field.get_default(call_default_factory=True)
        shown = "unset" if default is None else json.dumps(default, default=str)
        shown = shown.strip('"') if isinstance(default, str | Path) else shown
        rows.append([f"`VITSERVE_{name.upper()}`", f"`{shown}`", field.description or ""])
    return markdown(["variable", "default", "meaning"], rows)


RENDERERS: dict[str, Callable[[Table, Path], list[str]]] = {
    "models": models_table,
    "service": service_table,
    "baseline": baseline_table,
    "setups": setups_table,
    "worker_cpu": worker_cpu_table,
    "decode": decode_table,
    "decoders": decoders_table,
    "merge_steps": merge_steps_table,
    "proportional_sdpa": proportional_sdpa_table,
    "fidelity": fidelity_table,
    "pooled": pooled_table,
    "levels": levels_table,
    "perf_analyzer": perf_analyzer_table,
    "engine_ceiling": ceiling_table,
    "engine_loop": loop_table,
    "front": front_table,
    "variants": variants_table,
    "settings": settings_table,
}


def render(table: Table, repo: Path) -> str:
    lines = RENDERERS[table["render"]](table, repo)
    if "command" in table:
        lines += ["", f"Reproduce: `{table['command']}`"]
    return "\n".join(lines)


def write_docs(repo: Path = REPO, *, check: bool = False) -> list[str]:
    """Replace every table's section in its doc; returns the docs that differ (with
    ``check``, nothing is written)."""
    index = tomllib.loads((repo / INDEX).read_text())
    docs: dict[str, str] = {}
    for table in index["table"]:
        doc = table["doc"]
        text = docs.get(doc) or (repo / doc).read_text()
        start, end = f"<!-- report:{table['id']} -->", f"<!-- /report:{table['id']} -->"
        pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
        if not pattern.search(text):  # a doc without the section: say so, never append
            raise ValueError(f"{doc} has no {start} ... {end} section")
        start_at, end_at = pattern.search(text).span()
        docs[doc] = f"{text[:start_at]}{start}\n{render(table, repo)}\n{end}{text[end_at:]}"
    stale = [doc for doc, text in docs.items() if (repo / doc).read_text() != text]
    if not check:
        for doc in stale:
            (repo / doc).write_text(docs[doc])
    return stale


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vitserve report", description=__doc__)
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if stale")
    args = parser.parse_args(argv)
    stale = write_docs(REPO, check=args.check)
    for doc in stale:
        print(f"{doc}: {'stale, run `vitserve report`' if args.check else 'written'}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
