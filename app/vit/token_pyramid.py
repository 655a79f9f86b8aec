"""GLAD token pyramid: a learned linear map along the token axis shrinks the sequence.

Later blocks only need a coarse summary of the image, so before selected blocks the patch
tokens are aggregated (e.g. 196 -> 98 -> 49 -> 25) by a learned ``[N_out-1, N_in-1]``
matrix shared by all channels; CLS is passed through unchanged. The matrix starts as
adaptive average pooling over the patch grid (14x14 -> 14x7 -> 7x7 -> 5x5), so the
compressed model starts close to the dense one, and fine-tuning learns the rest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from app.vit.token_mix import token_mix

Grid = tuple[int, int]  # (rows, cols) of patch tokens, row-major in the sequence

# An output grid may deviate this much (ratio) from the input grid's aspect; 14x14 -> 14x7
# (98 tokens) is 2. Beyond it the pooling would smear along one axis: pool 1-D instead.
MAX_ASPECT_CHANGE = 2.0


def choose_grid(num_patches: int, grid_in: Grid | None) -> Grid | None:
    """The ``h x w == num_patches`` grid closest to ``grid_in``'s aspect, or None for 1-D.

    Candidates must fit inside ``grid_in`` (pooling, not upsampling); ties go to more rows.
    None (no fitting factorisation, or already 1-D) means pool the flattened sequence.
    """
    if grid_in is None:
        return None
    rows_in, cols_in = grid_in
    best, best_cost = None, math.inf
    for rows in range(min(rows_in, num_patches), 0, -1):
        cols = num_patches // rows
        if rows * cols != num_patches or cols > cols_in:
            continue
        cost = abs(math.log((rows / cols) / (rows_in / cols_in)))
        if cost < best_cost:
            best, best_cost = (rows, cols), cost
    return best if best_cost <= math.log(MAX_ASPECT_CHANGE) + 1e-9 else None


def pyramid_grids(grid: Grid, patch_counts: Sequence[int]) -> list[Grid | None]:
    """Grid after each aggregation stage, tracked from stage to stage (None: 1-D from there)."""
    grids: list[Grid | None] = []
    current: Grid | None = grid
    for num_patches in patch_counts:
        current = choose_grid(num_patches, current)
        grids.append(current)
    return grids


def adaptive_pool_matrix_1d(n_in: int, n_out: int) -> torch.Tensor:
    """``[n_out, n_in]`` matrix of ``F.adaptive_avg_pool1d``: row i averages its window."""
    pool_OI = torch.zeros(n_out, n_in)
    for i in range(n_out):
        start, end = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        pool_OI[i, start:end] = 1.0 / (end - start)
    return pool_OI


def adaptive_pool_matrix(
    n_in: int, n_out: int, grid_in: Grid | None, grid_out: Grid | None
) -> torch.Tensor:
    """``[n_out, n_in]`` adaptive average pooling of patch tokens; every row sums to 1.

    With both grids it is 2-D pooling of the row-major patch grid (``kron`` of the per-axis
    1-D poolings); with ``grid_out`` None it pools the flattened sequence.
    """
    if grid_out is None or grid_in is None:
        return adaptive_pool_matrix_1d(n_in, n_out)
    if grid_in[0] * grid_in[1] != n_in or grid_out[0] * grid_out[1] != n_out:
        raise ValueError(f"grids {grid_in} -> {grid_out} do not hold {n_in} -> {n_out} tokens")
    rows_OI = adaptive_pool_matrix_1d(grid_in[0], grid_out[0])
    cols_OI = adaptive_pool_matrix_1d(grid_in[1], grid_out[1])
    return torch.kron(rows_OI, cols_OI)


class TokenAggregation(nn.Module):
    """``[B, N_in, C] -> [B, N_out, C]``: CLS (index 0) kept, patch tokens mixed by ``weight``."""

    def __init__(
        self,
        num_tokens_in: int,
        num_tokens_out: int,
        grid_in: Grid | None = None,
        grid_out: Grid | None = None,
    ) -> None:
        """Token counts include CLS; the grids (of patch tokens) only shape the pooling init."""
        super().__init__()
        self.num_tokens_in = num_tokens_in
        self.num_tokens_out = num_tokens_out
        self.grid_in = grid_in
        self.grid_out = grid_out
        pool_OI = adaptive_pool_matrix(num_tokens_in - 1, num_tokens_out - 1, grid_in, grid_out)
        self.weight = nn.Parameter(pool_OI)  # [N_out-1, N_in-1]

    def forward(self, x_BNC: torch.Tensor) -> torch.Tensor:
        cls_B1C, patches_BPC = x_BNC[:, :1], x_BNC[:, 1:]
        pooled_BQC = token_mix(patches_BPC, self.weight.unsqueeze(0))
        return torch.cat([cls_B1C, pooled_BQC], dim=1)

    def extra_repr(self) -> str:
        grids = f", grid {self.grid_in} -> {self.grid_out}" if self.grid_out else ""
        return f"{self.num_tokens_in} -> {self.num_tokens_out} tokens{grids}"
