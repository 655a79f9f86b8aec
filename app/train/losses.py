"""The distillation loss and the forward hooks feeding it, kept apart from the training loop."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from app.train.options import DistillOptions
from app.vit.attention_maps import attention_probs
from app.vit.builder import CompressedViT

# ---- hooks: what the loss needs from inside both networks ------------------------------------


@dataclass
class Taps:
    """Filled by hooks during one forward: block outputs, attention maps, pre-logits."""

    blocks: dict[int, torch.Tensor] = field(default_factory=dict)  # i -> [B, N_i, C]
    attention: dict[int, torch.Tensor] = field(default_factory=dict)  # i -> [B, H, N, N]
    pre_logits: torch.Tensor | None = None  # [B, C], the head's input


@contextmanager
def tapped(
    model: nn.Module, blocks: Sequence[int], attention: Sequence[int] = ()
) -> Iterator[Taps]:
    """Hooks on ``model`` (a timm ViT or CompressedViT) for as long as the context lasts."""
    taps = Taps()

    def keep_block(i: int) -> Callable[..., None]:
        def hook(_m: nn.Module, _args: tuple, out_BNC: torch.Tensor) -> None:
            taps.blocks[i] = out_BNC

        return hook

    def keep_attention(i: int) -> Callable[..., None]:
        def hook(attn: nn.Module, args: tuple) -> None:
            taps.attention[i] = attention_probs(attn, args[0])

        return hook

    def keep_pre_logits(_m: nn.Module, args: tuple) -> None:
        taps.pre_logits = args[0]

    with ExitStack() as stack:
        handles = [model.head.register_forward_pre_hook(keep_pre_logits)]
        handles += [model.blocks[i].register_forward_hook(keep_block(i)) for i in blocks]
        handles += [
            model.blocks[i].attn.register_forward_pre_hook(keep_attention(i)) for i in attention
        ]
        for handle in handles:
            stack.callback(handle.remove)
        yield taps


# ---- views where the two networks disagree ---------------------------------------------------


def nudge_towards_disagreement(
    teacher: nn.Module,
    student: nn.Module,
    x_BCHW: torch.Tensor,
    share: float,
    step_C: torch.Tensor,
    *,
    temperature: float,
    amp: bool,
) -> torch.Tensor:
    """The first ``share`` of the views moved one signed-gradient step (``step_C`` per
    channel, in normalised units) up the teacher-student KL; the rest unchanged.

    A small photo pool leaves most of input space unlabelled; a view pushed to where the
    student already departs from the teacher carries more of the teacher's decision
    boundary (Heo et al., AAAI 2019) and costs one extra forward and backward of both
    networks on that share. Pass the unwrapped student: this forward has no parameter
    gradients, which DDP's reducer would wait for.
    """
    k = round(share * x_BCHW.shape[0])
    if k == 0:
        return x_BCHW
    probe_BCHW = x_BCHW[:k].detach().requires_grad_(True)
    with torch.autocast(x_BCHW.device.type, dtype=torch.bfloat16, enabled=amp):
        kl = logit_kl(teacher(probe_BCHW), student(probe_BCHW), temperature)
    (grad_BCHW,) = torch.autograd.grad(kl, probe_BCHW)
    moved_BCHW = probe_BCHW.detach() + step_C.view(1, -1, 1, 1) * grad_BCHW.sign()
    return torch.cat([moved_BCHW, x_BCHW[k:]])


# ---- the loss ------------------------------------------------------------------------------


def logit_kl(t_BK: torch.Tensor, s_BK: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of the softened distributions, times T² (Hinton et al.)."""
    log_t = F.log_softmax(t_BK.float() / temperature, dim=-1)
    log_s = F.log_softmax(s_BK.float() / temperature, dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum(-1).mean() * temperature**2


def attention_guidance(static_HNN: torch.Tensor, teacher_BHNN: torch.Tensor) -> torch.Tensor:
    """Squared error of the static matrix to each image's teacher attention, relative to
    that attention's energy (scale-free: 1.0 for an all-zero matrix), averaged over images."""
    err_B = (static_HNN.float().unsqueeze(0) - teacher_BHNN).pow(2).sum((1, 2, 3))
    return (err_B / teacher_BHNN.pow(2).sum((1, 2, 3))).mean()


def feature_match(s_BNC: torch.Tensor, t_BNC: torch.Tensor) -> torch.Tensor:
    """MSE of layer-normalised features: robust to ViTs' few huge activation channels."""
    c = s_BNC.shape[-1]
    return F.mse_loss(F.layer_norm(s_BNC.float(), (c,)), F.layer_norm(t_BNC.float(), (c,)))


def patch_maps(student: nn.Module) -> dict[int, torch.Tensor]:
    """Block -> ``[P_i, P_0]``: all aggregations up to block i chained (detached), mapping
    the teacher's patch tokens onto the student's; blocks before the first one are absent."""
    maps: dict[int, torch.Tensor] = {}
    chain_QP: torch.Tensor | None = None
    aggs = student.aggregations() if isinstance(student, CompressedViT) else {}
    for i in range(len(student.blocks)):
        if i in aggs:
            w_QP = aggs[i].weight.detach().float()
            chain_QP = w_QP if chain_QP is None else w_QP @ chain_QP
        if chain_QP is not None:
            maps[i] = chain_QP
    return maps


def aggregate_like(t_BNC: torch.Tensor, map_QP: torch.Tensor | None) -> torch.Tensor:
    """Teacher tokens with the patch part mapped by ``map`` (CLS kept, as GLAD keeps it)."""
    if map_QP is None:
        return t_BNC
    patches_BQC = torch.einsum("qp,bpc->bqc", map_QP, t_BNC[:, 1:].float())
    return torch.cat([t_BNC[:, :1].float(), patches_BQC], dim=1)


def merge_like(t_BPC: torch.Tensor, source_BNP: torch.Tensor) -> torch.Tensor:
    """Teacher tokens averaged as the student merged its own (``source_BNP``: which of the
    ``P`` tokens each of the student's ``N`` stands for), so every merged token has a target:
    the mean of the teacher's tokens over the same patches."""
    sums_BNC = torch.bmm(source_BNP.float(), t_BPC.float())
    return sums_BNC / source_BNP.sum(-1, keepdim=True).float()


def static_layers(student: nn.Module) -> dict[int, nn.Module]:
    return student.static_attention() if isinstance(student, CompressedViT) else {}


def token_sources(student: nn.Module) -> dict[int, torch.Tensor]:
    """Block -> the source trace its forward left (``CompressedViT.track_token_sources``)."""
    return student.token_sources if isinstance(student, CompressedViT) else {}


@dataclass
class LossParts:
    """The loss to minimise and, detached (no device sync until logged), its parts."""

    total: torch.Tensor
    parts: dict[str, torch.Tensor]


def distill_loss(
    student: nn.Module,
    t_BK: torch.Tensor,
    s_BK: torch.Tensor,
    t_taps: Taps,
    s_taps: Taps,
    opts: DistillOptions,
) -> LossParts:
    """KL on logits + weighted hard-label CE, attention guidance and feature matching."""
    kd = logit_kl(t_BK, s_BK, opts.temperature)
    total, parts = kd, {"kd": kd.detach()}
    if opts.hard_weight:
        hard = F.cross_entropy(s_BK.float(), t_BK.argmax(-1))
        total = total + opts.hard_weight * hard
        parts["hard"] = hard.detach()
    static = static_layers(student)
    if opts.attn_weight and static:
        attn = torch.stack(
            [attention_guidance(m.attn_matrix, t_taps.attention[i]) for i, m in static.items()]
        ).mean()
        total = total + opts.attn_weight * attn
        parts["attn"] = attn.detach()
    if opts.feature_weight:
        maps = patch_maps(student)
        sources = token_sources(student) if opts.merged_features == "aligned" else {}
        terms = []
        for i, s_BNC in s_taps.blocks.items():
            t_BNC = aggregate_like(t_taps.blocks[i], maps.get(i))
            source_BNP = sources.get(i)
            if source_BNP is not None and source_BNP.shape[1:] == (s_BNC.shape[1], t_BNC.shape[1]):
                t_BNC = merge_like(t_BNC, source_BNP)
            if t_BNC.shape[1] != s_BNC.shape[1]:  # merged tokens, not aligned: CLS pairs up
                s_BNC, t_BNC = s_BNC[:, :1], t_BNC[:, :1]
            terms.append(feature_match(s_BNC, t_BNC))
        terms.append(feature_match(s_taps.pre_logits, t_taps.pre_logits))
        feat = torch.stack(terms).mean()
        total = total + opts.feature_weight * feat
        parts["feat"] = feat.detach()
    parts["loss"] = total.detach()
    parts["agree"] = (t_BK.argmax(-1) == s_BK.argmax(-1)).float().mean()
    return LossParts(total, parts)
