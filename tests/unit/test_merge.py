"""Token merging (ToMe) and hybrids on CPU: the config text, the matching against a plain
reference, the invariants (sizes, CLS, static shapes), dense equivalence at r = 0, the
store round trip, torch.compile, and real DeiT-Tiny fidelity (slow)."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from contextlib import contextmanager

import huggingface_hub.constants
import pytest
import timm
import timm.data
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from pydantic import ValidationError
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from app.serving.runner import ModelRunner
from app.store import Manifest, ModelStore, Preprocessing, Source
from app.train.losses import merge_like
from app.vit.attention_maps import capture_tokens
from app.vit.builder import PRESETS, CompressedViT, compress, create_model, resolve_config
from app.vit.config import (
    CompressionConfig,
    MergeSpan,
    decreasing_r,
    merge_spans,
    r_for_token_targets,
)
from app.vit.merge import (
    MergeAttention,
    MergeBlock,
    MergeState,
    bipartite_soft_matching,
    merge_weighted,
)
from tests.helpers import DEV_IMAGES, HF_CACHE, TINY_VIT, require_shared

ARCH = "deit_tiny_patch16_224"
NUM_CLASSES = 10
HYBRID = "static=0;merge=4@1-2,2@3"  # 17 -> 17 -> 13 -> 9 -> 7 tokens


def tiny_dense(**kwargs) -> VisionTransformer:
    """Random weights larger than timm's init, so attention (and matching) is not uniform."""
    torch.manual_seed(0)
    model = create_model(ARCH, num_classes=NUM_CLASSES, **{**TINY_VIT, **kwargs})
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    return model.eval()


def images(batch: int, seed: int = 1, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def dense() -> VisionTransformer:
    return tiny_dense()


# --- config text -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "canonical", "family"),
    [
        ("merge=13", "merge=13", "merge"),
        ("merge=8@0-5,16@6-11", "merge=8@0-5,16@6-11", "merge"),
        ("merge=8@0-5, 8@6-", "merge=8", "merge"),  # touching spans of equal r join
        ("merge=4@3", "merge=4@3", "merge"),
        ("static=0-1;merge=13@2-11", "static=0,1;merge=13@2-11", "hybrid"),
        ("static=0-1;merge=16@2-", "static=0,1;merge=16@2-", "hybrid"),
        ("merge=0", "dense", "glad"),  # r = 0 everywhere is the dense model
        ("dense", "dense", "glad"),
        ("static=0-2;tokens=99@3,50@6", "static=0,1,2;tokens=99@3,50@6", "glad"),
        ("merge=8@1;proportional=off", "merge=8@1;proportional=off", "merge"),
        ("merge=8;proportional=on", "merge=8", "merge"),  # on is the default, left out
    ],
)
def test_text_round_trip_and_family(text: str, canonical: str, family: str) -> None:
    cfg = CompressionConfig.parse(text)
    assert str(cfg) == canonical and cfg.family == family
    assert CompressionConfig.parse(str(cfg)) == cfg
    assert CompressionConfig.model_validate_json(cfg.model_dump_json()) == cfg


@given(
    r_per_block=st.lists(st.integers(0, 6), min_size=1, max_size=12),
    static=st.integers(0, 3),
)
def test_any_per_block_schedule_round_trips(r_per_block: list[int], static: int) -> None:
    r_per_block = [0] * static + r_per_block  # static blocks precede every merge
    depth = len(r_per_block)
    cfg = CompressionConfig(
        static_layers=tuple(range(static)), merge_schedule=merge_spans(r_per_block)
    )
    assert CompressionConfig.parse(str(cfg)) == cfg
    assert cfg.merge_r(depth) == r_per_block
    merging = any(r_per_block)
    assert cfg.family == ("glad" if not merging else "hybrid" if static else "merge")
    counts = cfg.tokens_per_block(depth, 197)
    assert counts[0] == 197 and cfg.output_tokens(depth, 197) == 197 - sum(r_per_block)


