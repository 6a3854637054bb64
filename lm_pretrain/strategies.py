"""Sharded training: FSDP2 (PyTorch's `fully_shard`), one shard unit per transformer block.

Parameters, gradients and optimizer state are split across all processes; each block's parameters
are gathered only while that block runs. It is Lightning's ModelParallelStrategy with every process
in one data-parallel group, so it runs the same way on GPUs (nccl) and on CPUs (gloo, which is how
the tests cover it). `LanguageModel.configure_model` applies `fully_shard` per block. Chosen in YAML
with configs/overlays/fsdp.yaml:

    trainer:
      strategy:
        class_path: lm_pretrain.strategies.FSDP
"""

import shutil
from pathlib import Path

from lightning.pytorch.strategies import ModelParallelStrategy

from lm_pretrain.files import publish


class FSDP(ModelParallelStrategy):
    def __init__(self, save_distributed_checkpoint: bool = True, **kwargs):
        """
        Args:
            save_distributed_checkpoint: each process writes its own shard (fast, no gathering; the
                checkpoint is a folder, read back by train.py, generate, export and init_from alike);
                false gathers one full checkpoint file on the first process (slow, needs its memory).
            kwargs: any other ModelParallelStrategy argument (process_group_backend, timeout).
        """
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)

    def setup_environment(self) -> None:
        # ModelParallelStrategy's "auto" shards across nodes only; shard across every process instead.
        self._data_parallel_size = self.num_processes * self.num_nodes
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        """Write a sharded checkpoint into a hidden folder, then swap it in: a run killed while saving
        keeps its previous checkpoint (Lightning would overwrite the shards in place)."""
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        partial = path.with_name(f".{path.name}.partial")
        if self.is_global_zero and partial.exists():
            shutil.rmtree(partial) if partial.is_dir() else partial.unlink()
        self.barrier("checkpoint-staging")
        super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier("checkpoint-written")
        if self.is_global_zero:
            publish(partial, path)
        self.barrier("checkpoint-published")
