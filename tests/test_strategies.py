"""lm_pretrain.training.strategies: where the model is laid out (the 2-process runs are in test_sharded.py)."""

import os
import signal
import tempfile
from pathlib import Path

import pytest
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import FSDPModule

from helpers import ROOT, tiny_checkpoint
from lm_pretrain.utils.errors import UserError
from lm_pretrain.model import GPT, GPTConfig
from lm_pretrain.training.strategies import FSDP, parallelize


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
    assert FSDP(tensor_parallel_size=2)._tensor_parallel_size == 2  # (read by train.py and setup_environment)


# ---------------------------------------------------------------------------------------------
# Sharded checkpoints: whole or absent. One process without a process group writes the same folder
# of shards (torch.distributed.checkpoint) that each of N processes writes its part of.


def sharded(tmp_path: Path, step: int) -> dict:
    """A checkpoint dict as Lightning hands it to the strategy: a tiny model's, at `step`."""
    if not (tmp_path / "tiny.ckpt").exists():
        tiny_checkpoint(tmp_path / "tiny.ckpt", steps=1)
    checkpoint = torch.load(tmp_path / "tiny.ckpt", weights_only=False)
    checkpoint["global_step"], checkpoint["optimizer_states"] = step, []
    checkpoint["state_dict"] = {k: v + step for k, v in checkpoint["state_dict"].items()}
    return checkpoint


def kill_during_sharded_save(path: Path, checkpoint: dict, target, nth: int) -> None:
    """In a forked child: the FSDP strategy saves `checkpoint` at `path` and SIGKILLs itself at the
    nth call of `target` (a (module, name) pair: the function, patched there)."""
    pid = os.fork()
    if pid == 0:
        module, name = target
        real, calls = getattr(module, name), [0]

        def dying(*args, **kwargs):
            calls[0] += 1
            if calls[0] == nth:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)

        setattr(module, name, dying)
        try:
            FSDP().save_checkpoint(checkpoint, path)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, "the save ended before its kill point"


def test_a_kill_at_any_point_of_a_sharded_save_leaves_the_checkpoint_whole(tmp_path, monkeypatch):
    import shutil

    from lm_pretrain.training import checkpoints
    from lm_pretrain.utils import files

    if Path("/dev/shm").is_dir() and os.stat("/dev/shm").st_dev != os.stat(tmp_path).st_dev:
        monkeypatch.setenv("TMPDIR", tempfile.mkdtemp(dir="/dev/shm"))  # temporary files on another file system
    path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    FSDP().save_checkpoint(sharded(tmp_path, 1), path)
    assert checkpoints.read(path)["global_step"] == 1 and path.is_dir()
    points = [  # (where, which call): the save is killed there
        ((torch, "save"), 1),  # torch.distributed.checkpoint has begun the shard file (one torch.save per tensor)
        ((os, "fsync"), 1),  # the shard file is whole, the shards' index (.metadata) not yet
        ((os, "fsync"), 2),  # the shards and their index are whole, Lightning's meta.pt not yet
        ((files, "_exchange"), 1),  # the staged folder is whole, not yet swapped in
        ((shutil, "rmtree"), 1),  # swapped in; the old copy, now hidden, not yet deleted
    ]
    for target, nth in points:
        kill_during_sharded_save(path, sharded(tmp_path, 2), target, nth)
        expected = 2 if target == (shutil, "rmtree") else 1
        read = checkpoints.read(path)  # what --ckpt_path last and every command read
        assert read["global_step"] == expected, (target, nth)
        assert torch.equal(read["state_dict"]["model.lm_head.weight"], sharded(tmp_path, expected)["state_dict"]["model.lm_head.weight"])
        hidden = [p for p in path.parent.iterdir() if p != path]
        assert len(hidden) == 1 and files.PARTIAL.match(hidden[0].name), hidden  # one orphan, named as such
        FSDP().save_checkpoint(sharded(tmp_path, 1), path)  # the next save removes it
        assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]
        assert checkpoints.read(path)["global_step"] == 1


