"""A mixture-of-experts MLP: each token goes through `top_k` of `n_experts` SwiGLU MLPs, chosen by
a linear router, so the parameters grow n_experts / top_k-fold while each token costs what a dense
MLP of top_k experts' width costs (Switch Transformer, Mixtral, OLMoE, DeepSeek-V3).

    router     logits = x W_r (one score per expert); probabilities = softmax(logits)
    choice     the top_k experts by probability (+ a balancing bias, if trained with one)
    weights    their probabilities, renormalised to sum to 1 (Mixtral) or as they are (OLMoE)
    output     sum over the chosen experts of weight * SwiGLU_e(x), plus shared experts' SwiGLU(x)

Dropless: every token reaches every expert it chose, however many chose the same one (no capacity
factor). The (token, expert) pairs are sorted by expert, so each expert multiplies one contiguous
block of rows: one grouped matmul over all experts (`torch._grouped_mm`, on CPUs and Hopper GPUs)
or, where torch has none for the device and type, a loop over experts (which reads the counts back
to the host in every block: the one path that waits for the GPU).

Balancing. A router left alone sends most tokens to a few experts, which then learn fastest and
attract more. Two remedies, usable together:
    auxiliary loss   router_aux_loss * n_experts * sum_e f_e * P_e, f_e the fraction of choices that
                     went to expert e, P_e its mean probability: smallest when both are uniform
                     (Switch Transformer; OLMoE uses 0.01)
    bias             a per-expert bias added to the scores for the choice only, not the weights,
                     nudged after every optimizer step by router_bias_rate towards the experts that
                     got fewer tokens than average (DeepSeek-V3's auxiliary-loss-free balancing)
f_e counts the choices of the micro-batch across all data-parallel processes (as Qwen3's global-batch
balancing): N processes train as one process with N times their batch does. router_z_loss *
mean(logsumexp(logits)^2) keeps the router's logits small (ST-MoE). Both losses are averaged over
the blocks (as OLMoE's MegaBlocks does), so their weights mean the same at any depth.

The layer itself has no side effects: it returns its output and its RouterStats, which the model
gathers (GPT.forward) and router_losses turns into the loss, outside any compiled or recomputed
(activation checkpointing) region. The statistics for logging accumulate on the device, in buffers:
the tokens each expert received this optimizer step and since the last log step, the router losses.
"""

import contextlib
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from lm_pretrain.model.config import GPTConfig

TORCH_VERSION = tuple(int(part) for part in torch.__version__.split(".")[:2])


class RouterStats(NamedTuple):
    """What one MoE layer's routing of a batch says about balance (router_losses uses them)."""
    mean_probs: torch.Tensor  # (E,) the router's mean probability of each expert (has a gradient)
    counts: torch.Tensor  # (E,) how many tokens chose each expert, as floats (no gradient)
    z: torch.Tensor  # () mean over tokens of logsumexp(router logits)^2 (has a gradient)


def grouped_mm_supported(device: torch.device, dtype: torch.dtype, weight_shape: torch.Size) -> bool:
    """Whether torch._grouped_mm multiplies experts of this shape in `dtype` on `device`: CPUs in float32
    or bf16 from torch 2.9, Hopper GPUs (compute capability 9.0) in bf16; rows 16-byte aligned. (Not
    yet Blackwell: there torch gives experts without tokens nonzero gradients, pytorch/pytorch#172439.)"""
    if not hasattr(torch, "_grouped_mm"):
        return False
    aligned = all((n * dtype.itemsize) % 16 == 0 for n in weight_shape[1:])
    if device.type == "cpu":
        return aligned and TORCH_VERSION >= (2, 9) and dtype in (torch.float32, torch.bfloat16)
    if device.type == "cuda":
        return aligned and dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) == (9, 0)
    return False


def expert_matmul(x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor, grouped: bool) -> torch.Tensor:
    """x (rows, in), sorted by expert, times each expert's weight (E, out, in) transposed: rows before
    ends[0] by expert 0's, rows from ends[e-1] to ends[e] by expert e's. (rows, out).

    grouped: one torch._grouped_mm over all experts, else a loop over them. torch.compile takes
    _grouped_mm itself in bf16 only, so other types go through an op of ours that it does not look
    into (no graph break either way)."""
    weight = weight.transpose(-2, -1)  # (E, in, out)
    if grouped and x.dtype == torch.bfloat16:
        return torch._grouped_mm(x, weight, offs=ends.to(torch.int32))
    return _expert_matmul(x, weight, ends, grouped)


