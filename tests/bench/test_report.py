"""Generated tables (#24): every committed figure matches the results it is drawn from."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from app.bench.compression_tables import (
    block_cost,
    fidelity_table,
    merge_steps_table,
    pooled_table,
    variants_table,
)
from app.bench.fidelity import pooled
from app.bench.report import INDEX, settings_table, write_docs
from app.bench.service_tables import (
    baseline_table,
    decoders_table,
    levels_table,
    set_up_label,
    worker_cpu_table,
)
from app.store.manifest import wilson_interval
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


def _fidelity_row(name: str, config: str | None = None, **agree_of_10: int) -> dict:
    """A fidelity row scored on 10 labelled photos per folder named (a row named by its
    config when no config is given, as a sweep writes them)."""
    folder = {"n_images": 10, "n_labelled": 10, "student_top1_acc": 0.5, "teacher_top1_acc": 0.8}
    return {
        "name": name,
        "config": config or name,
        "training": "training-free",
        "eval": {f: {**folder, "agreement_top1": k / 10} for f, k in agree_of_10.items()},
    }


def _fidelity_file(repo: Path, name: str, rows: list[dict]) -> str:
    path = repo / "bench/results/fidelity" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": "cpu-x", "device_type": "cpu", "threads": 2, "torch_version": "2.x"}
    path.write_text(json.dumps({**meta, "teacher": "deit_tiny_patch16_224", "rows": rows}))
    return f"fidelity/{name}"


def test_pooled_fidelity_counts_every_folder_and_later_files_win(tmp_path: Path) -> None:
    older = _fidelity_file(
        tmp_path,
        "a.json",
        [
            _fidelity_row("tome-r8", "merge=8", dev=9, extra=5),
            _fidelity_row("dev-only", "merge=4", dev=10),  # not scored on extra: left out
            _fidelity_row("tome-r13", "merge=13", dev=1, extra=1),
        ],
    )
    newer = _fidelity_file(
        tmp_path,
        "b.json",
        [
            _fidelity_row("tome-r13", "merge=13", dev=8, extra=8),  # replaces a.json's row
            _fidelity_row("merge=44@0,34@1,27@3,21@4,16@7;proportional=off", dev=6, extra=6),
            {  # a file that kept only the pooled figure: shown as it stands
                **_fidelity_row("tome-r16", "merge=16@0-10,10@11"),
                "pooled": pooled(_fidelity_row("x", dev=3, extra=2)["eval"]),
            },
        ],
    )
    table = {"files": [older, newer], "folders": ["dev", "extra"]}

    lines = pooled_table(table, tmp_path)

    lo, hi = wilson_interval(14, 20)
    assert f"| `tome-r8` | `merge=8` | training-free | 70.0% [{lo:.1%}, {hi:.1%}] | 50.0% |" in (
        "\n".join(lines)
    )
    body = [line for line in lines if line.startswith("| `")]
    assert [line.split(" | ")[0] for line in body] == [
        "| `tome-r13`",
        "| `tome-r8`",
        "| `merge-t5`",
        "| `tome-r16`",
    ]
    assert "| 25.0% [" in body[3]
    assert "80.0%" in body[0] and body[0].endswith("| b |")  # the newer file's counts
    assert "20 photos" in lines[0] and "dense: 80.0%" in lines[0]


def test_a_fidelity_table_names_the_dtype_its_files_were_scored_in(tmp_path: Path) -> None:
    """A GPU scores under bf16 autocast; files from before the field were all float32."""

    def scored(name: str, **dtype: str) -> str:
        row = _fidelity_row(name, "merge=8", dev=9, extra=5)
        meta = {"device": "gpu-x", "device_type": "cuda", "folders": ["dev", "extra"], **dtype}
        path = tmp_path / "bench/results/fidelity" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**meta, "teacher": "deit_tiny_patch16_224", "rows": [row]}))
        return f"fidelity/{name}.json"

    assert (
        "mode eager, bfloat16;"
        in fidelity_table({"files": [scored("new", dtype="bfloat16")]}, tmp_path)[0]
    )
    assert "mode eager, float32;" in fidelity_table({"files": [scored("old")]}, tmp_path)[0]


def test_block_cost_counts_the_tokens_each_block_keeps() -> None:
    assert block_cost("merge=0", "deit_tiny_patch16_224") == pytest.approx(1.0)
    assert block_cost("merge=13", "deit_tiny_patch16_224") < block_cost(
        "merge=8", "deit_tiny_patch16_224"
    )
    assert block_cost("static=0-1;merge=16@2-11", "deit_tiny_patch16_224") is None


def test_service_levels_are_ratios_within_each_level() -> None:
    """The CPU run's levels: each model against dense measured in the same level."""
    table = {"files": ["service/service-cpu-20261204-173812.json"]}
    text = "\n".join(levels_table(table, REPO))
    assert "| level 1: c=4, reference first | level 2: c=4, reference last |" in text
    assert "| `deit_tiny_patch16_224` (reference) | – | 3.3 img/s | 8.0 img/s |" in text
    assert "| `tome-r13` | `merge=13` | 1.42× | 1.41× |" in text


