"""Token merging (ToMe, Bolya et al., ICLR 2023): fewer tokens without new parameters.

Inside a block, after attention and before the MLP, the ``r`` patch tokens most similar to
another token are averaged into it. Similarity is the cosine of the attention keys (mean
over heads), which already summarise what each token contains. Matching is bipartite so it
needs no iteration: tokens alternate into sets A (even positions) and B (odd), each A token
picks its most similar B token, and the ``r`` A tokens with the best matches are merged.

Every merged token remembers how many input patches it stands for (``size``): merges are
size-weighted averages and later attention adds ``log(size)`` to its logits (proportional
attention), so a token standing for k patches draws the attention those k patches would;
the bias is an additive mask, which SDPA's fused kernels take (cuDNN on the GPU).

``r`` is fixed per block, so every shape is known before the forward runs: batching, CUDA
graphs and ``torch.compile(fullgraph=True)`` keep working. Matching works on fixed-size
index tensors, then ``gather``/``scatter_add_``; nothing reads a value on the host. The CLS
token is never merged and stays at index 0.

The matching has no sort. ToMe ranks the A tokens with two argsorts; at served batch sizes
(16-64) those and the ``[B, A, B]`` similarity cost a merged model more than the tokens it
removes, and compiling the sorts took Inductor minutes per merging block on the H200 (so
compiled models left them eager, a graph break per merging block). :func:`rank_matches`
counts instead (same result, ties to the earlier token), and on CUDA two Triton kernels
(:mod:`app.vit.merge_kernels`) do the whole matching and a third the size-weighted merge
(where the torch path took about nine launches), all inside the compiled graph.
On CPU, Inductor compiles the counting about as slowly as it did the sorts (DeiT-Tiny cut
to 4 blocks, merge=13, on a loaded 2-core machine: 183 s against 164 s, and 88 s with the
ranking left eager; bench/results/kernels/merge-compile-cpu-*.json); a CPU server rarely
compiles, and one graph is what ``fullgraph`` and whole-model capture need.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block
from torch import nn

from app.vit.config import max_merge

try:
    from app.vit import merge_kernels
except ImportError:  # no Triton (a CPU-only install): the torch path serves every device
    merge_kernels = None


@dataclass(frozen=True)
class Matching:
    """Where a merge reads and writes, as positions in the ``N``-token input, ``[B, k, 1]`` each.

    ``slot_pos`` gives every output slot its input token (the kept A tokens, ascending so CLS
    stays first, then every B token), ``src_pos`` the A tokens merged away, ``dst_slot`` the
    output slot each of those is added to. Computed once per matching, so merging tokens and
    sizes costs only gathers and a scatter.
    """

    slot_pos: torch.Tensor
    src_pos: torch.Tensor
    dst_slot: torch.Tensor


def best_matches(keys_BNK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each A token's (even positions) best cosine similarity to a B token (odd positions),
    and which B token that is, ``[B, A]`` each.

    ``keys_BNK`` is the block's attention keys averaged over heads; index 0 is CLS, which
    gets -inf similarity so it always ranks last and is kept. Discrete, so no gradient.
    """
    metric_BNK = F.normalize(keys_BNK.detach(), dim=-1)
    scores_BAB = metric_BNK[:, ::2] @ metric_BNK[:, 1::2].transpose(-1, -2)
    scores_BAB[:, 0] = -math.inf  # protect CLS
    return scores_BAB.max(dim=-1)


