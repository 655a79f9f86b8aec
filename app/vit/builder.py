"""Build compressed ViTs (DGSSA static attention, GLAD token pyramid, ToMe token merging)
from dense timm ones.

``create_model(arch, compression)`` is what the model store calls to rebuild a network
before loading its safetensors, so a ``CompressedViT``'s state-dict keys depend on the
architecture and the config only: ``blocks.{i}.attn.{v,attn_matrix,proj}`` for static
blocks, ``aggregation.{i}.weight`` for the stage before block ``i``, and timm's names for
everything inherited from the dense model. Merging adds no parameters: a merging block
keeps the dense block's keys, so a ``merge=...`` model's state dict is the dense one's.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import timm
import torch
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer, global_pool_nlc
from torch import nn

from app.vit.attention_maps import capture_attention
from app.vit.config import CompressionConfig
from app.vit.merge import MergeBlock, MergeState
from app.vit.patch_embed import use_patch_gemm
from app.vit.static_attention import StaticAttention
from app.vit.token_pyramid import TokenAggregation, pyramid_grids

# Named configs, timm-style: "dgssa-s<n>" = n static blocks, "glad-...-t<k>" = k token
# stages, "tome-r<r>" = r tokens merged per block, "hybrid-s<n>-r<r>[-<r2>]" = n static
# blocks, then merging (r in blocks 2-3, r2 after). The merge presets assume 12 blocks and
# 197 tokens (DeiT at 224 px); "tome-r16" spells out ToMe's r=16 there, whose last block can
# merge only 10 (ToMe clamps r silently; a config here states it). Measured on DeiT-Tiny
# (250 dev images, static blocks calibrated, nothing fine-tuned), as top-1 agreement with
# the dense model / block FLOPs of dense: tome-r8 92.8% / 0.73, tome-r13 87.6% / 0.57,
# tome-r16 87.2% / 0.48, hybrid-s2-r16 88.4% / 0.60. Merging harder in blocks 2-3 beat
# merging harder late: hybrid-s2-r24-16 88.0% / 0.54, hybrid-s2-r28-16 86.8% / 0.51, vs
# static=0-1;merge=8@2-5,20@6-11 88.0% / 0.68. (250 images: +-2 points is noise.)
# "merge-t<k>": merging in k blocks only, with plain attention (proportional=off), to about
# glad-t3's token counts; content-adaptive pooling where GLAD's map is fixed. merge-t4
# (197 -> 148 -> 99 in blocks 0-1, 50 after 4, 26 after 7) 67.2% on dev / 69.1% on extra,
# merge-t6 (down to 25 tokens by block 8, fewer token-blocks than glad-t3) 69.6% / 67.7%,
# where glad-t3's fixed pooling gives 41.2% / 36.6% (CPU, no training). In one step per
# stage (merge=98@1,49@4,24@7) plain attention 60.8%, proportional 54.4%. merge-t5: the
# best of 30 milder schedules (block cost 0.42 of dense, merge-t6 0.30; picked on extra):
# 83.2% / 82.3% untrained. A CPU sweep of 29 schedules at merge-t6's cost found none better
# than it; merging must start at block 0, and block 2 is the worst place for a merge.
# "merge-t5-c<cost>": merge-t5's blocks with every r scaled up, to block cost 0.37 / 0.34 of
# dense (down to 41 / 34 tokens): 80.0% / 77.0% and 75.6% / 71.8% untrained.
# "merge-<k>x<r>": r tokens merged in k blocks spread over the depth, proportional attention:
# on a GPU each merging block costs a fixed time whatever its r, so fewer, larger merges pay
# it fewer times. merge-4x35 (blocks 0, 3, 6, 9) keeps 90.2% of dev + extra untrained at
# block cost 0.55, merge-3x47 (blocks 0, 4, 8) 89.2% at 0.52; without proportional
# attention such schedules lose 2-4 points (bench/results/fidelity/fidelity-cpu-20261206-*).
PRESETS: dict[str, str] = {
    "dense": "",
    "dgssa-s2": "static=0-1",
    "glad-t3": "tokens=99@2,50@5,26@8",
    "glad-s2-t2": "static=0-1;tokens=99@4,50@8",
    "glad-s3-t2": "static=0-2;tokens=50@3,26@6",
    "glad-s3-t3": "static=0-2;tokens=99@3,50@6,26@9",
    "glad-s2-t3": "static=0-1;tokens=99@2,50@5,26@8",
    "tome-r8": "merge=8",
    "tome-r13": "merge=13",
    "tome-r16": "merge=16@0-10,10@11",
    "hybrid-s2-r16": "static=0-1;merge=16@2-11",
    "hybrid-s2-r24-16": "static=0-1;merge=24@2-3,16@4-11",
    "hybrid-s2-r28-16": "static=0-1;merge=28@2-3,16@4-10",
    "merge-t4": "merge=49@0-1,49@4,24@7;proportional=off",
    "merge-t6": "merge=49@0-1,25@3-4,12@6-7;proportional=off",
    "merge-t5": "merge=44@0,34@1,27@3,21@4,16@7;proportional=off",
    "merge-t5-c37": "merge=48@0,37@1,30@3,23@4,18@7;proportional=off",
    "merge-t5-c34": "merge=51@0,39@1,31@3,24@4,18@7;proportional=off",
    "merge-4x35": "merge=35@0,35@3,35@6,35@9",
    "merge-3x47": "merge=47@0,47@4,47@8",
}


def resolve_config(text_or_preset: str) -> CompressionConfig:
    """A preset name from ``PRESETS`` or the text form, e.g. ``static=0-2;tokens=99@3``."""
    text = text_or_preset.strip()
    return CompressionConfig.parse(PRESETS.get(text, text))


class CompressedViT(nn.Module):
    """A DeiT/ViT whose early blocks use static attention and whose later blocks see fewer
    tokens (aggregated before a block, or merged inside it). Every other weight is the
    dense model's; the forward mirrors timm's."""

    def __init__(self, dense: VisionTransformer, compression: CompressionConfig) -> None:
        """Copies ``dense`` (left untouched) and swaps in the compressed layers."""
        super().__init__()
        _check_supported(dense)
        dense = copy.deepcopy(dense)
        depth = len(dense.blocks)
        num_tokens = dense.patch_embed.num_patches + 1  # patches + CLS
        late = [i for i in compression.static_layers if i >= depth]
        late += [s.layer for s in compression.token_schedule if s.layer >= depth]
        late += [s.first for s in compression.merge_schedule if s.first >= depth]
        if late:
            raise ValueError(f"{compression}: blocks {late} do not exist (depth {depth})")
        if compression.token_schedule and compression.token_schedule[0].tokens > num_tokens:
            raise ValueError(f"{compression}: more tokens than the model's {num_tokens}")

        self.compression = compression
        self.tokens_per_block = compression.tokens_per_block(depth, num_tokens)
        self.num_tokens_out = compression.output_tokens(depth, num_tokens)
        self.num_classes = dense.num_classes
        self.num_features = self.embed_dim = dense.embed_dim
        self.global_pool = dense.global_pool
        self.num_prefix_tokens = 1
        self.no_embed_class = dense.no_embed_class
        self.pool_include_prefix = getattr(dense, "pool_include_prefix", False)
        self.pretrained_cfg = getattr(dense, "pretrained_cfg", {})

        self.patch_embed = dense.patch_embed
        self.cls_token = dense.cls_token
        self.pos_embed = dense.pos_embed
        self.pos_drop = dense.pos_drop
        self.norm_pre = dense.norm_pre
        self.blocks = dense.blocks
        self.norm = dense.norm
        self.fc_norm = dense.fc_norm
        self.head_drop = dense.head_drop
        self.head = dense.head

        for i in compression.static_layers:
            block = self.blocks[i]
            if not isinstance(block.attn, Attention):
                raise TypeError(f"block {i}: {type(block.attn).__name__} is not timm Attention")
            block.attn = StaticAttention.from_dense(block.attn, self.tokens_per_block[i])

        # Aggregation before block i, keyed str(i); grids tracked stage to stage for the init.
        schedule = compression.token_schedule
        grid = tuple(dense.patch_embed.grid_size)
        grids = pyramid_grids(grid, [s.tokens - 1 for s in schedule])
        self.aggregation = nn.ModuleDict()
        tokens_in, grid_in = num_tokens, grid
        for stage, grid_out in zip(schedule, grids, strict=True):
            self.aggregation[str(stage.layer)] = TokenAggregation(
                tokens_in, stage.tokens, grid_in, grid_out
            ).to(device=self.pos_embed.device, dtype=self.pos_embed.dtype)
            tokens_in, grid_in = stage.tokens, grid_out

        # Every block from the first merge on: later ones (r = 0 too) need proportional
        # attention over the merged sizes; with plain attention only the merging blocks.
        # Blocks before the first merge stay timm's, bit for bit.
        proportional = compression.proportional_attention
        first_merge = compression.merge_schedule[0].first if compression.merge_schedule else depth
        for i, r in enumerate(compression.merge_r(depth)[first_merge:], start=first_merge):
            if r or proportional:
                self.blocks[i] = MergeBlock(self.blocks[i], r, proportional=proportional)
        # Distillation sets this to align the teacher's tokens with merged ones: each forward
        # then leaves, per block from the first merge on, which input tokens each output
        # token stands for (MergeState.source_BNP), ``[B, N_i, P]``.
        self.track_token_sources = False
        self.token_sources: dict[int, torch.Tensor] = {}

    def static_attention(self) -> dict[int, StaticAttention]:
        return {i: self.blocks[i].attn for i in self.compression.static_layers}

    def merge_blocks(self) -> dict[int, MergeBlock]:
        """Every block from the first merging one on, keyed by index (r may be 0)."""
        return {i: b for i, b in enumerate(self.blocks) if isinstance(b, MergeBlock)}

    def aggregations(self) -> dict[int, TokenAggregation]:
        """Keyed by the index of the block each one precedes."""
        return {int(i): agg for i, agg in self.aggregation.items()}

    def _pos_embed(self, x_BPC: torch.Tensor) -> torch.Tensor:
        cls_B1C = self.cls_token.expand(x_BPC.shape[0], -1, -1)
        if self.no_embed_class:  # DeiT-III: the position table covers patches only
            x_BNC = torch.cat([cls_B1C, x_BPC + self.pos_embed], dim=1)
        else:  # DeiT / original ViT: CLS has a position entry too
            x_BNC = torch.cat([cls_B1C, x_BPC], dim=1) + self.pos_embed
        return self.pos_drop(x_BNC)

    def forward_features(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        """Images -> normed tokens ``[B, N_out, C]`` (N_out = ``num_tokens_out``)."""
        x_BNC = self.norm_pre(self._pos_embed(self.patch_embed(x_B3HW)))
        merge_state = MergeState(track_source=self.track_token_sources)
        sources: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.blocks):
            if str(i) in self.aggregation:
                x_BNC = self.aggregation[str(i)](x_BNC)
                merge_state.source_BNP = None  # a trace restarts on the aggregated tokens
            x_BNC = block(x_BNC, merge_state) if isinstance(block, MergeBlock) else block(x_BNC)
            if merge_state.source_BNP is not None:
                sources[i] = merge_state.source_BNP
        if merge_state.track_source:  # only then: a served (compiled) forward mutates nothing
            self.token_sources = sources
        return self.norm(x_BNC)

    def forward_head(self, x_BNC: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool as timm does (``'token'``: CLS, ``'avg'``: mean of the other tokens, merged
        or not, as ToMe does), classify."""
        x_BC = global_pool_nlc(
            x_BNC,
            pool_type=self.global_pool,
            num_prefix_tokens=self.num_prefix_tokens,
            reduce_include_prefix=self.pool_include_prefix,
        )
        x_BC = self.head_drop(self.fc_norm(x_BC))
        return x_BC if pre_logits else self.head(x_BC)

    def forward(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x_B3HW))


