"""lm_pretrain.training.hardware: the GPU peaks that MFU is measured against."""

from lm_pretrain.training.hardware import peak_flops


def test_peak_flops_and_mfu_inputs():
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16-mixed") == 989e12  # SXM
    assert peak_flops("NVIDIA H100 PCIe", "bf16-mixed") == 756e12
    assert peak_flops("NVIDIA H100 NVL", "bf16-mixed") == peak_flops("NVIDIA H200 NVL", "bf16-mixed") == 835e12
    assert peak_flops("NVIDIA H200", "bf16-mixed") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "32-true") == 19.5e12
    assert peak_flops("cpu") is None and peak_flops("Some New GPU") is None


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
