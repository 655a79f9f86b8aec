"""Distillation on CPU with a tiny ViT: it learns, phases freeze what they should,
checkpoints resume bit-for-bit, the time budget stops cleanly; the compress job end to end
(tiny store entry; and, marked slow, the real DeiT-Tiny on photos from ../shared)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from app.jobs.compress import run_compress, run_training_free
from app.store import ModelStore
from app.store.pull import import_checkpoint
from app.train.data import EvalImages, eval_transform, list_images, read_labels
from app.train.distill import CHECKPOINT_FILE, distill
from app.train.evaluate import evaluate
from app.train.losses import (
    distill_loss,
    logit_kl,
    merge_like,
    nudge_towards_disagreement,
    tapped,
)
from app.train.options import DistillOptions
from app.vit.builder import CompressedViT, calibrate, compress
from app.vit.config import CompressionConfig
from tests.helpers import DEV_IMAGES, HF_CACHE, add_tiny_entry, require_shared
from tests.unit.test_evaluate import DATA_CONFIG, tiny_teacher, write_images, write_labels

CFG = CompressionConfig.parse("static=0;tokens=9@2,5@3")  # 17 -> 9 -> 5 tokens, 4 blocks


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Small models gain nothing from intra-op threads, and on a busy machine OpenMP's
    spinning threads make every op many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def quick_opts(**update) -> DistillOptions:
    base = dict(
        steps=8, batch_size=8, views=2, lr=1e-3, aggregation_lr=1e-2, static_lr=1e-3,
        warmup=2, phase1_steps=3, log_every=2, num_workers=0,
    )  # fmt: skip
    return DistillOptions(**{**base, **update})


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_images(tmp_path_factory.mktemp("photos"), 12)


def calibrated_student(teacher: nn.Module, photos: list[Path]) -> CompressedViT:
    student = compress(teacher, CFG)
    ds = EvalImages(photos, eval_transform(DATA_CONFIG))
    calibrate(student, teacher, [torch.stack([ds[i][0] for i in range(len(ds))])])
    return student


def test_distillation_brings_student_closer(photos: list[Path]) -> None:
    teacher = tiny_teacher()
    student = calibrated_student(teacher, photos)
    before = evaluate(teacher, student, photos, None, DATA_CONFIG, batch_size=12)
    result = distill(
        teacher, student, photos, quick_opts(steps=40, phase1_steps=10), data_config=DATA_CONFIG
    )
    after = evaluate(teacher, student, photos, None, DATA_CONFIG, batch_size=12)
    assert result.steps_done == 40 and result.stopped == "completed"
    assert after.mean_kl < 0.7 * before.mean_kl
    assert [h["step"] for h in result.history] == list(range(2, 41, 2))
    assert {"kd", "attn", "feat", "loss", "agree", "lr_static", "lr_decay"} <= set(
        result.history[-1]
    )


def test_phase1_trains_only_compression_weights(photos: list[Path]) -> None:
    teacher = tiny_teacher()
    student = calibrated_student(teacher, photos)
    start = {k: v.clone() for k, v in student.state_dict().items()}
    distill(teacher, student, photos, quick_opts(steps=3), data_config=DATA_CONFIG)
    changed = {k for k, v in student.state_dict().items() if not torch.equal(v, start[k])}
    assert changed == {"blocks.0.attn.attn_matrix", "aggregation.2.weight", "aggregation.3.weight"}


def test_aligned_features_target_the_teachers_tokens_merged_alike(photos: list[Path]) -> None:
    """merged_features='aligned': a student whose every token equals the teacher's tokens
    averaged over the same patches has no feature loss, and moving a merged (non-CLS)
    token costs loss there, while CLS-only matching does not see it."""
    teacher = tiny_teacher()
    student = compress(teacher, CompressionConfig.parse("merge=3@0,2@2;proportional=off"))
    student.track_token_sources = True
    ds = EvalImages(photos, eval_transform(DATA_CONFIG))
    x = torch.stack([ds[i][0] for i in range(4)])
    with torch.no_grad(), tapped(teacher, range(4)) as t, tapped(student, range(4)) as s:
        t_BK, s_BK = teacher(x), student(x)
    sources = student.token_sources
    assert set(sources) == {0, 1, 2, 3}
    s.blocks = {i: merge_like(t.blocks[i], sources[i]) for i in range(4)}
    s.pre_logits = t.pre_logits

    def feat(mode: str) -> float:
        opts = quick_opts(merged_features=mode)
        return float(distill_loss(student, t_BK, s_BK, t, s, opts).parts["feat"])

    assert feat("aligned") < 1e-6 and feat("cls") < 1e-6
    s.blocks[3] = s.blocks[3].clone()
    s.blocks[3][:, 1:] += torch.randn_like(s.blocks[3][:, 1:])
    assert feat("aligned") > 1e-3 and feat("cls") < 1e-6


def test_aligned_features_distil_and_stop_tracking(photos: list[Path]) -> None:
    teacher = tiny_teacher()
    student = compress(teacher, CompressionConfig.parse("merge=3@0,2@2;proportional=off"))
    opts = quick_opts(steps=2, merged_features="aligned")
    result = distill(teacher, student, photos, opts, data_config=DATA_CONFIG)
    assert result.steps_done == 2 and "feat" in result.history[-1]
    assert not student.track_token_sources  # a served forward keeps no trace


@pytest.mark.parametrize("text", ["static=0;merge=3@2-", "merge=3@0,2@2;proportional=off"])
def test_merging_student_distils(photos: list[Path], text: str) -> None:
    """ToMe blocks change the token count per block: features fall back to CLS there."""
    teacher = tiny_teacher()
    student = compress(teacher, CompressionConfig.parse(text))
    result = distill(teacher, student, photos, quick_opts(steps=2), data_config=DATA_CONFIG)
    assert result.steps_done == 2 and result.final_loss is not None


@pytest.mark.parametrize(
    ("extra", "teacher_calls_per_step"),
    [({}, 1), ({"ema_decay": 0.5, "adversarial_share": 0.5}, 2)],
    ids=["plain", "ema-and-nudged-views"],
)
def test_resume_continues_exactly(
    photos: list[Path], tmp_path: Path, extra: dict, teacher_calls_per_step: int
) -> None:
    """Crash in step 6 (after the step-4 checkpoint), resume: same weights as no crash
    (with EMA: the average is checkpointed too, and it is what the run returns)."""
    teacher = tiny_teacher()
    straight = calibrated_student(teacher, photos)
    resumed = calibrated_student(teacher, photos)
    distill(teacher, straight, photos, quick_opts(**extra), data_config=DATA_CONFIG)

    calls = 0

    def crash_on_sixth_call(_module: nn.Module, _args: tuple) -> None:
        nonlocal calls
        calls += 1
        if calls == 6 * teacher_calls_per_step:
            raise KeyboardInterrupt

    opts = quick_opts(checkpoint_dir=tmp_path, checkpoint_every=2, resume=True, **extra)
    handle = teacher.register_forward_pre_hook(crash_on_sixth_call)
    with pytest.raises(KeyboardInterrupt):
        distill(teacher, resumed, photos, opts, data_config=DATA_CONFIG)
    handle.remove()
    assert torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)["step"] == 4

    result = distill(teacher, resumed, photos, opts, data_config=DATA_CONFIG)
    assert result.steps_done == 8
    assert [h["step"] for h in result.history] == [2, 4, 6, 8]
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=1e-6)


def test_ema_returns_the_average_not_the_last_weights(photos: list[Path]) -> None:
    teacher = tiny_teacher()
    last, averaged = calibrated_student(teacher, photos), calibrated_student(teacher, photos)
    distill(teacher, last, photos, quick_opts(), data_config=DATA_CONFIG)
    distill(teacher, averaged, photos, quick_opts(ema_decay=0.9), data_config=DATA_CONFIG)
    weight = "blocks.3.mlp.fc1.weight"  # trained in phase 2 only: the average lags behind
    start = calibrated_student(teacher, photos).state_dict()[weight]
    moved_last = (last.state_dict()[weight] - start).norm()
    moved_average = (averaged.state_dict()[weight] - start).norm()
    assert 0 < moved_average < moved_last


def test_ema_can_start_when_a_run_resumes(photos: list[Path], tmp_path: Path) -> None:
    """A checkpoint made without an average: resuming with one starts it there."""
    teacher = tiny_teacher()
    student = calibrated_student(teacher, photos)
    opts = quick_opts(checkpoint_dir=tmp_path, checkpoint_every=2, resume=True)
    distill(teacher, student, photos, opts.model_copy(update={"steps": 4}), data_config=DATA_CONFIG)
    result = distill(
        teacher,
        student,
        photos,
        opts.model_copy(update={"ema_decay": 0.9}),
        data_config=DATA_CONFIG,
    )
    assert result.steps_done == 8
    assert "ema" in torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)


def test_nudged_views_move_one_step_towards_disagreement(photos: list[Path]) -> None:
    teacher = tiny_teacher().eval()
    student = calibrated_student(teacher, photos).eval()
    x = torch.randn(6, *DATA_CONFIG["input_size"])
    step_C = torch.tensor([0.01, 0.02, 0.03])
    nudged = nudge_towards_disagreement(
        teacher, student, x, 0.5, step_C, temperature=1.0, amp=False
    )
    moved = (nudged - x).abs()
    assert torch.equal(nudged[3:], x[3:])  # only the first half is nudged
    per_channel = moved[:3].amax(dim=(0, 2, 3))
    torch.testing.assert_close(per_channel, step_C)
    with torch.no_grad():
        kl_before = logit_kl(teacher(x[:3]), student(x[:3]), 1.0)
        kl_after = logit_kl(teacher(nudged[:3]), student(nudged[:3]), 1.0)
    assert kl_after > kl_before
    assert (
        nudge_towards_disagreement(teacher, student, x, 0.0, step_C, temperature=1.0, amp=False)
        is x
    )


def test_resume_refuses_other_view_stream(photos: list[Path], tmp_path: Path) -> None:
    teacher = tiny_teacher()
    opts = quick_opts(steps=2, checkpoint_dir=tmp_path, resume=True)
    distill(teacher, compress(teacher, CFG), photos, opts, data_config=DATA_CONFIG)
    with pytest.raises(ValueError, match="seed"):
        distill(
            teacher,
            compress(teacher, CFG),
            photos,
            opts.model_copy(update={"seed": 1}),
            data_config=DATA_CONFIG,
        )


def test_time_budget_stops_and_checkpoints(photos: list[Path], tmp_path: Path) -> None:
    teacher = tiny_teacher()
    opts = quick_opts(steps=100_000, time_budget_s=1.0, checkpoint_dir=tmp_path)
    result = distill(teacher, compress(teacher, CFG), photos, opts, data_config=DATA_CONFIG)
    assert result.stopped == "time_budget"
    assert 0 < result.steps_done < 100_000
    assert result.elapsed_s < 3.0
    saved = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    assert saved["step"] == result.steps_done


def test_run_compress_writes_a_loadable_entry(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    add_tiny_entry(store, "teacher")  # 2 blocks, 17 tokens
    train_dir, eval_dir = tmp_path / "train", tmp_path / "eval"
    write_images(train_dir, 6, seed=1)
    evals = write_images(eval_dir, 4, seed=2)
    write_labels(eval_dir, {p.name: i for i, p in enumerate(evals)})
    cfg = CompressionConfig.parse("static=0;tokens=9@1")
    manifest = run_compress(
        store, "teacher", cfg, train_dir, eval_dir, "teacher-glad", quick_opts(steps=4),
        speed_arch="deit_tiny_patch16_224",
    )  # fmt: skip
    assert manifest.variant == "compressed" and manifest.compression == cfg
    assert manifest.source.kind == "compress" and manifest.source.ref == "teacher"
    assert manifest.source.details["steps"] == 4 and manifest.source.details["seed"] == 0
    assert "calibration" in manifest.source.details  # static blocks were calibrated
    fidelity, speed = manifest.metrics["fidelity"], manifest.metrics["speed"]
    assert fidelity["n_images"] == 4 and fidelity["n_labelled"] == 4
    assert speed["speedup"] > 0 and speed["weights"] == "random (speed only)"
    loaded = store.load("teacher-glad")
    assert isinstance(loaded.module, CompressedViT)
    with pytest.raises(ValueError, match="training images"):
        run_compress(store, "teacher", cfg, train_dir, train_dir, "x", quick_opts(steps=1))


def test_run_compress_refuses_a_bad_entry_name_before_training(tmp_path: Path) -> None:
    """A name no manifest accepts fails at once, not after the distillation it would waste."""
    store = ModelStore(tmp_path / "store")
    add_tiny_entry(store, "teacher")
    train_dir = tmp_path / "train"
    write_images(train_dir, 2, seed=1)
    cfg = CompressionConfig.parse("tokens=9@1")
    too_long = "teacher-" + "x" * 60
    opts = quick_opts(steps=100_000, time_budget_s=2.0)  # would train 2 s if it started
    started = time.perf_counter()
    with pytest.raises(ValueError, match="at most 64 chars"):
        run_compress(store, "teacher", cfg, train_dir, None, too_long, opts)
    assert time.perf_counter() - started < 1.0  # nothing was trained
    with pytest.raises(ValueError, match="at most 64 chars"):
        run_training_free(
            store, "teacher", CompressionConfig.parse("merge=2"), None, "Bad Name", speed_arch=None
        )
    assert store.names() == ["teacher"]


@pytest.mark.slow
def test_real_deit_tiny_compress_job(tmp_path: Path) -> None:
    """DeiT-Tiny from the offline HF cache, 8 dev photos: 4 to distil on, 4 held out."""
    require_shared(HF_CACHE, DEV_IMAGES)
    weights = next(
        HF_CACHE.glob("models--timm--deit_tiny_patch16_224*/snapshots/*/model.safetensors")
    )
    store = ModelStore(tmp_path / "store")
    import_checkpoint(store, weights, "deit_tiny_patch16_224", name="deit-tiny")
    photos, labels = list_images(DEV_IMAGES)[:8], read_labels(DEV_IMAGES)
    train_dir, eval_dir = tmp_path / "train", tmp_path / "eval"
    for folder, chunk in ((train_dir, photos[:4]), (eval_dir, photos[4:])):
        folder.mkdir()
        for p in chunk:
            shutil.copy(p, folder / p.name)
    write_labels(eval_dir, {p.name: labels[p.name] for p in photos[4:]})
    manifest = run_compress(
        store, "deit-tiny", CompressionConfig.parse("static=0-1"), train_dir, eval_dir,
        "deit-tiny-s2", quick_opts(steps=2, batch_size=4, lr=1e-5, static_lr=1e-5),
        speed_arch="deit_tiny_patch16_224",
    )  # fmt: skip
    fidelity = manifest.metrics["fidelity"]
    assert fidelity["n_labelled"] == 4 and fidelity["teacher_top1_acc"] >= 0.5
    assert fidelity["agreement_top1"] >= 0.5
    assert store.load("deit-tiny-s2").module(torch.zeros(1, 3, 224, 224)).shape == (1, 1000)