def _sizes(ends: torch.Tensor) -> list[int]:
    return torch.diff(ends, prepend=ends.new_zeros(1)).tolist()  # a read back: the loop needs the sizes


@torch.library.custom_op("lm_pretrain::expert_matmul", mutates_args=())
def _expert_matmul(x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor, grouped: bool) -> torch.Tensor:
    if grouped:
        return torch._grouped_mm(x, weight, offs=ends.to(torch.int32))
    return torch.cat([rows @ w for rows, w in zip(x.split(_sizes(ends)), weight)])


@torch.library.custom_op("lm_pretrain::expert_weight_grad", mutates_args=())
def _expert_weight_grad(x: torch.Tensor, grad: torch.Tensor, ends: torch.Tensor, grouped: bool) -> torch.Tensor:
    """Each expert's x_e^T grad_e, (E, in, out): the gradient of its weight."""
    if grouped:
        return torch._grouped_mm(x.t(), grad, offs=ends.to(torch.int32))
    sizes = _sizes(ends)
    return torch.stack([rows.t() @ g for rows, g in zip(x.split(sizes), grad.split(sizes))])


@_expert_matmul.register_fake
def _(x, weight, ends, grouped):
    return x.new_empty(x.shape[0], weight.shape[-1])


@_expert_weight_grad.register_fake
def _(x, grad, ends, grouped):
    return x.new_empty(ends.shape[0], x.shape[1], grad.shape[1])


def _setup(ctx, inputs, output) -> None:
    x, weight, ends, ctx.grouped = inputs
    ctx.save_for_backward(x, weight, ends)


def _backward(ctx, grad):
    x, weight, ends = ctx.saved_tensors
    grad = grad.contiguous()
    return (_expert_matmul(grad, weight.transpose(-2, -1), ends, ctx.grouped),
            _expert_weight_grad(x, grad, ends, ctx.grouped), None, None)


_expert_matmul.register_autograd(_backward, setup_context=_setup)


