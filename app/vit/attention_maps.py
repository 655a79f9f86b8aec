"""Read a ViT's internals during a forward pass: softmax attention maps and block outputs.

The maps are recomputed from the hooked input of each block's ``attn`` module with its
own ``qkv`` / ``q_norm`` / ``k_norm`` / ``scale``, rather than read from timm internals
(fused SDPA never materialises them, and the private code path changes between versions).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from timm.layers import Attention
from torch import nn


def attention_probs(attn: Attention, x_BNC: torch.Tensor) -> torch.Tensor:
    """``softmax(q k^T * scale)`` of ``attn`` on its input ``x``: ``[B, H, N, N]`` float32."""
    B, N, _ = x_BNC.shape
    H = attn.num_heads
    qkv_B3HND = attn.qkv(x_BNC).reshape(B, N, 3, H, -1).permute(2, 0, 3, 1, 4)
    q_BHND, k_BHND = attn.q_norm(qkv_B3HND[0]), attn.k_norm(qkv_B3HND[1])
    logits_BHNN = (q_BHND * attn.scale) @ k_BHND.transpose(-2, -1)
    return logits_BHNN.float().softmax(dim=-1)


def _blocks(model: nn.Module, layers: Iterable[int]) -> dict[int, nn.Module]:
    return {i: model.blocks[i] for i in sorted(set(layers))}


def _forward_features(model: nn.Module, x: torch.Tensor, handles: list) -> None:
    """Run the feature extractor once, then remove the hooks whatever happens."""
    try:
        model.forward_features(x)
    finally:
        for handle in handles:
            handle.remove()


def capture_attention(
    model: nn.Module, x: torch.Tensor, layers: Iterable[int]
) -> dict[int, torch.Tensor]:
    """Softmax attention ``[B, H, N, N]`` of the given blocks on images ``x [B, 3, H, W]``.

    ``model`` is a timm ``VisionTransformer`` or a ``CompressedViT`` (whose requested blocks
    must still have dense attention). Runs ``forward_features`` once; grad mode is the
    caller's.
    """
    blocks = _blocks(model, layers)
    for i, block in blocks.items():
        if not isinstance(block.attn, Attention):
            raise TypeError(f"block {i} has {type(block.attn).__name__}, not a dense Attention")
    maps: dict[int, torch.Tensor] = {}

    def hook(i: int):
        def fn(attn: Attention, args: tuple[torch.Tensor, ...]) -> None:
            maps[i] = attention_probs(attn, args[0])

        return fn

    _forward_features(
        model, x, [b.attn.register_forward_pre_hook(hook(i)) for i, b in blocks.items()]
    )
    return maps


def capture_tokens(
    model: nn.Module, x: torch.Tensor, layers: Iterable[int]
) -> dict[int, torch.Tensor]:
    """Outputs ``[B, N, C]`` of the given blocks (e.g. for feature distillation)."""
    blocks = _blocks(model, layers)
    tokens: dict[int, torch.Tensor] = {}

    def hook(i: int):
        def fn(block: nn.Module, args: tuple[torch.Tensor, ...], out_BNC: torch.Tensor) -> None:
            tokens[i] = out_BNC

        return fn

    _forward_features(model, x, [b.register_forward_hook(hook(i)) for i, b in blocks.items()])
    return tokens
