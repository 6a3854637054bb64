"""Accelerator peaks and rough training costs: for MFU, and for sizing a run before buying it.

Peaks are dense (no sparsity) tensor-core FLOP/s from the vendors' data sheets, for the precision
a config trains in. MFU = achieved training FLOP/s (config.model_size's flops_per_token x tok/s) /
peak; 40-50 % is good for a GPT on one GPU.
"""

import math

import torch

from lm_pretrain.model.config import GPTConfig, model_size
from lm_pretrain.utils.errors import UserError

# Not Lightning's get_available_flops: it knows no "NVIDIA H200", counts the H100 NVL's sparse figure,
# and needs the GPU at hand, where lm-pretrain-sizes plans for GPUs that are not (tests/test_hardware.py).
# name fragment (as torch.cuda.get_device_name reports it) -> {precision: dense peak FLOP/s}. The
# first fragment found in the name wins: PCIe and NVL cards come before the SXM parts ("NVIDIA H100
# 80GB HBM3", "NVIDIA H200"), which are faster under the same name.
PEAK_FLOPS = {
    "H200 NVL": {"bf16": 835e12, "fp16": 835e12, "fp8": 1670e12, "tf32": 418e12, "fp32": 60e12},
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp8": 1979e12, "tf32": 494e12, "fp32": 67e12},  # SXM
    "H100 NVL": {"bf16": 835e12, "fp16": 835e12, "fp8": 1670e12, "tf32": 418e12, "fp32": 60e12},
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "fp8": 1513e12, "tf32": 378e12, "fp32": 51e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp8": 1979e12, "tf32": 494e12, "fp32": 67e12},  # SXM
    "A100": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "fp8": 733e12, "tf32": 183e12, "fp32": 91.6e12},
    "A10G": {"bf16": 70e12, "fp16": 70e12, "tf32": 35e12, "fp32": 31.2e12},
    "RTX 4090": {"bf16": 165e12, "fp16": 165e12, "fp8": 330e12, "tf32": 82.6e12, "fp32": 82.6e12},
    "V100": {"fp16": 125e12, "fp32": 15.7e12},
    "T4": {"fp16": 65e12, "fp32": 8.1e12},
}
MEMORY_BYTES = {"H200 NVL": 141e9, "H200": 141e9, "H100 NVL": 94e9, "H100 PCIe": 80e9, "H100": 80e9, "A100": 80e9, "L40S": 48e9, "A10G": 24e9, "RTX 4090": 24e9,
                "V100": 32e9, "T4": 16e9}


def allow_tf32(device_type: str) -> bool:
    """On CUDA devices, let float32 matmuls (and convolutions) run on TF32 tensor cores: ~8x the fp32
    peak, with a 10-bit mantissa per product but float32 sums. What float32 matmuls remain in a
    bf16-mixed run (and all of a 32-true run) gain; CPUs are left alone. True when switched on."""
    if device_type != "cuda":
        return False
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    return True


def precision_key(precision: str) -> str:
    """Lightning precision ("bf16-mixed", "16-mixed", "32-true", ...) -> PEAK_FLOPS key."""
    precision = str(precision)
    if "bf16" in precision:
        return "bf16"
    if precision.startswith("16"):
        return "fp16"
    if "transformer-engine" in precision or "fp8" in precision:
        return "fp8"
    return "tf32"  # float32 matmuls run on TF32 tensor cores: allow_tf32 switches them on in every CUDA run


def peak_flops(device_name: str, precision: str = "bf16-mixed") -> float | None:
    """Dense peak FLOP/s of a device by name, or None when unknown (CPUs, unlisted GPUs)."""
    for fragment, peaks in PEAK_FLOPS.items():
        if fragment.lower() in device_name.lower():
            key = precision_key(precision)
            return peaks.get(key, peaks.get("fp32") if key == "tf32" else None)  # (no TF32 cores: V100, T4)
    return None


def training_memory_bytes(config: GPTConfig, batch_size: int, shards: int = 1,
                          activation_checkpointing: bool = False, tensor_parallel: int = 1) -> dict[str, float]:
    """A rough per-GPU memory estimate for mixed-precision AdamW training (bf16 activations).

    States: fp32 weights (4 B) + fp32 grads (4 B) + AdamW moments (8 B) = 16 B per parameter,
    divided by `shards` (all GPUs) under FSDP; with tensor parallelism the parameters it does not
    split (embeddings, norms, output layer) are sharded over the shards / tensor_parallel groups only.
    Activations per layer and token ~ 34 * n_embd bytes plus the logits (Korthikanti et al. 2022, with
    a fused attention kernel: no T x T scores kept), of which 24 * n_embd are split by tensor
    parallelism (the group computes on the same batch_size sequences); with activation checkpointing
    only each block's input is kept (2 * n_embd bytes per layer and token). A mixture of experts keeps
    two bf16 copies of each token's row per chosen expert besides (gathered for the experts, and their
    output back in token order) and the router's float32 input: (4 * top_k + 4) * n_embd bytes.
    A rough guide, not a promise: torch.compile fuses some activations away (GPT-2 124M at batch 32
    peaked at ~15.5 GiB on an H200 with compile; this estimate says 20.6 GiB), while the allocator's
    slack and temporary buffers add some back.
    """
    size = model_size(config)
    c, attention = config.n_embd, config.head_dim * (2 * config.n_head + 2 * config.n_kv_head)
    split = config.n_layer * c * (attention + (3 if config.mlp == "swiglu" else 2) * config.mlp_hidden)
    states = 16 * (split / shards + (size["params"] - split) / (shards / tensor_parallel))
    tokens = batch_size * config.block_size
    per_layer = (2 if activation_checkpointing else 10 + 24 / tensor_parallel) * config.n_embd
    if config.mlp == "moe" and not activation_checkpointing:  # rows copied per chosen expert, the router's input
        per_layer += (4 * config.top_k + 4) * config.n_embd
    activations = tokens * (config.n_layer * per_layer + 6 * config.vocab_size)  # logits: bf16 + fp32 for the loss
    return {"states": states, "activations": activations, "total": states + activations}


def days_to_train(config: GPTConfig, tokens: float, device_name: str, gpus: int = 1, mfu: float = 0.4,
                  precision: str = "bf16-mixed") -> float:
    """Days to train on `tokens` tokens at a given MFU; inf when the device's peak is unknown."""
    peak = peak_flops(device_name, precision)
    if not peak:
        return math.inf
    return tokens * model_size(config)["flops_per_token"] / (peak * mfu * gpus) / 86400


def pick_device(device: str | None) -> str:
    """The device a command runs on: `device` if this machine has it (UserError naming the ones it
    has, if not); empty means cuda when there is a GPU, else cpu."""
    if not device:
        return "cuda" if torch.cuda.is_available() else "cpu"
    present = ["cpu", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    present += ["mps"] if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else []
    try:
        wanted = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r} is not a device name; this machine has {', '.join(present)}") from None
    if wanted.type == "cpu" or (wanted.type == "cuda" and (wanted.index or 0) < torch.cuda.device_count()) or \
            (wanted.type == "mps" and "mps" in present):
        return device
    raise UserError(f"--device {device}: this machine has no such device; it has {', '.join(present)}")