def rank_matches_sorted(best_BA: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ToMe's ranking, two sorts: the ``r`` A tokens with the best matches (merged away)
    and the others, ascending (kept), as ``[B, r, 1]`` and ``[B, A - r, 1]`` indices into A.

    What the CPU runs (there two small sorts cost less than the count: 3.1 against 3.7 ms
    for a batch of 16 at DeiT-S shapes, one core), and the specification :func:`rank_matches`
    is tested against; on a GPU, at batch 16-64, the sorts cost more than the tokens they
    remove.
    """
    order_BA1 = best_BA.argsort(dim=-1, descending=True).unsqueeze(-1)
    # Ascending, as ToMe: CLS stays first, and the token order (which decides the next
    # block's A/B split) is ToMe's, so its accuracy figures carry over.
    return order_BA1[:, :r], order_BA1[:, r:].sort(dim=1).values


def match_ranks(best_BA: torch.Tensor) -> torch.Tensor:
    """Each A token's place in the descending order of best matches, ``[B, A]``, by counting
    instead of sorting: how many score higher, plus how many earlier ones score the same.

    A ``[B, A, A]`` comparison (A <= 99 at 224 px: tiny), a few elementwise kernels that
    CUDA graphs replay and Inductor fuses, where a sort is a launch-heavy library call.
    Ties go to the earlier token, so the order is total and a permutation of ``0..A-1``.
    """
    A = best_BA.shape[1]
    s_i, s_j = best_BA.unsqueeze(-1), best_BA.unsqueeze(-2)
    earlier_AA = torch.ones(A, A, dtype=torch.bool, device=best_BA.device).tril(diagonal=-1)
    ahead_BAA = (s_j > s_i) | ((s_j == s_i) & earlier_AA)
    return ahead_BAA.sum(dim=-1)


def rank_matches(best_BA: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rank_matches_sorted`'s result without a sort (the same whenever no two scores
    tie): merged ``[B, r, 1]`` in order of rank, kept ``[B, A - r, 1]`` ascending.

    One scatter of ``0..A-1`` through a permutation builds both: a kept token goes to its
    slot among the kept (a cumulative count of the kept before it), a merged one after all
    kept tokens, at its rank.
    """
    B, A = best_BA.shape
    rank_BA = match_ranks(best_BA)
    kept_BA = rank_BA >= r
    slot_BA = torch.where(kept_BA, kept_BA.cumsum(dim=-1) - 1, (A - r) + rank_BA)
    order_BA = torch.empty_like(slot_BA).scatter_(
        1, slot_BA, torch.arange(A, device=best_BA.device).expand(B, A)
    )
    order_BA1 = order_BA.unsqueeze(-1)
    return order_BA1[:, A - r :], order_BA1[:, : A - r]


def matching_positions(
    match_BA: torch.Tensor, src_Br1: torch.Tensor, keep_BK1: torch.Tensor, num_tokens: int
) -> Matching:
    """The :class:`Matching` of ranked A tokens (:func:`rank_matches`) to their best B
    tokens (:func:`best_matches`) in a ``num_tokens`` sequence."""
    B = match_BA.shape[0]
    dst_Br1 = match_BA.unsqueeze(-1).gather(dim=1, index=src_Br1)
    b_pos_BB1 = torch.arange(1, num_tokens, 2, device=match_BA.device).view(1, -1, 1)
    return Matching(
        slot_pos=torch.cat([2 * keep_BK1, b_pos_BB1.expand(B, -1, 1)], dim=1),
        src_pos=2 * src_Br1,
        dst_slot=keep_BK1.shape[1] + dst_Br1,
    )


def check_merge(num_tokens: int, r: int) -> None:
    """Refuse an ``r`` that bipartite matching cannot merge out of ``num_tokens``."""
    if not 0 <= r <= max_merge(num_tokens):
        raise ValueError(
            f"cannot merge {r} of {num_tokens} tokens (at most {max_merge(num_tokens)})"
        )


def matching_kernels(device: torch.device) -> str:
    """Which implementation matches tokens on ``device``: ``"triton"`` (CUDA, Triton
    importable), ``"sort"`` (the CPU) or ``"torch"`` (counting); benchmark reports record it."""
    if device.type == "cpu":
        return "sort"
    return "triton" if merge_kernels is not None and device.type == "cuda" else "torch"


def bipartite_soft_matching(keys_BNK: torch.Tensor, r: int) -> Matching:
    """Match the ``r`` most similar A tokens (even positions) to B tokens (odd positions).

    On CUDA with Triton, two fused kernels (:mod:`app.vit.merge_kernels`); elsewhere the
    same steps in torch: :func:`best_matches`, :func:`rank_matches` (on the CPU
    :func:`rank_matches_sorted`), :func:`matching_positions`. Same matching every way, up to
    ties between scores.
    """
    num_tokens = keys_BNK.shape[1]
    check_merge(num_tokens, r)
    kernels = matching_kernels(keys_BNK.device)
    if kernels == "triton":
        best_BA, match_BA = merge_kernels.best_matches(keys_BNK.detach())
        return Matching(*merge_kernels.matching_positions(best_BA, match_BA, r, num_tokens))
    best_BA, match_BA = best_matches(keys_BNK)
    rank = rank_matches_sorted if kernels == "sort" else rank_matches
    return matching_positions(match_BA, *rank(best_BA, r), num_tokens)


def merge_sum(x_BNC: torch.Tensor, matching: Matching) -> torch.Tensor:
    """``[B, N, C] -> [B, N - r, C]``: kept A tokens, then B tokens plus what merged into them.

    One gather builds the output and one in-place ``scatter_add_`` adds the merged-away
    tokens, so the token tensor is read and written about twice; slicing A and B apart,
    scattering out of place and concatenating (as before) moved it about five times, and
    cost merge-t6 on DeiT-S 8% of its speed on an H200.
    """
    B, _, C = x_BNC.shape
    r = matching.src_pos.shape[1]
    out_BMC = x_BNC.gather(dim=1, index=matching.slot_pos.expand(B, -1, C))
    src_BrC = x_BNC.gather(dim=1, index=matching.src_pos.expand(B, r, C))
    return out_BMC.scatter_add_(dim=1, index=matching.dst_slot.expand(B, r, C), src=src_BrC)


def merge_weighted(
    x_BNC: torch.Tensor, size_BN1: torch.Tensor | None, matching: Matching
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average of merged tokens, and their summed sizes (None: all 1).

    On CUDA with Triton one kernel (:func:`app.vit.merge_kernels.merge_tokens`, summing in
    fp32, where :func:`merge_weighted_torch` takes about nine launches); elsewhere torch.
    """
    if matching_kernels(x_BNC.device) == "triton":
        return merge_kernels.merge_tokens(
            x_BNC, size_BN1, matching.slot_pos, matching.src_pos, matching.dst_slot
        )
    return merge_weighted_torch(x_BNC, size_BN1, matching)


def merge_weighted_torch(
    x_BNC: torch.Tensor, size_BN1: torch.Tensor | None, matching: Matching
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`merge_weighted` in torch, in x's dtype (every device; the kernel's reference).

    Sizes go through their own (tiny) gather/scatter; tokens of size 1 skip the weighting.
    """
    if size_BN1 is None:
        size_BN1 = x_BNC.new_ones(*x_BNC.shape[:2], 1)
        weighted_BNC = x_BNC
    else:
        weighted_BNC = x_BNC * size_BN1
    size_BM1 = merge_sum(size_BN1, matching)
    return merge_sum(weighted_BNC, matching) / size_BM1, size_BM1


@dataclass
class MergeState:
    """Token sizes handed from block to block during one forward.

    Created by each forward call (so concurrent forwards never share one) and passed to
    every :class:`MergeBlock`; blocks keep returning plain token tensors, so forward hooks
    (feature taps, ``capture_tokens``) see the same outputs as on a dense model.
    ``size_BN1`` is None until the first merge, meaning every token has size 1.

    With ``track_source`` (distillation only), ``source_BNP`` records which input tokens
    each token stands for, ``[B, N, P]`` counts over the ``P`` tokens of the first merging
    block's input (ToMe's source trace), so a teacher's tokens can be merged the same way.
    """

    size_BN1: torch.Tensor | None = None
    track_source: bool = False
    source_BNP: torch.Tensor | None = None
    log_size_B11N: torch.Tensor | None = None

    def set_sizes(self, size_BN1: torch.Tensor) -> None:
        """Take new token sizes, and make proportional attention's mask, ``log(size)`` as
        ``[B, 1, 1, N]``, once for all the blocks that attend with them: at served batches
        each small launch saved is a visible share of a merged forward."""
        self.size_BN1 = size_BN1
        self.log_size_B11N = size_BN1.log().transpose(-1, -2)[:, None]

    def merged(self, size_BM1: torch.Tensor, matching: Matching, num_tokens: int) -> None:
        """Take a merge's sizes and, when tracking, carry the source trace through it."""
        self.set_sizes(size_BM1)
        if self.track_source:
            source_BNP = self.source_BNP
            if source_BNP is None:
                eye_NN = torch.eye(num_tokens, device=size_BM1.device)
                source_BNP = eye_NN.expand(size_BM1.shape[0], num_tokens, num_tokens)
            self.source_BNP = merge_sum(source_BNP, matching)


def proportional_attention(
    q_BHND: torch.Tensor,
    k_BHND: torch.Tensor,
    v_BHND: torch.Tensor,
    log_size_B11N: torch.Tensor,
    *,
    scale: float,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """``softmax(q·kᵀ·scale + log size_k)·v`` through fused SDPA, the bias an additive
    ``[B, 1, 1, N]`` mask.

    The one form on every device. On the CPU, SDPA's flash kernel takes a mask at almost no
    cost. On the GPU the bias used to ride in an extra head column (heads 72 wide for 64,
    out of a padded qkv GEMM) to keep a mask-free kernel; measured whole, merged models ran
    faster with the mask (cuDNN takes it): on an H100 at batch 64, merge-3x47 on DeiT-S
    1.32x dense against 1.22x, tome-r13 1.09x against 1.02x
    (bench/results/kernels/proportional-sdpa-20261207-012058.json).
    """
    return F.scaled_dot_product_attention(
        q_BHND,
        k_BHND,
        v_BHND,
        attn_mask=log_size_B11N.to(q_BHND.dtype),
        dropout_p=dropout_p,
        scale=scale,
    )


class MergeAttention(nn.Module):
    """timm ``Attention`` with proportional attention that also returns its keys.

    Takes over the dense module's layers under the same names, so state-dict keys do not
    change; the forward is timm's fused path plus an additive ``log(size)`` bias.
    """

    def __init__(self, dense: Attention) -> None:
        super().__init__()
        self.num_heads = dense.num_heads
        self.head_dim = dense.head_dim
        self.attn_dim = dense.num_heads * dense.head_dim
        self.scale = dense.scale
        self.qkv = dense.qkv
        self.q_norm = dense.q_norm
        self.k_norm = dense.k_norm
        self.attn_drop = dense.attn_drop
        self.norm = dense.norm
        self.gate = getattr(dense, "gate", None)  # older timm: no gate
        self.proj = dense.proj
        self.proj_drop = dense.proj_drop

    def forward(
        self, x_BNC: torch.Tensor, log_size_B11N: torch.Tensor | None = None, keys: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention output ``[B, N, C]`` (``log_size_B11N``: proportional attention's mask,
        :attr:`MergeState.log_size_B11N`) and, if ``keys``, the keys averaged over heads
        ``[B, N, D]`` (a block that merges nothing skips that reduction)."""
        B, N, _ = x_BNC.shape
        dropout_p = self.attn_drop.p if self.training else 0.0
        qkv_3BHND = (
            self.qkv(x_BNC).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        )
        q_BHND, k_BHND, v_BHND = qkv_3BHND.unbind(0)
        q_BHND, k_BHND = self.q_norm(q_BHND), self.k_norm(k_BHND)
        if log_size_B11N is None:
            out_BHND = F.scaled_dot_product_attention(
                q_BHND, k_BHND, v_BHND, dropout_p=dropout_p, scale=self.scale
            )
        else:
            out_BHND = proportional_attention(
                q_BHND, k_BHND, v_BHND, log_size_B11N, scale=self.scale, dropout_p=dropout_p
            )
        out_BNA = self.norm(out_BHND.transpose(1, 2).reshape(B, N, self.attn_dim))
        if self.gate is not None:
            out_BNA = out_BNA * self.gate(x_BNC).sigmoid()
        return self.proj_drop(self.proj(out_BNA)), k_BHND.mean(dim=1) if keys else None


class MergeBlock(nn.Module):
    """timm ``Block`` that merges ``r`` tokens between attention and MLP, as ToMe does.

    Used for every block from the first merging one on (``r`` may be 0 there: the block
    still needs the sizes for proportional attention), or with ``proportional=False`` for
    the merging blocks only (sizes still weight the merges). Same submodules and names as
    the dense block, so the weights load unchanged.
    """

    def __init__(self, dense: Block, r: int, *, proportional: bool = True) -> None:
        super().__init__()
        if type(dense) is not Block:
            raise TypeError(f"token merging needs timm's Block, got {type(dense).__name__}")
        if not isinstance(dense.attn, Attention):
            raise TypeError(f"token merging needs timm Attention, got {type(dense.attn).__name__}")
        if r < 0:
            raise ValueError(f"r must be >= 0, got {r}")
        self.r = r
        self.proportional = proportional
        self.norm1 = dense.norm1
        self.attn = MergeAttention(dense.attn)
        self.ls1 = dense.ls1
        self.drop_path1 = dense.drop_path1
        self.norm2 = dense.norm2
        self.mlp = dense.mlp
        self.ls2 = dense.ls2
        self.drop_path2 = dense.drop_path2

    def forward(self, x_BNC: torch.Tensor, state: MergeState) -> torch.Tensor:
        """``[B, N, C] -> [B, N - r, C]``; updates ``state`` when it merges."""
        size_BN1 = state.size_BN1
        log_size_B11N = state.log_size_B11N if self.proportional else None
        attn_BNC, keys_BNK = self.attn(self.norm1(x_BNC), log_size_B11N, keys=self.r > 0)
        x_BNC = x_BNC + self.drop_path1(self.ls1(attn_BNC))
        if keys_BNK is not None:
            matching = bipartite_soft_matching(keys_BNK, self.r)
            num_tokens = x_BNC.shape[1]
            x_BNC, size_BM1 = merge_weighted(x_BNC, size_BN1, matching)
            state.merged(size_BM1, matching, num_tokens)
        return x_BNC + self.drop_path2(self.ls2(self.mlp(self.norm2(x_BNC))))

    def extra_repr(self) -> str:
        return f"r={self.r}" + ("" if self.proportional else ", proportional=False")
