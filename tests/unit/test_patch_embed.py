"""The patch embedding as a GEMM: the convolution's output, weights and keys, without cuDNN."""

from __future__ import annotations

import copy

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from app.vit.builder import create_model, resolve_config
from app.vit.patch_embed import PatchProjection, use_patch_gemm
from tests.helpers import TINY_VIT


@pytest.mark.parametrize("size", [(32, 32), (35, 37)])  # 35x37: the conv drops the remainder
def test_projection_equals_the_patchify_convolution(size):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 24, kernel_size=8, stride=8)
    x = torch.randn(2, 3, *size)
    got = PatchProjection(conv)(x)
    assert got.shape == conv(x).shape
    torch.testing.assert_close(got, conv(x), atol=1e-5, rtol=1e-5)


def test_a_vit_with_the_projection_keeps_its_outputs_and_its_state_dict_keys():
    torch.manual_seed(0)
    dense = VisionTransformer(**TINY_VIT).eval()
    gemm = use_patch_gemm(copy.deepcopy(dense))
    assert isinstance(gemm.patch_embed.proj, PatchProjection)
    assert gemm.state_dict().keys() == dense.state_dict().keys()
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(gemm(x), dense(x), atol=1e-5, rtol=1e-5)
    gemm.load_state_dict(dense.state_dict())  # checkpoints load unchanged


def test_other_convolutions_are_left_alone():
    overlapping = nn.Module()
    overlapping.patch_embed = nn.Module()
    overlapping.patch_embed.proj = nn.Conv2d(3, 8, kernel_size=7, stride=4, padding=3)
    use_patch_gemm(overlapping)
    assert type(overlapping.patch_embed.proj) is nn.Conv2d
    with pytest.raises(ValueError, match="patchify"):
        PatchProjection(nn.Conv2d(3, 8, kernel_size=3, stride=1))


def test_models_the_store_builds_use_it_dense_and_compressed():
    for compression in (None, "tokens=99@2,50@5,26@8"):
        cfg = resolve_config(compression) if compression else None
        model = create_model("deit_tiny_patch16_224", cfg)
        assert isinstance(model.patch_embed.proj, PatchProjection)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_the_gpu_in_bf16_it_matches_cudnns_convolution():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 384, kernel_size=16, stride=16).cuda().to(torch.bfloat16)
    x = torch.randn(8, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        torch.testing.assert_close(PatchProjection(conv)(x), conv(x), atol=0.05, rtol=0.02)