def test_stored_family_is_checked_and_old_manifests_load() -> None:
    old = CompressionConfig.model_validate_json('{"family": "glad", "static_layers": [0, 1]}')
    assert old == CompressionConfig.parse("static=0-1")
    merge = CompressionConfig.parse("merge=8")
    assert json.loads(merge.model_dump_json())["family"] == "merge"
    with pytest.raises(ValidationError, match="does not match"):
        CompressionConfig(family="glad", merge_schedule=(MergeSpan(r=8),))


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("static=0-2;merge=8@2-", "static layers must come before"),
        ("tokens=99@3;merge=8", "cannot be combined"),
        ("merge=8@0-5,4@5-", "overlap"),
        ("merge=8@2-,4@6", "overlap"),
        ("merge=8@5-3", "ends before it starts"),
        ("merge=8@x", "bad merge item"),
        ("merge=-1", "bad merge item"),
        ("merger=8", "unknown compression key"),
        ("tokens=99@3;proportional=off", "applies to merging only"),
        ("merge=8;proportional=no", "use on or off"),
    ],
)
def test_invalid_configs_are_refused(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        CompressionConfig.parse(text)


def test_tokens_per_block_counts_merges() -> None:
    cfg = CompressionConfig.parse("static=0-1;merge=16@2-11")
    assert cfg.tokens_per_block(12, 197) == [
        197,
        197,
        197,
        181,
        165,
        149,
        133,
        117,
        101,
        85,
        69,
        53,
    ]
    assert cfg.output_tokens(12, 197) == 37
    with pytest.raises(ValueError, match="block 11 cannot merge 16 of its 21 tokens; at most 10"):
        CompressionConfig.parse("merge=16").tokens_per_block(12, 197)
    with pytest.raises(ValueError, match="past the last block"):
        CompressionConfig.parse("merge=8@0-12").tokens_per_block(12, 197)


def test_builder_refuses_what_the_model_cannot_do(dense: VisionTransformer) -> None:
    with pytest.raises(ValueError, match="do not exist"):
        compress(dense, CompressionConfig.parse("merge=3@4-"))
    with pytest.raises(ValueError, match="block 0 cannot merge 9 of its 17 tokens"):
        compress(dense, CompressionConfig.parse("merge=9"))


def test_schedules() -> None:
    assert decreasing_r(13, 12) == [26, 23, 21, 18, 16, 14, 11, 9, 7, 4, 2, 0]
    assert r_for_token_targets(197, [181, 165, 165, 101]) == [16, 16, 0, 64]
    with pytest.raises(ValueError, match="increase"):
        r_for_token_targets(197, [181, 190])
    assert merge_spans([0, 0, 8, 8, 16, 0, 4]) == (
        MergeSpan(r=8, first=2, last=3),
        MergeSpan(r=16, first=4, last=4),
        MergeSpan(r=4, first=6, last=6),
    )
    cfg = CompressionConfig(merge_schedule=merge_spans(r_for_token_targets(17, [13, 9, 9, 7])))
    assert str(cfg) == "merge=4@0-1,2@3" and cfg.tokens_per_block(4, 17) == [17, 13, 9, 9]


def test_presets_are_valid_for_deit() -> None:
    for name in PRESETS:
        cfg = resolve_config(name)
        cfg.tokens_per_block(12, 197)  # raises if a block cannot merge its r
        assert resolve_config(str(cfg)) == cfg
    assert resolve_config("tome-r16").output_tokens(12, 197) == 11  # as ToMe's r=16
    assert resolve_config("hybrid-s2-r16").family == "hybrid"
    assert resolve_config("merge-t4").tokens_per_block(12, 197)[2::3] == [99, 50, 26, 26]


# --- matching and merging --------------------------------------------------------------------


def reference_merge(
    x_NC: torch.Tensor, keys_NK: torch.Tensor, size_N: torch.Tensor, r: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """ToMe written plainly for one image: lists, a loop, no index tensors."""
    metric = F.normalize(keys_NK, dim=-1)
    a, b = list(range(0, len(x_NC), 2)), list(range(1, len(x_NC), 2))
    best = {i: max(b, key=lambda j, i=i: float(metric[i] @ metric[j])) for i in a[1:]}
    score = {i: float(metric[i] @ metric[best[i]]) for i in a[1:]}
    merged = sorted(a[1:], key=score.__getitem__, reverse=True)[:r]
    total = {j: x_NC[j] * size_N[j] for j in b}
    count = {j: size_N[j].clone() for j in b}
    for i in merged:
        total[best[i]] = total[best[i]] + x_NC[i] * size_N[i]
        count[best[i]] = count[best[i]] + size_N[i]
    kept = [i for i in a if i not in merged]
    x_out = [x_NC[i] for i in kept] + [total[j] / count[j] for j in b]
    size_out = [size_N[i] for i in kept] + [count[j] for j in b]
    return torch.stack(x_out), torch.stack(size_out)


@pytest.mark.parametrize(("num_tokens", "r"), [(17, 3), (17, 8), (16, 7), (197, 13)])
def test_merge_matches_the_plain_reference(num_tokens: int, r: int) -> None:
    gen = torch.Generator().manual_seed(num_tokens + r)
    x_BNC = torch.randn(3, num_tokens, 8, generator=gen, dtype=torch.float64)
    keys_BNK = torch.randn(3, num_tokens, 4, generator=gen, dtype=torch.float64)
    size_BN1 = torch.randint(1, 5, (3, num_tokens, 1), generator=gen).double()
    size_BN1[:, 0] = 1.0
    out_BMC, out_size_BM1 = merge_weighted(x_BNC, size_BN1, bipartite_soft_matching(keys_BNK, r))
    assert out_BMC.shape == (3, num_tokens - r, 8)
    for b in range(3):
        ref_MC, ref_size_M = reference_merge(x_BNC[b], keys_BNK[b], size_BN1[b, :, 0], r)
        torch.testing.assert_close(out_BMC[b], ref_MC)
        torch.testing.assert_close(out_size_BM1[b, :, 0], ref_size_M)


def test_merge_is_differentiable_so_merged_models_can_be_distilled() -> None:
    gen = torch.Generator().manual_seed(0)
    x_BNC = torch.randn(2, 17, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    size_BN1 = torch.randint(1, 4, (2, 17, 1), generator=gen).double()
    matching = bipartite_soft_matching(torch.randn(2, 17, 4, generator=gen), 5)
    assert torch.autograd.gradcheck(lambda x: merge_weighted(x, size_BN1, matching)[0], (x_BNC,))


def test_cls_is_never_merged_even_when_it_matches_best() -> None:
    keys_BNK = torch.randn(2, 17, 4)
    keys_BNK[:, 0] = keys_BNK[:, 1]  # CLS identical to a B token: the best match there is
    matching = bipartite_soft_matching(keys_BNK, 8)  # every other A token is merged
    assert (matching.src_pos != 0).all()
    assert (matching.slot_pos[:, :1, 0] == 0).all()  # CLS kept, first
    assert matching.slot_pos.shape[1] == 17 - 8 and (matching.slot_pos[:, 1:] % 2 == 1).all()
    x_BNC = torch.randn(2, 17, 6)
    out_BNC, size_BN1 = merge_weighted(x_BNC, None, matching)
    assert torch.equal(out_BNC[:, 0], x_BNC[:, 0]) and (size_BN1[:, 0] == 1).all()


def test_merging_more_than_half_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot merge 9 of 17"):
        bipartite_soft_matching(torch.randn(1, 17, 4), 9)


# --- merged models ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["merge=0", "merge=0@0-3", ""])
def test_r0_reproduces_the_dense_model_exactly(dense: VisionTransformer, text: str) -> None:
    model = compress(dense, CompressionConfig.parse(text)).eval()
    assert not model.merge_blocks()
    with torch.no_grad():
        torch.testing.assert_close(model(images(3)), dense(images(3)), atol=0, rtol=0)


def test_merge_block_with_r0_is_the_dense_block(dense: VisionTransformer) -> None:
    """A block after the first merge may merge nothing; on unmerged tokens it is timm's."""
    block = copy.deepcopy(dense.blocks[1])
    block.attn.fused_attn = True  # timm's default; MergeAttention always takes that path
    x_BNC = torch.randn(3, 17, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            MergeBlock(block, 0)(x_BNC, MergeState()), block(x_BNC), atol=0, rtol=0
        )


def test_blocks_before_the_first_merge_are_untouched(dense: VisionTransformer) -> None:
    model = compress(dense, CompressionConfig.parse("merge=3@2-")).eval()
    assert sorted(model.merge_blocks()) == [2, 3]
    with torch.no_grad():
        ours = capture_tokens(model, images(2), [0, 1])
        theirs = capture_tokens(dense, images(2), [0, 1])
    assert all(torch.equal(ours[i], theirs[i]) for i in (0, 1))


@contextmanager
def hooked_sizes(model: CompressedViT) -> Iterator[dict[int, torch.Tensor]]:
    """Token sizes after each merge block, read from the state it was handed."""
    sizes: dict[int, torch.Tensor] = {}

    def hook(i: int):
        def fn(_block: nn.Module, args: tuple, _out: torch.Tensor) -> None:
            sizes[i] = args[1].size_BN1

        return fn

    handles = [b.register_forward_hook(hook(i)) for i, b in model.merge_blocks().items()]
    try:
        yield sizes
    finally:
        for handle in handles:
            handle.remove()


def test_plain_attention_changes_only_the_merging_blocks(dense: VisionTransformer) -> None:
    """proportional=off: blocks after a merge stay timm's; merges still weight by size, so
    the merging blocks get the sizes; and the log-size bias really is left out."""
    plain = compress(dense, CompressionConfig.parse("merge=3@1,2@3;proportional=off")).eval()
    assert sorted(plain.merge_blocks()) == [1, 3]
    assert all(type(plain.blocks[i]) is type(dense.blocks[i]) for i in (0, 2))
    proportional = compress(dense, CompressionConfig.parse("merge=3@1,2@3")).eval()
    assert sorted(proportional.merge_blocks()) == [1, 2, 3]
    with torch.no_grad(), hooked_sizes(plain) as sizes:
        out = plain(images(3))
    assert (sizes[3].sum(dim=1) == 17).all() and sizes[3].max() > 1
    with torch.no_grad():
        assert not torch.allclose(out, proportional(images(3)))
        # Block 2 of the plain model is exactly timm's block on the merged tokens.
        tokens = capture_tokens(plain, images(3), [1, 2])
        torch.testing.assert_close(dense.blocks[2](tokens[1]), tokens[2], atol=0, rtol=0)


@pytest.mark.parametrize(
    "text", ["merge=3", HYBRID, "merge=8@0,4@1,2@2", "merge=4@0,3@2;proportional=off"]
)
def test_sizes_sum_to_the_input_count(dense: VisionTransformer, text: str) -> None:
    model = compress(dense, CompressionConfig.parse(text)).eval()
    with torch.no_grad(), hooked_sizes(model) as sizes:
        model(images(3))
    counts = [*model.tokens_per_block[1:], model.num_tokens_out]
    assert sorted(sizes) == sorted(model.merge_blocks())
    for i, size_BN1 in sizes.items():
        assert size_BN1.shape == (3, counts[i], 1)
        assert (size_BN1.sum(dim=1) == 17).all()
        assert (size_BN1[:, 0] == 1).all() and (size_BN1 >= 1).all()


def test_cls_features_pass_through_a_merge_unchanged(dense: VisionTransformer) -> None:
    """At each merging block: CLS after attention (block input + attention output) equals
    CLS after the merge (the MLP's input), bit for bit, and stays at index 0."""
    model = compress(dense, CompressionConfig.parse(HYBRID)).eval()
    seen: dict[str, dict[int, torch.Tensor]] = {"in": {}, "attn": {}, "merged": {}}
    handles = []
    for i, block in model.merge_blocks().items():
        handles += [
            block.register_forward_pre_hook(lambda m, a, i=i: seen["in"].update({i: a[0]})),
            block.attn.register_forward_hook(
                lambda m, a, out, i=i: seen["attn"].update({i: out[0]})
            ),
            block.norm2.register_forward_pre_hook(
                lambda m, a, i=i: seen["merged"].update({i: a[0]})
            ),
        ]
    with torch.no_grad():
        model(images(4))
    for handle in handles:
        handle.remove()
    for i, block in model.merge_blocks().items():
        before_BNC = seen["in"][i] + seen["attn"][i]
        assert seen["merged"][i].shape[1] == before_BNC.shape[1] - block.r
        assert torch.equal(seen["merged"][i][:, 0], before_BNC[:, 0])


def test_merged_shapes_are_static(dense: VisionTransformer) -> None:
    """Same shapes for any content, ties included (a constant image: all patches equal)."""
    model = compress(dense, CompressionConfig.parse(HYBRID)).eval()
    assert model.tokens_per_block == [17, 17, 13, 9] and model.num_tokens_out == 7
    inputs = [images(3, seed=1), images(3, seed=2), torch.zeros(3, 3, 32, 32), images(1)]
    with torch.no_grad():
        for x in inputs:
            outputs = capture_tokens(model, x, range(4))
            lengths = [outputs[i].shape[1] for i in range(4)]
            assert lengths == [*model.tokens_per_block[1:], model.num_tokens_out]
            assert model.forward_features(x).shape == (len(x), 7, 64)
            assert model(x).shape == (len(x), NUM_CLASSES)


def test_source_trace_merges_tokens_as_the_merges_did() -> None:
    """Averaging the first merge's input over each token's source gives what two chained
    size-weighted merges gave: the trace a teacher's tokens are merged through."""
    x_BNC = torch.randn(3, 17, 8)
    state = MergeState(track_source=True)
    merged_BNC = x_BNC
    for r in (4, 3):
        matching = bipartite_soft_matching(torch.randn(3, merged_BNC.shape[1], 5), r)
        num_tokens = merged_BNC.shape[1]
        merged_BNC, size_BM1 = merge_weighted(merged_BNC, state.size_BN1, matching)
        state.merged(size_BM1, matching, num_tokens)
    source_BNP = state.source_BNP
    assert source_BNP.shape == (3, 10, 17)
    assert torch.equal(source_BNP.sum(-1, keepdim=True), state.size_BN1)
    assert torch.equal(source_BNP.sum(1), torch.ones(3, 17))  # every input token once
    assert torch.allclose(merge_like(x_BNC, source_BNP), merged_BNC, atol=1e-6)


def test_a_served_forward_tracks_no_sources(dense: VisionTransformer) -> None:
    model = compress(dense, CompressionConfig.parse("merge=4@0,3@2;proportional=off")).eval()
    with torch.no_grad():
        model(images(2))
        assert model.token_sources == {}
        model.track_token_sources = True
        model(images(2))
    counts = [*model.tokens_per_block[1:], model.num_tokens_out]
    # from the first merge on, plain blocks between merges included
    assert {i: s.shape for i, s in model.token_sources.items()} == {
        i: (2, counts[i], 17) for i in range(4)
    }


def test_merged_model_trains(dense: VisionTransformer) -> None:
    model = compress(dense, CompressionConfig.parse("merge=3")).train()
    model(images(2)).logsumexp(-1).sum().backward()
    grad = model.blocks[3].attn.qkv.weight.grad
    assert grad is not None and grad.isfinite().all() and grad.abs().sum() > 0


def test_store_round_trip(tmp_path, dense: VisionTransformer) -> None:
    cfg = CompressionConfig.parse(HYBRID)
    model = compress(dense, cfg).eval()
    with torch.no_grad():  # a calibrated-looking static matrix, not the uniform init
        model.static_attention()[0].attn_matrix.copy_(torch.rand(4, 17, 17).softmax(-1))
    store = ModelStore(tmp_path)
    manifest = Manifest(
        name="tiny-hybrid",
        architecture=ARCH,
        architecture_kwargs=TINY_VIT,
        variant="compressed",
        compression=cfg,
        num_classes=NUM_CLASSES,
        preprocessing=Preprocessing(input_size=(3, 32, 32)),
        source=Source(kind="compress", ref="tests"),
    )
    store.write_entry(manifest, model.state_dict())
    stored = json.loads((tmp_path / "tiny-hybrid" / "manifest.json").read_text())
    assert stored["compression"]["family"] == "hybrid"
    loaded = store.load("tiny-hybrid")
    assert loaded.manifest.compression == cfg
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(images(3)), model(images(3)), atol=0, rtol=0)


def test_compiles_fullgraph() -> None:
    """No graph break, no data-dependent shape: what CUDA graphs and batching rely on.
    Smaller still than the other tests' model: CPU Inductor compiles every kernel in C++."""
    dense = tiny_dense(embed_dim=32, depth=2, num_heads=2)
    model = compress(dense, CompressionConfig.parse("static=0;merge=4@1"))
    compiled = torch.compile(model.eval(), fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(images(3)), model(images(3)), atol=1e-5, rtol=1e-5)


def test_a_compiling_runner_compiles_a_merged_model() -> None:
    """``VITSERVE_COMPILE=1`` on a merged model: it predicts what the eager model predicts
    (the matching has no sort left, so nothing is kept out of the graph)."""
    model = compress(
        tiny_dense(embed_dim=32, depth=3, num_heads=2), CompressionConfig.parse("merge=4@1,2@2")
    )
    common = {"device": torch.device("cpu"), "dtype": torch.float32, "input_size": (3, 32, 32)}
    eager = ModelRunner(copy.deepcopy(model), **common)
    compiled = ModelRunner(model, compile=True, **common)
    x = images(3)
    torch.testing.assert_close(compiled.predict(x), eager.predict(x), atol=1e-5, rtol=1e-5)


def test_deit_tiny_architecture() -> None:
    """The real 197-token geometry, random weights: counts, keys, shapes of every preset."""
    torch.manual_seed(0)
    dense = create_model(ARCH).eval()
    dense_keys = set(dense.state_dict())
    x = torch.randn(1, 3, 224, 224)
    for name in [n for n in PRESETS if "merge=" in PRESETS[n]]:
        model = compress(dense, resolve_config(name)).eval()
        with torch.no_grad():
            outputs = capture_tokens(model, x, range(12))
        lengths = [outputs[i].shape[1] for i in range(12)]
        assert lengths == [*model.tokens_per_block[1:], model.num_tokens_out], name
        static = [f"blocks.{i}.attn." for i in model.compression.static_layers]
        qkv = {f"{s}qkv.{p}" for s in static for p in ("weight", "bias")}
        v = {f"{s}{p}" for s in static for p in ("v.weight", "v.bias", "attn_matrix")}
        assert set(model.state_dict()) == dense_keys - qkv | v, name
        assert model(x).shape == (1, 1000)


# --- real weights ----------------------------------------------------------------------------


@pytest.mark.slow
def test_real_deit_tiny_r13_agrees_with_dense(monkeypatch: pytest.MonkeyPatch) -> None:
    """32 dev photos through timm's eval transform; on all 250, r=13 agrees 87.6%."""
    require_shared(HF_CACHE, DEV_IMAGES)
    # huggingface_hub reads these once, at import (timm imports it): set both.
    monkeypatch.setenv("HF_HUB_CACHE", str(HF_CACHE))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(HF_CACHE))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    dense = timm.create_model(ARCH, pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=dense))
    files = sorted(DEV_IMAGES.glob("*.JPEG"))[:32]
    x = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    merged = compress(dense, resolve_config("tome-r13")).eval()
    with torch.no_grad():
        agreement = (merged(x).argmax(-1) == dense(x).argmax(-1)).float().mean().item()
    assert agreement >= 0.8, f"top-1 agreement {agreement:.1%}"


