"""``vitserve store``: create, list, verify, build and share the model store's entries."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from app.config import Settings

if TYPE_CHECKING:  # imported when a command runs: `vitserve --help` needs no torch
    from app.store import ModelStore


def store_from(args: argparse.Namespace) -> ModelStore:
    """The store ``--store`` names, else the settings' (``VITSERVE_STORE_DIR``)."""
    from app.store import ModelStore

    return ModelStore(args.store or Settings().store_dir)


def cmd_store_pull(args: argparse.Namespace) -> int:
    from app.store.pull import pull

    manifest = pull(store_from(args), args.arch, name=args.name)
    print(f"pulled {manifest.name}: sha256 {manifest.weights.sha256}")
    return 0


def cmd_store_import(args: argparse.Namespace) -> int:
    from app.store.pull import import_checkpoint

    manifest = import_checkpoint(store_from(args), Path(args.file), args.arch, name=args.name)
    print(f"imported {manifest.name}: sha256 {manifest.weights.sha256}")
    return 0


def cmd_store_random(args: argparse.Namespace) -> int:
    from app.store.pull import random_entry

    manifest = random_entry(
        store_from(args), args.arch, name=args.name, config=args.config, seed=args.seed
    )
    print(f"created {manifest.name} ({manifest.variant}, random weights)")
    return 0


def cmd_store_build(args: argparse.Namespace) -> int:
    from app.store.build import build

    build(
        store_from(args),
        args.name,
        device=args.device,
        checkpoint_every=args.checkpoint_every,
        dry_run=args.dry_run,
    )
    return 0


def cmd_store_export(args: argparse.Namespace) -> int:
    from app.store.share import export_archive

    out = export_archive(store_from(args), args.name, Path(args.output or f"{args.name}.tar"))
    print(f"exported {args.name} to {out}")
    return 0


def cmd_store_import_archive(args: argparse.Namespace) -> int:
    from app.store.share import import_archive

    manifest = import_archive(store_from(args), Path(args.file))
    print(f"imported {manifest.name}: sha256 {manifest.weights.sha256}")
    return 0


def cmd_store_push(args: argparse.Namespace) -> int:
    from app.store.share import push

    print(f"pushed {args.name} to {args.repo}: {push(store_from(args), args.name, args.repo)}")
    return 0


def cmd_store_pull_entry(args: argparse.Namespace) -> int:
    from app.store.share import pull_entry

    manifest = pull_entry(store_from(args), args.name, args.repo, revision=args.revision)
    print(f"pulled {manifest.name} from {args.repo}: sha256 {manifest.weights.sha256}")
    return 0


def cmd_store_list(args: argparse.Namespace) -> int:
    from app.store import StoreError

    store = store_from(args)
    rows = []
    for name in store.names():
        try:
            m = store.manifest(name)
            weights = "present" if store.has_weights(name) else "absent"
            if m.teacher is not None:
                weights += f" (derived from {m.teacher.name})"
            rows.append((name, m.variant, m.architecture, str(m.compression or "-"), weights))
        except StoreError as exc:
            rows.append((name, "?", "?", "?", f"invalid: {exc}"))
    if args.json:
        print(
            json.dumps(
                [
                    dict(zip(("name", "variant", "arch", "compression", "weights"), r, strict=True))
                    for r in rows
                ],
                indent=2,
            )
        )
        return 0
    widths = [
        max(
            len(str(r[i]))
            for r in rows + [("name", "variant", "architecture", "compression", "weights")]
        )
        for i in range(5)
    ]
    for r in [("name", "variant", "architecture", "compression", "weights"), *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))
    return 0


def cmd_store_verify(args: argparse.Namespace) -> int:
    from app.store import StoreError

    store = store_from(args)
    failed = 0
    for name in args.names or store.names():
        try:
            store.load(name)
            print(f"ok       {name}")
        except StoreError as exc:
            failed += 1
            print(f"FAILED   {name}: {exc}")
    return 1 if failed else 0


def add_store_commands(sub: argparse._SubParsersAction) -> None:
    """``store`` and its subcommands, under the ``vitserve`` command's ``sub``."""
    store = sub.add_parser("store", help="manage the model store").add_subparsers(
        dest="store_command", required=True
    )
    for name, func, help_ in (
        ("pull", cmd_store_pull, "create an entry from timm's pretrained weights (HF hub/cache)"),
        ("import", cmd_store_import, "create an entry from a local .pth/.safetensors checkpoint"),
        ("random", cmd_store_random, "create an entry with random weights (speed tests only)"),
        ("list", cmd_store_list, "list entries"),
        ("verify", cmd_store_verify, "check manifests, checksums and tensor shapes"),
        ("build", cmd_store_build, "run a distilled entry's recorded recipe (resumable)"),
        ("export", cmd_store_export, "write an entry (manifest + weights) to one .tar"),
        ("import-archive", cmd_store_import_archive, "add an entry from an exported .tar"),
        ("push", cmd_store_push, "upload an entry to a Hugging Face Hub repo (folder NAME/)"),
        ("pull-entry", cmd_store_pull_entry, "fetch an entry pushed to a Hub repo"),
    ):
        p = store.add_parser(name, help=help_)
        p.add_argument("--store", type=Path, help="store folder (default: VITSERVE_STORE_DIR)")
        p.set_defaults(func=func)
        if name == "pull":
            p.add_argument("arch", help="timm model name, e.g. deit_tiny_patch16_224")
            p.add_argument("--name", help="entry name (default: the timm name)")
        elif name == "import":
            p.add_argument("file", help="checkpoint (.safetensors, or .pth read weights-only)")
            p.add_argument("--arch", required=True, help="timm model name of the checkpoint")
            p.add_argument("--name", help="entry name (default: the timm name)")
        elif name == "random":
            p.add_argument("arch", help="timm model name, e.g. deit_small_patch16_224")
            p.add_argument("--name", required=True, help="entry name")
            p.add_argument("--config", help="compression preset or config text (else dense)")
            p.add_argument("--seed", type=int, default=0)
        elif name == "list":
            p.add_argument("--json", action="store_true")
        elif name == "build":
            p.add_argument("name", help="entry whose manifest records a compress command")
            p.add_argument("--device", help="override the recipe's device (e.g. cpu)")
            p.add_argument("--checkpoint-every", dest="checkpoint_every", type=int, default=50)
            p.add_argument("--dry-run", dest="dry_run", action="store_true", help="print it")
        elif name == "export":
            p.add_argument("name")
            p.add_argument("-o", "--output", help="archive path (default: NAME.tar)")
        elif name == "import-archive":
            p.add_argument("file", help="a .tar written by `vitserve store export`")
        elif name in ("push", "pull-entry"):
            p.add_argument("name")
            p.add_argument("--repo", required=True, help="Hub repo id, e.g. org/vitserve-models")
            if name == "pull-entry":
                p.add_argument("--revision", help="branch, tag or commit (default: main)")
        else:
            p.add_argument("names", nargs="*", help="entries (default: all)")
