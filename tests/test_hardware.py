"""lm_pretrain.hardware: the GPU peaks that MFU is measured against."""

from lm_pretrain.hardware import peak_flops


def test_peak_flops_and_mfu_inputs():
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16-mixed") == 989e12  # SXM
    assert peak_flops("NVIDIA H100 PCIe", "bf16-mixed") == 756e12
    assert peak_flops("NVIDIA H100 NVL", "bf16-mixed") == peak_flops("NVIDIA H200 NVL", "bf16-mixed") == 835e12
    assert peak_flops("NVIDIA H200", "bf16-mixed") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "32-true") == 19.5e12
    assert peak_flops("cpu") is None and peak_flops("Some New GPU") is None
