"""``token_mix``: a learned linear map along the token axis, per channel group.

Both compressed layers reduce to it: static attention (DGSSA) mixes the tokens of each
head with that head's fixed ``[N, N]`` matrix (G = num_heads), token aggregation (GLAD)
maps ``N_in`` patch tokens to ``N_out`` with one matrix shared by all channels (G = 1).

Written with einsum/bmm, a static attention needs permute copies around the matmul and
measured never faster than dense SDPA (H100, DeiT-S block: 0.705 ms dense vs 0.73-0.79 ms
static), so the skipped Q/K projections bought nothing. The Triton kernel reads ``x`` in
its ``[B, N, C]`` layout and writes ``[B, N_out, C]`` directly, which cashes them in.
It is used for CUDA inference only; training and CPU take the einsum reference.
Names: ``x_BMC`` has M = N_in tokens, ``weight_GNM`` maps them to N = N_out.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the einsum path is all there is
    triton = None

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # fp32: tf32 tensor cores


def token_mix_reference(x_BMC: torch.Tensor, weight_GNM: torch.Tensor) -> torch.Tensor:
    """Differentiable reference (CPU, training): einsum over the grouped channels."""
    B, _, C = x_BMC.shape
    G, N, _ = weight_GNM.shape
    x_BMGD = x_BMC.unflatten(-1, (G, C // G))
    out_BNGD = torch.einsum("gnm,bmgd->bngd", weight_GNM.to(x_BMC.dtype), x_BMGD)
    return out_BNGD.reshape(B, N, C)


def token_mix(x_BMC: torch.Tensor, weight_GNM: torch.Tensor) -> torch.Tensor:
    """Mix tokens: ``out[b, n, g*D + j] = sum_m weight[g, n, m] * x[b, m, g*D + j]``.

    ``x`` is ``[B, N_in, C]`` (any strides), ``weight`` is ``[G, N_out, N_in]`` and the
    channels split into G contiguous groups of ``D = C // G``. Returns ``[B, N_out, C]``
    in ``x``'s dtype. The fused kernel runs when ``x`` is on CUDA, Triton is importable
    and no gradient is needed; anything else takes :func:`token_mix_reference`.
    """
    if x_BMC.dim() != 3 or weight_GNM.dim() != 3:
        raise ValueError(
            f"need x [B,N_in,C] and weight [G,N_out,N_in], got "
            f"{tuple(x_BMC.shape)} and {tuple(weight_GNM.shape)}"
        )
    if x_BMC.shape[1] != weight_GNM.shape[2] or x_BMC.shape[2] % weight_GNM.shape[0]:
        raise ValueError(f"x {tuple(x_BMC.shape)} does not fit weight {tuple(weight_GNM.shape)}")
    needs_grad = torch.is_grad_enabled() and (x_BMC.requires_grad or weight_GNM.requires_grad)
    if x_BMC.is_cuda and x_BMC.dtype in _KERNEL_DTYPES and triton is not None and not needs_grad:
        return torch.ops.vitserve.token_mix(x_BMC, weight_GNM)
    return token_mix_reference(x_BMC, weight_GNM)


if triton is not None:

    @triton.autotune(
        configs=[
            triton.Config({"BLOCK_N": 32, "BLOCK_M": 32}, num_warps=2, num_stages=2),
            triton.Config({"BLOCK_N": 32, "BLOCK_M": 64}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_N": 64, "BLOCK_M": 32}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_N": 64, "BLOCK_M": 64}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_N": 128, "BLOCK_M": 32}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_N": 128, "BLOCK_M": 64}, num_warps=8, num_stages=3),
        ],
        key=["N_OUT", "N_IN", "D", "BLOCK_D"],  # not B: serving batch sizes vary per call
    )
    @triton.jit
    def _token_mix_kernel(
        x_ptr,
        w_ptr,
        out_ptr,
        N_IN,
        N_OUT,
        D,
        stride_xb,
        stride_xm,
        stride_xc,
        stride_wg,
        stride_wn,
        stride_wm,
        stride_ob,
        stride_on,
        stride_oc,
        BLOCK_N: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """One program: out[b, n-blk, g*D + d-blk] = W[g, n-blk, :] @ x[b, :, g*D + d-blk]."""
        pid_n = tl.program_id(0)  # fastest: the n blocks of one (b, g) share their x tile in L2
        pid_gd = tl.program_id(1)
        pid_b = tl.program_id(2).to(tl.int64)
        d_blocks = tl.cdiv(D, BLOCK_D)
        g = pid_gd // d_blocks
        offs_d = (pid_gd % d_blocks) * BLOCK_D + tl.arange(0, BLOCK_D)  # channel within group
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        chan = g * D + offs_d
        mask_n = offs_n < N_OUT
        mask_d = offs_d < D

        x_base = x_ptr + pid_b * stride_xb + chan[None, :] * stride_xc
        w_base = w_ptr + g * stride_wg + offs_n[:, None] * stride_wn
        acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        for m0 in range(0, N_IN, BLOCK_M):
            m = m0 + offs_m
            mask_m = m < N_IN
            w_nm = tl.load(
                w_base + m[None, :] * stride_wm, mask=mask_n[:, None] & mask_m[None, :], other=0.0
            )
            x_md = tl.load(
                x_base + m[:, None] * stride_xm, mask=mask_m[:, None] & mask_d[None, :], other=0.0
            )
            acc += tl.dot(w_nm.to(x_md.dtype), x_md)

        out = out_ptr + pid_b * stride_ob + offs_n[:, None] * stride_on + chan[None, :] * stride_oc
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_d[None, :])

    def _launch_token_mix(
        kernel, x_BMC: torch.Tensor, weight_GNM: torch.Tensor, out_BNC: torch.Tensor, **tile: int
    ) -> None:
        """Run ``kernel`` (raw or ``wrap_triton``-ed): ``out = token_mix(x, weight)``.

        ``tile`` (BLOCK_N, BLOCK_M) is for launching the un-autotuned ``kernel.fn`` in tests.
        """
        B, M, C = x_BMC.shape
        G, N, _ = weight_GNM.shape
        D = C // G
        block_d = min(128, max(16, D & -D))  # largest power of two dividing D, within [16, 128]

        def grid(meta: dict[str, int]) -> tuple[int, int, int]:
            return (triton.cdiv(N, meta["BLOCK_N"]), G * triton.cdiv(D, block_d), B)

        kernel[grid](
            x_BMC,
            weight_GNM,
            out_BNC,
            M,
            N,
            D,
            *x_BMC.stride(),
            *weight_GNM.stride(),
            *out_BNC.stride(),
            BLOCK_D=block_d,
            **tile,
        )

    def _new_out(x_BMC: torch.Tensor, weight_GNM: torch.Tensor) -> torch.Tensor:
        return x_BMC.new_empty(x_BMC.shape[0], weight_GNM.shape[1], x_BMC.shape[2])

    if hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton"):

        @torch.library.triton_op("vitserve::token_mix", mutates_args=())
        def _token_mix_triton(x_BMC: torch.Tensor, weight_GNM: torch.Tensor) -> torch.Tensor:
            """Traceable by torch.compile: Inductor sees (and schedules) the kernel itself."""
            out_BNC = _new_out(x_BMC, weight_GNM)
            _launch_token_mix(
                torch.library.wrap_triton(_token_mix_kernel), x_BMC, weight_GNM, out_BNC
            )
            return out_BNC

    else:  # torch < 2.6: an opaque custom op, still a single node for torch.compile

        @torch.library.custom_op("vitserve::token_mix", mutates_args=())
        def _token_mix_triton(x_BMC: torch.Tensor, weight_GNM: torch.Tensor) -> torch.Tensor:
            out_BNC = _new_out(x_BMC, weight_GNM)
            _launch_token_mix(_token_mix_kernel, x_BMC, weight_GNM, out_BNC)
            return out_BNC

        _token_mix_triton.register_fake(_new_out)
