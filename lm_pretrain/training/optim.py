"""Optimizers and learning-rate schedules of LanguageModel.configure_optimizers.

Parameters fall into roles, and each role gets the update that suits it:

    role        what                                  AdamW recipe          Muon recipe
    hidden      the blocks' matrices                  AdamW, decayed        Muon, decayed
                (a mixture's stacked experts)         AdamW, decayed        AdamW, decayed
    embedding   token (and position) tables           AdamW, no decay       AdamW, no decay
    head        an untied output layer                AdamW at head_lr      AdamW at head_lr
    gains       norms' scales, biases                 AdamW, no decay       AdamW, no decay

Muon (Keller Jordan's MomentUm Orthogonalized by Newton-Schulz; `torch.optim.Muon`) replaces each
matrix's update by the nearest orthogonal matrix, so every direction of the matrix learns at the
same rate; it only applies to 2-D weights, and embeddings and the head learn better with Adam. With
adjust_lr_fn="match_rms_adamw" its updates have AdamW's size, so it takes AdamW's learning rate.

Schedules, as a multiplier of each group's learning rate: "cosine" (linear warmup, cosine decay to
min_lr_ratio) or "wsd" (warmup, stable at the peak, then a linear decay over the final
decay_fraction of the steps: a run can be continued from before the decay).
"""

import math
from typing import Literal

import torch

from lm_pretrain.utils.errors import UserError

OptimizerName = Literal["adamw", "muon"]
Schedule = Literal["cosine", "wsd"]


def parameter_roles(model: torch.nn.Module) -> dict[str, list[torch.nn.Parameter]]:
    """The model's trainable parameters by role (see the table above); a tied head is the embedding."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    head = getattr(model, "lm_head", None)
    head_ids = {id(head.weight)} - embeddings if head is not None else set()
    roles = {"hidden": [], "embedding": [], "head": [], "gains": []}
    for param in model.parameters():
        if not param.requires_grad:
            continue
        if id(param) in embeddings:
            roles["embedding"].append(param)
        elif id(param) in head_ids:
            roles["head"].append(param)
        else:
            roles["hidden" if param.dim() >= 2 else "gains"].append(param)
    return roles


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon for some parameter groups, AdamW for the others, as one optimizer (Lightning's automatic
    optimization steps one). The groups are the two inner optimizers' own, so the schedule, gradient
    clipping and checkpoints see every parameter; the state is one dict shared by both."""

    def __init__(self, muon_groups: list[dict], adamw_groups: list[dict], muon: dict, adamw: dict):
        self.muon = torch.optim.Muon(muon_groups, **muon)
        self.adamw = torch.optim.AdamW(adamw_groups, **adamw)
        super().__init__([*self.muon.param_groups, *self.adamw.param_groups], {})
        self._link()

    def _link(self) -> None:
        n = len(self.muon.param_groups)
        self.muon.param_groups, self.adamw.param_groups = self.param_groups[:n], self.param_groups[n:]
        self.muon.state = self.adamw.state = self.state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # makes new group dicts and a new state dict: re-share them
        self._link()


def build_optimizer(model: torch.nn.Module, optimizer: OptimizerName, learning_rate: float, weight_decay: float,
                    betas: tuple[float, float], head_lr: float | None = None, muon_lr: float | None = None,
                    fused: bool = False, foreach: bool | None = None) -> torch.optim.Optimizer:
    """The optimizer of a recipe, its groups named (the names label the logged learning rates).
    fused: one kernel for all AdamW parameters; foreach False: one parameter at a time (torch's
    choice when None)."""
    roles = parameter_roles(model)
    groups = [{"params": roles["embedding"] + roles["gains"], "weight_decay": 0.0, "name": "no_decay"}]
    if roles["head"]:
        groups.append({"params": roles["head"], "weight_decay": weight_decay, "lr": head_lr or learning_rate,
                       "name": "head"})
    hidden = {"params": roles["hidden"], "weight_decay": weight_decay, "name": "decay"}
    adamw = {"lr": learning_rate, "betas": tuple(betas), "fused": fused, "foreach": foreach}
    if optimizer == "adamw":
        return torch.optim.AdamW([hidden, *groups], **adamw)
    if not hasattr(torch.optim, "Muon"):
        raise UserError(f"model.optimizer muon needs torch.optim.Muon, which torch 2.9 added; this is torch "
                        f"{torch.__version__}: upgrade torch, or use model.optimizer adamw")
    hidden["lr"] = muon_lr or learning_rate
    stacked = [p for p in hidden["params"] if p.dim() > 2]  # a mixture's experts, (E, out, in): AdamW, decayed
    if stacked:
        hidden["params"] = [p for p in hidden["params"] if p.dim() == 2]
        groups.append({"params": stacked, "weight_decay": weight_decay, "name": "experts"})
    return MuonWithAdamW([hidden], groups, muon={"lr": learning_rate, "adjust_lr_fn": "match_rms_adamw"},
                         adamw=adamw)


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, min_ratio: float, schedule: Schedule = "cosine",
                  decay_fraction: float = 0.2) -> float:
    """The learning rate at `step` as a fraction of the peak: linear warmup to 1, then "cosine" decay to
    min_ratio at total_steps, or "wsd": 1 until the last decay_fraction of total_steps, then a linear
    decay to min_ratio at total_steps; flat after total_steps."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if step >= total_steps:
        return min_ratio
    if schedule == "wsd":
        decay_start = max(warmup_steps, total_steps - round(decay_fraction * total_steps))
        if step < decay_start:
            return 1.0
        return 1 - (1 - min_ratio) * (step - decay_start) / max(1, total_steps - decay_start)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