class MoE(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        E, d, h = config.n_experts, config.n_embd, config.mlp_hidden
        self.n_experts, self.top_k, self.renormalize = E, config.top_k, config.router_renormalize
        self.router = nn.Linear(d, E, bias=False)
        # Each expert's SwiGLU matrices, stacked (out, in) as nn.Linear's: silu(x gate_e^T) * (x up_e^T) down_e^T
        self.gate = nn.Parameter(torch.empty(E, h, d))
        self.up = nn.Parameter(torch.empty(E, h, d))
        self.down = nn.Parameter(torch.empty(E, d, h))
        self.down.is_residual_projection = True  # see GPT.init_weights
        self.n_shared = config.n_shared_experts
        if self.n_shared:  # experts every token goes through (DeepSeek-MoE): one SwiGLU as wide as they are
            self.shared_gate = nn.Linear(d, self.n_shared * h, bias=False)
            self.shared_up = nn.Linear(d, self.n_shared * h, bias=False)
            self.shared_down = nn.Linear(self.n_shared * h, d, bias=False)
            self.shared_down.is_residual_projection = True
        # Added to the router's probabilities to choose experts (never to weight them); moved after each
        # optimizer step by end_step, zero without router_bias_rate. Part of the model: saved.
        self.register_buffer("expert_bias", torch.zeros(E))
        # Optimizer steps in a row in which each expert got no token (saved: the warning survives a resume).
        self.register_buffer("idle_steps", torch.zeros(E, dtype=torch.int64))
        # Statistics of the training forward passes (not saved): choices per expert this optimizer step
        # and since the last log step, and the router losses (auxiliary, z) with their count.
        self.register_buffer("step_tokens", torch.zeros(E), persistent=False)
        self.register_buffer("window_tokens", torch.zeros(E), persistent=False)
        self.register_buffer("loss_sums", torch.zeros(3), persistent=False)
        # torch._grouped_mm (True) or the loop, by the type the experts run in: decided once per run for
        # its precision's types (LanguageModel.setup), else at each call (grouped_mm_supported).
        self.grouped_for: dict[torch.dtype, bool] = {}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterStats]:
        shape, E, k = x.shape, self.n_experts, self.top_k
        x = x.reshape(-1, shape[-1])  # (N, d): every token of every sequence
        device = x.device.type
        autocast = torch.amp.is_autocast_available(device)  # (not on the meta device)
        with torch.autocast(device, enabled=False) if autocast else contextlib.nullcontext():
            logits = F.linear(x.float(), self.router.weight.float())  # float32 under bf16-mixed too: near-ties
            # between experts' scores decide the choice
        probs = logits.softmax(dim=-1)
        chosen = (probs + self.expert_bias).topk(k, dim=-1).indices  # (N, k)
        weights = probs.gather(-1, chosen)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)

        # The N * k (token, expert) pairs, sorted by expert: expert e's rows end at ends[e].
        flat = chosen.flatten()
        order = flat.argsort(stable=True)
        counts = torch.zeros(E, dtype=torch.int64, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
        ends = counts.cumsum(0)
        # (under autocast, in its type: bf16-mixed multiplies experts in bf16 as it does nn.Linear)
        dtype = torch.get_autocast_dtype(device) if autocast and torch.is_autocast_enabled(device) else x.dtype
        rows = x.to(dtype)[order // k]
        grouped = self.grouped_for[dtype] if dtype in self.grouped_for else \
            grouped_mm_supported(x.device, dtype, self.gate.shape)
        gate, up, down = (w.to(dtype) for w in (self.gate, self.up, self.down))
        hidden = F.silu(expert_matmul(rows, gate, ends, grouped)) * expert_matmul(rows, up, ends, grouped)
        out = expert_matmul(hidden, down, ends, grouped)
        # back to (token, choice) order, each weighted, summed over the token's choices
        out = torch.empty_like(out).index_copy_(0, order, out).view(-1, k, shape[-1])
        y = (out * weights.unsqueeze(-1).to(out.dtype)).sum(dim=1).to(x.dtype)
        if self.n_shared:
            y = y + self.shared_down(F.silu(self.shared_gate(x)) * self.shared_up(x))
        stats = RouterStats(probs.mean(dim=0), counts.float(), torch.logsumexp(logits, dim=-1).square().mean())
        return y.view(shape), stats

    @torch.no_grad()
    def end_step(self, bias_rate: float) -> None:
        """After an optimizer step: move the balancing bias by bias_rate towards the experts that got
        fewer tokens than the mean this step (DeepSeek-V3; the counts are all processes' choices, so every
        process moves it alike), count idle steps, and start the next step's count. On the device."""
        counts = self.step_tokens
        if bias_rate:
            self.expert_bias.add_(bias_rate * torch.sign(counts.mean() - counts))
        self.idle_steps.copy_(torch.where(counts == 0, self.idle_steps + 1, 0))
        self.window_tokens.add_(counts)
        counts.zero_()

    @torch.no_grad()
    def record(self, counts: torch.Tensor, aux: torch.Tensor, z: torch.Tensor) -> None:
        """Add a training batch's choices (global) and unweighted router losses to the statistics."""
        self.step_tokens.add_(counts)
        self.loss_sums.add_(torch.stack([aux, z, torch.ones_like(z)]))

    @torch.no_grad()
    def init_weights(self, normal_, std: float, residual_std: float) -> None:
        """Each expert as a dense MLP's matrices: N(0, std), the output ones N(0, residual_std)."""
        normal_(self.gate, 0.0, std)
        normal_(self.up, 0.0, std)
        normal_(self.down, 0.0, residual_std)
        for buffer in self.buffers(recurse=False):
            buffer.zero_()


def router_losses(layers: list[MoE], stats: list[RouterStats], aux_weight: float, z_weight: float,
                  group=None) -> torch.Tensor:
    """The auxiliary and z-losses of a training batch, weighted and averaged over the blocks (`layers`,
    with the `stats` their forward passes returned), to add to the training loss. f_e counts the choices of
    every process of `group` (one all-reduce for all blocks; no gradient flows through it). Records the
    counts and losses in each layer's statistics."""
    mean_probs = torch.stack([s.mean_probs for s in stats])  # (blocks, experts)
    counts = torch.stack([s.counts for s in stats])
    z = torch.stack([s.z for s in stats])
    if group is not None:
        import torch.distributed._functional_collectives as funcol

        counts = funcol.all_reduce(counts, "sum", group)
    f = counts / counts.sum(dim=-1, keepdim=True)
    aux = mean_probs.shape[-1] * (f * mean_probs).sum(dim=-1)  # (blocks,): 1 when both are uniform
    for layer, c, a, zz in zip(layers, counts, aux.detach(), z.detach()):
        layer.record(c, a, zz)
    return (aux_weight * aux + z_weight * z).mean()
