"""The torchrun path on CPU: ranks take disjoint shares of each global batch, views do
not depend on which process makes them, and two gloo processes end with the same student
as one process taking whole batches (the phase switch, which re-wraps DDP, included)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

from app.bench.server import free_port
from app.train.data import DistillViews, StepBatches, ViewAugment
from app.train.distill import distill
from app.train.options import DistillOptions
from app.vit.builder import compress
from tests.unit.test_distill import CFG, one_thread  # noqa: F401 - autouse fixture, applies here too
from tests.unit.test_evaluate import DATA_CONFIG, tiny_teacher, write_images

WORLD = 2
OPTS = DistillOptions(
    steps=4, batch_size=8, views=2, lr=1e-3, warmup=1, phase1_steps=2, num_workers=0
)


def _rank_main(rank: int, port: int, photos: list[Path], out: Path) -> None:
    """One torchrun-style process: the env vars torchrun would set, then plain distill()."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
    )
    torch.set_num_threads(1)
    teacher = tiny_teacher()
    student = compress(teacher, CFG)
    distill(teacher, student, photos, OPTS, data_config=DATA_CONFIG)
    torch.save(student.state_dict(), out / f"rank{rank}.pt")


def test_step_batches_split_the_global_batch() -> None:
    whole = list(StepBatches(3, 5, 8))
    shards = [list(StepBatches(3, 5, 8, rank=r, world=4)) for r in range(4)]
    assert whole == [list(range(24, 32)), list(range(32, 40))]  # steps 3 and 4
    for step, batch in enumerate(whole):
        assert sum((shard[step] for shard in shards), []) == batch


def test_views_do_not_depend_on_the_process(tmp_path: Path) -> None:
    """Loader workers (which skip restoring RNG states) make the same views as the caller."""
    views = DistillViews(write_images(tmp_path, 5), DATA_CONFIG, ViewAugment(), seed=7, views=2)
    batches = StepBatches(2, 5, 6)
    direct = [torch.stack([views[k] for k in idx]) for idx in batches]
    loaded = list(DataLoader(views, batch_sampler=batches, num_workers=2))
    assert len(loaded) == 3 and all(torch.equal(a, b) for a, b in zip(direct, loaded, strict=True))
    assert not torch.equal(direct[0][0], direct[0][1])  # two views of one photo differ


def test_two_processes_match_one(tmp_path: Path) -> None:
    photos = write_images(tmp_path / "photos", 6)
    # fork: the ranks inherit the imported modules (spawn re-imports torch and the app in
    # each, ~10 s); each sets one thread first, as DataLoader workers do after a fork.
    mp.start_processes(
        _rank_main, args=(free_port(), photos, tmp_path), nprocs=WORLD, start_method="fork"
    )

    teacher = tiny_teacher()
    single = compress(teacher, CFG)
    distill(teacher, single, photos, OPTS, data_config=DATA_CONFIG)
    start = compress(teacher, CFG).state_dict()
    trained = single.state_dict()
    assert all(not torch.equal(trained[k], start[k]) for k in trained)  # phase 2 moved them all
    for rank in range(WORLD):
        state = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for key, value in trained.items():
            torch.testing.assert_close(state[key], value, rtol=1e-4, atol=1e-5, msg=key)
