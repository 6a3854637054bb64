"""lm_pretrain.strategies: where the model is laid out (the 2-process runs are in test_sharded.py)."""

from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import FSDPModule

from lm_pretrain.model import GPT, GPTConfig
from lm_pretrain.strategies import FSDP, parallelize


def test_without_a_mesh_only_activation_checkpointing_is_set():
    model = GPT(GPTConfig(vocab_size=100, block_size=8, n_layer=2, n_head=2, n_embd=16))
    parallelize(model, None, activation_checkpointing=True)
    assert model.checkpoint_blocks and not isinstance(model, FSDPModule)
    parallelize(model, None)
    assert not model.checkpoint_blocks


def test_fsdp_still_finds_the_private_setting_it_overrides():
    """FSDP shards across every process by setting ModelParallelStrategy's private
    `_data_parallel_size` before its setup_environment reads it: fail here if Lightning renames it."""
    assert FSDP().distributed_checkpoint and not FSDP(save_distributed_checkpoint=False).distributed_checkpoint
    assert "_data_parallel_size" in vars(ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1))
