"""The training objective: cross-entropy of next-token predictions, computed one of three ways.

    plain   logits = model(idx); F.cross_entropy(logits.float(), targets) (+ the z-loss)
    fused   hidden = model(idx, return_hidden=True); the output layer and the loss in one step
            (LinearCrossEntropy below), without the tensors autograd would keep
    chunked the same, CHUNK_ROWS positions at a time, the gradients computed in the forward pass
            (ChunkedLinearCrossEntropy, as liger-kernel's fused linear cross-entropy): the full
            logits never exist, only one CHUNK_ROWS x vocabulary buffer; never picked by "auto"

The model (lm_pretrain.model.gpt) only maps tokens to logits or hidden states; which way the loss goes is
picked here, once, by `pick_loss`: "auto" takes the one that is best where the run is (fused when
the model runs eagerly, plain under torch.compile, which fuses the plain path itself), and a
combination that cannot work (fused with the z-loss or logit soft-capping) is an error, never
silently changed.

Why fused: with a 50k-token vocabulary the logits are the largest tensor of a small model by far
(8 x 128 positions x 50,257 floats = 206 MB), and the plain path makes four of that size each step:
the logits, their log-softmax, a zero-filled gradient that the loss scatters into, and the gradient
of the log-softmax. Here the logits are turned into their log-softmax in place, the loss is read off
it, and the same buffer becomes the gradient with respect to the logits (softmax minus one-hot); the
backward pass only multiplies it into the two small gradients. One large tensor instead of four: a
third less time per step for the tiny CPU presets (bench/time_to_loss.py). Under torch.compile in a
bf16-mixed run it holds the bf16 logits and its float32 buffer where the compiled plain path holds
one bf16 buffer (bench/loss_memory.py), so "auto" leaves it out there.
"""

from typing import Literal

import torch
import torch.nn.functional as F

from lm_pretrain.utils.errors import UserError

IGNORE_INDEX = -100  # target of a padding position: no loss, not counted (data.datamodule.inputs_and_targets)
LossKind = Literal["auto", "plain", "fused", "chunked"]
CHUNK_ROWS = 4096  # positions per chunk of the chunked loss: 4096 x 50,304 float32 logits = 824 MB


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                reduction: str) -> torch.Tensor:
        valid = targets != ignore_index
        safe = torch.where(valid, targets, 0)[:, None]
        buffer = torch.mm(x, weight.t()).float()  # (N, V) logits
        torch.log_softmax(buffer, dim=-1, out=buffer)  # row by row, in place
        picked = buffer.gather(1, safe).squeeze(1)
        loss = -(picked * valid).sum()
        count = valid.sum()
        if ctx is not None:
            # d(sum of losses)/d(logits) = softmax - one_hot(target); padding rows are zeroed below
            buffer.exp_()
            buffer.scatter_add_(1, safe, -valid[:, None].to(buffer.dtype))
            ctx.save_for_backward(buffer, x, weight, valid, count)
            ctx.reduction = reduction
        return loss / count if reduction == "mean" else loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_logits, x, weight, valid, count = ctx.saved_tensors
        scale = grad_loss / count if ctx.reduction == "mean" else grad_loss
        keep = valid[:, None].to(grad_logits.dtype)
        grad_x = (grad_logits @ weight.to(grad_logits.dtype)) * keep * scale
        grad_weight = grad_logits.t() @ (x.to(grad_logits.dtype) * keep) * scale
        return grad_x.to(x.dtype), grad_weight.to(weight.dtype), None, None, None


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """LinearCrossEntropy a chunk of rows at a time, each chunk's gradients computed at once, so that
    only one (chunk, V) buffer ever exists; the backward pass only scales the two gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                reduction: str, chunk: int) -> torch.Tensor:
        valid = targets != ignore_index
        safe = torch.where(valid, targets, 0)[:, None]
        grad = ctx is not None
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        grad_x = torch.empty(x.shape, dtype=torch.float32, device=x.device) if grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if grad else None
        for start in range(0, x.shape[0], chunk):
            rows, keep = slice(start, start + chunk), valid[start:start + chunk, None]
            buffer = torch.mm(x[rows], weight.t()).float()
            torch.log_softmax(buffer, dim=-1, out=buffer)
            loss = loss - (buffer.gather(1, safe[rows]) * keep).sum()
            if grad:  # softmax - one_hot(target), zero on padding rows
                buffer.exp_()
                buffer.scatter_add_(1, safe[rows], -keep.to(buffer.dtype))
                buffer.mul_(keep)
                grad_x[rows] = buffer @ weight.float()
                grad_weight += buffer.t() @ x[rows].float()
        count = valid.sum()
        if grad:
            ctx.save_for_backward(grad_x, grad_weight, count)
            ctx.reduction, ctx.dtypes = reduction, (x.dtype, weight.dtype)
        return loss / count if reduction == "mean" else loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_x, grad_weight, count = ctx.saved_tensors
        scale = grad_loss / count if ctx.reduction == "mean" else grad_loss
        return (grad_x * scale).to(ctx.dtypes[0]), (grad_weight * scale).to(ctx.dtypes[1]), None, None, None, None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         reduction: str = "mean", chunk: int | None = None) -> torch.Tensor:
    """F.cross_entropy(x @ weight.T, targets, ignore_index=..., reduction=...) for x (N, C), weight
    (V, C), targets (N,): the same value and gradients, computed in float32; with `chunk`, `chunk`
    rows at a time (ChunkedLinearCrossEntropy)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be mean or sum, got {reduction!r}")
    train = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if chunk is not None:
        if train:
            return ChunkedLinearCrossEntropy.apply(x, weight, targets, ignore_index, reduction, chunk)
        return ChunkedLinearCrossEntropy.forward(None, x, weight, targets, ignore_index, reduction, chunk)
    if train:
        return LinearCrossEntropy.apply(x, weight, targets, ignore_index, reduction)
    return LinearCrossEntropy.forward(None, x, weight, targets, ignore_index, reduction)  # scoring: no gradient


