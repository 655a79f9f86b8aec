"""Benchmark plumbing on CPU with a tiny ViT: timing, same-run ratios, the sweep's JSON,
the Pareto front and plot. GPU timing (CUDA events, compiled rows) is not exercised here."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from app.bench.models import _parse_args, mode_name, resolve_configs, run_models_bench
from app.bench.pareto import (
    POOLED,
    collect_fidelity,
    fidelity_from_report,
    plot_pareto,
    speed_points,
)
from app.bench.pareto import (
    main as pareto_main,
)
from app.bench.pareto_plot import keyed_points, pareto_front
from app.environment import code_version, environment
from app.store import ModelStore
from app.timing import (
    BenchError,
    Timing,
    prepare,
    throughput_ratio,
    time_forward,
    time_interleaved,
    timing_device,
)
from app.vit.config import CompressionConfig
from tests.helpers import TINY_VIT, tiny_manifest

SHAPE = (3, 32, 32)
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: with two, a busy second core makes OpenMP barriers stall for
    tens of milliseconds and turns timing tests into noise."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_vit(depth: int = 4) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(**{**TINY_VIT, "depth": depth}).eval()


def tiny_sweep(tmp_path: Path, configs: list[str], **overrides) -> dict:
    """``run_models_bench`` on a tiny ViT, one warm-up round, no per-layer section, quiet;
    a test passes only the knobs it is about."""
    defaults = {
        "archs": ["vit_tiny_patch16_224"],
        "arch_kwargs": TINY_VIT,
        "per_layer": False,
        "warmup": 1,
        "out_dir": tmp_path,
        "progress": False,
    }
    return run_models_bench(configs, **{**defaults, **overrides})


class Broken(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("no kernel for this op")


class Recorder(nn.Module):
    """Logs (name, first input value) per call, to check call order and input rotation."""

    def __init__(self, name: str, log: list[tuple[str, float]]) -> None:
        super().__init__()
        self.name, self.log = name, log

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.log.append((self.name, float(x.flatten()[0])))
        return x


def test_time_forward_gives_positive_ordered_statistics():
    t = time_forward(tiny_vit(), batch_size=2, device="cpu", warmup=1, repeats=5, input_shape=SHAPE)
    assert 0 < t.p10_ms <= t.median_ms <= t.p90_ms
    assert t.img_s == pytest.approx(2 * 1e3 / t.median_ms)


def test_models_are_interleaved_and_inputs_rotate():
    log: list[tuple[str, float]] = []
    models = {"a": Recorder("a", log), "b": Recorder("b", log)}
    results = time_interleaved(
        models, batch_size=1, device=CPU, dtype="float32", warmup=0, repeats=6, input_shape=(4,)
    )
    assert all(isinstance(r, Timing) for r in results.values())
    timed = log[2:]  # after one solo call each
    assert [name for name, _ in timed] == ["a", "b"] * 6
    a_inputs = [v for name, v in timed if name == "a"]
    b_inputs = [v for name, v in timed if name == "b"]
    assert a_inputs == b_inputs  # every round feeds both models the same batch
    assert len(set(a_inputs)) == 3 and a_inputs[0] != a_inputs[1]


def test_ratio_of_a_model_against_itself_is_near_one():
    model = tiny_vit()
    r = throughput_ratio(
        model,
        copy.deepcopy(model),
        batch_size=8,
        device="cpu",
        warmup=2,
        repeats=15,
        input_shape=SHAPE,
    )
    assert r["error"] is None
    assert 0.5 < r["speedup"] < 2.0
    assert r["batch_size"] == 8 and r["dtype"] == "float32" and r["compiled"] is False


def test_ratio_against_four_times_the_work_is_clearly_below_one():
    r = throughput_ratio(
        tiny_vit(depth=2),
        tiny_vit(depth=8),
        batch_size=8,
        device="cpu",
        warmup=2,
        repeats=10,
        input_shape=SHAPE,
    )
    assert r["speedup"] < 0.6
    assert r["compressed_img_s"] < r["dense_img_s"]


def test_failing_model_is_reported_not_raised():
    r = throughput_ratio(
        tiny_vit(), Broken(), batch_size=2, device="cpu", warmup=1, repeats=3, input_shape=SHAPE
    )
    assert r["speedup"] is None and r["compressed_img_s"] is None
    assert r["dense_img_s"] > 0
    assert "no kernel for this op" in r["error"]
    with pytest.raises(BenchError, match="no kernel"):
        time_forward(Broken(), batch_size=1, device="cpu", warmup=0, repeats=2, input_shape=SHAPE)


def test_environment_names_the_versions():
    env = environment("cpu")
    assert env["device_type"] == "cpu" and env["cuda_version"] is None
    assert env["torch_version"] == torch.__version__ and env["threads"] == 1
    assert timing_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ValueError):
        timing_device("meta")


def test_a_result_names_the_commit_it_was_measured_at_and_whether_it_had_changes(tmp_path):
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    assert code_version(tmp_path) is None  # not a checkout
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "a.py").write_text("x = 1\n")
    subprocess.run([*git, "add", "a.py"], check=True)
    subprocess.run([*git, "commit", "-qm", "a"], check=True)
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    assert code_version(tmp_path) == head.stdout.strip()
    (tmp_path / "b.py").write_text("")  # untracked: not the measured code's
    assert code_version(tmp_path) == head.stdout.strip()
    (tmp_path / "a.py").write_text("x = 2\n")
    assert code_version(tmp_path) == head.stdout.strip() + "+changes"
    assert "code" in environment("cpu")


def test_resolve_configs_keeps_preset_names_and_drops_dense():
    assert resolve_configs(["dense", "dgssa-s2", "static=0-1", "tokens=9@2"]) == {
        "static=0,1": "dgssa-s2",
        "tokens=9@2": "tokens=9@2",
    }


def test_run_models_bench_writes_json(tmp_path: Path):
    configs = ["static=0;tokens=9@2,5@3", "dgssa-s2", "merge=2@1-2"]
    report = tiny_sweep(
        tmp_path, configs, device="cpu", threads=1, batches=(1, 4), repeats=3, per_layer=True
    )
    path = Path(report["path"])
    assert path.parent == tmp_path and path.name.startswith("models-cpu-")
    data = json.loads(path.read_text())
    for key in ("device", "torch_version", "date", "rows", "per_layer"):
        assert key in data
    assert data["weights"] == "random (speed only)" and data["complete"] is True

    rows = data["rows"]
    assert len(rows) == 2 * 4  # batches x (dense + 3 configs)
    for row in rows:
        for key in ("arch", "config", "dtype", "batch", "compiled", "img_s", "median_ms"):
            assert row[key] is not None
        assert row["error"] is None and row["img_s"] > 0 and row["speedup"] > 0
        assert row["dtype"] == "float32" and row["compiled"] is False
    assert {r["batch"] for r in rows} == {1, 4}
    assert all(r["speedup"] == 1.0 for r in rows if r["config"] == "dense")
    assert {r["name"] for r in rows} == {
        "dense",
        "dgssa-s2",
        "static=0;tokens=9@2,5@3",
        "merge=2@1-2",
    }

    (section,) = data["per_layer"]
    assert section["batch"] == 4 and section["tokens"] == 17
    assert section["static_layer_speedup"] > 0 and not section["errors"]
    predictions = {c["name"]: c for c in section["configs"]}
    glad = predictions["static=0;tokens=9@2,5@3"]
    assert glad["tokens_per_block"] == [17, 17, 9, 5]
    assert sum(glad["cost_share"]) == pytest.approx(1 / glad["predicted_speedup_blocks"])
    # merging blocks are timed whole; the one after the first merge with token sizes
    assert {"merge_block@17-r2", "merge_block@15-r2+sizes"} <= section["timings_ms"].keys()
    merge = predictions["merge=2@1-2"]
    assert merge["tokens_per_block"] == [17, 17, 15, 13]
    assert merge["predicted_speedup_blocks"] > 0


def test_cli_defaults_cover_every_compressed_preset():
    args = _parse_args(["--compile", "on", "--compiled-batches", "256"])
    assert "dense" not in args.configs and "glad-s3-t3" in args.configs
    assert args.compile == "on" and args.compiled_batches == [256]


def test_pareto_front_keeps_only_undominated_points():
    points = [
        (1.0, 1.0, "dense"),
        (2.0, 0.90, "a"),
        (1.5, 0.85, "slower and worse than a"),
        (2.5, 0.70, "b"),
        (2.5, 0.60, "as fast as b, worse"),
        (2.0, 0.90, "duplicate of a"),
        (3.0, 0.50, "c"),
    ]
    assert [p[2] for p in pareto_front(points)] == ["dense", "a", "b", "c"]
    assert pareto_front([]) == []


def test_points_but_dense_are_keyed_by_speed_then_agreement_with_their_place_on_the_front():
    points = [(1.0, 1.0, "dense"), (2.0, 0.9, "a"), (2.0, 0.8, "a, worse run"), (1.5, 0.7, "x")]
    keyed = keyed_points(points, pareto_front(points))
    assert [(p[2], on_front) for p, on_front in keyed] == [
        ("x", False),
        ("a, worse run", False),
        ("a", True),
    ]


def _speed_report() -> dict:
    def row(config: str, name: str, speedup: float | None) -> dict:
        return {
            "arch": "deit_small_patch16_224",
            "config": config,
            "name": name,
            "dtype": "bfloat16",
            "batch": 256,
            "compiled": False,
            "speedup": speedup,
        }

    return {
        "device": "test",
        "rows": [
            row("dense", "dense", 1.0),
            row("static=0,1,2;tokens=99@3,50@6,26@9", "glad-s3-t3", 2.3),
            row("tokens=99@2,50@5,26@8", "glad-t3", 2.1),
            row("static=0,1", "dgssa-s2", 1.1),
        ],
    }


def test_plot_pareto_writes_png(tmp_path: Path):
    fidelity = {  # keys in any accepted spelling: text with ranges, preset name
        "static=0-2;tokens=99@3,50@6,26@9": {"agreement_top1": 0.86, "top1": 0.74},
        "glad-t3": {"agreement_top1": 0.82, "top1": None},
    }
    out = plot_pareto(
        _speed_report(),
        fidelity,
        tmp_path / "plots" / "pareto.png",
        arch="deit_small_patch16_224",
        dtype="bfloat16",
        batch=256,
        compiled=False,
    )
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 5000
    with pytest.raises(ValueError, match="no config has both"):
        plot_pareto(
            _speed_report(),
            {},
            tmp_path / "x.png",
            arch="deit_small_patch16_224",
            dtype="bfloat16",
            batch=256,
            compiled=False,
        )


def test_pareto_cli_pools_speed_runs_and_reads_both_fidelity_formats(tmp_path: Path):
    """One command from the committed JSONs to the PNG and the front's JSON: a distillation
    summary and a fidelity report both give points, a second speed run adds its configs."""
    first = _speed_report()
    second = {
        "device": "test",
        "rows": [{**first["rows"][1], "config": "merge=13", "name": "tome-r13", "speedup": 0.8}],
    }
    distill = {
        "rows": [
            {
                "entry": "tiny-glad-t3",
                "config": "tokens=99@2,50@5,26@8",
                "agreement_top1": 0.74,
                "student_top1_acc": 0.68,
            }
        ]
    }
    report = {
        "rows": [
            {
                "name": "tome-r13",
                "training": "training-free",
                "config": "merge=13",
                "eval": {"imagenet-dev": {"agreement_top1": 0.876}},
            }
        ]
    }
    paths = {}
    for name, data in (("s1", first), ("s2", second), ("d", distill), ("f", report)):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(data))
    out_json = tmp_path / "front.json"
    argv = [
        "--speed",
        str(paths["s1"]),
        str(paths["s2"]),
        "--fidelity",
        str(paths["d"]),
        str(paths["f"]),
    ]
    argv += ["--eager", "--out-png", str(tmp_path / "front.png"), "--out-json", str(out_json)]
    assert pareto_main(argv) == 0
    summary = json.loads(out_json.read_text())
    points = {p["label"]: p for p in summary["points"]}
    assert points["tiny-glad-t3 (top-1 68.0%)"]["speedup"] == 2.1
    assert points["tome-r13 (training-free)"] == {
        "label": "tome-r13 (training-free)",
        "speedup": 0.8,
        "agreement_top1": 0.876,
        "agreement_ci95": None,
        "on_front": False,
    }
    assert points["dense"]["on_front"] and points["tiny-glad-t3 (top-1 68.0%)"]["on_front"]
    assert set(summary["no_fidelity"]) == {"glad-s3-t3", "dgssa-s2"}
    assert (tmp_path / "front.png").read_bytes().startswith(b"\x89PNG")


def test_collect_fidelity_reads_compressed_manifests(tmp_path: Path):
    store = ModelStore(tmp_path)
    store.write_manifest(tiny_manifest("dense-one"))
    cfg = CompressionConfig.parse("static=0;tokens=9@1")
    fidelity = {"agreement_top1": 0.9, "student_top1_acc": 0.7, "n_images": 10}
    store.write_manifest(
        tiny_manifest(
            "comp-one", variant="compressed", compression=cfg, metrics={"fidelity": fidelity}
        )
    )
    store.write_manifest(
        tiny_manifest("comp-unmeasured", variant="compressed", compression=cfg.model_copy())
    )
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.json").write_text("{not json")

    found = collect_fidelity(tmp_path)
    assert found == {
        "comp-one": {
            "config": str(cfg),
            "agreement_top1": 0.9,
            "top1": 0.7,
            "model": "comp-one",
            "architecture": "vit_tiny_patch16_224",
        }
    }
    assert collect_fidelity(tmp_path, arch="deit_small_patch16_224") == {}


def test_variants_of_one_config_are_separate_points():
    """A distilled merge model runs exactly as fast as the training-free one: same speed
    row, two points, each with its own agreement."""
    report = {
        "rows": [
            {
                "name": "fidelity-test",
                "config": "tome-r13-variant",
                "training": t,
                "eval": {"dev": {"agreement_top1": a, "student_top1_acc": 0.8}},
            }
            for t, a in (("distilled", 0.9), ("training-free", 0.876))
        ]
    }
    for row in report["rows"]:
        row["config"] = "merge=13"
    fidelity = fidelity_from_report(report, "dev")
    assert set(fidelity) == {"fidelity-test (distilled)", "fidelity-test (training-free)"}
    speed = _speed_report()
    speed["rows"].append({**speed["rows"][1], "config": "merge=13", "name": "tome-r13"})
    points, missing = speed_points(
        speed, fidelity, arch="deit_small_patch16_224", dtype="bfloat16", batch=256, compiled=False
    )
    merged = sorted((p.agreement, p.speedup) for p in points if p.label != "dense")
    assert merged == [(0.876, 2.3), (0.9, 2.3)]
    assert set(missing) == {"glad-s3-t3", "glad-t3", "dgssa-s2"}


def test_pooled_fidelity_carries_its_interval_and_leaves_out_single_folds() -> None:
    """--folder pooled: a variant's figure over all the photos it was scored on, with the
    95% interval; a cross-fitted row keeps its own pooled figure, a fold below the photo
    floor is left out, and a row without one is pooled from its folders."""
    ev = {"n_labelled": 0, "student_top1_acc": None, "teacher_top1_acc": None}
    report = {
        "rows": [
            {
                "name": "a-fold",
                "training": "distilled",
                "config": "merge=13",
                "eval": {"dev": {**ev, "n_images": 10, "agreement_top1": 0.9}},
                "pooled": {
                    "n_images": 10,
                    "agreement_top1": 0.9,
                    "agreement_ci95": [0.6, 0.98],
                    "student_top1_acc": None,
                },
            },
            {
                "name": "tome",
                "training": "training-free",
                "config": "merge=13",
                "eval": {
                    "dev": {**ev, "n_images": 100, "agreement_top1": 0.9},
                    "extra": {**ev, "n_images": 300, "agreement_top1": 0.8},
                },
            },
        ]
    }
    fidelity = fidelity_from_report(report, POOLED, min_photos=50)
    assert set(fidelity) == {"tome (training-free)"}
    figure = fidelity["tome (training-free)"]
    assert figure["n_images"] == 400 and figure["agreement_top1"] == pytest.approx(0.825)
    low, high = figure["ci95"]
    assert low < 0.825 < high
    speed = _speed_report()
    speed["rows"].append({**speed["rows"][1], "config": "merge=13", "name": "tome-r13"})
    points, _ = speed_points(
        speed, fidelity, arch="deit_small_patch16_224", dtype="bfloat16", batch=256, compiled=False
    )
    assert [p.ci95 for p in points if p.label != "dense"] == [(low, high)]


def test_cuda_graph_rows_are_refused_without_cuda(tmp_path: Path):
    """Graph rows replay eager models on a GPU; on CPU the sweep says so instead of
    silently timing something else."""
    with pytest.raises(ValueError, match="CUDA graph rows need a CUDA device"):
        run_models_bench(["dgssa-s2"], device="cpu", out_dir=tmp_path, cuda_graphs=True)
    assert _parse_args(["--cuda-graphs"]).cuda_graphs


def test_compile_modes_that_capture_graphs_themselves_are_not_replayed():
    """Replaying a reduce-overhead model from our own CUDA graphs would nest captures."""
    for mode in ("reduce-overhead", "max-autotune"):
        with pytest.raises(ValueError, match="captures CUDA graphs itself"):
            prepare(
                nn.Linear(2, 2),
                device=torch.device("cuda"),
                dtype="float32",
                compiled=True,
                compile_mode=mode,
                cuda_graphs=True,
            )
    names = [mode_name(c, g) for c in (False, True) for g in (False, True)]
    assert names == ["eager", "graphs", "compiled", "compiled+graphs"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CUDA graphs)")
@pytest.mark.parametrize(
    ("config", "compiled", "modes"),
    [
        ("static=0;tokens=9@2", (False,), ("eager", "graphs")),
        # as the server runs a compiled merged model: Inductor's kernels and the Triton
        # matching between them, all in one CUDA graph per batch size
        ("merge=2@1-2", (False, True), ("eager", "graphs", "compiled", "compiled+graphs")),
    ],
)
def test_graph_rows_follow_their_pass_and_time_the_same_models(
    tmp_path: Path, config: str, compiled: tuple[bool, ...], modes: tuple[str, ...]
):
    report = tiny_sweep(
        tmp_path,
        [config],
        device="cuda",
        dtypes=["bfloat16"],
        batches=[4],
        compiled=compiled,
        cuda_graphs=True,
        repeats=3,
    )
    rows = report["rows"]
    assert [mode_name(r["compiled"], r["cuda_graphs"]) for r in rows] == [
        mode for mode in modes for _model in ("dense", config)
    ]
    assert all(r["error"] is None and r["speedup"] > 0 for r in rows)


def test_compiled_merge_rows_say_which_matching_ran(tmp_path: Path):
    """Merged models compile whole (no sort left in the matching): rows compile and time,
    and the report records the matching's implementation (CPU: torch)."""
    report = tiny_sweep(
        tmp_path,
        ["merge=2@1-2"],
        arch_kwargs={**TINY_VIT, "depth": 3},
        device="cpu",
        threads=1,
        batches=(2,),
        compiled=(True,),
        repeats=2,
    )
    assert report["method"]["merge_matching"] == "sort"
    assert [(r["config"], r["compiled"], r["error"]) for r in report["rows"]] == [
        ("dense", True, None),
        ("merge=2@1-2", True, None),
    ]
    assert all(r["speedup"] > 0 for r in report["rows"])


