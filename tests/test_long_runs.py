"""Long runs: DDP, multi-node, exact resume, preemption, atomic checkpoints, NaN, integrity."""

import socket
import sys
import subprocess
from pathlib import Path

import pytest
import torch

from helpers import (ROOT, TINY_MODEL, assert_same_run, callback, cli_error, env, last_line, python, run_args, run_cli,
                     scalars, tiny_checkpoint)
from lm_pretrain.training.debug import read_records

pytestmark = pytest.mark.slow  # multi-process and end-to-end runs


DDP = ("--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp")


@pytest.fixture(scope="module")
def straight(prepared, tmp_path_factory) -> list[dict]:
    """Records of an uninterrupted 8-step run."""
    work = tmp_path_factory.mktemp("straight")
    done = run_cli(run_args(prepared, 8, work / "rec"), cwd=work)
    assert done.returncode == 0, done.stderr[-3000:]
    return read_records(work / "rec")


def test_killed_and_resumed_run_matches_a_straight_one(prepared, straight, tmp_path):
    killed = run_cli(run_args(prepared, 8, tmp_path / "rec", extra=[callback("SignalAt", step=6)]), cwd=tmp_path)
    assert killed.returncode == -9  # SIGKILL after step 6; last.ckpt is from step 4
    ckpt = tmp_path / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=False)["global_step"] == 4
    resumed = run_cli([*run_args(prepared, 8, tmp_path / "rec"), "--ckpt_path", "last"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not (tmp_path / "runs" / "tiny" / "version_1").exists()  # logs continue in the same folder
    records = read_records(tmp_path / "rec")
    assert [r["step"] for r in records] == list(range(1, 9))
    assert_same_run(records, straight)  # bitwise the same losses, and the same batches after the resume point


def test_a_run_while_both_cores_are_busy_is_bitwise_the_run_without(prepared, straight, tmp_path):
    """Load changes the timing, never the numbers: the straight run again, while two other processes
    keep both cores busy, gives the same records bit for bit."""
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True) for _ in range(2)]
    try:
        done = run_cli(run_args(prepared, 8, tmp_path / "rec"), cwd=tmp_path)
    finally:
        for process in busy:
            process.kill()
            process.wait()
    assert done.returncode == 0, done.stderr[-3000:]
    assert {r["threads"] for r in straight} == {1}
    assert_same_run(read_records(tmp_path / "rec"), straight)


def ddp_run(prepared, folder: Path, *extra: str):
    folder.mkdir(exist_ok=True)
    return run_cli([*run_args(prepared, 6, folder / "rec", every=2), *DDP, *extra], cwd=folder)


@pytest.fixture(scope="module")
def ddp_straight_folder(prepared, tmp_path_factory) -> Path:
    """The folder of an uninterrupted 6-step run of 2 DDP processes on one node."""
    folder = tmp_path_factory.mktemp("ddp-straight")
    done = ddp_run(prepared, folder)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


@pytest.fixture(scope="module")
def ddp_straight(ddp_straight_folder) -> list[dict]:
    """Its records."""
    return read_records(ddp_straight_folder / "rec")


