"""token_mix: the einsum reference against explicit loops (CPU), the Triton kernel against the
reference (CUDA; and on CPU through Triton's interpreter, which checks its indexing)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from app.vit import token_mix as tm
from app.vit.token_mix import token_mix, token_mix_reference

needs_triton = pytest.mark.skipif(tm.triton is None, reason="triton is not installed")
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or tm.triton is None, reason="needs CUDA and triton"
)


def loop_reference(x_BMC: torch.Tensor, weight_GNM: torch.Tensor) -> torch.Tensor:
    """float64, one (group, output token) at a time, straight from the definition."""
    B, _, C = x_BMC.shape
    G, N, _ = weight_GNM.shape
    D = C // G
    x, w = x_BMC.double(), weight_GNM.double()
    out = torch.zeros(B, N, C, dtype=torch.float64)
    for g in range(G):
        chans = slice(g * D, (g + 1) * D)
        for n in range(N):
            out[:, n, chans] = (w[g, n, :, None] * x[:, :, chans]).sum(dim=1)
    return out


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


# (B, N_in, N_out, C, G): N_in != N_out both ways, G = 1 (GLAD) and G = heads, D = 1.
SHAPES = [(3, 17, 9, 64, 4), (2, 197, 99, 24, 1), (1, 10, 12, 12, 3), (2, 5, 5, 8, 8)]


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_matches_loops(shape: tuple[int, ...]) -> None:
    B, M, N, C, G = shape
    x = torch.randn(B, M + 1, C, dtype=torch.float64)[:, 1:]  # strided, like TokenAggregation's
    w = torch.randn(G, N, M, dtype=torch.float64)
    ref = loop_reference(x, w)
    torch.testing.assert_close(token_mix(x, w), ref)
    out32 = token_mix(x.float(), w.float())
    assert out32.dtype == torch.float32 and rel_error(out32, ref) < 1e-6


def test_reference_gradients() -> None:
    x = torch.randn(2, 7, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(token_mix, (x, w))


def test_shape_errors() -> None:
    with pytest.raises(ValueError):
        token_mix(torch.randn(2, 7, 6), torch.randn(3, 5, 8))  # N_in mismatch
    with pytest.raises(ValueError):
        token_mix(torch.randn(2, 7, 6), torch.randn(4, 5, 7))  # 6 channels, 4 groups


@needs_triton
def test_kernel_in_triton_interpreter() -> None:
    """Every autotune tile on CPU via TRITON_INTERPRET=1 (a subprocess: the flag is read when
    the kernel is decorated). bf16 is left out: the interpreter's bf16 dot is wrong."""
    script = textwrap.dedent(
        """
        import torch
        from app.vit import token_mix as tm
        torch.manual_seed(0)
        kernel = tm._token_mix_kernel
        for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
            for B, M, N, C, G in ((2, 37, 19, 48, 3), (3, 19, 37, 48, 1)):
                x = torch.randn(B, M + 1, C, dtype=dtype)[:, 1:]
                w = torch.randn(G, N, M)
                ref = tm.token_mix_reference(x.double(), w.double())
                for config in kernel.configs:
                    out = torch.full((B, N, C), float("nan"), dtype=dtype)
                    tm._launch_token_mix(kernel.fn, x, w, out, **config.kwargs)
                    err = ((out.double() - ref).norm() / ref.norm()).item()
                    assert err < tol, (dtype, (B, M, N, C, G), config.kwargs, err)
        """
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]


CUDA_CASES = [(torch.bfloat16, 1e-2), (torch.float16, 1e-2), (torch.float32, 1e-3)]  # fp32: tf32


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize(("dtype", "tol"), CUDA_CASES)
@pytest.mark.parametrize(("N", "C", "G"), [(99, 384, 1), (197, 384, 6), (26, 192, 3)])
def test_triton_matches_reference(dtype: torch.dtype, tol: float, N: int, C: int, G: int) -> None:
    B, M = 3, 197
    x = torch.randn(B, M + 1, C, device="cuda", dtype=dtype)[:, 1:]  # strided, offset view
    w = (torch.randn(G, N, M, device="cuda") / M**0.5).to(dtype)
    ref = loop_reference(x.cpu(), w.cpu())

    kernel = tm._token_mix_kernel
    for config in kernel.configs:  # every tile, output poisoned so unwritten elements show
        out = torch.full((B, N, C), float("nan"), device="cuda", dtype=dtype)
        tm._launch_token_mix(kernel.fn, x, w, out, **config.kwargs)
        assert rel_error(out.cpu(), ref) < tol, config.kwargs
    out = torch.full((B, N, C), float("nan"), device="cuda", dtype=dtype)
    tm._launch_token_mix(kernel, x, w, out)  # autotuned
    assert rel_error(out.cpu(), ref) < tol

    with torch.no_grad():
        out = token_mix(x, w)  # the public dispatch takes the registered op
    assert out.shape == (B, N, C) and out.dtype == dtype
    assert rel_error(out.cpu(), ref) < tol


@needs_cuda
@pytest.mark.gpu
def test_triton_op_under_compile_and_autograd_dispatch() -> None:
    x = torch.randn(4, 198, 192, device="cuda", dtype=torch.bfloat16)[:, 1:]
    w = torch.randn(3, 197, 197, device="cuda", dtype=torch.bfloat16) / 197**0.5
    ref = token_mix_reference(x.double(), w.double())
    with torch.no_grad():
        out = torch.compile(token_mix, fullgraph=True)(x, w)
    assert rel_error(out, ref) < 1e-2

    w_param = torch.nn.Parameter(w.float())
    out = token_mix(x.float(), w_param)  # grad needed: the differentiable reference
    out.sum().backward()
    assert w_param.grad is not None