def test_the_decoders_table_shows_each_backends_rate_and_crop_distance() -> None:
    name = "decode/jpeg-decoders-nvidia-h100-80gb-hbm3-20261205-072122.json"
    result = json.loads((REPO / "bench/results" / name).read_text())
    text = "\n".join(decoders_table({"files": [name]}, REPO))
    row = next(r for r in result["rows"] if r["decoder"] == "torchvision-nvjpeg")
    diff = result["fidelity"]["torchvision-nvjpeg"]
    line = next(x for x in text.splitlines() if x.startswith("| `torchvision-nvjpeg`"))
    assert f"{row['img_s']:,.0f} img/s" in line
    assert line.endswith(f"| {diff['max']:.0f} / {diff['mean']:.3f} / {diff['p99_9']:.0f} |")
    assert f"{row['step']} @{row['batch']}" in text and result["device"] in text


def test_the_merge_steps_table_gives_each_implementations_ratio_to_argsort() -> None:
    name = "kernels/merge-matching-nvidia-h100-80gb-hbm3-20261205-072821.json"
    result = json.loads((REPO / "bench/results" / name).read_text())
    lines = merge_steps_table({"files": [name]}, REPO)
    rows = [r for r in result["rows"] if not r.get("error")]
    assert len([x for x in lines if x.startswith("| ") and "ms |" in x]) == len(rows)
    first = rows[0]
    assert any(
        f"| `{first['impl']}` | {first['median_ms']:.3f} ms | {first['speedup_vs_argsort']:.2f}× |"
        in x
        for x in lines
    )


def test_service_rows_say_the_set_up_a_run_recorded_and_nothing_for_older_runs():
    assert set_up_label({}) == ""  # before the switches were recorded: no claim either way
    assert set_up_label({"VITSERVE_HARDWARE_DECODE": "false"}) == ", JPEG engines off"
    assert (
        set_up_label({"VITSERVE_HARDWARE_DECODE": "true", "VITSERVE_HTTP_SERVER": "granian"})
        == ", JPEG engines on, granian"
    )
    assert set_up_label({"VITSERVE_HTTP_SERVER": "uvicorn"}) == ""  # the default says nothing
    nvimgcodec = {"VITSERVE_GPU_JPEG_DECODER": "nvimgcodec", "VITSERVE_NVIMGCODEC_THREADS": "12"}
    assert set_up_label(nvimgcodec) == ", nvImageCodec CUDA decode on 12 threads"
    assert set_up_label({"VITSERVE_GPU_JPEG_DECODER": "torchvision"}) == ""


def test_the_worker_cpu_table_gives_each_commits_median_cpu_a_request() -> None:
    names = ["service/service-cpu-20261206-131729.json", "service/service-cpu-20261206-131814.json"]
    names += ["service/service-cpu-20261206-131858.json"]
    results = [json.loads((REPO / "bench/results" / n).read_text()) for n in names]
    lines = worker_cpu_table({"files": names}, REPO)
    http_ms = {r["code"]: [] for r in results}
    for r in results:
        (level,) = r["levels"]
        http_ms[r["code"]].append(1000 * level["cores"]["server"] / level["img_s"])
    old, new = sorted(http_ms, key=lambda code: -len(http_ms[code]))  # 2 runs, then 1
    median_rows = [x for x in lines if "median of" in x]
    assert median_rows[0].startswith(f"| `{old}` | **median of 2** |")
    assert f"**{sum(http_ms[old]) / 2:.3f}**" in median_rows[0]
    assert f"**{http_ms[new][0]:.3f}**" in median_rows[1]
    assert len([x for x in lines if x.startswith("| `")]) == 3 + 2


