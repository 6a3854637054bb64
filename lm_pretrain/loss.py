"""The output layer and the cross-entropy in one step, without the tensors autograd would keep.

With a 50k-token vocabulary the logits are the largest tensor of a small model by far (8 x 128
positions x 50,257 floats = 206 MB), and the plain path, `F.cross_entropy(x @ W.T, targets)`, makes
four of that size each step: the logits, their log-softmax, a zero-filled gradient that the loss
scatters into, and the gradient of the log-softmax. Here the logits are turned into their
log-softmax in place, the loss is read off it, and the same buffer becomes the gradient with
respect to the logits (softmax minus one-hot); the backward pass only multiplies it into the two
small gradients. One large tensor instead of four: a third less time per step for the tiny CPU
presets (bench/time_to_loss.py) and far less memory for the logits on any device.
"""

import torch


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


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         reduction: str = "mean") -> torch.Tensor:
    """F.cross_entropy(x @ weight.T, targets, ignore_index=..., reduction=...) for x (N, C), weight
    (V, C), targets (N,): the same value and gradients, computed in float32."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be mean or sum, got {reduction!r}")
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return LinearCrossEntropy.apply(x, weight, targets, ignore_index, reduction)
    return LinearCrossEntropy.forward(None, x, weight, targets, ignore_index, reduction)  # scoring: no gradient