def _check_supported(dense: nn.Module) -> None:
    """Fixed token count, exactly one CLS prefix token, plain pooling head."""
    if not isinstance(dense, VisionTransformer):
        raise TypeError(f"expected a timm VisionTransformer, got {type(dense).__name__}")
    problems = []
    if dense.cls_token is None or dense.num_prefix_tokens != 1:
        problems.append("needs exactly one prefix token, the CLS token")
    if dense.pos_embed is None:
        problems.append("needs an absolute position embedding")
    if dense.dynamic_img_size:
        problems.append("dynamic image size changes the token count")
    if not isinstance(dense.patch_drop, nn.Identity):
        problems.append("patch dropout changes the token count")
    if dense.attn_pool is not None:
        problems.append(f"global_pool {dense.global_pool!r} (attention pooling) unsupported")
    if problems:
        raise ValueError("cannot compress this model: " + "; ".join(problems))


def compress(dense: VisionTransformer, cfg: CompressionConfig) -> CompressedViT:
    """A compressed copy of ``dense`` with every dense weight; static attention is uniform
    until :func:`calibrate`, the token aggregations start as adaptive average pooling,
    merging needs nothing (its matching is computed per image)."""
    return CompressedViT(dense, cfg)


def create_model(
    arch: str,
    compression: CompressionConfig | None = None,
    *,
    num_classes: int = 1000,
    pretrained: bool = False,
    **timm_kwargs: Any,
) -> nn.Module:
    """``timm.create_model`` plus :func:`compress` when a config is given (the store's rebuild),
    with the patch embedding as one GEMM (:mod:`app.vit.patch_embed`; same weights and keys)."""
    model = timm.create_model(arch, pretrained=pretrained, num_classes=num_classes, **timm_kwargs)
    use_patch_gemm(model)
    return model if compression is None else compress(model, compression)


@torch.no_grad()
def calibrate(
    model: CompressedViT, teacher: VisionTransformer, batches: Iterable[torch.Tensor]
) -> None:
    """Set each static block's matrix to ``teacher``'s attention of that block, averaged over
    every image of ``batches`` (``[B, 3, H, W]`` each; moved to the teacher's device)."""
    static = model.static_attention()
    if not static:
        return
    param = next(teacher.parameters())
    sums_HNN: dict[int, torch.Tensor] = {}
    count = 0
    was_training = teacher.training
    teacher.eval()
    try:
        for images in batches:
            maps = capture_attention(teacher, images.to(param.device, param.dtype), static.keys())
            for i, attn_BHNN in maps.items():
                batch_sum_HNN = attn_BHNN.sum(dim=0, dtype=torch.float64)
                sums_HNN[i] = sums_HNN[i] + batch_sum_HNN if i in sums_HNN else batch_sum_HNN
            count += images.shape[0]
    finally:
        teacher.train(was_training)
    if count == 0:
        raise ValueError("calibrate needs at least one image")
    for i, attn in static.items():
        attn.set_attention(sums_HNN[i] / count)
