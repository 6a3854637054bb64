"""How the model is laid out over devices: sharding (FSDP2) and activation checkpointing, in one place.

`parallelize` is what `LanguageModel.configure_model` applies, as torchtitan's parallelize.py does
for its models: activation checkpointing when asked, and under the FSDP strategy below PyTorch's
`fully_shard` with one shard unit per transformer block, each block compiled on its own when the
run compiles (FSDP's hooks between blocks run eagerly; a graph across them would break at every
hook, so the whole loss step is compiled only without FSDP).

FSDP splits parameters, gradients and optimizer state across all processes; each block's parameters
are gathered only while that block runs. It is Lightning's ModelParallelStrategy with every process
in one data-parallel group, so it runs the same way on GPUs (nccl) and on CPUs (gloo, which is how
the tests cover it). Chosen in YAML with configs/overlays/fsdp.yaml:

    trainer:
      strategy:
        class_path: lm_pretrain.training.strategies.FSDP

With `tensor_parallel_size: T` (configs/overlays/tensor_parallel.yaml) the processes form groups of T
that split each block's matrices between them, as torchtitan's plan for Llama does: q, k, v and the
MLP's input matrices by output rows (each process computes its own heads and its share of the hidden
units), the attention and MLP output matrices by input columns, summed across the group. Embeddings,
norms and the output layer are not split (the fused loss needs the whole output matrix); FSDP shards
everything across the groups. A 2-D layout: N processes = N / T data-parallel groups of T, each group
reading one share of the data (the same batches for its processes: TokenDataModule's data_replicas),
so the global batch is batch_size x N / T.
"""

import shutil
from pathlib import Path

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from lm_pretrain.training.checkpoints import tensor_bytes
from lm_pretrain.utils.files import done_with, full_disk_is_one_line, partial_path, publish, remove_orphans
from lm_pretrain.model import GPT, GPTConfig
from lm_pretrain.model.config import check_tensor_parallel
from lm_pretrain.utils import ranges
from lm_pretrain.utils.errors import UserError
from lm_pretrain.utils.ranges import PositiveInt


def parallelize(model: GPT, mesh: DeviceMesh | None, activation_checkpointing: bool = False,
                compile: bool = False, compile_mode: str = "default", param_dtype: torch.dtype | None = None) -> None:
    """Lay `model` out for training, in place: recompute each block's activations in the backward
    pass (activation_checkpointing), and with a device mesh (ModelParallelStrategy's) shard it with
    FSDP2, one unit per block and the rest (embeddings, final norm, head) at the root, each block's
    forward compiled (compile; one graph serves every block). Safe to call again (Lightning calls
    configure_model for each of fit, validate, ...).

    param_dtype (bf16 under bf16-mixed): FSDP2's mixed precision, as torchtitan's: each unit's
    parameters are gathered in that type (half the bytes of float32) and computed with, while the
    shards (the optimizer's master weights) stay float32 and gradients are reduced in float32."""
    model.checkpoint_blocks = activation_checkpointing
    if mesh is None or isinstance(model, FSDPModule):
        return
    tensor_parallel = mesh["tensor_parallel"]
    if tensor_parallel.size() > 1:
        check_tensor_parallel(model.config, tensor_parallel.size())
        for block in model.blocks:
            parallelize_module(block, tensor_parallel, block_plan(model.config))
    mesh = mesh["data_parallel"]
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else \
        MixedPrecisionPolicy()
    for block in model.blocks:
        if compile:
            # The forward, not the module: FSDP's hooks stay outside the graph, the weights' names
            # stay as they are (a compiled module would prefix them with _orig_mod).
            block.forward = torch.compile(block.forward, fullgraph=True, mode=compile_mode)
        fully_shard(block, mesh=mesh, mp_policy=policy)
    # The root unit is not resharded after the forward pass (FSDP2 keeps the root's parameters for
    # the backward that follows), so a loss that reads lm_head.weight after the forward (the fused
    # loss) sees the whole matrix.
    fully_shard(model, mesh=mesh, mp_policy=policy)


def check_layout(processes: int, tensor_parallel_size: int, per_node: int) -> int:
    """The number of data-parallel groups; UserError when the processes (`per_node` on each node) do
    not split into groups of tensor_parallel_size within nodes (a group talks at every block)."""
    if per_node % tensor_parallel_size:
        raise UserError(f"tensor_parallel_size {tensor_parallel_size} must divide the processes of each node "
                        f"({per_node}: trainer.devices): a group's processes work together at every block")
    return processes // tensor_parallel_size


