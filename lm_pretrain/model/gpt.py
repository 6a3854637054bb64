"""A decoder-only transformer, in one readable file: GPT-2 and Llama-style blocks are two settings
of its configuration (lm_pretrain.model.config.GPTConfig).

Tokens -> token embeddings (+ learned positions, for GPT-2) -> n_layer pre-norm blocks
(causal self-attention, then an MLP, each added back to the residual stream) -> final norm
-> LM head giving next-token logits over the vocabulary.

                 GPT-2                         Llama-style
    position     learned table (wpe)           rotary (RoPE) on queries and keys
    norm         LayerNorm                     RMSNorm
    MLP          GELU, 4x wide                 SwiGLU (gated), ~8/3x wide
    attention    one K/V head per query head   n_kv_head shared K/V heads (grouped-query)
    bias, tying  biases, tied embeddings       no biases, untied (either is a flag)

Three options of recent small-model recipes (e.g. modded-nanogpt) are flags too: QK-norm (queries and
keys normalised per head, so attention logits stay bounded at high learning rates), the ReLU² MLP
(relu(x)², 4x wide) and logit soft-capping (logits squashed smoothly into (-cap, cap)). With
mlp "moe" each block's MLP is a mixture of experts (lm_pretrain.model.moe), in either style of block.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.nn.attention.bias import causal_lower_right

from lm_pretrain.model.config import GPTConfig
from lm_pretrain.model.moe import MoE, RouterStats, router_losses


def make_norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":  # scales only: no mean subtraction, no bias
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


def rope_tables(config: GPTConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of each position's rotation angles, (block_size, head_dim)."""
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, config.head_dim, 2, device=device).float() / config.head_dim))
    angles = torch.outer(torch.arange(config.block_size, device=device).float(), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)  # halves layout, as in Hugging Face's Llama
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (x_i, x_{i+d/2}) pair of x (B, H, T, D) by its position's angle: the dot product of
    a rotated query and key then depends only on how far apart they are."""
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat((-x2, x1), dim=-1) * sin).type_as(x)


class KVCache:
    """Keys and values of the tokens seen so far, one per layer, so each new token costs one
    position of attention instead of re-running the whole context."""

    def __init__(self, config: GPTConfig, batch_size: int):
        self.block_size = config.block_size
        self.k: list[torch.Tensor | None] = [None] * config.n_layer
        self.v: list[torch.Tensor | None] = [None] * config.n_layer
        self.length = 0  # positions filled

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k[layer] is None:  # made as the first keys come: in the type and on the device the model
            # computes in (bf16 under FSDP's mixed precision, whatever type its stored weights have), for
            # the heads this process holds (some of them under tensor parallelism)
            shape = (k.shape[0], k.shape[1], self.block_size, k.shape[3])
            self.k[layer], self.v[layer] = k.new_zeros(shape), v.new_zeros(shape)
        start, end = self.length, self.length + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.layer, self.n_head, self.n_kv_head, self.head_dim = layer, config.n_head, config.n_kv_head, config.head_dim
        self.dropout = config.dropout
        self.rope, self.qk_norm = config.position == "rope", config.qk_norm
        # k and v are narrower with grouped-query attention. Three matrices, not one fused qkv: tensor
        # parallelism (strategies.parallelize) gives each process its heads' rows of each.
        self.q = nn.Linear(config.n_embd, config.n_head * config.head_dim, bias=config.bias)
        self.k = nn.Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=config.bias)
        self.v = nn.Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=config.bias)
        self.proj = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=config.bias)
        self.proj.is_residual_projection = True  # see GPT.init_weights
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, rope: tuple | None = None, cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        # (B, T, heads * head_dim) -> (B, heads, T, head_dim): heads attend independently. (-1: under
        # tensor parallelism this process holds only some of the heads.)
        q = self.q(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        k = self.k(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.v(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        if self.qk_norm:  # unit RMS per head: q.k stays bounded however large the weights grow
            q, k = F.rms_norm(q, (self.head_dim,)), F.rms_norm(k, (self.head_dim,))
        if self.rope:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        # PyTorch picks a fused kernel (flash / memory-efficient) where it can. Each query may see its
        # own position and earlier ones. With a cache, the T new queries are the *last* T positions of
        # the keys, so the causal mask is aligned bottom-right (is_causal aligns it top-left).
        if k.shape[2] == T:
            # (also right for T = 1; a condition on T here would be symbolic under torch.compile's
            # dynamic shapes, which SDPA refuses)
            mask = {"is_causal": True}
        else:
            mask = {"attn_mask": causal_lower_right(T, k.shape[2])} if T > 1 else {}  # one new token sees all
        # Each K/V head serves a group of consecutive query heads. Training's causal attention lets
        # SDPA share them (enable_gqa: no copy; flash on GPUs); with a mask (sampling from a cache)
        # the kernel that takes one has no GQA, so the heads are copied out there.
        gqa = self.n_kv_head != self.n_head and "attn_mask" not in mask
        if self.n_kv_head != self.n_head and not gqa:
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           enable_gqa=gqa, **mask)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.kind = config.mlp  # gelu, swiglu or relu2
        self.fc = nn.Linear(config.n_embd, config.mlp_hidden, bias=config.bias)
        if self.kind == "swiglu":  # silu(x W_gate) * (x W_fc)
            self.gate = nn.Linear(config.n_embd, config.mlp_hidden, bias=config.bias)
        self.proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=config.bias)
        self.proj.is_residual_projection = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            h = F.silu(self.gate(x)) * self.fc(x)
        elif self.kind == "relu2":  # sparse and cheap; learns faster than GELU in small models
            h = F.relu(self.fc(x)).square()
        else:
            h = F.gelu(self.fc(x), approximate="tanh")  # GPT-2's GELU
        return self.dropout(self.proj(h))


class Block(nn.Module):
    """Pre-norm transformer block: normalise, transform, add to the residual stream."""

    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = make_norm(config)
        self.mlp = MoE(config) if config.mlp == "moe" else MLP(config)

    def forward(self, x: torch.Tensor, rope: tuple | None = None,
                cache: KVCache | None = None) -> tuple[torch.Tensor, RouterStats | None]:
        """The block's output, and with a mixture of experts its routing statistics (else None)."""
        x = x + self.attn(self.ln_1(x), rope, cache)
        h = self.mlp(self.ln_2(x))
        h, stats = h if isinstance(self.mlp, MoE) else (h, None)
        return x + h, stats


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        # The layers are made on the meta device (shapes only: no memory, no random draws), then made
        # real where the caller builds (the CPU, or a `with torch.device(...)` block) and initialised by
        # init_weights alone. A caller that builds inside `with torch.device("meta")` gets the model
        # without memory, to shard and initialise later (training.strategies.materialize): the same
        # weights as a model built whole from the same seed, whatever the layout.
        device = torch.empty(()).device
        with torch.device("meta"):
            self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token embeddings
            if config.position == "learned":
                self.wpe = nn.Embedding(config.block_size, config.n_embd)  # learned position embeddings
            self.drop = nn.Dropout(config.dropout)
            self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
            self.ln_f = make_norm(config)
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
            if config.position == "rope":  # not parameters: recomputed (init_weights), never saved
                self.register_buffer("rope_cos", torch.empty(config.block_size, config.head_dim), persistent=False)
                self.register_buffer("rope_sin", torch.empty(config.block_size, config.head_dim), persistent=False)
        self.checkpoint_blocks = False  # activation checkpointing: see strategies.parallelize
        # A mixture of experts: the routing statistics of the last training forward pass (router_loss
        # reads them), and the process group whose choices balancing counts (LanguageModel.setup).
        self.experts = [block.mlp for block in self.blocks if isinstance(block.mlp, MoE)]
        self.router_stats: list[RouterStats] | None = None
        self.balance_group = None
        self.register_load_state_dict_pre_hook(self._load_fused_layout)  # checkpoints of earlier versions
        if device.type != "meta":
            self.to_empty(device=device)
        self.tie_weights()
        if device.type != "meta":
            self.init_weights()

    def _load_fused_layout(self, module, state_dict, prefix, *args) -> None:
        split_fused_weights(state_dict, self.config, prefix)

    def tie_weights(self) -> None:
        """With tie_embeddings, one matrix reads tokens in and writes them out (to_empty unties them)."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.wte.weight

    @torch.no_grad()
    def init_weights(self, normal_=nn.init.normal_) -> None:
        """Set every parameter and buffer to its initial value; the only random draws of a model's
        making, in a fixed order, so that the same seed gives the same model. `normal_(tensor, mean,
        std)` fills a weight (strategies.materialize passes one that draws each whole tensor and keeps
        this process's shard of it)."""
        # GPT-2: N(0, 0.02) everywhere (PyTorch's N(0, 1) embeddings would start the loss near 23, not ln V).
        # Projections that write into the residual stream are scaled by 1/sqrt(2 * n_layer) so the
        # stream's variance does not grow with depth (two such writes per block).
        drawn = set()  # a tied matrix is drawn once, as the token embeddings
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)) and id(module.weight) not in drawn:
                drawn.add(id(module.weight))
                std = 0.02
                if getattr(module, "is_residual_projection", False):
                    std /= math.sqrt(2 * self.config.n_layer)
                normal_(module.weight, 0.0, std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                module.reset_parameters()  # scale 1, bias 0
            elif isinstance(module, MoE):  # (its router and shared experts are nn.Linear: drawn above)
                module.init_weights(normal_, 0.02, 0.02 / math.sqrt(2 * self.config.n_layer))
        if self.config.position == "rope":
            cos, sin = rope_tables(self.config)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, each shared tensor counted once. non_embedding leaves out the token and
        position tables (an untied LM head still counts), as in the scaling-law papers."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.weight.numel() + (self.wpe.weight.numel() if hasattr(self, "wpe") else 0)
        return n

    def router_loss(self) -> torch.Tensor | float:
        """The weighted router losses (balancing and z-loss) of the last training forward pass, averaged
        over the blocks, to add to the training loss (moe.router_losses; read once: the statistics go);
        0 for a dense model."""
        stats, self.router_stats = self.router_stats, None
        if not stats:
            return 0.0
        return router_losses(self.experts, stats, self.config.router_aux_loss, self.config.router_z_loss,
                             self.balance_group)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, return_hidden: bool = False) -> torch.Tensor:
        """Token ids (B, T) -> next-token logits (B, T, vocab_size). With a cache, idx continues the
        tokens already in it. return_hidden gives the final norm's output (B, T, n_embd) instead, for
        a loss that applies the output layer itself (lm_pretrain.model.loss, fused)."""
        T = idx.shape[1]
        start = cache.length if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of length {start + T} is longer than block_size {self.config.block_size}")
        x = self.wte(idx)
        rope = None
        if self.config.position == "learned":
            x = x + self.wpe(torch.arange(start, start + T, device=idx.device))
        else:
            rope = (self.rope_cos[start:start + T].to(x.dtype), self.rope_sin[start:start + T].to(x.dtype))
        x = self.drop(x)
        routed = []
        for block in self.blocks:
            if self.checkpoint_blocks and self.training:  # keep only block inputs; recompute the rest
                x, stats = torch.utils.checkpoint.checkpoint(block, x, rope, cache, use_reentrant=False)
            else:
                x, stats = block(x, rope, cache)
            routed.append(stats)
        if self.experts and self.training and torch.is_grad_enabled():
            self.router_stats = routed
        if cache is not None:
            cache.length += T
        x = self.ln_f(x)
        if return_hidden:
            return x
        logits = self.lm_head(x)
        if self.config.logit_softcap is not None:  # smooth, so gradients never vanish at the cap
            logits = self.config.logit_softcap * torch.tanh(logits / self.config.logit_softcap)
        return logits

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None, vocab_limit: int | None = None,
                 stop_token: int | None = None, use_cache: bool = True) -> torch.Tensor:
        """Append up to `max_new_tokens` sampled tokens to `idx` (B, T).

        temperature 0 is greedy; top_k keeps the k likeliest tokens, top_p the smallest set whose
        probability reaches p; vocab_limit samples only ids below it (a vocabulary padded for speed
        has ids no tokenizer can decode); generation stops once every row has produced stop_token.
        With use_cache, keys and values are kept between steps; when the context fills up, the
        model restarts from the last block_size // 2 tokens, as the uncached path crops its input.
        """
        cache, done = None, torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            if not use_cache:
                logits = self(idx[:, -self.config.block_size:])[:, -1]
            else:
                if cache is None or cache.length >= self.config.block_size:
                    keep = self.config.block_size if cache is None else self.config.block_size // 2
                    cache = KVCache(self.config, idx.shape[0])
                    logits = self(idx[:, -keep:], cache)[:, -1]
                else:
                    logits = self(idx[:, -1:], cache)[:, -1]
            next_token = sample_next(logits[:, :vocab_limit], temperature, top_k, top_p, generator)
            if stop_token is not None:
                next_token = torch.where(done[:, None], stop_token, next_token)  # finished rows stay finished
                done |= next_token[:, 0] == stop_token
            idx = torch.cat((idx, next_token), dim=1)
            if stop_token is not None and bool(done.all()):
                break
        return idx


def split_fused_weights(state: dict, config: GPTConfig, prefix: str = "") -> None:
    """Rewrite, in place, the weights of a checkpoint written before q, k, v and SwiGLU's gate and
    up projection were separate matrices (one fused attn.qkv, one mlp.fc of both halves)."""
    sizes = [config.n_head * config.head_dim, config.n_kv_head * config.head_dim, config.n_kv_head * config.head_dim]
    for i in range(config.n_layer):
        block = f"{prefix}blocks.{i}."
        for kind in ("weight", "bias"):
            fused = state.pop(f"{block}attn.qkv.{kind}", None)
            if fused is not None:
                for name, part in zip("qkv", fused.split(sizes)):
                    state[f"{block}attn.{name}.{kind}"] = part
            fc = state.get(f"{block}mlp.fc.{kind}")
            if config.mlp == "swiglu" and fc is not None and fc.shape[0] == 2 * config.mlp_hidden:
                state[f"{block}mlp.gate.{kind}"], state[f"{block}mlp.fc.{kind}"] = fc.chunk(2)


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of logits (B, V), as a (B, 1) tensor."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # keep tokens until p is reached
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1, generator=generator)
