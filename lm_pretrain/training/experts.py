"""What a mixture of experts (model.mlp moe) is doing while it trains: ExpertLoad logs each block's
expert load and the router losses, and warns when an expert stops receiving tokens.

The counts accumulate on the device as each training step forms its loss (GPT.router_loss); they are
read back once per log step, which waits for the GPU anyway: other steps never do. Logged:

    moe/aux_loss, moe/z_loss            the router losses, unweighted, mean over blocks
    moe/cv                              mean over blocks of the coefficient of variation (std / mean)
                                        of the tokens per expert: 0 is perfect balance
    moe/block{i}/cv, moe/block{i}/max   a block's: its CV, and its busiest expert's load over the mean
    moe/block{i}/expert{e}              the fraction of the block's choices that went to expert e
                                        (1 / n_experts each, in perfect balance)
"""

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from lm_pretrain.model.gpt import GPT
from lm_pretrain.model.moe import grouped_mm_supported
from lm_pretrain.training.steps import ends_optimizer_step, is_log_step
from lm_pretrain.utils import ranges
from lm_pretrain.utils.ranges import PositiveInt


def balance_group(strategy):
    """The process group across which balancing counts a micro-batch's choices (None: one process).
    Under FSDP the data-parallel dimension of the mesh, under DDP all processes."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    mesh = getattr(strategy, "device_mesh", None)
    return mesh["data_parallel"].get_group() if mesh is not None else dist.group.WORLD


def choose_expert_matmul(model: GPT, device: torch.device, precision) -> None:
    """Decide once, outside any compiled code, whether the experts run as one grouped matmul or a loop
    in each type the run computes in (its precision's, and float32 for a mixed precision's samples
    outside autocast), and say so when training's is the loop on a GPU: slower, and it reads the token
    counts back to the host in every block."""
    precision = str(precision)
    dtype = {"bf16": torch.bfloat16, "16": torch.float16, "64": torch.float64}.get(precision.split("-")[0], torch.float32)
    shape = model.experts[0].gate.shape
    choices = {t: grouped_mm_supported(device, t, shape) for t in {dtype, torch.float32}}
    for layer in model.experts:
        layer.grouped_for = choices
    if not choices[dtype] and device.type != "cpu":
        rank_zero_info(f"note: the experts run one after another on {device} in {dtype} (torch._grouped_mm needs "
                       f"a Hopper GPU and bf16): slower, and each block waits for the GPU")


class ExpertLoad(L.Callback):
    def __init__(self, idle_warning_steps: PositiveInt = 100):
        """
        Args:
            idle_warning_steps: warn (one line, once per expert) when an expert has received no token
                for this many optimizer steps in a row; it is dead weight, and may stay so.
        """
        ranges.check(ExpertLoad.__init__, {"idle_warning_steps": idle_warning_steps}, "trainer.callbacks")
        self.idle_warning_steps = idle_warning_steps
        self.warned: set[tuple[int, int]] = set()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if not ends_optimizer_step(trainer, batch_idx) or not is_log_step(trainer):
            return
        layers = module.model.experts
        if not layers:
            return
        # one copy to the host: (blocks, experts) counts and idle steps, (blocks, 3) loss sums
        values = torch.cat([torch.cat([m.window_tokens, m.idle_steps.float(), m.loss_sums]) for m in layers]).cpu()
        E = layers[0].n_experts
        values = values.view(len(layers), 2 * E + 3)
        tokens, idle, sums = values[:, :E], values[:, E:2 * E], values[:, 2 * E:]
        for m in layers:
            m.window_tokens.zero_()
            m.loss_sums.zero_()
        self._warn_idle(idle)
        if sums[:, 2].min() == 0:  # no training forward pass since the last log step
            return
        fractions = tokens / tokens.sum(dim=1, keepdim=True)
        cv = tokens.std(dim=1, correction=0) / tokens.mean(dim=1)
        metrics = {"moe/aux_loss": float((sums[:, 0] / sums[:, 2]).mean()),
                   "moe/z_loss": float((sums[:, 1] / sums[:, 2]).mean()), "moe/cv": float(cv.mean())}
        for i, block in enumerate(fractions):
            metrics[f"moe/block{i}/cv"] = float(cv[i])
            metrics[f"moe/block{i}/max"] = float(block.max() * len(block))
            metrics.update({f"moe/block{i}/expert{e}": float(f) for e, f in enumerate(block)})
        module.log_dict(metrics)

    def _warn_idle(self, idle: torch.Tensor) -> None:
        for block, expert in (idle >= self.idle_warning_steps).nonzero().tolist():
            if (block, expert) not in self.warned:
                self.warned.add((block, expert))
                rank_zero_info(f"warning: expert {expert} of block {block} has received no token for {int(idle[block, expert])} "
                               f"optimizer steps: raise model.router_aux_loss or set model.router_bias_rate")
        self.warned = {(b, e) for b, e in self.warned if idle[b, e] > 0}  # back in use: may warn again
