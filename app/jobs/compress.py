"""One command from a dense store entry to a verified compressed one.

Teacher from the store -> compress -> calibrate the static matrices on the training
photos -> distil -> measure fidelity on held-out photos -> measure the speed of the same
config on ``speed_arch`` -> write a new store entry whose manifest records all of it.
Every random choice derives from ``opts.seed``, so the same command gives the same model.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import timm.data
import torch
from torch.utils.data import DataLoader

from app.store.manifest import (
    FidelityFigure,
    Figures,
    Manifest,
    Source,
    SpeedFigure,
    Teacher,
    check_model_name,
    wilson_interval,
)
from app.store.store import ModelStore, tensor_digest
from app.timing import throughput_ratio
from app.train.data import EvalImages, eval_transform, list_images, read_labels
from app.train.distill import distill, launched_rank, training_device
from app.train.evaluate import evaluate
from app.train.options import DistillOptions
from app.vit.builder import calibrate, compress, create_model
from app.vit.config import CompressionConfig

BATCH = 64  # calibration and evaluation: inference only, the size sets speed, not results
# Speed is measured as served: bf16, a large batch and compiled on CUDA; on CPU fp32 and
# a batch small enough to time in seconds.
CUDA_SPEED = {"batch_size": 256, "dtype": torch.bfloat16, "compiled": True}
CPU_SPEED = {"batch_size": 8, "dtype": torch.float32, "compiled": False}


def train_pool(train_dir: Path, extra_train_dirs: Sequence[Path]) -> list[Path]:
    """All distillation photos: the main folder first, then the extra ones, each sorted."""
    return [p for d in (train_dir, *extra_train_dirs) for p in list_images(d)]


def measure_speed(arch: str, cfg: CompressionConfig, *, device: str, seed: int) -> dict[str, Any]:
    """Throughput of ``cfg`` applied to ``arch`` vs dense ``arch``, both with random weights
    (speed does not depend on the values; DeiT-S/B have no offline weights here)."""
    torch.manual_seed(seed)
    dense = create_model(arch)
    compressed = compress(dense, cfg)
    dev = torch.device(device)
    settings = CUDA_SPEED if dev.type == "cuda" else CPU_SPEED
    input_shape = timm.data.resolve_model_data_config(dense)["input_size"]
    ratio = throughput_ratio(dense, compressed, device=device, input_shape=input_shape, **settings)
    return {"arch": arch, "weights": "random (speed only)", **ratio}


def _eval_batches(images: Sequence[Path], data_config: dict[str, Any]) -> Iterator[torch.Tensor]:
    """Eval-transformed images ``[B, 3, H, W]``: calibration sees photos as served."""
    for x_B3HW, _ in DataLoader(EvalImages(images, eval_transform(data_config)), BATCH):
        yield x_B3HW


# Options that change how a run goes, not what it computes.
NOT_IN_RESULT = {
    "num_workers",
    "log_every",
    "checkpoint_dir",
    "checkpoint_every",
    "resume",
    "device",
}


def reproduce_command(
    teacher: str,
    cfg: CompressionConfig,
    train_dir: Path,
    extra_train_dirs: Sequence[Path],
    eval_dir: Path | None,
    out_name: str,
    opts: DistillOptions,
) -> str:
    """The one command that recreates this entry (seeded; GPU runs are not bit-exact): every
    option that differs from its default and can change the result goes in ``--options``."""
    parts = [
        f"vitserve compress --teacher {teacher} --config '{cfg}' --images {train_dir}",
        *([f"--extra-images {' '.join(map(str, extra_train_dirs))}"] if extra_train_dirs else []),
        *([f"--eval-images {eval_dir}"] if eval_dir else []),
        f"--out {out_name} --seed {opts.seed} --steps {opts.steps} --batch-size {opts.batch_size}",
    ]
    changed = opts.model_dump(
        mode="json", exclude_defaults=True, exclude=NOT_IN_RESULT | {"seed", "steps", "batch_size"}
    )
    if changed:
        parts.append(f"--options '{json.dumps(changed, separators=(',', ':'))}'")
    return " ".join(parts)


def run_compress(
    store: ModelStore,
    teacher_name: str,
    cfg: CompressionConfig,
    train_dir: Path,
    eval_dir: Path | None,
    out_name: str,
    opts: DistillOptions,
    *,
    extra_train_dirs: Sequence[Path] = (),
    speed_arch: str | None = "deit_small_patch16_224",
) -> Manifest | None:
    """Build, distil, evaluate and store ``out_name``; returns its manifest.

    Under torchrun every rank distils its share; only rank 0 evaluates, measures and
    writes, and the other ranks return None. ``eval_dir`` must not share photos with the
    training folders (fidelity on trained-on photos would flatter the student).
    """
    check_model_name(out_name)
    train_images = train_pool(Path(train_dir), [Path(d) for d in extra_train_dirs])
    eval_images = list_images(eval_dir) if eval_dir else []
    overlap = {p.resolve() for p in train_images} & {p.resolve() for p in eval_images}
    if overlap:
        raise ValueError(
            f"{len(overlap)} eval images are also training images, e.g. {min(overlap)}"
        )
    loaded = store.load(teacher_name)
    teacher, teacher_manifest = loaded.module, loaded.manifest
    if out_name in store.names():  # refused now, not after minutes of training
        declared = store.declared_manifest(out_name)
        if declared.compression != cfg or declared.architecture != teacher_manifest.architecture:
            raise ValueError(
                f"{out_name} is declared as {declared.architecture} ({declared.compression}): "
                "choose another --out"
            )
    data_config = teacher_manifest.preprocessing.timm_data_config()

    device = training_device(opts.device)
    torch.manual_seed(opts.seed)
    teacher.to(device)
    student = compress(teacher, cfg)
    calibrate(student, teacher, _eval_batches(list_images(train_dir), data_config))
    result = distill(teacher, student, train_images, opts, data_config=data_config)
    if launched_rank() != 0:
        return None

    details = {
        "command": reproduce_command(
            teacher_name, cfg, train_dir, extra_train_dirs, eval_dir, out_name, opts
        ),
        "recipe": opts.model_dump(mode="json"),
        "seed": opts.seed,
        "steps": result.steps_done,
        "stopped": result.stopped,
        "final_loss": result.final_loss,
        "train_dirs": [str(train_dir), *map(str, extra_train_dirs)],
        "train_images": len(train_images),
    }
    if cfg.static_layers:  # only static blocks are calibrated
        details["calibration"] = f"teacher attention averaged over {train_dir} (eval transform)"
    return _measure_and_store(
        store,
        teacher_name,
        teacher_manifest,
        teacher,
        student,
        cfg,
        out_name,
        eval_dir=eval_dir,
        device=device,
        seed=opts.seed,
        speed_arch=speed_arch,
        description=f"{teacher_name} compressed ({cfg}), distilled {result.steps_done} steps",
        details=details,
    )


def run_training_free(
    store: ModelStore,
    teacher_name: str,
    cfg: CompressionConfig,
    eval_dir: Path | None,
    out_name: str,
    *,
    device: str = "auto",
    seed: int = 0,
    speed_arch: str | None = "deit_small_patch16_224",
) -> Manifest:
    """A config with no learned part (token merging) as a *derived* store entry, in seconds:
    a manifest naming the teacher and its checksum, no weights file (the store applies the
    config to the teacher's weights at load).

    Nothing is trained or calibrated, so no training photos are needed; fidelity is
    measured when ``eval_dir`` is given, speed unless ``speed_arch`` is None.
    """
    check_model_name(out_name)
    if not cfg.training_free:
        raise ValueError(
            f"{cfg} has static attention or aggregation maps to calibrate and train: "
            "give training images (--images)"
        )
    loaded = store.load(teacher_name)
    dev = training_device(device)
    teacher = loaded.module.to(dev)
    command = f"vitserve compress --teacher {teacher_name} --config '{cfg}' --out {out_name}"
    if eval_dir:
        command += f" --eval-images {eval_dir}"
    return _measure_and_store(
        store,
        teacher_name,
        loaded.manifest,
        teacher,
        compress(teacher, cfg),
        cfg,
        out_name,
        eval_dir=eval_dir,
        device=dev,
        seed=seed,
        speed_arch=speed_arch,
        description=f"{teacher_name} compressed ({cfg}), training-free",
        details={"command": command, "seed": seed, "steps": 0, "training": "none"},
        derived_from=Teacher(name=teacher_name, sha256=tensor_digest(loaded.module.state_dict())),
    )


def _measure_and_store(
    store: ModelStore,
    teacher_name: str,
    teacher_manifest: Manifest,
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    cfg: CompressionConfig,
    out_name: str,
    *,
    eval_dir: Path | None,
    device: torch.device,
    seed: int,
    speed_arch: str | None,
    description: str,
    details: dict[str, Any],
    derived_from: Teacher | None = None,
) -> Manifest:
    """Fidelity on held-out photos, speed of the config on ``speed_arch``, then the entry:
    with the student's weights, or for a derived entry (``derived_from``) the manifest alone."""
    metrics: dict[str, Any] = {}
    figures = Figures()
    if eval_dir:
        fidelity = evaluate(
            teacher,
            student,
            list_images(eval_dir),
            read_labels(eval_dir),
            teacher_manifest.preprocessing.timm_data_config(),
            batch_size=BATCH,
            device=str(device),
            dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
        )
        metrics["fidelity"] = {"eval_dir": str(eval_dir), **fidelity.model_dump()}
        agree = round(fidelity.agreement_top1 * fidelity.n_images)
        figures.fidelity.append(
            FidelityFigure(
                eval_sets=[Path(eval_dir).name],
                n_images=fidelity.n_images,
                agreement_top1=fidelity.agreement_top1,
                ci95=tuple(round(x, 4) for x in wilson_interval(agree, fidelity.n_images)),
                seeds=None if derived_from else [seed],
                measured=f"{device.type}, by the command that made this entry",
            )
        )
    if speed_arch:  # skipped when several jobs share a GPU: they would time each other
        speed = measure_speed(speed_arch, cfg, device=str(device), seed=seed)
        metrics["speed"] = speed
        if speed["speedup"] is not None:
            figures.speed.append(
                SpeedFigure(
                    architecture=speed_arch,
                    borrowed=speed_arch != teacher_manifest.architecture,
                    device=speed["device"],
                    mode="compiled" if speed["compiled"] else "eager",
                    dtype=speed["dtype"],
                    speedup={speed["batch_size"]: speed["speedup"]},
                )
            )
    manifest = Manifest(
        name=out_name,
        architecture=teacher_manifest.architecture,
        architecture_kwargs=teacher_manifest.architecture_kwargs,
        variant="compressed",
        compression=cfg,
        num_classes=teacher_manifest.num_classes,
        preprocessing=teacher_manifest.preprocessing,
        source=Source(
            kind="derived" if derived_from else "compress", ref=teacher_name, details=details
        ),
        teacher=derived_from,
        description=description,
        figures=figures,
        metrics=metrics,
    )
    if derived_from:
        store.declare(manifest)
    else:
        store.write_entry(manifest, student.cpu().state_dict())
    return store.manifest(out_name)