def _glad_t3_in_modes(tmp_path: Path, modes: dict[tuple[bool, bool], float]) -> list[str]:
    """``--speed`` and ``--fidelity`` arguments: dense and glad-t3 timed in each
    (compiled, cuda_graphs) mode at the given speed-up, and glad-t3's fidelity as ``t3``."""
    rows = []
    for (compiled, graphs), ratio in modes.items():
        for r in _speed_report()["rows"][:3:2]:  # dense and glad-t3
            ratio_here = 1.0 if r["name"] == "dense" else ratio
            rows.append({**r, "compiled": compiled, "cuda_graphs": graphs, "speedup": ratio_here})
    speed, fidelity = tmp_path / "speed.json", tmp_path / "fidelity.json"
    speed.write_text(json.dumps({"device": "test", "rows": rows}))
    fidelity.write_text(
        json.dumps({"rows": [{"entry": "t3", "config": "glad-t3", "agreement_top1": 0.7}]})
    )
    return ["--speed", str(speed), "--fidelity", str(fidelity)]


@pytest.mark.parametrize(
    ("flag", "speedup"), [("--eager", 2.1), ("--cuda-graphs", 2.2), ("--compiled-graphs", 2.4)]
)
def test_pareto_cli_picks_the_rows_of_one_mode(tmp_path: Path, flag: str, speedup: float):
    modes = {(False, False): 2.1, (False, True): 2.2, (True, False): 2.3, (True, True): 2.4}
    out_json = tmp_path / "front.json"
    argv = [*_glad_t3_in_modes(tmp_path, modes), flag]
    assert (
        pareto_main([*argv, "--out-png", str(tmp_path / "f.png"), "--out-json", str(out_json)]) == 0
    )
    summary = json.loads(out_json.read_text())
    assert {p["label"]: p["speedup"] for p in summary["points"]}["t3"] == speedup


