"""Sharded training (FSDP) set up for this model: one shard unit per transformer block.

`BlockFSDP` is Lightning's FSDPStrategy (GPUs) with the model's blocks as the wrap and activation-
checkpointing units, and sharded checkpoints, chosen from YAML without importing classes there:

    trainer:
      strategy:
        class_path: lm_pretrain.strategies.BlockFSDP

On CPUs (tests) Lightning's FSDPStrategy refuses to run; FSDP2 (`fully_shard`) under
`ModelParallelStrategy` works there, and `LanguageModel.configure_model` applies it per block
whenever that strategy is used (see configs/fsdp2.yaml).
"""

from lightning.pytorch.strategies import FSDPStrategy

from lm_pretrain.model import Block


class BlockFSDP(FSDPStrategy):
    def __init__(self, activation_checkpointing: bool = True, sharding_strategy: str = "FULL_SHARD",
                 state_dict_type: str = "sharded", **kwargs):
        """
        Args:
            activation_checkpointing: recompute each block's activations in the backward pass
                instead of keeping them: ~1/3 more compute, much less memory.
            sharding_strategy: FULL_SHARD (parameters, gradients and optimizer state sharded),
                SHARD_GRAD_OP (parameters kept whole between forward and backward), HYBRID_SHARD
                (full sharding within a node, replication across nodes), NO_SHARD.
            state_dict_type: "sharded" (each rank writes its own shard: fast, a folder) or "full"
                (one file gathered on rank 0).
            kwargs: any other FSDPStrategy argument.
        """
        super().__init__(auto_wrap_policy={Block},
                         activation_checkpointing_policy={Block} if activation_checkpointing else None,
                         sharding_strategy=sharding_strategy, state_dict_type=state_dict_type, **kwargs)
