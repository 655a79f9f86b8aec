"""``vitserve store build NAME``: run the recipe a distilled entry's manifest records.

The recorded command is run as recorded (its environment prefix included, the user's
environment winning), from the store's parent folder, where it was recorded, with a
checkpoint folder inside the entry so that an interrupted build resumes. The weights'
checksum lands in ``local.json`` (the manifest stays as declared), and the agreement the
build measured is set beside the declared figure.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

from app.store.errors import StoreError
from app.store.manifest import Manifest
from app.store.store import ModelStore

ENV_ASSIGNMENT = "="


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


def with_checkpoints(args: list[str], every: int) -> list[str]:
    """``args`` with ``checkpoint_every`` merged into ``--options`` (it changes no result)."""
    args = list(args)
    if "--options" in args:
        i = args.index("--options") + 1
        args[i] = json.dumps({**json.loads(args[i]), "checkpoint_every": every})
    else:
        args += ["--options", json.dumps({"checkpoint_every": every})]
    return args


def build_argv(
    store: ModelStore, name: str, *, device: str | None = None, checkpoint_every: int = 50
) -> tuple[dict[str, str], list[str]]:
    """Environment and argv of the build subprocess."""
    env, args = recorded_command(store.manifest(name))
    argv = [sys.executable, "-m", "app", *["compress", *with_checkpoints(args, checkpoint_every)]]
    argv += ["--store", str(store.root.resolve())]
    argv += ["--checkpoint-dir", str((store.root / name / "checkpoints").resolve()), "--resume"]
    if device:
        argv += ["--device", device]
    return env, argv


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
