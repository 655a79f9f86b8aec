"""Token merging's matching without sorts: the torch ranking against ToMe's two argsorts
(CPU, always), and the Triton kernels (matching and merge) against the eager reference
(CUDA; on CPU in Triton's interpreter, which a test here starts in a subprocess when no GPU
is present)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from app.serving.cuda_graphs import GraphedForward
from app.vit.builder import compress, create_model
from app.vit.config import CompressionConfig
from app.vit.merge import (
    Matching,
    best_matches,
    bipartite_soft_matching,
    match_ranks,
    matching_kernels,
    matching_positions,
    merge_kernels,
    merge_weighted,
    merge_weighted_torch,
    rank_matches,
    rank_matches_sorted,
)
from tests.helpers import REPO, TINY_VIT

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(merge_kernels is None, reason="Triton is not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
# (batch, tokens, key width, r): DeiT-S at 224 px and ragged small ones (odd A/B counts,
# a width that is no power of two, r = 0 and the largest r).
SHAPES = [(6, 197, 64, 13), (3, 17, 8, 4), (2, 16, 20, 7), (4, 197, 64, 98), (2, 9, 64, 0)]


def random_keys(shape: tuple[int, int, int], seed: int, **kwargs) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(**kwargs)


def kernel_device() -> torch.device:
    """CUDA, or the CPU when Triton interprets the kernels; otherwise the test skips."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if INTERPRETED:
        return torch.device("cpu")
    pytest.skip("no CUDA: the Triton kernels run on CPU only in TRITON_INTERPRET=1 (see below)")


def as_tuple(matching: Matching) -> tuple[torch.Tensor, ...]:
    return matching.slot_pos, matching.src_pos, matching.dst_slot


def assert_same_matching(got: Matching, expected: Matching) -> None:
    for g, e in zip(as_tuple(got), as_tuple(expected), strict=True):
        assert torch.equal(g.cpu(), e.cpu())


def sorted_matching(keys_BNK: torch.Tensor, r: int) -> Matching:
    """ToMe's matching as it was: the two argsorts."""
    best_BA, match_BA = best_matches(keys_BNK)
    return matching_positions(match_BA, *rank_matches_sorted(best_BA, r), keys_BNK.shape[1])


# --- the torch path (every device) -----------------------------------------------------------


@pytest.mark.parametrize(("batch", "tokens", "width", "r"), SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_counting_ranks_match_two_argsorts_exactly(batch, tokens, width, r, seed) -> None:
    """Random keys have no tied scores, so counting and sorting give the same indices: the
    merged tokens in order of rank, the kept ones ascending, CLS (-inf) kept first."""
    keys_BNK = random_keys((batch, tokens, width), seed)
    best_BA, _ = best_matches(keys_BNK)
    assert best_BA[:, 0].eq(-math.inf).all()
    merged, kept = rank_matches(best_BA, r)
    expected_merged, expected_kept = rank_matches_sorted(best_BA, r)
    assert torch.equal(merged, expected_merged) and torch.equal(kept, expected_kept)
    assert (kept[:, 0] == 0).all()
    assert_same_matching(bipartite_soft_matching(keys_BNK, r), sorted_matching(keys_BNK, r))


def test_tied_scores_rank_the_earlier_token_first() -> None:
    """Ties (common in bf16) have one answer, unlike an unstable sort's: the ranks are a
    permutation, earlier tokens ahead of later equal ones."""
    best_BA = torch.tensor([[-math.inf, 0.5, 0.9, 0.5, 0.5, 0.9]])
    assert match_ranks(best_BA).tolist() == [[5, 2, 0, 3, 4, 1]]
    merged, kept = rank_matches(best_BA, 3)
    assert merged.flatten().tolist() == [2, 5, 1]
    assert kept.flatten().tolist() == [0, 3, 4]


def test_a_merged_model_traces_whole_with_the_torch_matching() -> None:
    """No sort left to break the graph: ``fullgraph=True`` (which raises at a break) through
    AOT autograd (fake tensors, functionalisation) gives the eager output. Inductor compiles
    one in test_merge.py's test_compiles_fullgraph; none here, so this takes seconds."""
    torch.manual_seed(0)
    dense = create_model("deit_tiny_patch16_224", num_classes=10, **TINY_VIT).eval()
    model = compress(dense, CompressionConfig.parse("merge=4@1,2@2")).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)


# --- the Triton kernels (CUDA, or the interpreter) -------------------------------------------


