"""Train LanguageModel a few steps with one process, or with N CPU processes (DDP or FSDP2).

    python tests/sharded_equivalence.py STRATEGY DEVICES BATCH_SIZE DATA_DIR RECORD_PATH

STRATEGY is single, ddp, fsdp or tp (FSDP with tensor_parallel_size 2); with -moe appended (single-moe,
ddp-moe, fsdp-moe), the model is a mixture of experts with bias balancing. Training reads fixed random tokens through a DistributedSampler,
which deals replica r the samples r, r + N, ...: N replicas at batch b see, step by step, the same
samples as one process at batch N * b, so (gradients being averaged) they must follow the same
losses. (Each process is a replica, but a tensor-parallel group of processes is one.) Validation is the template's own, over DATA_DIR's val split, at the end of training.
Each rank appends to RECORD_PATH.rankR one JSON line per optimizer step and one at the end.
"""

import contextlib
import hashlib
import json
import sys
from datetime import timedelta

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lm_pretrain.training.callbacks import TextSamples
from lm_pretrain.data.datamodule import TokenDataModule, data_replicas
from lm_pretrain.training.module import LanguageModel, network_on_meta
from lm_pretrain.training import strategies
from lm_pretrain.training.strategies import FSDP

CLIP = 0.3  # low enough that every step here is clipped


def whole(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor  # FSDP2: shards -> whole


def total_norm(tensors) -> float:
    return float(strategies.total_norm(tensors))  # sharded: the whole model's


class Record(L.Callback):
    def __init__(self, path: str):
        self.path, self.val_batches = path, 0

    def write(self, trainer, **row) -> None:
        with open(f"{self.path}.rank{trainer.global_rank}", "a") as f:
            f.write(json.dumps({"rank": trainer.global_rank, **row}) + "\n")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        self.write(trainer, step=trainer.global_step, loss=float(outputs["loss"]),
                   rows=[",".join(map(str, r.tolist())) for r in batch[0]],
                   grad_norm=float(trainer.callback_metrics["train/grad_norm"]), clipped_norm=total_norm(grads))

    def on_train_start(self, trainer, module) -> None:
        # before the first forward pass: FSDP2 swaps in whole (unsharded) parameters while it runs
        names = {id(p): n for n, p in module.model.named_parameters()}
        self.groups = {g["name"]: sorted(names[id(p)] for p in g["params"]) for g in trainer.optimizers[0].param_groups}
        self.initial = {name: hashlib.sha256(whole(p).detach().numpy().tobytes()).hexdigest()[:16]
                        for name, p in module.model.state_dict().items()}

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.val_batches += 1

    def on_train_end(self, trainer, module) -> None:
        samples = TextSamples(prompts=["The king"], max_new_tokens=8, top_k=1)._samples(module)
        bias = [b.tolist() for name, b in module.model.named_buffers() if name.endswith("expert_bias")]
        self.write(trainer, bias=bias, groups=self.groups, initial=self.initial, built_on_meta=BUILT_ON_META, val_loss=float(trainer.callback_metrics["val/loss"]),
                   val_batches=self.val_batches, samples=samples)


class FixedTrainTokens(TokenDataModule):
    def train_dataloader(self):
        tokens = torch.randint(0, 50257, (64, 17), generator=torch.Generator().manual_seed(1))
        dataset = TensorDataset(tokens)
        replica, replicas = data_replicas(self.trainer)  # (a tensor-parallel group reads the same samples)
        sampler = DistributedSampler(dataset, replicas, replica, shuffle=False)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, collate_fn=lambda rows: torch.stack(
            [r[0] for r in rows]))


if __name__ == "__main__":
    kind, devices, batch_size, data_dir, record = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    kind, experts = kind.removesuffix("-moe"), kind.endswith("-moe")
    L.seed_everything(0)
    # sharded as train.py shards: no process builds the whole model (strategies.materialize)
    with network_on_meta() if kind in ("fsdp", "tp") else contextlib.nullcontext():
        module = LanguageModel(block_size=16, n_layer=2, n_head=2, n_embd=32, warmup_steps=0, learning_rate=3e-3,
                               **(dict(mlp="moe", n_experts=4, top_k=2, mlp_hidden=16, router_bias_rate=0.01)
                                  if experts else {}))
    BUILT_ON_META = module.model.lm_head.weight.is_meta
    strategy = {"single": "auto", "ddp": DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=120)),
                "fsdp": FSDP(process_group_backend="gloo", timeout=timedelta(seconds=120)),
                # groups of 2 processes split each block and read the same samples (2 processes: one
                # group, one replica of the data; 4: FSDP across 2 groups)
                "tp": FSDP(process_group_backend="gloo", timeout=timedelta(seconds=120), tensor_parallel_size=2)}[kind]
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=10, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[Record(record)], use_distributed_sampler=False, gradient_clip_val=CLIP,
                        log_every_n_steps=1, val_check_interval=10, check_val_every_n_epoch=None,
                        num_sanity_val_steps=0)
    trainer.fit(module, datamodule=FixedTrainTokens(data_dir, batch_size=batch_size))
