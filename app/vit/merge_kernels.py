"""Token merging's matching and merge as Triton kernels (CUDA; imported only where Triton is).

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
* :func:`merge_tokens`: the size-weighted merge itself, where the torch path launches about
  nine small kernels (ones, multiply, two gathers and a ``scatter_add_`` for tokens and
  again for sizes, divide) costing about as much as the matching. Programs over (image,
  tile of output slots, tile of channels) gather their slots' tokens and add the merged-away
  tokens whose ``dst_slot`` falls in the tile through a one-hot product, in fp32, in a fixed
  order: deterministic, no atomics. Its gradient is a gather in torch (training only).

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
BLOCK_SLOTS = 32  # output slots per merge program: 6 tiles of DeiT's 184 after r = 13
BLOCK_CHANNELS = 64  # channels per merge program: 6 tiles of DeiT-S's 384
BLOCK_MERGED_MAX = 128  # merged-away tokens per step: all of r <= 98 in one
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


@triton.jit
def _merge_kernel(
    x_ptr,
    size_ptr,
    slot_ptr,
    src_ptr,
    dst_ptr,
    out_ptr,
    out_size_ptr,
    num_slots,
    r,
    channels,
    stride_xb,
    stride_xn,
    stride_xc,
    stride_sb,
    stride_sn,
    HAS_SIZE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    image = tl.program_id(0)
    first = tl.program_id(1) * BLOCK_S
    s = first + tl.arange(0, BLOCK_S)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    s_valid, c_valid = s < num_slots, c < channels
    image_x = x_ptr + image * stride_xb
    image_size = size_ptr + image * stride_sb
    slot = tl.load(slot_ptr + image * num_slots + s, mask=s_valid, other=0)
    acc = tl.load(
        image_x + slot[:, None] * stride_xn + c[None, :] * stride_xc,
        mask=s_valid[:, None] & c_valid[None, :],
        other=0.0,
    ).to(tl.float32)
    if HAS_SIZE:
        total = tl.load(image_size + slot * stride_sn, mask=s_valid, other=0.0).to(tl.float32)
        acc = acc * total[:, None]
    else:
        total = s_valid.to(tl.float32)
    for start in range(0, r, BLOCK_R):
        j = start + tl.arange(0, BLOCK_R)
        dst = tl.load(dst_ptr + image * r + j, mask=j < r, other=-1)
        in_tile = (j < r) & (dst >= first) & (dst < first + BLOCK_S)
        src = tl.load(src_ptr + image * r + j, mask=in_tile, other=0)
        rows = tl.load(
            image_x + src[:, None] * stride_xn + c[None, :] * stride_xc,
            mask=in_tile[:, None] & c_valid[None, :],
            other=0.0,
        ).to(tl.float32)
        if HAS_SIZE:
            weight = tl.load(image_size + src * stride_sn, mask=in_tile, other=0.0)
            weight = weight.to(tl.float32)
        else:
            weight = in_tile.to(tl.float32)
        # Row i of the one-hot picks, weighted, the merged tokens that land in slot i.
        onehot = tl.where(s[:, None] == dst[None, :], weight[None, :], 0.0)
        acc += tl.dot(onehot, rows, input_precision=PRECISION)
        total += tl.sum(onehot, axis=1)
    out = acc / tl.where(s_valid, total, 1.0)[:, None]
    out_ptrs = out_ptr + image * num_slots * channels + s[:, None] * channels + c[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=s_valid[:, None] & c_valid[None, :])
    if tl.program_id(2) == 0:
        sizes = total.to(out_size_ptr.dtype.element_ty)
        tl.store(out_size_ptr + image * num_slots + s, sizes, mask=s_valid)


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


def merge_precision(dtype: torch.dtype) -> str:
    """The merge's ``tl.dot`` precision for tokens of ``dtype``: TF32 tensor cores for bf16
    and fp16 tokens, fp32 FMA (``"ieee"``) for fp32 ones.

    TF32 is exact here, not an approximation: a bf16/fp16 value fits TF32's 10-bit
    mantissa, a size (an integer <= 2048) does too, their product fits fp32, and the sum is
    fp32 either way. FMA made the merge's one-hot product the largest part of the kernel
    at served batches (about half of ~19 us on DeiT-S, batch 64, on an H100).
    """
    return "tf32" if dtype in (torch.bfloat16, torch.float16) else "ieee"


@triton_op("vitserve::merge_tokens", mutates_args={})
def merge_tokens(
    x_BNC: torch.Tensor,
    size_BN1: torch.Tensor | None,
    slot_pos: torch.Tensor,
    src_pos: torch.Tensor,
    dst_slot: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`app.vit.merge.merge_weighted` in one kernel: the size-weighted average
    ``[B, N - r, C]`` (x's dtype, summed in fp32) and summed sizes ``[B, N - r, 1]`` (sizes'
    dtype; x's when ``size_BN1`` is None, meaning all 1), from a matching's index tensors."""
    B, _, C = x_BNC.shape
    num_slots, r = slot_pos.shape[1], src_pos.shape[1]
    has_size = size_BN1 is not None
    sizes = size_BN1 if has_size else x_BNC  # a placeholder pointer, never read
    out_BMC = x_BNC.new_empty(B, num_slots, C)
    size_BM1 = sizes.new_empty(B, num_slots, 1)
    grid = (B, triton.cdiv(num_slots, BLOCK_SLOTS), triton.cdiv(C, BLOCK_CHANNELS))
    wrap_triton(_merge_kernel)[grid](
        x_BNC,
        sizes,
        slot_pos.contiguous(),
        src_pos.contiguous(),
        dst_slot.contiguous(),
        out_BMC,
        size_BM1,
        num_slots,
        r,
        C,
        x_BNC.stride(0),
        x_BNC.stride(1),
        x_BNC.stride(2),
        sizes.stride(0),
        sizes.stride(1),
        HAS_SIZE=has_size,
        PRECISION=merge_precision(x_BNC.dtype),
        BLOCK_S=BLOCK_SLOTS,
        BLOCK_R=max(MIN_DOT, min(BLOCK_MERGED_MAX, triton.next_power_of_2(r))),
        BLOCK_C=BLOCK_CHANNELS,
    )
    return out_BMC, size_BM1


def _merge_setup_context(ctx, inputs, output) -> None:
    x_BNC, size_BN1, slot_pos, src_pos, dst_slot = inputs
    ctx.save_for_backward(size_BN1, slot_pos, src_pos, dst_slot, output[1])
    ctx.num_tokens = x_BNC.shape[1]


def _merge_backward(ctx, grad_BMC, _grad_size):
    """Every input token lands in exactly one output slot (its own, or the one it merged
    into) with weight ``size / slot size``: the gradient is that slot's, gathered back."""
    size_BN1, slot_pos, src_pos, dst_slot, size_BM1 = ctx.saved_tensors
    B, num_slots, C = grad_BMC.shape
    slots = torch.arange(num_slots, device=slot_pos.device).view(1, -1, 1).expand(B, -1, 1)
    home_BN1 = slot_pos.new_empty(B, ctx.num_tokens, 1)
    home_BN1.scatter_(1, slot_pos, slots).scatter_(1, src_pos, dst_slot)
    grad_BNC = (grad_BMC / size_BM1).gather(1, home_BN1.expand(B, -1, C))
    if size_BN1 is not None:
        grad_BNC = grad_BNC * size_BN1
    return grad_BNC, None, None, None, None


merge_tokens.register_autograd(_merge_backward, setup_context=_merge_setup_context)