@pytest.mark.parametrize(("head_dim", "qkv_bias"), [(64, True), (12, True), (7, False)])
def test_proportional_attention_equals_the_biased_softmax(head_dim: int, qkv_bias: bool) -> None:
    """Attention with the log-size bias is ``softmax(q·kᵀ·scale + log size)·v``, exactly."""
    torch.manual_seed(head_dim)
    dense = Attention(3 * head_dim, num_heads=3, qkv_bias=qkv_bias).double().eval()
    x_BNC = torch.randn(2, 11, 3 * head_dim, dtype=torch.float64)
    size_BN1 = torch.randint(1, 9, (2, 11, 1)).double()
    q, k, v = dense.qkv(x_BNC).reshape(2, 11, 3, 3, head_dim).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-1, -2) * dense.scale + size_BN1.log().transpose(1, 2)[:, None]
    expected = dense.proj((logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(2, 11, -1))
    got, keys_BND = MergeAttention(dense)(x_BNC, size_BN1.log().transpose(1, 2)[:, None])
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(keys_BND, k.mean(dim=1))


def test_new_sizes_bring_proportional_attentions_mask_once() -> None:
    """The mask every later block attends with is made when the sizes change, as
    ``log(size)`` laid out ``[B, 1, 1, N]`` for SDPA, not rebuilt block by block."""
    state = MergeState()
    assert state.log_size_B11N is None  # before any merge: plain attention
    size_BN1 = torch.tensor([[[1.0], [2.0], [4.0]], [[3.0], [1.0], [1.0]]])
    state.set_sizes(size_BN1)
    assert state.log_size_B11N.shape == (2, 1, 1, 3)
    torch.testing.assert_close(state.log_size_B11N[:, 0, 0], size_BN1[..., 0].log())
