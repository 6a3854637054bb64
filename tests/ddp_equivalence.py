"""Train LanguageModel a few steps on fixed tokens with N CPU processes (DDP, gloo) or one.

    python tests/ddp_equivalence.py DEVICES BATCH_SIZE RECORD_PATH

With DDP, a DistributedSampler deals rank r the samples r, r + N, ...; so N processes at
batch b see, step by step, the same samples as one process at batch N * b, and (gradients being
averaged) must follow the same losses.
"""

import sys
from datetime import timedelta

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from helpers import RecordBatches
from lm_pretrain.module import LanguageModel

if __name__ == "__main__":
    devices, batch_size, record = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    L.seed_everything(0)
    tokens = torch.randint(0, 50257, (64, 17), generator=torch.Generator().manual_seed(1))
    dataset = TensorDataset(tokens[:, :-1], tokens[:, 1:])

    class Data(L.LightningDataModule):
        def train_dataloader(self):
            sampler = DistributedSampler(dataset, self.trainer.world_size, self.trainer.global_rank, shuffle=False)
            return DataLoader(dataset, batch_size=batch_size, sampler=sampler)

    module = LanguageModel(block_size=16, n_layer=2, n_head=2, n_embd=32, warmup_steps=0, learning_rate=3e-3)
    strategy = DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=120)) if devices > 1 else "auto"
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=4, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[RecordBatches(record)], use_distributed_sampler=False)
    trainer.fit(module, datamodule=Data())
