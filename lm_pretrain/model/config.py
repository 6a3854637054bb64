"""The model's architecture as data: GPTConfig, and what it costs (parameters, FLOPs per token).

No torch here: `lm-pretrain-sizes`, `--help` and anything that only reads configs stay quick.
lm_pretrain.model.gpt builds the network that a GPTConfig describes.
"""

import math
from dataclasses import dataclass
from typing import Literal

from lm_pretrain.utils.ranges import (Context, Experts, Fraction, Heads, Layers, NonNegativeFloat, NonNegativeInt,
                                      PositiveFloat, VocabSize, Width)
from lm_pretrain.utils.ranges import check as check_ranges
from lm_pretrain.utils.ranges import plain
from lm_pretrain.utils.errors import UserError

GPT2_VOCAB_SIZE = 50257  # GPT-2's tokenizer: 50,256 merges and bytes, and <|endoftext|>


@dataclass
class GPTConfig:
    """The model's architecture: the one place it is declared and documented. Its fields are also
    the `--model.*` flags of train.py (LanguageModel takes them as **architecture).

    Args:
        vocab_size: size of the embedding and output layers; at least the tokenizer's (GPT-2: 50257;
            round up, e.g. to 50304, for faster matmuls on GPUs). Empty means the tokenizer's: train.py
            reads it from the data's metadata (or the checkpoint it resumes); a GPTConfig made in
            Python takes GPT-2's.
        block_size: longest sequence (context) the model takes.
        n_layer: transformer blocks.
        n_head: attention heads per block (must divide n_embd).
        n_embd: width of the residual stream.
        n_kv_head: key/value heads for grouped-query attention (must divide n_head); empty means
            n_head (multi-head attention), 1 is multi-query attention.
        dropout: dropout probability (0 for pre-training: one pass over the data rarely overfits).
        bias: biases in linear and norm layers.
        tie_embeddings: share the token embedding with the output layer.
        position: "learned" position embeddings (GPT-2) or "rope" rotary embeddings (Llama).
        rope_theta: RoPE base frequency (10000 in Llama 2, 500000 in Llama 3): larger turns slower,
            for longer contexts.
        norm: "layernorm" (GPT-2) or "rmsnorm" (Llama).
        norm_eps: epsilon of the norm layers.
        mlp: "gelu" (GPT-2, 4x wide), "swiglu" (Llama, gated), "relu2" (relu(x) squared, 4x wide) or
            "moe": a mixture of SwiGLU experts, top_k of n_experts per token (lm_pretrain.model.moe).
        mlp_hidden: MLP hidden width (with moe, each expert's); empty means 4 * n_embd for gelu and relu2,
            8/3 * n_embd rounded up to a multiple of 256 for swiglu, and that divided by top_k +
            n_shared_experts (rounded up to a multiple of 64) for moe: a token's experts then cost what
            the dense SwiGLU costs. A mixture's experts and router have no biases.
        n_experts: with mlp moe, the routed experts per block.
        top_k: with mlp moe, the experts each token goes through (at most n_experts; 1 needs
            router_renormalize false).
        n_shared_experts: with mlp moe, experts every token goes through besides its top_k (DeepSeek-MoE):
            one SwiGLU n_shared_experts times an expert's width.
        router_renormalize: with mlp moe, scale the chosen experts' probabilities to sum to 1 (Mixtral,
            Qwen3-MoE); false keeps them as they are (OLMoE).
        router_aux_loss: with mlp moe, weight of the load-balancing loss, averaged over blocks (Switch
            Transformer; OLMoE: 0.01); 0 turns it off.
        router_z_loss: with mlp moe, weight of the router's z-loss, averaged over blocks (ST-MoE, OLMoE:
            0.001); 0 turns it off.
        router_bias_rate: with mlp moe, how far each optimizer step moves the per-expert balancing bias
            (DeepSeek-V3: 0.001); 0 turns it off.
        qk_norm: RMS-normalise each head's queries and keys (no learned scale) before attention.
        logit_softcap: squash the output logits into (-cap, cap) with cap * tanh(logits / cap) (Gemma 2
            uses 30); empty means no cap.
    """

    vocab_size: VocabSize | None = None
    block_size: Context = 1024
    n_layer: Layers = 12
    n_head: Heads = 12
    n_embd: Width = 768
    n_kv_head: Heads | None = None
    dropout: Fraction = 0.0
    bias: bool = True
    tie_embeddings: bool = True
    position: Literal["learned", "rope"] = "learned"
    rope_theta: PositiveFloat = 10000.0
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: PositiveFloat = 1e-5
    mlp: Literal["gelu", "swiglu", "relu2", "moe"] = "gelu"
    mlp_hidden: Width | None = None
    n_experts: Experts = 8
    top_k: Experts = 2
    n_shared_experts: NonNegativeInt = 0
    router_renormalize: bool = True
    router_aux_loss: NonNegativeFloat = 0.01
    router_z_loss: NonNegativeFloat = 0.001
    router_bias_rate: NonNegativeFloat = 0.0
    qk_norm: bool = False
    logit_softcap: PositiveFloat | None = None

    @classmethod
    def from_dict(cls, values: dict) -> "GPTConfig":
        """The config that a dict holding these fields among others (hyperparameters, YAML) describes."""
        return cls(**{k: v for k, v in values.items() if k in cls.__dataclass_fields__})

    def __post_init__(self):
        for name in self.__dataclass_fields__:
            setattr(self, name, plain(getattr(self, name)))
        # ranges and choices, as the command line checks them (a config made in Python gets the same errors)
        check_ranges(GPTConfig, {name: getattr(self, name) for name in self.__dataclass_fields__}, "model")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.vocab_size is None:
            self.vocab_size = GPT2_VOCAB_SIZE
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head})")
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head size, got n_embd / n_head = {self.head_dim}")
        if self.mlp == "moe" and self.top_k > self.n_experts:
            raise ValueError(f"top_k ({self.top_k}) cannot exceed n_experts ({self.n_experts}): each token "
                             f"goes through top_k different experts")
        if self.mlp == "moe" and self.top_k == 1 and self.router_renormalize:
            raise ValueError("top_k 1 with router_renormalize true: each token's one weight would be 1, and the "
                             "router would learn nothing from the loss; set router_renormalize false (Switch)")
        if self.mlp_hidden is None:
            swiglu = 256 * math.ceil(8 * self.n_embd / 3 / 256)
            per_token = self.top_k + self.n_shared_experts  # experts a token goes through
            self.mlp_hidden = {"swiglu": swiglu, "moe": 64 * math.ceil(swiglu / per_token / 64)}.get(
                self.mlp, 4 * self.n_embd)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def model_size(config: GPTConfig) -> dict[str, int]:
    """Parameter counts and training FLOPs per token, from the config alone (no weights needed).

    flops_per_token counts the matmuls of forward + backward (2 + 4 FLOPs per weight per token,
    the LM head included) plus attention's scores and weighted sums over a full block_size context:
    6 * N + 12 * n_layer * n_head * head_dim * block_size (PaLM's estimate, as used for MFU). With a
    mixture of experts, N counts the weights a token goes through (active_params: its top_k experts,
    the shared ones and the router), not all of them.
    """
    c = config
    d, kv, hidden, b = c.n_embd, c.n_kv_head * c.head_dim, c.mlp_hidden, int(c.bias)
    norm = d + (b * d if c.norm == "layernorm" else 0)
    attention = d * (d + 2 * kv) + b * (d + 2 * kv) + d * d + b * d
    if c.mlp == "moe":  # bias-free SwiGLU experts and a router
        expert, shared, router = 3 * d * hidden, 3 * d * hidden * c.n_shared_experts, d * c.n_experts
        mlp, active_mlp = c.n_experts * expert + shared + router, c.top_k * expert + shared + router
    else:
        mlp = d * hidden * (2 if c.mlp == "swiglu" else 1) + b * hidden * (2 if c.mlp == "swiglu" else 1) + hidden * d + b * d
        active_mlp = mlp
    blocks = c.n_layer * (2 * norm + attention + mlp)
    inactive = c.n_layer * (mlp - active_mlp)
    token_table = c.vocab_size * d
    position_table = c.block_size * d if c.position == "learned" else 0
    head = 0 if c.tie_embeddings else c.vocab_size * d
    non_embedding = blocks + norm + head
    matmul_params = non_embedding - inactive + (token_table if c.tie_embeddings else 0)  # the head's matmul either way
    return {
        "params": token_table + position_table + non_embedding,
        "non_embedding_params": non_embedding,
        "active_params": token_table + position_table + non_embedding - inactive,
        "flops_per_token": 6 * matmul_params + 12 * c.n_layer * c.n_head * c.head_dim * c.block_size,
    }


def check_tensor_parallel(config: GPTConfig, size: int) -> None:
    """UserError (one line) for a model that `size` processes cannot split between them."""
    if config.mlp == "moe":
        raise UserError(f"tensor_parallel_size {size} with model.mlp moe: tensor parallelism does not split "
                        f"experts; shard a mixture of experts with FSDP alone (tensor_parallel_size 1)")
    for name, count in (("n_head", config.n_head), ("n_kv_head", config.n_kv_head), ("mlp_hidden", config.mlp_hidden)):
        if count % size:
            raise UserError(f"tensor_parallel_size {size} must divide model.{name} ({count}): each process of a "
                            f"group takes an equal share")
    if config.dropout:
        raise UserError(f"model.dropout {config.dropout} with tensor parallelism: the processes of a group would "
                        f"drop different units of the same activations; set model.dropout 0")
