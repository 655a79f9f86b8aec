"""The training command of one cross-fitting fold (``bench/scripts/cross_fit.sh``).

A fold is the entry's own recorded recipe (:func:`app.store.build.recorded_command`, as
``vitserve store build`` runs it) with half of imagenet-extra in place of all of it, its
own seed and name, the photos where this machine keeps them, and optionally other
distillation options or another compression config (a recipe under test rather than the
recorded one). Printed as one shell line for the script to run::

    python -m app.bench.cross_fit --store model_store --entry deit_tiny-merge-t5 \\
        --seed 1 --extra /tmp/cross-fit/extra-a --out deit_tiny-merge-t5-s1-fold-a
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
from pathlib import Path

from app.store import ModelStore
from app.store.build import recorded_command, with_options

SHARED_IMAGES = "../shared/images"  # where recorded recipes read their photos


def set_value(args: list[str], flag: str, value: str | None) -> list[str]:
    """``args`` with ``flag``'s value replaced (None: the flag and its value dropped)."""
    args = list(args)
    if flag not in args:
        return args if value is None else [*args, flag, value]
    i = args.index(flag)
    if value is None:
        del args[i : i + 2]
    else:
        args[i + 1] = value
    return args


# options that the recorded command sets as flags of `compress`, which override --options
FLAG_OPTIONS = {"steps": "--steps", "batch_size": "--batch-size"}


def fold_args(
    args: list[str],
    *,
    seed: int,
    extra: Path,
    out: str,
    images: Path | None = None,
    train_only: bool = False,
    options: dict | None = None,
    config: str | None = None,
) -> list[str]:
    """The recorded ``compress`` arguments turned into one fold's."""
    if images is not None:
        args = [
            str(images) + a[len(SHARED_IMAGES) :] if a.startswith(SHARED_IMAGES) else a
            for a in args
        ]
    args = set_value(args, "--extra-images", str(extra))
    args = set_value(args, "--seed", str(seed))
    args = set_value(args, "--out", out)
    args = set_value(args, "--speed-arch", "none")  # a fold is scored for fidelity alone
    if train_only:
        args = set_value(args, "--eval-images", None)
    if config is not None:
        args = set_value(args, "--config", config)
    options = dict(options or {})
    for key, flag in FLAG_OPTIONS.items():  # compress's own flags win over its --options
        if key in options:
            args = set_value(args, flag, str(options.pop(key)))
    return with_options(args, options) if options else args


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", type=Path, default=Path("model_store"))
    p.add_argument("--entry", required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--extra", type=Path, required=True, help="this fold's half of extra")
    p.add_argument("--out", required=True, help="the fold's entry name")
    p.add_argument("--images", type=Path, help=f"where {SHARED_IMAGES}'s folders are here")
    p.add_argument("--train-only", action="store_true", help="no evaluation on dev")
    p.add_argument("--options", type=json.loads, help="JSON merged into the recipe's options")
    p.add_argument("--config", help="another compression config (preset or text) to distil")
    args = p.parse_args(argv)
    env, recorded = recorded_command(ModelStore(args.store).manifest(args.entry))
    compress = fold_args(
        recorded,
        seed=args.seed,
        extra=args.extra,
        out=args.out,
        images=args.images,
        train_only=args.train_only,
        options=args.options,
        config=args.config,
    )
    # the caller's environment wins over the recorded prefix, as in `vitserve store build`
    prefix = [f"{k}={v}" for k, v in env.items() if k not in os.environ]
    print(shlex.join([*prefix, "python3", "-m", "app", "compress", *compress]))


if __name__ == "__main__":
    main()
