"""Compressed-ViT model code on CPU: shapes, equivalences with the dense model, the
state-dict round trip the model store relies on, calibration and the grid bookkeeping."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer

from app.vit.attention_maps import attention_probs, capture_attention, capture_tokens
from app.vit.builder import (
    PRESETS,
    CompressedViT,
    calibrate,
    compress,
    create_model,
    resolve_config,
)
from app.vit.config import CompressionConfig
from app.vit.static_attention import StaticAttention
from app.vit.token_pyramid import (
    TokenAggregation,
    adaptive_pool_matrix,
    choose_grid,
    pyramid_grids,
)
from tests.helpers import TINY_VIT

ARCH = "deit_tiny_patch16_224"
NUM_CLASSES = 10


def tiny_dense(global_pool: str = "token") -> VisionTransformer:
    """Random weights larger than timm's init, so attention maps are far from uniform."""
    torch.manual_seed(0)
    model = create_model(ARCH, num_classes=NUM_CLASSES, global_pool=global_pool, **TINY_VIT)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
        for block in model.blocks:
            block.attn.qkv.weight.mul_(4.0)  # peaked attention
    return model.eval()


def images(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def dense() -> VisionTransformer:
    return tiny_dense()


# --- token pyramid -------------------------------------------------------------------------


def test_grid_choice_and_tracking() -> None:
    assert choose_grid(98, (14, 14)) == (14, 7)
    assert choose_grid(49, (14, 7)) == (7, 7)
    assert choose_grid(25, (7, 7)) == (5, 5)
    assert choose_grid(97, (14, 14)) is None  # prime: 1-D pooling
    assert choose_grid(12, None) is None  # once 1-D, 1-D for good
    assert pyramid_grids((14, 14), [98, 49, 25]) == [(14, 7), (7, 7), (5, 5)]
    assert pyramid_grids((14, 14), [49, 24]) == [(7, 7), (6, 4)]
    assert pyramid_grids((4, 4), [3, 2]) == [None, None]


@pytest.mark.parametrize(
    ("grid_in", "grid_out"),
    [((14, 14), (14, 7)), ((14, 7), (7, 7)), ((7, 7), (5, 5)), ((4, 4), (3, 2))],
)
def test_pool_matrix_is_adaptive_avg_pool2d(grid_in: tuple, grid_out: tuple) -> None:
    n_in, n_out = grid_in[0] * grid_in[1], grid_out[0] * grid_out[1]
    pool_OI = adaptive_pool_matrix(n_in, n_out, grid_in, grid_out)
    x_CHW = torch.randn(5, *grid_in, dtype=torch.float64)
    expected_CO = F.adaptive_avg_pool2d(x_CHW, grid_out).flatten(1)
    torch.testing.assert_close(x_CHW.flatten(1) @ pool_OI.double().T, expected_CO)
    torch.testing.assert_close(pool_OI.sum(dim=1), torch.ones(n_out))


def test_pool_matrix_1d_fallback() -> None:
    pool_OI = adaptive_pool_matrix(97, 13, (14, 14), None)
    x_CL = torch.randn(4, 97, dtype=torch.float64)
    torch.testing.assert_close(x_CL @ pool_OI.double().T, F.adaptive_avg_pool1d(x_CL, 13))
    torch.testing.assert_close(pool_OI.sum(dim=1), torch.ones(13))


def test_token_aggregation_shapes_and_cls() -> None:
    agg = TokenAggregation(17, 9, (4, 4), (4, 2))
    assert agg.weight.shape == (8, 16)
    x_BNC = torch.randn(2, 17, 64)
    out_BNC = agg(x_BNC)
    assert out_BNC.shape == (2, 9, 64)
    assert torch.equal(out_BNC[:, 0], x_BNC[:, 0])
    # patch token (0, 0) of the 4x2 grid averages patches (0,0), (0,1) of the 4x4 grid
    torch.testing.assert_close(out_BNC[:, 1], x_BNC[:, 1:3].mean(dim=1))


# --- static attention ----------------------------------------------------------------------


def test_static_attention_from_dense(dense: VisionTransformer) -> None:
    attn = dense.blocks[0].attn
    static = StaticAttention.from_dense(attn, num_tokens=17)
    assert static.attn_matrix.shape == (4, 17, 17)
    torch.testing.assert_close(static.attn_matrix.sum(-1), torch.ones(4, 17))  # uniform
    torch.testing.assert_close(static.v.weight, attn.qkv.weight[128:])
    torch.testing.assert_close(static.v.bias, attn.qkv.bias[128:])
    torch.testing.assert_close(static.proj.weight, attn.proj.weight)
    assert static(torch.randn(3, 17, 64)).shape == (3, 17, 64)
    assert not hasattr(static, "qkv")


def test_static_attention_with_image_attention_equals_dense(dense: VisionTransformer) -> None:
    """Given one image's own attention map, the static layer is the dense layer on it."""
    image = images(1)
    block = dense.blocks[1]
    with torch.no_grad():
        x_BNC = block.norm1(capture_tokens(dense, image, [0])[0])  # block 1's attention input
        attn_BHNN = capture_attention(dense, image, [1])[1]
        torch.testing.assert_close(attn_BHNN, attention_probs(block.attn, x_BNC))
        static = StaticAttention.from_dense(block.attn, num_tokens=17)
        static.set_attention(attn_BHNN[0])
        torch.testing.assert_close(static(x_BNC), block.attn(x_BNC), atol=1e-5, rtol=0)


# --- builder -------------------------------------------------------------------------------


@pytest.mark.parametrize("global_pool", ["token", "avg"])
@pytest.mark.parametrize("text", ["", "tokens=17@2"])
def test_identity_compression_reproduces_dense(global_pool: str, text: str) -> None:
    """An empty config, or a token map 17 -> 17 (its pooling init is the identity)."""
    dense = tiny_dense(global_pool)
    model = compress(dense, CompressionConfig.parse(text)).eval()
    for agg in model.aggregations().values():
        assert torch.equal(agg.weight, torch.eye(16))
    with torch.no_grad():
        torch.testing.assert_close(model(images(3)), dense(images(3)), atol=0, rtol=0)


def test_compress_leaves_dense_untouched(dense: VisionTransformer) -> None:
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    model = compress(dense, CompressionConfig.parse("static=0-1;tokens=9@2,5@3"))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    assert all(isinstance(block.attn, Attention) for block in dense.blocks)
    after = dense.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_state_dict_round_trip(tmp_path) -> None:
    cfg = CompressionConfig.parse("static=0-1;tokens=9@2,5@3")
    model = compress(tiny_dense(), cfg).eval()
    with torch.no_grad():  # move every compressed parameter away from its init
        for module in [*model.static_attention().values(), *model.aggregations().values()]:
            for param in module.parameters():
                param.add_(torch.randn_like(param) * 0.1)
    state = model.state_dict()
    assert "blocks.0.attn.attn_matrix" in state and "aggregation.3.weight" in state
    assert "blocks.0.attn.qkv.weight" not in state and "blocks.2.attn.qkv.weight" in state

    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")
    fresh = create_model(ARCH, cfg, num_classes=NUM_CLASSES, **TINY_VIT).eval()
    assert isinstance(fresh, CompressedViT) and fresh.compression == cfg
    fresh.load_state_dict(load_file(tmp_path / "w.safetensors"), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(images(2)), model(images(2)), atol=0, rtol=0)


def test_tokens_per_block_matches_sequence_lengths(dense: VisionTransformer) -> None:
    cfg = CompressionConfig.parse("static=0;tokens=9@1,5@3")
    model = compress(dense, cfg)
    assert model.tokens_per_block == cfg.tokens_per_block(4, 17) == [17, 9, 9, 5]
    with torch.no_grad():
        outputs = capture_tokens(model, images(2), range(4))
    assert [outputs[i].shape[1] for i in range(4)] == model.tokens_per_block
    assert model.forward_features(images(2)).shape == (2, 5, 64)
    assert model(images(2)).shape == (2, NUM_CLASSES)


def test_calibrate_sets_the_mean_attention(dense: VisionTransformer) -> None:
    model = compress(dense, CompressionConfig.parse("static=0-1;tokens=9@2"))
    batches = [images(1, seed=1), images(2, seed=2)]
    calibrate(model, dense, batches)
    with torch.no_grad():
        maps = [capture_attention(dense, b, [0, 1]) for b in batches]
    for i in (0, 1):
        mean_HNN = torch.cat([m[i] for m in maps]).mean(dim=0)
        torch.testing.assert_close(model.static_attention()[i].attn_matrix, mean_HNN)


def test_calibrated_on_one_image_reproduces_dense_on_it(dense: VisionTransformer) -> None:
    model = compress(dense, CompressionConfig.parse("static=0-1")).eval()
    image = images(1)
    calibrate(model, dense, [image])
    with torch.no_grad():
        torch.testing.assert_close(model(image), dense(image), atol=1e-5, rtol=0)


def test_unsupported_models_are_refused() -> None:
    no_cls = VisionTransformer(**TINY_VIT, class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match="CLS"):
        compress(no_cls, CompressionConfig())
    with pytest.raises(ValueError, match="do not exist"):
        compress(tiny_dense(), CompressionConfig.parse("static=4"))
    with pytest.raises(ValueError, match="more tokens"):
        compress(tiny_dense(), CompressionConfig.parse("tokens=18@1"))


def test_presets_resolve() -> None:
    for name, text in PRESETS.items():
        cfg = resolve_config(name)
        assert cfg == CompressionConfig.parse(text)
        assert resolve_config(str(cfg)) == cfg
    assert resolve_config("static=0-1").static_layers == (0, 1)


def test_deit_tiny_architecture_shapes() -> None:
    """The real 197-token geometry: 14x14 -> 14x7 -> 7x7 -> 5x5."""
    torch.manual_seed(0)
    model = create_model(ARCH, resolve_config("glad-s3-t3")).eval()
    assert {i: a.attn_matrix.shape for i, a in model.static_attention().items()} == {
        i: (3, 197, 197) for i in range(3)
    }
    assert {i: a.weight.shape for i, a in model.aggregations().items()} == {
        3: (98, 196),
        6: (49, 98),
        9: (25, 49),
    }
    with torch.no_grad():
        outputs = capture_tokens(model, torch.randn(1, 3, 224, 224), range(12))
    lengths = [outputs[i].shape[1] for i in range(12)]
    assert lengths == model.tokens_per_block == [197] * 3 + [99] * 3 + [50] * 3 + [26] * 3
