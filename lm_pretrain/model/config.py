"""The model's architecture as data: GPTConfig, and what it costs (parameters, FLOPs per token).

No torch here: `lm-pretrain-sizes`, `--help` and anything that only reads configs stay quick.
lm_pretrain.model.gpt builds the network that a GPTConfig describes.
"""

import math
from dataclasses import dataclass
from typing import Literal

from lm_pretrain.utils.ranges import Context, Fraction, Heads, Layers, PositiveFloat, VocabSize, Width
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
        mlp: "gelu" (GPT-2, 4x wide), "swiglu" (Llama, gated) or "relu2" (relu(x) squared, 4x wide).
        mlp_hidden: MLP hidden width; empty means 4 * n_embd for gelu and relu2, 8/3 * n_embd rounded up
            to a multiple of 256 for swiglu.
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
    mlp: Literal["gelu", "swiglu", "relu2"] = "gelu"
    mlp_hidden: Width | None = None
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
        if self.mlp_hidden is None:
            self.mlp_hidden = 256 * math.ceil(8 * self.n_embd / 3 / 256) if self.mlp == "swiglu" else 4 * self.n_embd

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def model_size(config: GPTConfig) -> dict[str, int]:
    """Parameter counts and training FLOPs per token, from the config alone (no weights needed).

    flops_per_token counts the matmuls of forward + backward (2 + 4 FLOPs per weight per token,
    the LM head included) plus attention's scores and weighted sums over a full block_size context:
    6 * N + 12 * n_layer * n_head * head_dim * block_size (PaLM's estimate, as used for MFU).
    """
    c = config
    d, kv, hidden, b = c.n_embd, c.n_kv_head * c.head_dim, c.mlp_hidden, int(c.bias)
    norm = d + (b * d if c.norm == "layernorm" else 0)
    attention = d * (d + 2 * kv) + b * (d + 2 * kv) + d * d + b * d
    mlp = d * hidden * (2 if c.mlp == "swiglu" else 1) + b * hidden * (2 if c.mlp == "swiglu" else 1) + hidden * d + b * d
    blocks = c.n_layer * (2 * norm + attention + mlp)
    token_table = c.vocab_size * d
    position_table = c.block_size * d if c.position == "learned" else 0
    head = 0 if c.tie_embeddings else c.vocab_size * d
    non_embedding = blocks + norm + head
    matmul_params = non_embedding + (token_table if c.tie_embeddings else 0)  # the head's matmul either way
    return {
        "params": token_table + position_table + non_embedding,
        "non_embedding_params": non_embedding,
        "flops_per_token": 6 * matmul_params + 12 * c.n_layer * c.n_head * c.head_dim * c.block_size,
    }


def check_tensor_parallel(config: GPTConfig, size: int) -> None:
    """UserError (one line) for a model that `size` processes cannot split between them."""
    for name, count in (("n_head", config.n_head), ("n_kv_head", config.n_kv_head), ("mlp_hidden", config.mlp_hidden)):
        if count % size:
            raise UserError(f"tensor_parallel_size {size} must divide model.{name} ({count}): each process of a "
                            f"group takes an equal share")
    if config.dropout:
        raise UserError(f"model.dropout {config.dropout} with tensor parallelism: the processes of a group would "
                        f"drop different units of the same activations; set model.dropout 0")
