"""Training steps that do not log never wait for the GPU (no host sync), checked on CPUs.

HostSyncCheck counts the calls that would synchronise with a GPU (.item(), bool(tensor), .tolist(),
.cpu(), .numpy(), float(), int()) made in training steps between log steps, with the callbacks
the GPU presets ship (progress bar, throughput, learning rate, checkpoints, preemption, samples);
on a GPU the same callback turns on PyTorch's own sync detector (bench/gpu_acceptance.sh).
"""

import pytest

from helpers import callback, ROOT, run_cli, TINY_MODEL

pytestmark = pytest.mark.slow  # multi-process and end-to-end runs


def gpu_preset_on_cpu(data, *extra: str) -> list[str]:
    """configs/gpt2-124m.yaml as shipped (callbacks, accumulation, workers), shrunk to run on a CPU."""
    return [str(ROOT / "train.py"), "fit", "--config", str(ROOT / "configs" / "gpt2-124m.yaml"),
            "--data.data_dir", str(data), "--data.batch_size", "2", *TINY_MODEL, "--model.compile", "false",
            "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true",
            "--trainer.max_steps", "14", "--trainer.log_every_n_steps", "5", "--trainer.accumulate_grad_batches", "2",
            "--trainer.val_check_interval", "1000", "--trainer.callbacks+=lm_pretrain.training.debug.HostSyncCheck", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("model", [[], ["--model.mlp", "moe", "--model.n_experts", "4", "--model.mlp_hidden", "16",
                                        "--model.router_bias_rate", "0.001"]], ids=["dense", "mixture of experts"])
def test_steps_between_log_steps_never_sync(model, prepared, tmp_path):
    """Also a mixture of experts: its load statistics and balancing stay on the device."""
    done = run_cli(gpu_preset_on_cpu(prepared, *model), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    # steps 3, 4, 6-9, 11-13 (not 1-2: warm-up; not 5 and 10: log steps; not 14: the last)
    assert "HostSyncCheck: 9 optimizer steps without a log step checked, no host sync in them" in done.stdout + done.stderr


@pytest.mark.slow
def test_sharded_steps_between_log_steps_never_sync(prepared, tmp_path):
    done = run_cli([*gpu_preset_on_cpu(prepared, "--config", str(ROOT / "configs" / "overlays" / "fsdp.yaml")),
                    "--trainer.devices", "2"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "HostSyncCheck: 9 optimizer steps without a log step checked" in done.stdout + done.stderr


def test_a_sync_between_log_steps_is_caught(prepared, tmp_path):
    done = run_cli([*gpu_preset_on_cpu(prepared), "--trainer.max_steps", "4", callback("ReadLossEveryStep")],
                   cwd=tmp_path)
    assert done.returncode != 0
    assert "host syncs in training steps that do not log" in done.stderr and "helpers.py" in done.stderr