def block_plan(config: GPTConfig) -> dict:
    """Tensor parallelism for one block: matrices that fan out split by output rows (each process
    gets whole heads, whole hidden units), those that fan back in split by input columns, their
    partial sums added across the group."""
    plan = {"attn.q": ColwiseParallel(), "attn.k": ColwiseParallel(), "attn.v": ColwiseParallel(),
            "attn.proj": RowwiseParallel(), "mlp.fc": ColwiseParallel(), "mlp.proj": RowwiseParallel()}
    if config.mlp == "swiglu":
        plan["mlp.gate"] = ColwiseParallel()
    return plan


def total_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all `tensors` together, as one process's tensor: sharded ones (DTensors) count
    whole. Tensor parallelism lays blocks out over both mesh dimensions and the rest over one; norms
    are taken per layout and then combined (torch's get_total_norm needs a single one)."""
    by_mesh: dict = {}
    for t in tensors:
        by_mesh.setdefault(t.device_mesh if isinstance(t, DTensor) else None, []).append(t)
    parts = []
    for group in by_mesh.values():
        norm = torch.nn.utils.get_total_norm(group)
        parts.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    return torch.linalg.vector_norm(torch.stack(parts)) if len(parts) > 1 else parts[0]


def materialize(model: GPT, device: torch.device) -> None:
    """Give a model built on the meta device (laid out by parallelize: each process holds only its
    shards) memory on `device` and its initial weights. Each weight is drawn whole on the CPU, with the
    draws and in the order of a model built whole (GPT.init_weights), and each process keeps its shard
    of it: the same seed gives the same model on any number of processes, bitwise, for the price of
    one whole weight matrix at a time, never the whole model (torchtitan's seed checkpoint gets the
    same from a file; DTensor's own random ops match a whole draw only on CUDA)."""
    model.to_empty(device=device)
    model.tie_weights()
    model.init_weights(normal_=_draw_whole_keep_shard)


def _draw_whole_keep_shard(weight: torch.Tensor, mean: float, std: float) -> None:
    whole = torch.empty(weight.shape, dtype=weight.dtype).normal_(mean, std)  # on the CPU, as GPT(config) draws
    if not isinstance(weight, DTensor):
        weight.copy_(whole)
        return
    whole = whole.to(weight.device)
    try:  # every process drew the same tensor: each keeps its part, nothing is sent
        shard = distribute_tensor(whole, weight.device_mesh, weight.placements, src_data_rank=None)
    except TypeError:  # torch < 2.7: sent from the first process instead (the same tensor)
        shard = distribute_tensor(whole, weight.device_mesh, weight.placements)
    weight.copy_(shard)


class FSDP(ModelParallelStrategy):
    def __init__(self, save_distributed_checkpoint: bool = True, tensor_parallel_size: PositiveInt = 1, **kwargs):
        """
        Args:
            save_distributed_checkpoint: each process writes its own shard (fast, no gathering; the
                checkpoint is a folder, read back by train.py, generate, export and init_from alike);
                false gathers one full checkpoint file on the first process (slow, needs its memory).
            tensor_parallel_size: processes that split each block's matrices between them (1: none);
                it must divide each node's processes and the model's heads, K/V heads and MLP width.
            kwargs: any other ModelParallelStrategy argument (process_group_backend, timeout).
        """
        ranges.check(FSDP.__init__, {"tensor_parallel_size": tensor_parallel_size}, "trainer.strategy.init_args")
        super().__init__(data_parallel_size="auto", tensor_parallel_size=tensor_parallel_size,
                         save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)
        self.distributed_checkpoint = save_distributed_checkpoint

    def setup_environment(self) -> None:
        # ModelParallelStrategy's "auto" shards across nodes only; shard across every process (every
        # group of tensor_parallel_size processes) instead. (It reads the sizes from these private
        # attributes: tests/test_strategies.py fails if that changes.)
        self._data_parallel_size = check_layout(self.num_processes * self.num_nodes, self._tensor_parallel_size,
                                                self.num_processes)
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        """Write a sharded checkpoint into a hidden folder beside its final name, then swap it in
        (files.publish): a run killed while saving keeps its previous checkpoint whole (Lightning
        would overwrite the shards in place). The hidden folders of killed saves are removed at the
        next save; a full disk is one line."""
        if not self.distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        # named after the first process (pid@host), as remove_orphans expects; every process writes there
        partial = Path(self.broadcast(str(partial_path(path)) if self.is_global_zero else None))
        needed = tensor_bytes(checkpoint)
        if self.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
            remove_orphans(path.parent)
        self.barrier("checkpoint-staging")
        try:
            with full_disk_is_one_line(path, needed):
                super().save_checkpoint(checkpoint, partial, storage_options)
            self.barrier("checkpoint-written")
            if self.is_global_zero:
                publish(partial, path)
        finally:
            if self.is_global_zero:
                if partial.exists():  # a failed save's shards
                    shutil.rmtree(partial)
                done_with(partial)
        self.barrier("checkpoint-published")