def test_pareto_cli_overlays_the_compiled_front_on_the_served_one(tmp_path: Path):
    """--overlay-compiled: the served (graphs) front is the figure's own; the same batch
    compiled + graphs is a second front beside it, listed apart in the JSON."""
    out_json, out_png = tmp_path / "front.json", tmp_path / "front.png"
    argv = [*_glad_t3_in_modes(tmp_path, {(False, True): 2.2, (True, True): 2.4}), "--cuda-graphs"]
    argv += ["--overlay-compiled", "--out-png", str(out_png), "--out-json", str(out_json)]
    assert pareto_main(argv) == 0
    summary = json.loads(out_json.read_text())
    assert {p["label"]: p["speedup"] for p in summary["points"]}["t3"] == 2.2
    assert summary["overlay"]["mode"] == "compiled + CUDA graphs"
    assert {p["label"]: p["speedup"] for p in summary["overlay"]["points"]}["t3"] == 2.4
    assert out_png.stat().st_size > 0


def test_pareto_redraw_keeps_a_fronts_slice_and_adds_a_fidelity_file(tmp_path: Path):
    """--redraw FRONT_JSON: the same mode, batch, overlay and output as the front was drawn
    with, its fidelity files plus the new one; a variant scored since joins the points."""
    out_json, out_png = tmp_path / "front.json", tmp_path / "front.png"
    argv = [*_glad_t3_in_modes(tmp_path, {(False, True): 2.2, (True, True): 2.4}), "--cuda-graphs"]
    argv += ["--overlay-compiled", "--out-png", str(out_png), "--out-json", str(out_json)]
    assert pareto_main(argv) == 0
    before = json.loads(out_json.read_text())
    newer = tmp_path / "newer.json"
    newer.write_text(
        json.dumps({"rows": [{"entry": "t3-again", "config": "glad-t3", "agreement_top1": 0.8}]})
    )
    out_png.unlink()
    assert pareto_main(["--redraw", str(out_json), "--fidelity", str(newer)]) == 0
    after = json.loads(out_json.read_text())
    assert after["slice"] == before["slice"]
    assert after["overlay"]["mode"] == before["overlay"]["mode"]
    assert after["fidelity_json"] == [*before["fidelity_json"], str(newer)]
    assert after["fidelity_folder"] == before["fidelity_folder"]
    assert {p["label"] for p in after["points"]} == {p["label"] for p in before["points"]} | {
        "t3-again"
    }
    assert out_png.stat().st_size > 0


def test_pareto_cli_needs_its_inputs_without_redraw(tmp_path: Path):
    with pytest.raises(SystemExit):
        pareto_main(["--out-png", str(tmp_path / "f.png")])
