"""lm_pretrain.training.hardware: the GPU peaks that MFU is measured against."""

import pytest

from lm_pretrain.training.hardware import peak_flops


def test_peak_flops_and_mfu_inputs():
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16-mixed") == 989e12  # SXM
    assert peak_flops("NVIDIA H100 PCIe", "bf16-mixed") == 756e12
    assert peak_flops("NVIDIA H100 NVL", "bf16-mixed") == peak_flops("NVIDIA H200 NVL", "bf16-mixed") == 835e12
    assert peak_flops("NVIDIA H200", "bf16-mixed") == 989e12
    # 32-true: float32 matmuls on TF32 tensor cores (every CUDA run allows them), else the fp32 peak
    assert peak_flops("NVIDIA A100-SXM4-80GB", "32-true") == 156e12 and peak_flops("Tesla V100", "32-true") == 15.7e12
    assert peak_flops("cpu") is None and peak_flops("Some New GPU") is None


def test_peaks_agree_with_lightnings_table_where_it_is_right(monkeypatch):
    """Where Lightning's get_available_flops knows a card and gives its dense figure, ours is the
    same; it knows no H200 and gives the H100 NVL's sparse figure (why hardware.PEAK_FLOPS is ours)."""
    import torch
    from lightning.fabric.utilities.throughput import get_available_flops

    def lightnings(name: str):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        return get_available_flops(torch.device("cuda"), torch.bfloat16)

    for name in ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA A100-SXM4-80GB"):
        assert lightnings(name) == pytest.approx(peak_flops(name, "bf16-mixed"), rel=0.01), name
    assert lightnings("NVIDIA H200") is None and peak_flops("NVIDIA H200", "bf16-mixed") == 989e12
    assert lightnings("NVIDIA H100 NVL") == pytest.approx(2 * peak_flops("NVIDIA H100 NVL", "bf16-mixed"), rel=0.2)


def test_tf32_is_switched_on_for_cuda_only():
    import torch

    from lm_pretrain.training.hardware import allow_tf32

    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        torch.set_float32_matmul_precision("highest")
        assert not allow_tf32("cpu") and torch.get_float32_matmul_precision() == "highest"
        assert allow_tf32("cuda") and torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]
