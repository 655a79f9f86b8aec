"""The ``vitserve`` command: serve, manage the model store, analyze, compress, bench."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import NoReturn

from pydantic import ValidationError

from app.config import Settings
from app.store.cli import add_store_commands, store_from


def cmd_serve(args: argparse.Namespace) -> int:
    from app.serve import serve

    return serve(
        {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    )


def cmd_analyze(args: argparse.Namespace) -> int:
    from app.train.analysis import analyze
    from app.train.data import list_images

    loaded = store_from(args).load(args.model)
    report = analyze(
        loaded.module,
        list_images(args.images),
        args.out,
        loaded.manifest.preprocessing.timm_data_config(),
        max_images=args.max_images,
        device=args.device,
    )
    print(f"proposed config: {report.proposed}")
    print(f"wrote {args.out}")
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from app.jobs.compress import run_compress, run_training_free
    from app.train.options import DistillOptions
    from app.vit.builder import resolve_config

    options = json.loads(args.options) if args.options else {}
    for key in ("steps", "batch_size", "lr", "seed", "time_budget_s", "device"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    if args.checkpoint_dir:
        options.update(checkpoint_dir=args.checkpoint_dir, resume=args.resume)
    if (args.config is None) == (args.r is None):
        raise ValueError("give exactly one of --config and --r")
    cfg = resolve_config(args.config if args.r is None else f"merge={args.r}")
    if args.family and args.family != cfg.family:
        raise ValueError(f"--family {args.family} but {cfg} is of family {cfg.family}")
    slug = re.sub(r"[^a-z0-9_.-]+", "-", str(cfg).replace("@", "at").replace("=", ""))
    out = args.out or f"{args.teacher}-{slug}"[:64]
    if args.images is None:
        manifest = run_training_free(
            store_from(args),
            args.teacher,
            cfg,
            args.eval_images,
            out,
            device=args.device or "auto",
            seed=args.seed or 0,
            speed_arch=args.speed_arch,
        )
        print(json.dumps(manifest.metrics, indent=2))
        print(f"wrote store entry {manifest.name} (training-free)")
        return 0
    manifest = run_compress(
        store_from(args),
        args.teacher,
        cfg,
        args.images,
        args.eval_images,
        out,
        DistillOptions(**options),
        extra_train_dirs=args.extra_images,
        speed_arch=args.speed_arch,
    )
    if manifest is not None:
        print(json.dumps(manifest.metrics, indent=2))
        print(f"wrote store entry {manifest.name}")
    return 0


def cmd_bench_models(args: argparse.Namespace) -> int:
    from app.bench.models import main as bench_main

    bench_main(args.extra)
    return 0


def cmd_bench_service(args: argparse.Namespace) -> int:
    from app.bench.service import main as service_main

    return service_main(args.extra)


def cmd_report(args: argparse.Namespace) -> int:
    from app.bench.report import main as report_main

    return report_main(["--check"] if args.check else [])


class OneLineErrorParser(argparse.ArgumentParser):
    """A bad flag or value is one line on stderr and exit 2, like every other bad setting."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def setting_error(exc: Exception) -> str:
    """One line for a bad setting: which field, its environment variable, what is wrong."""
    if not isinstance(exc, ValidationError):
        return " ".join(str(exc).split())
    problems = []
    for err in exc.errors():
        field = ".".join(str(part) for part in err["loc"])
        env = f"VITSERVE_{str(err['loc'][0]).upper()}" if err["loc"] else "VITSERVE_*"
        problems.append(f"{field} ({env}): {err['msg']}, got {err.get('input')!r}")
    return "invalid setting " + "; ".join(problems)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="vitserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP service (uvicorn)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--store-dir", dest="store_dir", type=Path)
    serve.add_argument("--default-model", dest="default_model")
    serve.add_argument("--device", choices=["auto", "cuda", "cpu"])
    serve.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    serve.add_argument("--max-batch-size", dest="max_batch_size", type=int)
    serve.add_argument("--max-delay-ms", dest="max_delay_ms", type=float)
    serve.add_argument("--compile", action="store_true", default=None)
    serve.add_argument("--workers", type=int, help="HTTP worker processes")
    serve.add_argument("--http-server", dest="http_server", choices=["uvicorn", "granian"])
    serve.set_defaults(func=cmd_serve)

    add_store_commands(sub)

    analyze = sub.add_parser("analyze", help="attention similarity and rank per layer; a config")
    analyze.add_argument("--model", required=True, help="dense store entry")
    analyze.add_argument("--images", type=Path, required=True, help="folder of images")
    analyze.add_argument("--out", type=Path, default=Path("runs/analysis"))
    analyze.add_argument("--max-images", dest="max_images", type=int, default=64)
    analyze.add_argument("--device", default="cpu")
    analyze.add_argument("--store", type=Path)
    analyze.set_defaults(func=cmd_analyze)

    compress = sub.add_parser(
        "compress", help="calibrate + distil a compressed variant into a new store entry"
    )
    compress.add_argument("--teacher", required=True, help="dense store entry")
    compress.add_argument("--config", help="preset name or config text")
    compress.add_argument("--family", choices=["glad", "merge", "hybrid"], help="checked")
    compress.add_argument("--r", type=int, help="token merging: r tokens per block (no training)")
    compress.add_argument(
        "--images", type=Path, help="training images (omit for training-free merging)"
    )
    compress.add_argument("--extra-images", dest="extra_images", type=Path, nargs="*", default=[])
    compress.add_argument("--eval-images", dest="eval_images", type=Path, help="held-out folder")
    compress.add_argument("--out", help="new entry name")
    compress.add_argument("--steps", type=int)
    compress.add_argument("--batch-size", dest="batch_size", type=int)
    compress.add_argument("--lr", type=float)
    compress.add_argument("--seed", type=int)
    compress.add_argument("--time-budget", dest="time_budget_s", type=float, help="seconds")
    compress.add_argument("--device")
    compress.add_argument("--checkpoint-dir", dest="checkpoint_dir", type=Path)
    compress.add_argument("--resume", action="store_true")
    compress.add_argument("--options", help="JSON of further DistillOptions fields")
    compress.add_argument(
        "--speed-arch",
        dest="speed_arch",
        default="deit_small_patch16_224",
        type=lambda v: None if v == "none" else v,
        help="architecture the config's speed is measured on; 'none' skips the measurement",
    )
    compress.add_argument("--store", type=Path)
    compress.set_defaults(func=cmd_compress)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(
        dest="bench_command", required=True
    )
    models = bench.add_parser(
        "models", help="dense vs compressed throughput (-h lists its flags)", add_help=False
    )
    models.set_defaults(func=cmd_bench_models, passes_through=True)
    service = bench.add_parser(
        "service",
        help="end-to-end service speed, dense vs compressed (-h lists its flags)",
        add_help=False,
    )
    service.set_defaults(func=cmd_bench_service, passes_through=True)

    report = sub.add_parser(
        "report", help="write the docs' tables from bench/results/ (see current.toml there)"
    )
    report.add_argument("--check", action="store_true", help="write nothing; exit 1 if stale")
    report.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "passes_through", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    try:
        sys.exit(args.func(args))
    except Exception as exc:  # noqa: BLE001 - a CLI prints the reason, not a traceback
        from app.store import StoreError

        if isinstance(exc, StoreError | ValueError | FileNotFoundError):
            print(f"error: {setting_error(exc)}", file=sys.stderr)
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
