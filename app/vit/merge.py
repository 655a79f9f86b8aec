"""Token merging (ToMe, Bolya et al., ICLR 2023): fewer tokens without new parameters.

Inside a block, after attention and before the MLP, the ``r`` patch tokens most similar to
another token are averaged into it. Similarity is the cosine of the attention keys (mean
over heads), which already summarise what each token contains. Matching is bipartite so it
needs no iteration: tokens alternate into sets A (even positions) and B (odd), each A token
picks its most similar B token, and the ``r`` A tokens with the best matches are merged.

Every merged token remembers how many input patches it stands for (``size``): merges are
size-weighted averages and later attention adds ``log(size)`` to its logits (proportional
attention), so a token standing for k patches draws the attention those k patches would;
the bias travels in an extra head dimension, not a mask, so SDPA keeps its flash kernel.

``r`` is fixed per block, so every shape is known before the forward runs: batching, CUDA
graphs and ``torch.compile(fullgraph=True)`` keep working. Matching is ``argsort`` +
``gather``/``scatter_add_`` on fixed-size index tensors; nothing reads a value on the host.
The CLS token is never merged and stays at index 0.

Compiling the matching's sorts is what makes Inductor slow on a merged model (a DeiT-Tiny
with ``merge=13`` did not compile in 4 minutes on CPU), so :func:`leave_matching_eager`
trades ``fullgraph`` for a graph break per merging block around :func:`rank_matches`, the
two sorts: everything else is compiled, the normalised key mean and the similarities fused
with their neighbours (DeiT-Tiny ``merge-t5`` compiled in 33 s on two CPU cores, 39 s with
the whole matching left eager). On a small model those breaks can cost more than
compiling gains (the host works between graphs while the GPU waits), unless the compiled
model is replayed from CUDA graphs, as the server does.
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


def rank_matches(best_BA: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``r`` A tokens with the best matches (merged away) and the others, ascending
    (kept), as ``[B, r, 1]`` and ``[B, A - r, 1]`` indices into A.

    The matching's only sorts, and what makes Inductor slow to compile a merged model, so
    :func:`leave_matching_eager` leaves just this out of the graph.
    """
    order_BA1 = best_BA.argsort(dim=-1, descending=True).unsqueeze(-1)
    # Ascending, as ToMe: CLS stays first, and the token order (which decides the next
    # block's A/B split) is ToMe's, so its accuracy figures carry over.
    return order_BA1[:, :r], order_BA1[:, r:].sort(dim=1).values


_eager_rank_matches = torch.compiler.disable(rank_matches)


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


def bipartite_soft_matching(keys_BNK: torch.Tensor, r: int) -> Matching:
    """Match the ``r`` most similar A tokens (even positions) to B tokens (odd positions).

    The three steps in one call; a :class:`MergeBlock` calls them itself, so that compiling
    can leave the middle one eager.
    """
    check_merge(keys_BNK.shape[1], r)
    best_BA, match_BA = best_matches(keys_BNK)
    return matching_positions(match_BA, *rank_matches(best_BA, r), keys_BNK.shape[1])


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
    """

    size_BN1: torch.Tensor | None = None


def proportional_attention(
    q_BHND: torch.Tensor,
    k_BHND: torch.Tensor,
    v_BHND: torch.Tensor,
    log_size_BN1: torch.Tensor,
    *,
    scale: float,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """``softmax(q·kᵀ·scale + log size_k)·v`` through fused SDPA, in the form each device's
    fastest kernel takes: the bias as an extra head dimension on a GPU
    (:func:`head_bias_attention`), as an additive mask on the CPU (:func:`mask_bias_attention`).
    """
    attend = mask_bias_attention if q_BHND.device.type == "cpu" else head_bias_attention
    return attend(q_BHND, k_BHND, v_BHND, log_size_BN1, scale=scale, dropout_p=dropout_p)


def head_bias_attention(
    q_BHND: torch.Tensor,
    k_BHND: torch.Tensor,
    v_BHND: torch.Tensor,
    log_size_BN1: torch.Tensor,
    *,
    scale: float,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Proportional attention *without* an attention mask, for the GPU.

    A mask sends SDPA off its fastest kernel (flash attention takes none): on an H200 the
    log-size mask made a DeiT-S block at 197 tokens 0.23 ms slower (1.00 ms against
    0.77 ms). The bias rides in an extra head dimension instead -- q gets 1 there, k gets
    ``log(size) / scale``, so ``scale · q'·k' = scale · q·k + log size`` -- padded with zeros
    to the next multiple of 8, as the fused kernels want; v gets zeros there, and the output
    keeps its first ``D`` channels.
    """
    B, H, N, D = q_BHND.shape
    pad = 8 - D % 8  # at least 1: the bias column
    zeros_BHNp = q_BHND.new_zeros(B, H, N, pad - 1)
    bias_BHN1 = (log_size_BN1 / scale).to(k_BHND.dtype)[:, None].expand(B, H, N, 1)
    q_BHNE = torch.cat([q_BHND, q_BHND.new_ones(B, H, N, 1), zeros_BHNp], dim=-1)
    k_BHNE = torch.cat([k_BHND, bias_BHN1, zeros_BHNp], dim=-1)
    v_BHNE = torch.cat([v_BHND, v_BHND.new_zeros(B, H, N, pad)], dim=-1)
    out_BHNE = F.scaled_dot_product_attention(
        q_BHNE, k_BHNE, v_BHNE, dropout_p=dropout_p, scale=scale
    )
    return out_BHNE[..., :D]