@needs_triton
@pytest.mark.parametrize(("batch", "tokens", "width", "r"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_best_matches_equal_the_eager_scores(batch, tokens, width, r, dtype) -> None:
    """Scores to 1e-3 of the eager cosine of the same (bf16: rounded) keys in fp32; the
    same B token wherever the best score is ahead of the runner-up by more than that."""
    device = kernel_device()
    keys_BNK = random_keys((batch, tokens, width), seed=r, dtype=dtype, device=device)
    best_BA, match_BA = merge_kernels.best_matches(keys_BNK)
    assert best_BA.dtype == torch.float32 and match_BA.dtype == torch.int64
    expected_best_BA, expected_match_BA = best_matches(keys_BNK.float())
    torch.testing.assert_close(best_BA, expected_best_BA, atol=1e-3, rtol=0)
    metric_BNK = torch.nn.functional.normalize(keys_BNK.float(), dim=-1)
    scores_BAB = metric_BNK[:, ::2] @ metric_BNK[:, 1::2].transpose(-1, -2)
    top2_BA2 = scores_BAB.topk(min(2, scores_BAB.shape[-1]), dim=-1).values
    untied_BA = (top2_BA2[..., 0] - top2_BA2[..., -1] > 1e-3) | (top2_BA2.shape[-1] == 1)
    untied_BA[:, 0] = True  # CLS: index 0 by convention
    assert untied_BA.float().mean() > 0.9
    assert torch.equal(match_BA[untied_BA], expected_match_BA[untied_BA])


@needs_triton
@pytest.mark.parametrize(("batch", "tokens", "width", "r"), SHAPES)
def test_triton_positions_equal_the_torch_ranking_even_with_ties(batch, tokens, width, r) -> None:
    """Same rule (count, ties to the earlier token), so the same indices exactly, here on
    scores rounded to a coarse grid so many of them tie."""
    device = kernel_device()
    best_BA, match_BA = best_matches(random_keys((batch, tokens, width), seed=r, device=device))
    best_BA = (best_BA * 8).round() / 8
    got = merge_kernels.matching_positions(best_BA, match_BA, r, tokens)
    expected = matching_positions(match_BA, *rank_matches(best_BA, r), tokens)
    assert_same_matching(Matching(*got), expected)


def random_sizes(batch: int, tokens: int, seed: int, **kwargs) -> torch.Tensor:
    """Whole-number sizes 1..8, as merging makes them."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, 9, (batch, tokens, 1), generator=generator).to(**kwargs)


@needs_triton
@pytest.mark.parametrize(("batch", "tokens", "width", "r"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sized", [False, True])
def test_triton_merge_equals_the_torch_merge(batch, tokens, width, r, dtype, sized) -> None:
    """The kernel's average and sizes equal the torch path's run in fp32 on the same
    inputs: fp32 to 1e-5; bf16 as one rounding of that average (within one bf16 step, 2^-7
    relative: Triton's interpreter truncates; CUDA rounds to nearest, so there nearly always
    the same bf16 number); sizes exactly, in the sizes' dtype (x's when they are None)."""
    device = kernel_device()
    x_BNC = random_keys((batch, tokens, width), seed=r + 1, dtype=dtype, device=device)
    size_BN1 = random_sizes(batch, tokens, seed=r, dtype=dtype, device=device) if sized else None
    matching = bipartite_soft_matching(random_keys((batch, tokens, 8), seed=r), r)
    matching = Matching(*(index.to(device) for index in as_tuple(matching)))
    out_BMC, size_BM1 = merge_kernels.merge_tokens(x_BNC, size_BN1, *as_tuple(matching))
    assert out_BMC.dtype == dtype and size_BM1.dtype == dtype
    assert out_BMC.shape == (batch, tokens - r, width) and size_BM1.shape == (batch, tokens - r, 1)
    expected_BMC, expected_BM1 = merge_weighted_torch(
        x_BNC.float(), None if size_BN1 is None else size_BN1.float(), matching
    )
    assert torch.equal(size_BM1.float(), expected_BM1)
    if dtype == torch.float32:
        torch.testing.assert_close(out_BMC, expected_BMC, atol=1e-5, rtol=1e-5)
    else:
        error_BMC = (out_BMC.float() - expected_BMC).abs()
        assert (error_BMC <= expected_BMC.abs() * 2**-7 + 1e-6).all()
        if not INTERPRETED:
            assert out_BMC.eq(expected_BMC.to(dtype)).float().mean() > 0.99


@needs_triton
@pytest.mark.parametrize("sized", [False, True])
def test_triton_merge_gradient_equals_the_torch_gradient(sized) -> None:
    """Training through the kernel: the gradient reaching x is the torch path's."""
    device = kernel_device()
    batch, tokens, width, r = 3, 17, 24, 6
    x_BNC = random_keys((batch, tokens, width), seed=5, device=device)
    size_BN1 = random_sizes(batch, tokens, seed=5, device=device) if sized else None
    matching = bipartite_soft_matching(random_keys((batch, tokens, 8), seed=6), r)
    matching = Matching(*(index.to(device) for index in as_tuple(matching)))
    weights_BMC = random_keys((batch, tokens - r, width), seed=7, device=device)
    x_kernel, x_torch = x_BNC.clone().requires_grad_(), x_BNC.clone().requires_grad_()
    out_BMC = merge_kernels.merge_tokens(x_kernel, size_BN1, *as_tuple(matching))[0]
    (out_BMC * weights_BMC).sum().backward()
    (merge_weighted_torch(x_torch, size_BN1, matching)[0] * weights_BMC).sum().backward()
    torch.testing.assert_close(x_kernel.grad, x_torch.grad, atol=1e-5, rtol=1e-5)


@needs_triton
@needs_cuda
@pytest.mark.gpu
def test_cuda_merge_runs_the_kernel() -> None:
    """On CUDA ``merge_weighted`` takes the kernel path (it sums in fp32, so bf16 tokens
    differ from the torch path's bf16 sums by at most the torch path's rounding)."""
    keys_BNK = random_keys((8, 197, 64), seed=3, device="cuda")
    x_BNC = random_keys((8, 197, 384), seed=4, dtype=torch.bfloat16, device="cuda")
    matching = bipartite_soft_matching(keys_BNK, 13)
    out_BMC, size_BM1 = merge_weighted(x_BNC, None, matching)
    expected_BMC, expected_BM1 = merge_kernels.merge_tokens(x_BNC, None, *as_tuple(matching))
    assert torch.equal(out_BMC, expected_BMC) and torch.equal(size_BM1, expected_BM1)


@needs_triton
@needs_cuda
@pytest.mark.gpu
def test_cuda_matching_runs_the_kernels_and_agrees_with_argsort() -> None:
    """On CUDA ``bipartite_soft_matching`` takes the Triton path and finds ToMe's matching
    (fp32 keys; a fixed seed whose scores are untied beyond both paths' rounding)."""
    assert matching_kernels(torch.device("cuda")) == "triton"
    keys_BNK = random_keys((8, 197, 64), seed=3, device="cuda")
    assert_same_matching(bipartite_soft_matching(keys_BNK, 13), sorted_matching(keys_BNK, 13))


@needs_triton
@needs_cuda
@pytest.mark.gpu
def test_a_merged_model_with_the_kernels_compiles_whole_and_graphs() -> None:
    """The kernels stay in one graph under ``fullgraph=True`` and replay from a CUDA graph;
    both give the eager output (fp32: no bf16 near-tie flips a match between the paths)."""
    torch.manual_seed(0)
    dense = create_model("deit_tiny_patch16_224", num_classes=10, **TINY_VIT).eval()
    model = compress(dense, CompressionConfig.parse("merge=4@1,2@2")).eval()
    device, dtype = torch.device("cuda"), torch.float32
    model = model.to(device, dtype)
    x = torch.randn(8, 3, 32, 32, device=device, dtype=dtype)
    with torch.inference_mode():
        expected = model(x)
        compiled = torch.compile(model, fullgraph=True)
        torch.testing.assert_close(compiled(x), expected, atol=1e-4, rtol=1e-4)
        graphed = GraphedForward(
            model, device=device, dtype=dtype, input_size=(3, 32, 32), buckets=(8,)
        )
        torch.testing.assert_close(graphed(x).clone(), expected, atol=1e-5, rtol=1e-5)


@needs_triton
@pytest.mark.skipif(
    torch.cuda.is_available() or INTERPRETED, reason="the kernels run in this process already"
)
def test_triton_kernels_pass_in_the_interpreter_on_cpu() -> None:
    """Without a GPU, the kernel tests above run in Triton's interpreter (numpy, CPU
    tensors), which reads TRITON_INTERPRET when a kernel is defined: hence a fresh process."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "triton_"],
        cwd=REPO,
        env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and " failed" not in done.stdout
