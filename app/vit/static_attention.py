"""DGSSA static self-attention: a fixed per-head token-mixing matrix replaces softmax(QK^T).

Early ViT blocks attend in nearly the same pattern for every image, so the paper replaces
their attention map by one learned ``[H, N, N]`` matrix (initialised from the dense model's
attention averaged over calibration images). Q, K and the softmax disappear; what is left
is the V projection, a token mix per head and the output projection.
"""

from __future__ import annotations

import torch
from timm.layers import Attention
from torch import nn

from app.vit.token_mix import token_mix


class StaticAttention(nn.Module):
    """Drop-in for timm's ``Attention`` inside a ``Block``: ``proj(mix_h(v(x)))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_tokens: int,
        *,
        attn_dim: int | None = None,
        dim_out: int | None = None,
        v_bias: bool = True,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        attn_dim = attn_dim or dim
        if attn_dim % num_heads:
            raise ValueError(f"attn_dim {attn_dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = attn_dim // num_heads
        self.num_tokens = num_tokens
        self.v = nn.Linear(dim, attn_dim, bias=v_bias)
        # Raw mixing weights, used as they are (no softmax): uniform until calibrated.
        self.attn_matrix = nn.Parameter(
            torch.full((num_heads, num_tokens, num_tokens), 1.0 / num_tokens)
        )
        # Dropout on the shared matrix drops the same entries for the whole batch.
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(attn_dim, dim_out or dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    @classmethod
    def from_dense(cls, attn: Attention, num_tokens: int) -> StaticAttention:
        """Keep ``attn``'s V rows of the fused qkv (timm layout ``[q; k; v]``) and its proj."""
        if getattr(attn, "gate", None) is not None or not isinstance(attn.norm, nn.Identity):
            raise ValueError("gated or scale-normed attention has no static equivalent here")
        qkv, proj = attn.qkv, attn.proj
        attn_dim = qkv.out_features // 3
        static = cls(
            qkv.in_features,
            attn.num_heads,
            num_tokens,
            attn_dim=attn_dim,
            dim_out=proj.out_features,
            v_bias=qkv.bias is not None,
            proj_bias=proj.bias is not None,
            attn_drop=attn.attn_drop.p,
            proj_drop=attn.proj_drop.p,
        ).to(device=qkv.weight.device, dtype=qkv.weight.dtype)
        with torch.no_grad():
            static.v.weight.copy_(qkv.weight[2 * attn_dim :])
            if qkv.bias is not None:
                static.v.bias.copy_(qkv.bias[2 * attn_dim :])
            static.proj.load_state_dict(proj.state_dict())
        return static

    @torch.no_grad()
    def set_attention(self, attn_HNN: torch.Tensor) -> None:
        """Set the matrix, e.g. to the teacher's softmax attention averaged over images."""
        if attn_HNN.shape != self.attn_matrix.shape:
            raise ValueError(
                f"expected {tuple(self.attn_matrix.shape)}, got {tuple(attn_HNN.shape)}"
            )
        self.attn_matrix.copy_(attn_HNN)

    def forward(
        self,
        x_BNC: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        # attn_mask / is_causal: timm's Block passes them; a fixed matrix cannot honour them.
        if attn_mask is not None or is_causal:
            raise ValueError("static attention does not support attention masks")
        v_BNA = self.v(x_BNC)
        out_BNA = token_mix(v_BNA, self.attn_drop(self.attn_matrix))
        return self.proj_drop(self.proj(out_BNA))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, num_tokens={self.num_tokens}"