def test_validation_scores_the_same_windows_on_one_and_two_processes(trained_run, tmp_path):
    """limit_val_batches counts one process's batches; the val windows are those of all processes
    together, so val/loss of 1 and 2 processes compare (before: 2 processes scored twice as many)."""
    import re

    args = [str(ROOT / "train.py"), "validate", "--config", str(ROOT / "configs" / "tiny.yaml"), "--data.data_dir",
            str(trained_run["data"]), *TINY_MODEL, "--data.batch_size", "2", "--trainer.limit_val_batches", "3",
            "--ckpt_path", str(trained_run["ckpt"]), "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    losses = []
    for devices in ([], DDP):
        done = run_cli([*args, *devices], cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        losses.append(float(re.search(r"val/loss\W+([0-9.]+)", done.stdout).group(1)))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_the_logged_loss_of_a_step_is_the_mean_over_the_processes(ddp_straight_folder, ddp_straight):
    logged = dict(scalars(ddp_straight_folder / "runs" / "tiny" / "version_0")["train/loss"])
    for step in range(1, 7):
        losses = [r["loss"] for r in ddp_straight if r["step"] == step]
        assert len(losses) == 2 and losses[0] != losses[1]
        assert logged[step - 1] == pytest.approx(sum(losses) / 2, rel=1e-6), step  # (TensorBoard counts from 0)


def test_killed_and_resumed_ddp_run_matches_a_straight_one(prepared, ddp_straight, tmp_path):
    assert {r["rank"] for r in ddp_straight} == {0, 1}
    for step in range(1, 7):  # the ranks read different samples
        rows = [set(r["rows"]) for r in ddp_straight if r["step"] == step]
        assert len(rows) == 2 and not rows[0] & rows[1]
    assert ddp_run(prepared, tmp_path, callback("SignalAt", step=3)).returncode != 0
    resumed = ddp_run(prepared, tmp_path, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(read_records(tmp_path / "rec"), ddp_straight)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_two_nodes(prepared, folder: Path, *extra: str) -> list[subprocess.CompletedProcess]:
    """docs/long-runs.md's torchrun command on one machine: two nodes (node ranks 0 and 1) of one CPU
    process each, meeting on 127.0.0.1, one thread each as every process of the tests (helpers.env)."""
    port = str(free_port())
    nodes = [subprocess.Popen([python(), "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                               "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", port,
                               *run_args(prepared, 6, folder / "rec", every=2), "--trainer.accelerator", "cpu",
                               "--trainer.num_nodes", "2", "--trainer.devices", "1", "--trainer.strategy", "ddp", *extra],
                              cwd=folder, env=env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    return [subprocess.CompletedProcess(node.args, node.returncode, *out) for node, out in zip(nodes, outputs)]


def test_two_torchrun_nodes_train_as_two_ddp_processes_and_resume_exactly_after_a_kill(prepared, ddp_straight,
                                                                                         tmp_path):
    killed = torchrun_two_nodes(prepared, tmp_path, callback("SignalAt", step=3))  # both nodes' processes
    assert all(node.returncode != 0 for node in killed)
    ckpt = tmp_path / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=False)["global_step"] == 2
    resumed = torchrun_two_nodes(prepared, tmp_path, "--ckpt_path", "last")
    assert [node.returncode for node in resumed] == [0, 0], resumed[0].stderr[-2000:] + resumed[1].stderr[-2000:]
    # one writer: one run folder, one last checkpoint; the global ranks read disjoint samples; the
    # steps before the kill and after the resume are bitwise those of 2 DDP processes on one node
    assert [p.name for p in (tmp_path / "runs" / "tiny").iterdir()] == ["version_0"]
    assert [p.name for p in ckpt.parent.glob("last*")] == ["last.ckpt"]
    records = read_records(tmp_path / "rec")
    assert [(r["rank"], r["step"]) for r in records] == [(rank, step) for rank in (0, 1) for step in range(1, 7)]
    assert_same_run(records, ddp_straight)


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_preemption_saves_and_resumes(prepared, straight, tmp_path, signal_name):
    args = run_args(prepared, 8, tmp_path / "rec", every=100)  # no periodic checkpoint: only the signal saves
    stopped = run_cli([*args, callback("SignalAt", step=3, signal_name=signal_name)], cwd=tmp_path)
    ckpt = tmp_path / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    if signal_name == "SIGINT":  # Ctrl-C: saved the same way, then the interrupted command's status and line
        assert stopped.returncode == 130, stopped.stderr[-3000:]
        assert last_line(stopped) == f"error: interrupted: saved {ckpt.relative_to(tmp_path)} at step 3; continue " \
                                     f"with --ckpt_path last"
    else:  # a scheduler's notice: a clean stop
        assert stopped.returncode == 0, stopped.stderr[-3000:]
        assert f"{signal_name}: saved" in stopped.stderr + stopped.stdout
    assert torch.load(ckpt, weights_only=False)["global_step"] == 3
    resumed = run_cli([*args, "--ckpt_path", "last"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(read_records(tmp_path / "rec"), straight)


def test_a_sigterm_to_one_process_between_log_steps_stops_every_process_one_step_later(prepared, ddp_straight,
                                                                                      tmp_path):
    """No log step for 100 steps, the notice to rank 1 alone after step 3: both processes save at step
    4 and stop (a grace period outlasts one step, not many), and the run resumes exactly."""
    args = [*run_args(prepared, 6, tmp_path / "rec", every=100), *DDP, "--trainer.log_every_n_steps", "100"]
    stopped = run_cli([*args, callback("SignalAt", step=3, signal_name="SIGTERM", rank=1)], cwd=tmp_path)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert "another process's signal: saved" in stopped.stderr + stopped.stdout  # rank 0, not signalled, says it
    ckpt = tmp_path / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=False)["global_step"] == 4
    assert max(r["step"] for r in read_records(tmp_path / "rec")) == 4
    resumed = run_cli([*args, "--ckpt_path", "last"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = {(r["rank"], r["step"]): r["loss"] for r in ddp_straight}
    assert {(r["rank"], r["step"]): r["loss"] for r in read_records(tmp_path / "rec")} == straight


KILL_MID_SAVE = """
import os, signal, sys, torch, fsspec.implementations.local as local
from lightning.pytorch.plugins.io import TorchCheckpointIO
path = sys.argv[1]
real_write = local.LocalFileOpener.write
def write_half_then_die(self, data):
    real_write(self, bytes(data)[: len(data) // 2])
    os.kill(os.getpid(), signal.SIGKILL)
local.LocalFileOpener.write = write_half_then_die
TorchCheckpointIO().save_checkpoint({"global_step": 99, "state_dict": {"w": torch.zeros(1000)}}, path)
"""


def test_a_save_killed_midway_leaves_the_previous_checkpoint(tmp_path):
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    path = tmp_path / "last.ckpt"
    TorchCheckpointIO().save_checkpoint({"global_step": 4, "state_dict": {"w": torch.ones(1000)}}, path)
    before = path.read_bytes()
    done = subprocess.run([python(), "-c", KILL_MID_SAVE, str(path)], capture_output=True, timeout=120)
    assert done.returncode == -9
    assert path.read_bytes() == before  # the interrupted save never touched it
    assert torch.load(path)["global_step"] == 4


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(prepared, tmp_path):
    args = [*run_args(prepared, 8, tmp_path / "rec", every=2), "--model.nonfinite_check_every", "2",
            callback("PoisonAt", step=5)]
    done = run_cli(args, cwd=tmp_path)
    assert done.returncode == 2
    assert "NaN or infinite at or before step 6" in last_line(done)
    state = torch.load(tmp_path / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


def test_nan_loss_can_skip_the_batch(prepared, tmp_path):
    args = [*run_args(prepared, 6, tmp_path / "rec", every=100), "--model.nonfinite_loss", "skip",
            callback("PoisonAt", step=2, restore=True)]
    done = run_cli(args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "NaN/inf loss at step 2, batch skipped" in done.stdout + done.stderr
    state = torch.load(tmp_path / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


def test_gradient_accumulation_counts_optimizer_steps(prepared, tmp_path):
    from lm_pretrain.training.optim import lr_multiplier

    done = run_cli([*run_args(prepared, 4, tmp_path / "rec", every=100), "--trainer.accumulate_grad_batches", "2",
                    "--model.warmup_steps", "2"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(Path(f"{tmp_path / 'rec'}.rank0").read_text().splitlines()) == 8  # 4 steps x 2 batches
    lrs = dict(scalars(tmp_path / "runs" / "tiny" / "version_0")["lr-AdamW/decay"])  # step -> lr
    assert sorted(lrs) == [0, 1, 2, 3]  # logged at optimizer steps, before each update
    assert all(lrs[step] == pytest.approx(0.01 * lr_multiplier(step, 2, 4, 0.1)) for step in lrs)


def test_resume_refuses_another_architecture(prepared, tmp_path, capsys, monkeypatch):
    from lm_pretrain.commands.train import main as train

    monkeypatch.chdir(tmp_path)
    ckpt = tiny_checkpoint(tmp_path / "last.ckpt", steps=1, block_size=32, n_layer=2, n_head=2, n_embd=32)[1]
    args = [*run_args(prepared, 4, tmp_path / "rec")[1:], "--model.n_layer", "3", "--ckpt_path", str(ckpt)]
    assert "another architecture: n_layer=2 (config: 3)" in cli_error(train, args, capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # refused before any run folder exists


def test_corrupted_or_truncated_shards_are_refused(prepared, tmp_path):
    import shutil

    for damage in ("corrupt", "truncate"):
        data = tmp_path / damage
        shutil.copytree(prepared, data)
        chunk = sorted((data / "train").glob("*.bin"))[0]
        raw = bytearray(chunk.read_bytes())
        if damage == "corrupt":
            raw[10] ^= 0xFF
        else:
            raw = raw[:-7]
        chunk.write_bytes(bytes(raw))
        done = run_cli(run_args(data, 2, tmp_path / "rec"), cwd=tmp_path)
        assert done.returncode == 2
        assert {"corrupt": "corrupted", "truncate": "truncated"}[damage] in last_line(done) and chunk.name in last_line(done)


@pytest.mark.parametrize("when", ["between steps", "twice"])
def test_ctrl_c_to_the_process_group_exits_130_and_keeps_a_whole_checkpoint(prepared, tmp_path, when):
    """A real interpreter in a session of its own, SIGINT to the whole group as a terminal sends it.
    Once: the step ends, last.ckpt is saved, exit 130. Twice (impatient): it stops at once, exit 130,
    and the checkpoint saved before is whole."""
    import os
    import signal
    import sys
    import time

    args = [*run_args(prepared, 100_000, tmp_path / "rec", every=2), "--data.num_workers", "1"]
    process = subprocess.Popen([sys.executable, *args], cwd=tmp_path, env=env(), start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpt = tmp_path / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    while process.poll() is None and not ckpt.exists():
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGINT)
    if when == "twice":
        time.sleep(0.05)
        os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    line = stderr.strip().splitlines()[-1]
    # (twice: the second signal may come before or after the first one's save ended the run)
    assert line.startswith("error: interrupted" if when == "twice" else "error: interrupted: saved "), line
    saved = torch.load(ckpt, weights_only=False)  # whole: it loads
    assert saved["global_step"] >= 2
    assert not [p for p in ckpt.parent.iterdir() if p.name != "last.ckpt" and not p.name.startswith("best")]


def test_peak_host_memory_records_each_process_peak_as_it_grows(tmp_path):
    """debug.PeakHostMemory (bench/host_memory.py): the kernel's peak resident bytes of a process, once
    built and once trained, the second covering memory touched in between (a fresh process: pytest's
    own peak would hide the growth)."""
    code = f"""
from types import SimpleNamespace
import torch
from lm_pretrain.training.debug import PeakHostMemory
callback, trainer = PeakHostMemory({str(tmp_path / "memory")!r}), SimpleNamespace(global_rank=0)
callback.on_fit_start(trainer, None)
block = torch.ones(256 * 2**20 // 4)  # 256 MiB, written
callback.on_train_end(trainer, None)
"""
    done = subprocess.run([python(), "-c", code], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    import json

    rows = [json.loads(line) for line in (tmp_path / "memory.rank0").read_text().splitlines()]
    assert [r["at"] for r in rows] == ["built", "trained"] and rows[0]["peak_bytes"] > 2**20
    assert rows[1]["peak_bytes"] - rows[0]["peak_bytes"] >= 200 * 2**20
