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
from tests.helpers import TINY_VIT
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
            assert_same_training(key, start[key], value, state[key])


# Two ranks sum each gradient in another order than one process does, so the two runs
# differ by float32 rounding, not by a machine's luck. One n-term sum is off by at most
# about n * eps relatively; a weight's gradient sums batch x views x tokens terms. AdamW
# divides each gradient by its own running magnitude, which enlarges the rounding of
# elements whose gradient is small: 32x headroom covers that (measured: a tensor's
# travel differs by at most ~3 n * eps), while a rank on the wrong shard of the batch or
# gradients left unsynchronised change a tensor's travel by tens of per cent.
TOKENS = (TINY_VIT["img_size"] // TINY_VIT["patch_size"]) ** 2 + 1
SUMMED_TERMS = OPTS.batch_size * OPTS.views * TOKENS
TRAVEL_RTOL = 32 * SUMMED_TERMS * torch.finfo(torch.float32).eps
# AdamW moves an element by about lr per step whatever its gradient's size.
ADAM_BOUND = 2 * OPTS.steps * OPTS.lr


def assert_same_training(
    key: str, start: torch.Tensor, single: torch.Tensor, ranked: torch.Tensor
) -> None:
    """Each tensor travelled the same way from ``start``, within float32 rounding.

    The key bias is the exception: softmax ignores a shift shared by a query's logits,
    so its gradient is exactly zero and AdamW turns the rounding alone into steps of
    about lr, in either direction. Those elements are only held to AdamW's bound."""
    noise_only = torch.zeros_like(single, dtype=torch.bool)
    if key.endswith("attn.qkv.bias"):
        dim = single.shape[0] // 3
        noise_only[dim : 2 * dim] = True
    assert torch.all((ranked - single)[noise_only].abs() <= ADAM_BOUND), key
    travel = (single - start)[~noise_only]
    gap = (ranked - single)[~noise_only]
    assert gap.norm() <= TRAVEL_RTOL * travel.norm(), (
        f"{key}: ranks end {float(gap.norm() / travel.norm()):.2e} of the travel away "
        f"(float32 allows {TRAVEL_RTOL:.2e})"
    )
