"""The kernel profile: where a forward's GPU time goes, grouped so a ratio can be explained."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from app.bench.kernels import OTHER, categorise, format_table, kernel_times, main
from app.timing import random_inputs
from tests.helpers import TINY_VIT


@pytest.mark.parametrize(
    ("kernel", "category"),
    [
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
        ("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm>", "matmul"),
        ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64>>", "attention"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", "attention"),
        ("_token_mix_kernel", "token_mix"),
        ("triton_per_fused_add_native_layer_norm_3", "fused (triton)"),
        ("void at::native::vectorized_elementwise_kernel<4, GeluCUDAKernelImpl>", OTHER),
    ],
)
def test_kernels_fall_into_the_category_a_reader_expects(kernel, category):
    assert categorise(kernel) == category


def test_table_gives_each_model_its_ratio_to_dense_and_its_costliest_kernels():
    def result(ms: float) -> dict:
        kernels = [
            {
                "kernel": "gemm_a",
                "category": "matmul",
                "us_per_forward": ms * 600,
                "calls_per_forward": 4,
            },
            {
                "kernel": "flash_b",
                "category": "attention",
                "us_per_forward": ms * 400,
                "calls_per_forward": 1,
            },
        ]
        return {
            "gpu_ms_per_forward": ms,
            "categories_ms": {"matmul": ms * 0.6, "attention": ms * 0.4},
            "kernels": kernels,
        }

    table = format_table({"dense": result(2.0), "glad-t3": result(1.0), "broken": {"error": "OOM"}})
    dense_row, glad_row = (
        line for line in table.splitlines() if line.startswith(("dense ", "glad-t3 "))
    )
    assert dense_row.split()[1:3] == ["2.000", "1.00"]
    assert glad_row.split()[1:3] == ["1.000", "2.00"]
    assert "broken" in table and "error: OOM" in table
    assert "gemm_a" in table and "flash_b" in table


def test_cli_refuses_to_run_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        main(["--configs", "glad-t3"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="profiles CUDA kernels")
def test_gpu_time_is_the_sum_of_its_kernels_and_grows_with_the_work():
    torch.manual_seed(0)
    small = VisionTransformer(**{**TINY_VIT, "depth": 1}).cuda().eval()
    large = VisionTransformer(**{**TINY_VIT, "depth": 4}).cuda().eval()
    inputs = random_inputs(8, (3, 32, 32), device=torch.device("cuda"), dtype="float32")
    one, four = kernel_times(small, inputs, 5), kernel_times(large, inputs, 5)
    for r in (one, four):
        assert r["gpu_ms_per_forward"] > 0
        assert sum(r["categories_ms"].values()) == pytest.approx(r["gpu_ms_per_forward"])
        assert r["categories_ms"].get("matmul", 0) > 0
    assert four["gpu_ms_per_forward"] > 2 * one["gpu_ms_per_forward"]