def mask_bias_attention(
    q_BHND: torch.Tensor,
    k_BHND: torch.Tensor,
    v_BHND: torch.Tensor,
    log_size_BN1: torch.Tensor,
    *,
    scale: float,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Proportional attention with the bias as an additive mask, for the CPU: SDPA's CPU
    flash kernel takes a mask at almost no cost, while padded heads cost copies and a wider
    product (2 cores, DeiT-Tiny shapes at 150 tokens, batch 16: 30 ms against 130 ms)."""
    mask_B11N = log_size_BN1.to(q_BHND.dtype).transpose(-1, -2)[:, None]
    return F.scaled_dot_product_attention(
        q_BHND, k_BHND, v_BHND, attn_mask=mask_B11N, dropout_p=dropout_p, scale=scale
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
        self, x_BNC: torch.Tensor, log_size_BN1: torch.Tensor | None = None, keys: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention output ``[B, N, C]`` and, if ``keys``, the keys averaged over heads
        ``[B, N, D]`` (a block that merges nothing skips that reduction)."""
        B, N, _ = x_BNC.shape
        qkv_3BHND = (
            self.qkv(x_BNC).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        )
        q_BHND, k_BHND, v_BHND = qkv_3BHND.unbind(0)
        q_BHND, k_BHND = self.q_norm(q_BHND), self.k_norm(k_BHND)
        dropout_p = self.attn_drop.p if self.training else 0.0
        if log_size_BN1 is None:
            out_BHND = F.scaled_dot_product_attention(
                q_BHND, k_BHND, v_BHND, dropout_p=dropout_p, scale=self.scale
            )
        else:
            out_BHND = proportional_attention(
                q_BHND, k_BHND, v_BHND, log_size_BN1, scale=self.scale, dropout_p=dropout_p
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
        self.matching_in_graph = True  # False: torch.compile leaves its sorts eager
        self.norm1 = dense.norm1
        self.attn = MergeAttention(dense.attn)
        self.ls1 = dense.ls1
        self.drop_path1 = dense.drop_path1
        self.norm2 = dense.norm2
        self.mlp = dense.mlp
        self.ls2 = dense.ls2
        self.drop_path2 = dense.drop_path2

    def forward(self, x_BNC: torch.Tensor, state: MergeState) -> torch.Tensor:
        """``[B, N, C] -> [B, N - r, C]``; updates ``state.size_BN1`` when it merges."""
        size_BN1 = state.size_BN1
        sized = size_BN1 is not None and self.proportional
        log_size_BN1 = size_BN1.log() if sized else None
        attn_BNC, keys_BNK = self.attn(self.norm1(x_BNC), log_size_BN1, keys=self.r > 0)
        x_BNC = x_BNC + self.drop_path1(self.ls1(attn_BNC))
        if keys_BNK is not None:
            # The three steps of bipartite_soft_matching, called here so that a graph
            # break around the sorts (leave_matching_eager) splits only this frame.
            num_tokens = keys_BNK.shape[1]
            check_merge(num_tokens, self.r)
            best_BA, match_BA = best_matches(keys_BNK)
            rank = rank_matches if self.matching_in_graph else _eager_rank_matches
            matching = matching_positions(match_BA, *rank(best_BA, self.r), num_tokens)
            x_BNC, state.size_BN1 = merge_weighted(x_BNC, size_BN1, matching)
        return x_BNC + self.drop_path2(self.ls2(self.mlp(self.norm2(x_BNC))))

    def extra_repr(self) -> str:
        return f"r={self.r}" + ("" if self.proportional else ", proportional=False")


def leave_matching_eager(model: nn.Module) -> int:
    """Make ``torch.compile`` skip every merging block's sorts (:func:`rank_matches`);
    returns how many blocks.

    The output is unchanged; only what a compiled graph contains differs.
    """
    blocks = [m for m in model.modules() if isinstance(m, MergeBlock)]
    for block in blocks:
        block.matching_in_graph = False
    return len(blocks)
