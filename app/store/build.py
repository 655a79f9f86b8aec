"""``vitserve store build NAME``: run the recipe a distilled entry's manifest records.

The recorded command is run as recorded (its environment prefix included, the user's
environment winning), from the store's parent folder, where it was recorded, with a
checkpoint folder inside the entry so that an interrupted build resumes. That folder
records the recipe that filled it, and a build of another recipe (the manifest's command
changed, other teacher weights, another device) refuses it rather than continue someone
else's run: resuming is only exact when it continues the same one. The weights' checksum
lands in ``local.json`` (the manifest stays as declared), and the agreement the build
measured is set beside the declared figure.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from app.store.errors import StoreError
from app.store.manifest import Manifest
from app.store.store import ModelStore, tensor_digest

ENV_ASSIGNMENT = "="
CHECKPOINT_FOLDER = "checkpoints"
RECIPE_FILE = "recipe.json"


def recorded_command(manifest: Manifest) -> tuple[dict[str, str], list[str]]:
    """The recipe's environment prefix and its ``compress`` arguments."""
    if manifest.teacher is not None:
        raise StoreError(
            f"{manifest.name} is derived from {manifest.teacher.name}: nothing to build, it is "
            "ready as soon as its teacher's weights are"
        )
    command = manifest.source.details.get("command") if manifest.source.kind == "compress" else None
    if not command:
        raise StoreError(
            f"{manifest.name} records no recipe to build (source {manifest.source.kind!r})"
        )
    words = shlex.split(command)
    env = {}
    while words and ENV_ASSIGNMENT in words[0] and not words[0].startswith("-"):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    if words[:2] != ["vitserve", "compress"]:
        raise StoreError(f"{manifest.name}: recorded command is not `vitserve compress`: {command}")
    return env, words[2:]


def with_options(args: list[str], update: dict[str, Any]) -> list[str]:
    """``compress`` arguments with ``update`` merged into their ``--options`` JSON."""
    args = list(args)
    if "--options" in args:
        i = args.index("--options") + 1
        args[i] = json.dumps({**json.loads(args[i]), **update})
    else:
        args += ["--options", json.dumps(update)]
    return args


def with_checkpoints(args: list[str], every: int) -> list[str]:
    """``args`` with ``checkpoint_every`` merged into ``--options`` (it changes no result)."""
    return with_options(args, {"checkpoint_every": every})


def build_argv(
    store: ModelStore, name: str, *, device: str | None = None, checkpoint_every: int = 50
) -> tuple[dict[str, str], list[str]]:
    """Environment and argv of the build subprocess."""
    env, args = recorded_command(store.manifest(name))
    argv = [sys.executable, "-m", "app", *["compress", *with_checkpoints(args, checkpoint_every)]]
    argv += ["--store", str(store.root.resolve())]
    argv += ["--checkpoint-dir", str(checkpoint_folder(store, name).resolve()), "--resume"]
    if device:
        argv += ["--device", device]
    return env, argv


def checkpoint_folder(store: ModelStore, name: str) -> Path:
    return store.root / name / CHECKPOINT_FOLDER


def recipe_identity(
    store: ModelStore, env: dict[str, str], args: list[str], device: str | None
) -> dict[str, Any]:
    """What decides the weights a build makes, so that a checkpoint can say which it is
    from: the recorded command, the teacher's weights (their tensors, not their file: a
    re-pulled teacher may differ) and the kind of device it trains on (CPU and CUDA runs
    do not round alike). Checkpoint frequency is left out: it changes no result."""
    teacher = args[args.index("--teacher") + 1] if "--teacher" in args else None
    return {
        "env": env,
        "args": args,
        "teacher": tensor_digest(store.load(teacher).module.state_dict()) if teacher else None,
        "device": device_kind(device),
    }


def device_kind(device: str | None) -> str:
    """``cpu`` or ``cuda``: what ``vitserve compress --device`` resolves ``device`` to
    (the store stays free of the training package, which the server never imports)."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device).type


def claim_checkpoints(folder: Path, identity: dict[str, Any]) -> None:
    """Refuse ``folder``'s checkpoints if another recipe made them (continuing them would
    give weights of neither recipe); with none there yet, record ``identity`` as theirs."""
    recorded_path = folder / RECIPE_FILE
    if not any(folder.glob("*.pt")):
        folder.mkdir(parents=True, exist_ok=True)
        recorded_path.write_text(json.dumps(identity, indent=2) + "\n")
        return
    if not recorded_path.is_file():
        raise StoreError(
            f"{folder} holds checkpoints that do not say which recipe made them: delete that "
            "folder to build from scratch"
        )
    recorded = json.loads(recorded_path.read_text())
    changed = sorted(
        k for k in identity.keys() | recorded.keys() if recorded.get(k) != identity.get(k)
    )
    if changed:
        raise StoreError(
            f"{folder} holds checkpoints of another recipe ({', '.join(changed)} differ): "
            "delete that folder to build from scratch, or build the recipe they are from"
        )


def build(
    store: ModelStore,
    name: str,
    *,
    device: str | None = None,
    checkpoint_every: int = 50,
    dry_run: bool = False,
) -> Manifest | None:
    """Run the recipe (progress from the distillation's bar), then verify the entry."""
    env, argv = build_argv(store, name, device=device, checkpoint_every=checkpoint_every)
    cwd = store.root.resolve().parent
    prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items() if k not in os.environ)
    print(f"building {name} in {cwd}:\n  {prefix} {shlex.join(argv)}".strip(), file=sys.stderr)
    if dry_run:
        return None
    recorded_env, recorded_args = recorded_command(store.manifest(name))
    identity = recipe_identity(store, recorded_env, recorded_args, device)
    claim_checkpoints(checkpoint_folder(store, name), identity)
    done = subprocess.run(argv, cwd=cwd, env={**env, **os.environ}, check=False)
    if done.returncode:
        raise StoreError(
            f"building {name} failed (exit {done.returncode}); run the same command again to "
            "resume from its last checkpoint"
        )
    manifest = store.verify(name)
    print(f"built {name}: sha256 {manifest.weights.sha256}", file=sys.stderr)
    measured = manifest.metrics.get("fidelity")
    declared = store.declared_manifest(name).figures.fidelity
    if measured and declared:
        lo, hi = declared[0].ci95
        print(
            f"agreement {measured['agreement_top1']:.3f} on {measured['n_images']} images; "
            f"declared {declared[0].agreement_top1:.3f} (95% {lo:.3f}-{hi:.3f}) on "
            f"{'+'.join(declared[0].eval_sets)}",
            file=sys.stderr,
        )
    return manifest
