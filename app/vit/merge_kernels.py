"""Token merging's matching as two Triton kernels (CUDA; imported only where Triton is).

At served batch sizes (16-64) the eager matching was a dozen small launches per merging
block -- normalise, a ``[B, A, B]`` similarity written out and read back, max, two sorts,
gathers -- costing more than the tokens it removes. Here it is two launches:

* :func:`best_matches`: per tile of A tokens, L2-normalise the keys, take the cosine with
  every B token chunk by chunk and keep a running row max / argmax in registers, so the
  score matrix never reaches memory. Scores are fp32 whatever the keys' dtype (fewer ties
  than bf16 scores; only their order is used).
* :func:`matching_positions`: one program per image ranks its A tokens by counting (the
  rule of :func:`app.vit.merge.match_ranks`, ties to the earlier token) and writes the
  :class:`~app.vit.merge.Matching` index tensors directly.

Both are ``torch.library.triton_op`` s: ``torch.compile(fullgraph=True)`` sees the kernels
(no graph break), the functions themselves serve as fake kernels (shapes are known before
the launch), and CUDA graphs capture them like any launch. Block sizes are fixed (no
autotuning), so warm-up and capture do no extra work.
"""

# No ``from __future__ import annotations``: triton_op infers each op's schema from the
# annotations, and real objects need no string resolution in any torch (the device: 2.11).
import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

BLOCK_M = 16  # A tokens per program: at batch 16 and 99 A tokens, 112 programs
BLOCK_N_MAX = 128  # B tokens per step: all 98 of a 224 px DeiT in one
MIN_DOT = 16  # tl.dot's smallest block side


@triton.jit
def _normalised_rows(ptr, rows, row_mask, cols, col_mask, stride_n, stride_d):
    """Rows ``rows`` of a ``[N, D]`` matrix, fp32, divided by their L2 norm (min 1e-12,
    as ``F.normalize``); masked rows and columns read as 0."""
    ptrs = ptr + rows[:, None] * stride_n + cols[None, :] * stride_d
    x = tl.load(ptrs, mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
    norm = tl.sqrt(tl.sum(x * x, axis=1))
    return x / tl.maximum(norm, 1e-12)[:, None]


@triton.jit
def _best_matches_kernel(
    keys_ptr,
    best_ptr,
    match_ptr,
    num_a,
    num_b,
    dim,
    stride_b,
    stride_n,
    stride_d,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    image = tl.program_id(1)
    image_keys = keys_ptr + image * stride_b
    a = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    a_MD = _normalised_rows(image_keys, 2 * a, a < num_a, d, d < dim, stride_n, stride_d)
    best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    match = tl.zeros([BLOCK_M], tl.int32)
    for start in range(0, num_b, BLOCK_N):
        b = start + tl.arange(0, BLOCK_N)
        b_ND = _normalised_rows(image_keys, 2 * b + 1, b < num_b, d, d < dim, stride_n, stride_d)
        scores = tl.dot(a_MD, tl.trans(b_ND), input_precision="ieee")
        scores = tl.where((b < num_b)[None, :], scores, float("-inf"))
        step_best, step_match = tl.max(scores, axis=1, return_indices=True)
        better = step_best > best  # strictly: a tie keeps the earlier B token, as torch.max
        best = tl.where(better, step_best, best)
        match = tl.where(better, step_match + start, match)
    best = tl.where(a == 0, float("-inf"), best)  # CLS: never merged
    match = tl.where(a == 0, 0, match)
    out = image * num_a + a
    tl.store(best_ptr + out, best, mask=a < num_a)
    tl.store(match_ptr + out, match.to(tl.int64), mask=a < num_a)


@triton.jit
def _positions_kernel(
    best_ptr,
    match_ptr,
    slot_ptr,
    src_ptr,
    dst_ptr,
    num_a,
    num_b,
    r,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    image = tl.program_id(0)
    a = tl.arange(0, BLOCK_A)
    valid = a < num_a
    best = tl.load(best_ptr + image * num_a + a, mask=valid, other=float("-inf"))
    s_i, s_j = best[:, None], best[None, :]
    ahead = (s_j > s_i) | ((s_j == s_i) & (a[None, :] < a[:, None]))
    rank = tl.sum((ahead & valid[None, :]).to(tl.int32), axis=1)
    kept = valid & (rank >= r)
    merged = valid & (rank < r)
    num_kept = num_a - r
    slots = num_kept + num_b
    kept_slot = tl.cumsum(kept.to(tl.int32), axis=0) - 1
    tl.store(slot_ptr + image * slots + kept_slot, (2 * a).to(tl.int64), mask=kept)
    b = tl.arange(0, BLOCK_B)
    tl.store(slot_ptr + image * slots + num_kept + b, (2 * b + 1).to(tl.int64), mask=b < num_b)
    match = tl.load(match_ptr + image * num_a + a, mask=valid, other=0)
    tl.store(src_ptr + image * r + rank, (2 * a).to(tl.int64), mask=merged)
    tl.store(dst_ptr + image * r + rank, num_kept + match, mask=merged)


@triton_op("vitserve::best_matches", mutates_args={})
def best_matches(keys_BNK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`app.vit.merge.best_matches` in one kernel: fp32 scores ``[B, A]`` (CLS -inf)
    and int64 B-token indices ``[B, A]``."""
    B, N, D = keys_BNK.shape
    num_a, num_b = (N + 1) // 2, N // 2
    best_BA = keys_BNK.new_empty(B, num_a, dtype=torch.float32)
    match_BA = keys_BNK.new_empty(B, num_a, dtype=torch.int64)
    grid = (triton.cdiv(num_a, BLOCK_M), B)
    wrap_triton(_best_matches_kernel)[grid](
        keys_BNK,
        best_BA,
        match_BA,
        num_a,
        num_b,
        D,
        keys_BNK.stride(0),
        keys_BNK.stride(1),
        keys_BNK.stride(2),
        BLOCK_M=BLOCK_M,
        BLOCK_N=max(MIN_DOT, min(BLOCK_N_MAX, triton.next_power_of_2(num_b))),
        BLOCK_D=max(MIN_DOT, triton.next_power_of_2(D)),
    )
    return best_BA, match_BA


@triton_op("vitserve::matching_positions", mutates_args={})
def matching_positions(
    best_BA: torch.Tensor, match_BA: torch.Tensor, r: int, num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``slot_pos [B, N - r, 1]``, ``src_pos [B, r, 1]``, ``dst_slot [B, r, 1]`` of a
    :class:`~app.vit.merge.Matching`, from :func:`best_matches`' outputs (contiguous)."""
    B, num_a = best_BA.shape
    num_b = num_tokens // 2
    slot_pos = match_BA.new_empty(B, num_tokens - r, 1)
    src_pos = match_BA.new_empty(B, r, 1)
    dst_slot = match_BA.new_empty(B, r, 1)
    wrap_triton(_positions_kernel)[(B,)](
        best_BA,
        match_BA,
        slot_pos,
        src_pos,
        dst_slot,
        num_a,
        num_b,
        r,
        BLOCK_A=triton.next_power_of_2(num_a),
        BLOCK_B=triton.next_power_of_2(num_b),
    )
    return slot_pos, src_pos, dst_slot
