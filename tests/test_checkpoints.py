"""lm_pretrain.training.checkpoints: reading a checkpoint (or refusing it in one line), checking its
architecture, finding the last one of a run, writing one whole whatever happens, and the RNG
states saved in it."""

import builtins
import io
import os
import random
import signal
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from jsonargparse import Namespace

from helpers import run_cli, tiny_checkpoint, train_args
from lm_pretrain.training.checkpoints import (LAST, AtomicCheckpointIO, check_architecture, read, read_hyperparameters, resolve_last, rng_states,
                                     set_rng_states)
from lm_pretrain.utils.errors import UserError
from lm_pretrain.training.module import LanguageModel

TINY = dict(vocab_size=300, block_size=16, n_layer=1, n_head=2, n_embd=16)
TINY_ROPE_BASE = dict(vocab_size=50257, block_size=16, n_layer=2, n_head=2, n_embd=32)


def test_what_is_not_a_checkpoint_is_refused_in_one_line(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read(tmp_path / "missing.ckpt")
    (tmp_path / "garbage.ckpt").write_bytes(b"not a pickle at all")
    with pytest.raises(UserError, match="garbage.ckpt is not a checkpoint of this project"):
        read(tmp_path / "garbage.ckpt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.ckpt")
    with pytest.raises(UserError, match="other.ckpt is not a checkpoint written by train.py"):
        read(tmp_path / "other.ckpt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(UserError, match="is a folder but not a sharded checkpoint"):
        read_hyperparameters(tmp_path / "folder")


def test_a_saved_module_reads_back_whole(tmp_path):
    module, path = tiny_checkpoint(tmp_path / "m.ckpt", steps=1, **TINY)
    assert read(path)["global_step"] == 1 and read_hyperparameters(path)["hyper_parameters"]["n_embd"] == 16
    loaded = LanguageModel.from_checkpoint(path)
    assert not loaded.training and all(torch.equal(a, b) for a, b in zip(loaded.parameters(), module.parameters()))


@pytest.mark.parametrize("field,value", [("rope_theta", 500000.0), ("norm_eps", 1e-6), ("n_kv_head", 1)])
def test_a_checkpoint_of_another_architecture_is_refused(field, value):
    saved = LanguageModel(**{**TINY_ROPE_BASE, "position": "rope"}).hparams
    check_architecture(saved, LanguageModel(**{**TINY_ROPE_BASE, "position": "rope", "dropout": 0.1}).config, "checkpoint")
    with pytest.raises(UserError, match=f"another architecture: {field}="):
        check_architecture(saved, LanguageModel(**{**TINY_ROPE_BASE, "position": "rope", field: value}).config, "checkpoint")


def run_config(save_dir: Path, ckpt_path: str = "last") -> Namespace:
    logger = Namespace(class_path="lightning.pytorch.loggers.TensorBoardLogger",
                       init_args=Namespace(save_dir=str(save_dir), name="tiny", version=None))
    return Namespace(ckpt_path=ckpt_path, checkpoint=Namespace(dirpath=None), trainer=Namespace(logger=logger))


def test_ckpt_path_last_resumes_the_newest_run_and_logs_into_it(tmp_path):
    for version, age in ((0, 100), (1, 10), (2, None)):  # version_2 has no checkpoint yet
        folder = tmp_path / "tiny" / f"version_{version}" / "checkpoints"
        folder.mkdir(parents=True)
        if age is not None:
            (folder / LAST).write_bytes(b"x")
            stamp = (folder / LAST).stat().st_mtime - age
            os.utime(folder / LAST, (stamp, stamp))
    config = run_config(tmp_path)
    resolve_last(config)
    assert config.ckpt_path == str(tmp_path / "tiny" / "version_1" / "checkpoints" / LAST)
    assert config.trainer.logger.init_args.version == 1
    fresh = run_config(tmp_path / "elsewhere")
    resolve_last(fresh)  # no run yet: start from scratch with the same command
    assert fresh.ckpt_path == "last" and fresh.trainer.logger.init_args.version is None


def test_rng_states_survive_a_weights_only_round_trip(tmp_path):
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    torch.save(rng_states(), tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    set_rng_states(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_ckpt_path_last_takes_the_newest_last_checkpoint_whatever_its_version_suffix(tmp_path):
    folder = tmp_path / "tiny" / "version_0" / "checkpoints"
    folder.mkdir(parents=True)
    for name, age in (("last.ckpt", 100), ("last-v1.ckpt", 10), ("best-step000004.ckpt", 0), ("lastly.ckpt", 0)):
        (folder / name).write_bytes(b"x")
        stamp = (folder / name).stat().st_mtime - age
        os.utime(folder / name, (stamp, stamp))
    config = run_config(tmp_path)
    resolve_last(config)
    assert config.ckpt_path == str(folder / "last-v1.ckpt")


@pytest.mark.slow
def test_a_resumed_run_with_other_checkpoint_settings_keeps_one_last_checkpoint(prepared, tmp_path):
    # Lightning would write last-v1.ckpt beside last.ckpt (and the next --ckpt_path last took the older)
    args = [*train_args(prepared, max_steps=4), "--checkpoint.every_n_train_steps", "2"]
    first = run_cli(args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    resumed = run_cli([*train_args(prepared, max_steps=6), "--checkpoint.every_n_train_steps", "3", "--ckpt_path", "last"],
                      cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    (folder,) = {p.parent for p in tmp_path.rglob("last*.ckpt")}
    assert sorted(p.name for p in folder.glob("last*")) == ["last.ckpt"]
    assert read(folder / "last.ckpt")["global_step"] == 6


def kill_during_save(path: Path, checkpoint: dict, after_bytes: int) -> None:
    """In a forked child: AtomicCheckpointIO saves `checkpoint` at `path` and SIGKILLs itself once
    `after_bytes` bytes of it are written."""
    pid = os.fork()
    if pid == 0:  # the child
        written = [0]
        real_write = io.BufferedWriter.write

        class Dying(io.BufferedWriter):
            def write(self, data):
                written[0] += len(data)
                if written[0] >= after_bytes:
                    os.kill(os.getpid(), signal.SIGKILL)
                return real_write(self, data)

        real_open = builtins.open
        builtins.open = lambda *a, **k: Dying(real_open(*a, **{**k, "buffering": 0})) if "wb" in a[1:2] else real_open(*a, **k)
        try:
            AtomicCheckpointIO().save_checkpoint(checkpoint, path)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def test_a_kill_at_any_point_of_a_save_leaves_the_checkpoint_whole_across_file_systems(tmp_path, monkeypatch):
    # $TMPDIR on another file system than the run (/dev/shm is a tmpfs on Linux): Lightning's own
    # writer moves its temporary file across, which is a copy a kill can cut short.
    if not Path("/dev/shm").is_dir() or os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another file system than the test's folder")
    temporary = Path(tempfile.mkdtemp(dir="/dev/shm"))
    monkeypatch.setenv("TMPDIR", str(temporary))
    path = tmp_path / "checkpoints" / LAST
    old, new = {"step": 1, "w": torch.zeros(50_000)}, {"step": 2, "w": torch.ones(50_000)}
    AtomicCheckpointIO().save_checkpoint(old, path)
    size = path.stat().st_size
    for after in (1, 64, size // 4, size // 2, size - 10):
        kill_during_save(path, new, after)
        assert torch.load(path, weights_only=True)["step"] == 1  # the old checkpoint, whole
        assert len(list(path.parent.iterdir())) == 2  # and the killed save's partial file
    AtomicCheckpointIO().save_checkpoint(new, path)  # the next save clears what the kills left
    assert torch.load(path, weights_only=True)["step"] == 2 and [p.name for p in path.parent.iterdir()] == [LAST]
    assert list(temporary.iterdir()) == []  # nothing was ever written to $TMPDIR
    temporary.rmdir()


def claim(save_dir: str, barrier, versions) -> None:
    """One run's start: wait for the others, then claim a version folder."""
    from lm_pretrain.training.checkpoints import claim_run_folder

    config = run_config(Path(save_dir))
    barrier.wait()
    claim_run_folder(config)
    versions.put(config.trainer.logger.init_args.version)


def test_runs_started_at_once_under_load_each_claim_their_own_version_folder(tmp_path):
    import multiprocessing
    import subprocess
    import sys

    fork = multiprocessing.get_context("fork")  # the runs start with this module imported: at once
    barrier, versions = fork.Barrier(8), fork.Queue()
    runs = [fork.Process(target=claim, args=(str(tmp_path), barrier, versions)) for _ in range(8)]
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]  # both cores taken
    try:
        for run in runs:
            run.start()
        claimed = sorted(versions.get(timeout=60) for _ in runs)
        for run in runs:
            run.join(timeout=60)
    finally:
        for process in busy:
            process.kill()
    assert claimed == list(range(8))  # none shared, none skipped
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == [f"version_{v}" for v in range(8)]


def test_a_chosen_version_or_a_launched_process_claims_nothing(tmp_path, monkeypatch):
    from lm_pretrain.training.checkpoints import CLAIMED_VERSION, claim_run_folder

    config = run_config(tmp_path)
    config.trainer.logger.init_args.version = 3
    claim_run_folder(config)
    assert not (tmp_path / "tiny").exists()
    monkeypatch.setenv("LOCAL_RANK", "1")  # a process Lightning's launcher started for another device
    monkeypatch.setenv(CLAIMED_VERSION, "5")
    config = run_config(tmp_path)
    claim_run_folder(config)
    assert config.trainer.logger.init_args.version == 5 and not (tmp_path / "tiny").exists()


@pytest.mark.parametrize("sharded", [False, True], ids=["file", "folder of shards"])
def test_a_checkpoint_from_before_q_k_v_were_split_still_serves_its_weights_but_is_not_resumed(tmp_path, sharded):
    """Earlier versions saved one fused attn.qkv matrix (and SwiGLU's halves in one mlp.fc): its
    weights load (generate, export, init_from read them through checkpoints.read), and resuming it
    is one line naming --model.init_from (its optimizer state has other shapes)."""
    import torch.distributed.checkpoint as dcp

    from lm_pretrain.training.checkpoints import META_FILE, check_resumable

    module, ckpt = tiny_checkpoint(tmp_path / "new.ckpt", mlp="swiglu", position="rope", norm="rmsnorm", bias=False)
    saved = torch.load(ckpt, weights_only=False)
    state, fused = saved["state_dict"], {}
    for name, tensor in state.items():
        if ".attn.k." in name or ".attn.v." in name or ".mlp.gate." in name:
            continue
        if ".attn.q." in name:
            fused[name.replace(".attn.q.", ".attn.qkv.")] = torch.cat([state[name.replace(".q.", f".{x}.")] for x in "qkv"])
        elif ".mlp.fc." in name:
            fused[name] = torch.cat([state[name.replace(".fc.", ".gate.")], tensor])
        else:
            fused[name] = tensor
    old = tmp_path / ("old" if sharded else "old.ckpt")
    if sharded:  # as the FSDP strategy writes one: tensors by DCP, the rest in meta.pt
        dcp.save({"state_dict": fused}, checkpoint_id=old)
        torch.save({k: v for k, v in saved.items() if k not in ("state_dict", "optimizer_states")}, old / META_FILE)
    else:
        torch.save({**saved, "state_dict": fused}, old)
    loaded = LanguageModel.from_checkpoint(old)
    tokens = torch.randint(0, module.config.vocab_size, (2, 8))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), module.eval()(tokens))
    with pytest.raises(UserError, match=rf"^checkpoint {old} was written before q, k and v .* --model.init_from {old}$"):
        check_resumable(str(old), read_hyperparameters(old), dict(module.config.__dict__))
    check_resumable(str(ckpt), read_hyperparameters(ckpt), dict(module.config.__dict__))  # today's: resumable