def test_the_worker_cpu_table_keeps_two_http_servers_of_one_commit_apart(tmp_path: Path) -> None:
    names = ["service/a.json", "service/b.json"]
    (tmp_path / "bench/results/service").mkdir(parents=True)
    source = REPO / "bench/results/service/service-cpu-20261206-131729.json"
    for name, server in zip(names, ["uvicorn", "granian"], strict=True):
        result = json.loads(source.read_text())
        result["server"]["VITSERVE_HTTP_SERVER"] = server
        (tmp_path / "bench/results" / name).write_text(json.dumps(result))
    code = json.loads(source.read_text())["code"]
    median_rows = [x for x in worker_cpu_table({"files": names}, tmp_path) if "median of" in x]
    assert [row.split(" | ")[0] for row in median_rows] == [f"| `{code}`", f"| `{code}`, granian"]


@pytest.mark.parametrize(
    ("folds", "seeds", "said"),
    [
        (["s0-fold-a", "s0-fold-b", "s1-fold-a", "s1-fold-b"], [0, 1], "2 folds a seed"),
        (["s0-fold-b", "s1-fold-a", "s1-fold-b", "s2-fold-a"], [0, 1, 2], "4 folds over the seeds"),
    ],
)
def test_the_variants_table_counts_a_cross_fits_folds_as_they_are(
    tmp_path: Path, folds: list[str], seeds: list[int], said: str
) -> None:
    manifest = {
        "name": "glad",
        "variant": "compressed",
        "source": {"kind": "compress"},
        "figures": {
            "fidelity": [
                {
                    "eval_sets": ["extra-a", "extra-b", "imagenet-dev"],
                    "n_images": 1543,
                    "agreement_top1": 0.8,
                    "ci95": [0.78, 0.82],
                    "seeds": seeds,
                    "method": "cross-fitted",
                    "folds": folds,
                }
            ]
        },
    }
    (tmp_path / "model_store/glad").mkdir(parents=True)
    (tmp_path / "model_store/glad/manifest.json").write_text(json.dumps(manifest))
    (row,) = [line for line in variants_table({}, tmp_path) if line.startswith("| `glad`")]
    assert f"{len(seeds)} seed(s), cross-fitted: {said})" in row


def test_a_settings_table_shows_the_settings_it_names_in_that_order() -> None:
    table = {"id": "settings", "settings": ["port", "host"]}
    rows = settings_table(table, REPO)[2:]
    assert [row.split(" | ")[0] for row in rows] == ["| `VITSERVE_PORT`", "| `VITSERVE_HOST`"]
    assert len(settings_table({"id": "all"}, REPO)) > 20  # none named: every setting
    with pytest.raises(KeyError, match="'nope'"):
        settings_table({"id": "settings", "settings": ["port", "nope"]}, REPO)


@pytest.mark.parametrize("decode_threads", [0, 4])
def test_the_litserve_rows_name_its_set_up_down_to_where_it_decodes(tmp_path, decode_threads):
    name = "service/service-cuda-20261206-181834.json"
    result = json.loads((REPO / "bench/results" / name).read_text())
    result["litserve"]["decode_threads"] = decode_threads
    (tmp_path / "bench/results/service").mkdir(parents=True)
    (tmp_path / "bench/results" / name).write_text(json.dumps(result))
    rows = [row for row in baseline_table({"files": [name]}, tmp_path) if "LitServe" in row]
    assert rows and all("12 workers × 1 thread, 4 API servers" in row for row in rows)
    in_batch = ", decode in batch() on 4 threads" in rows[0]
    assert in_batch == (decode_threads == 4)
