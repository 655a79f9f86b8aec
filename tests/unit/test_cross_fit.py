"""A cross-fitting fold runs the entry's recorded recipe, changed only where the fold must."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from app.bench.cross_fit import fold_args, main
from app.store import ModelStore
from app.store.build import recorded_command

STORE = Path("model_store")


def recorded(entry: str) -> list[str]:
    return recorded_command(ModelStore(STORE).manifest(entry))[1]


def test_a_fold_changes_only_its_half_of_extra_seed_name_and_photo_folder() -> None:
    args = recorded("deit_tiny-merge-t5-gpu")
    fold = fold_args(
        args, seed=7, extra=Path("/w/extra-a"), out="f-a", images=Path("/data"), train_only=True
    )
    flags = dict(zip(fold[::2], fold[1::2], strict=True))
    assert flags["--extra-images"] == "/w/extra-a" and flags["--seed"] == "7"
    assert flags["--out"] == "f-a" and flags["--images"] == "/data/imagenet-train"
    assert "--eval-images" not in flags
    assert flags["--speed-arch"] == "none"  # folds are for fidelity: no minutes of timing
    same = {k: v for k, v in zip(args[::2], args[1::2], strict=True) if k in flags}
    changed = {"--extra-images", "--seed", "--out", "--images", "--speed-arch"}
    assert {k: v for k, v in same.items() if k not in changed} == {
        k: v for k, v in flags.items() if k not in changed
    }


def test_options_under_test_merge_into_the_recorded_ones() -> None:
    args = recorded("deit_tiny-merge-t5-gpu")
    fold = fold_args(args, seed=1, extra=Path("e"), out="o", options={"merged_features": "aligned"})
    options = json.loads(fold[fold.index("--options") + 1])
    assert options["merged_features"] == "aligned" and options["lr"] == 0.0001
    assert options["augment"]["mix_prob"] == 0.0


def test_steps_under_test_replace_the_recorded_flag() -> None:
    """``compress --steps`` overrides ``--options``, so a longer run must change the flag."""
    args = recorded("deit_tiny-merge-t5-gpu")
    fold = fold_args(args, seed=1, extra=Path("e"), out="o", options={"steps": 1600, "lr": 5e-5})
    assert fold[fold.index("--steps") + 1] == "1600"
    options = json.loads(fold[fold.index("--options") + 1])
    assert "steps" not in options and options["lr"] == 5e-5


def test_the_printed_line_runs_compress(capsys, monkeypatch) -> None:
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    main(["--entry", "deit_tiny-merge-t6", "--seed", "0", "--extra", "e", "--out", "o"])
    words = shlex.split(capsys.readouterr().out)
    assert words[0] == "HF_HUB_CACHE=../shared/hf-cache"  # the recorded prefix, unset here
    assert words[words.index("python3") : words.index("python3") + 4] == [
        "python3", "-m", "app", "compress",
    ]  # fmt: skip


def test_another_schedule_replaces_only_the_config() -> None:
    args = recorded("deit_tiny-merge-t5-gpu")
    text = "merge=38@0,29@1,23@3,18@4,14@7;proportional=off"
    fold = fold_args(args, seed=0, extra=Path("e"), out="o", config=text)
    assert fold[fold.index("--config") + 1] == text
    assert fold[fold.index("--options") + 1] == args[args.index("--options") + 1]