def test_a_full_disk_during_a_sharded_save_is_one_line_and_keeps_the_checkpoint(small_disk, tmp_path):
    from lm_pretrain.training import checkpoints

    path = small_disk / "last.ckpt"
    small = sharded(tmp_path, 1)
    small["state_dict"] = {k: v for k, v in small["state_dict"].items() if "blocks.0.attn" in k}
    FSDP().save_checkpoint(small, path)
    with pytest.raises(UserError, match=rf"no space left to write {path}: it needs ~\d+ MiB, .* are free there; "
                                        "the previous last.ckpt is kept"):
        FSDP().save_checkpoint(sharded(tmp_path, 2) | {"big": torch.zeros(2**19)}, path)  # 2 MiB more than the disk
    assert sorted(p.name for p in small_disk.iterdir()) == ["last.ckpt"]
    assert torch.load(path / checkpoints.META_FILE, weights_only=False)["global_step"] == 1


def test_bf16_mixed_gathers_bf16_while_shards_and_gradients_stay_float32(tmp_path):
    """FSDP2's mixed-precision policy (one gloo process): every unit computes with bf16 parameters,
    the type they are gathered in (half the bytes of float32), while the shards the optimizer
    updates and their gradients stay float32."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
        for dtype in (None, torch.bfloat16):
            torch.manual_seed(0)
            model = GPT(GPTConfig(vocab_size=100, block_size=8, n_layer=2, n_head=2, n_embd=16))
            parallelize(model, mesh, param_dtype=dtype)
            computed_with = set()
            for layer in model.modules():
                if isinstance(layer, (torch.nn.Linear, torch.nn.Embedding)):
                    layer.register_forward_pre_hook(lambda m, args: computed_with.add(m.weight.dtype))
            model(torch.randint(0, 100, (2, 8))).float().square().mean().backward()
            assert computed_with == {dtype or torch.float32}
            for parameter in model.parameters():
                assert isinstance(parameter, DTensor) and parameter.dtype == parameter.grad.dtype == torch.float32
            with torch.no_grad():  # sampling with a KV cache: the cache takes the type the keys come in
                assert model.eval().generate(torch.zeros(1, 2, dtype=torch.long), 3).shape == (1, 5)
    finally:
        dist.destroy_process_group()


def test_a_tensor_parallel_layout_that_does_not_divide_is_one_line_before_any_process_starts(prepared, tmp_path,
                                                                                             capsys):
    from helpers import cli_error
    from lm_pretrain.commands.train import main

    overlay = str(ROOT / "configs" / "overlays" / "tensor_parallel.yaml")
    base = ["fit", "--config", overlay, "--data.data_dir", str(prepared), "--model.block_size", "16",
            "--model.n_layer", "1", "--model.n_embd", "32", "--trainer.accelerator", "cpu",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")]
    assert cli_error(main, [*base, "--model.n_head", "2", "--trainer.devices", "3"], capsys) == (
        "error: tensor_parallel_size 2 must divide the processes of each node (3: trainer.devices): a group's "
        "processes work together at every block")
    assert cli_error(main, [*base, "--model.n_head", "1", "--trainer.devices", "2"], capsys) == (
        "error: tensor_parallel_size 2 must divide model.n_head (1): each process of a group takes an equal share")
    assert cli_error(main, [*base, "--model.n_head", "4", "--model.n_kv_head", "1", "--trainer.devices", "2"],
                     capsys) == ("error: tensor_parallel_size 2 must divide model.n_kv_head (1): each process of a "
                                 "group takes an equal share")
    assert cli_error(main, [*base, "--model.n_head", "2", "--model.dropout", "0.1", "--trainer.devices", "2"],
                     capsys).startswith("error: model.dropout 0.1 with tensor parallelism: the processes of a group")
    assert cli_error(main, [*base, "--trainer.strategy.init_args.tensor_parallel_size", "0"], capsys).startswith(
        "error: --trainer.strategy (FSDP) tensor_parallel_size 0 is out of range: it must be > 0")
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("*.ckpt"))