def pick_loss(kind: LossKind, compile: bool = False, z_loss: float = 0.0, logit_softcap: float | None = None) -> str:
    """"plain", "fused" or "chunked": the loss path of a run (see the module docstring); UserError for
    a combination that cannot work."""
    if kind in ("fused", "chunked") and (z_loss or logit_softcap is not None):
        raise UserError(f"model.loss {kind} computes the output layer itself, so it cannot add the z-loss or "
                        "soft-cap the logits: set model.loss plain (or auto), or drop model.z_loss / model.logit_softcap")
    if kind == "auto":
        return "plain" if compile or z_loss or logit_softcap is not None else "fused"
    return kind


def next_token_loss(model: torch.nn.Module, idx: torch.Tensor, targets: torch.Tensor, fused: bool = False,
                    z_loss: float = 0.0, reduction: str = "mean", chunk: int | None = None) -> torch.Tensor:
    """Cross-entropy of `model`'s predictions for idx (B, T) against targets (B, T): the mean, or with
    reduction "sum" the sum, over targets that are not IGNORE_INDEX. z_loss adds that weight times
    the squared log of the softmax normaliser per target (PaLM), which keeps the logits from
    drifting. fused computes the output layer and the loss in one step, `chunk` rows at a time when
    given. The model is always called as a module (model(...)), so hooks such as FSDP's run."""
    if fused:
        hidden = model(idx, return_hidden=True)
        return linear_cross_entropy(hidden.flatten(0, 1), model.lm_head.weight, targets.flatten(), IGNORE_INDEX,
                                    reduction, chunk)
    logits, targets = model(idx).flatten(0, 1).float(), targets.flatten()
    loss = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction=reduction)
    if z_loss:
        kept = targets != IGNORE_INDEX
        z = (torch.logsumexp(logits, dim=-1).square() * kept).sum()
        loss = loss + z_loss * (z if reduction == "sum" else z / kept.sum())
    return loss
