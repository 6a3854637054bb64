"""lm_pretrain.experiment: a run built in Python (a notebook's) is the run `train.py fit` starts."""

import json

import pytest
import torch

from helpers import ROOT, assert_same_run, callback, run_cli, scalars
from lm_pretrain.training.debug import read_records
from lm_pretrain.utils.errors import UserError

TINY = ROOT / "configs" / "tiny.yaml"


def settings(data, folder) -> dict:
    return {"data.data_dir": str(data), "data.batch_size": 8, "model.block_size": 32, "model.n_layer": 2,
            "model.n_head": 2, "model.n_embd": 32, "model.mlp": "relu2", "model.dropout": 0.1,
            "model.learning_rate": 0.01, "model.warmup_steps": 2, "trainer.max_steps": 6,
            "trainer.val_check_interval": 6, "trainer.limit_val_batches": 2, "trainer.log_every_n_steps": 1,
            "trainer.enable_progress_bar": False, "trainer.logger.init_args.save_dir": str(folder / "runs")}


def flags(values: dict) -> list[str]:
    """The settings as a user types them: --KEY VALUE (true/false for booleans)."""
    return [arg for key, value in values.items()
            for arg in (f"--{key}", str(value).lower() if isinstance(value, bool) else str(value))]


@pytest.mark.slow
def test_a_notebooks_run_logs_bitwise_the_losses_of_train_py_fit(prepared, tmp_path, monkeypatch):
    import lm_pretrain

    cli = tmp_path / "cli"
    done = run_cli([str(ROOT / "train.py"), "fit", "--config", str(TINY), *flags(settings(prepared, cli)),
                    callback("RecordBatches", path=str(cli / "rec"))], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]

    here = tmp_path / "python"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what helpers.env gives the command's process
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    try:
        run = lm_pretrain.experiment(TINY, {**settings(prepared, here), "trainer.callbacks+": json.dumps(
            {"class_path": "lm_pretrain.training.debug.RecordBatches", "init_args": {"path": str(here / "rec")}})})
        assert run.model.config.mlp == "relu2" and run.trainer.max_steps == 6
        metrics = run.fit()
    finally:
        torch.set_num_threads(threads)
    assert_same_run(read_records(here / "rec"), read_records(cli / "rec"))
    logged = scalars(cli / "runs" / "tiny" / "version_0")
    assert run.curve("train/loss") == logged["train/loss"] and len(logged["train/loss"]) == 6
    assert metrics["val/loss"] == logged["val/loss"][-1][1] and "val/bpb" in metrics
    assert run.log_dir == here / "runs" / "tiny" / "version_0" and (run.log_dir / "config.yaml").is_file()


def test_bad_settings_are_one_line_user_errors(prepared, tmp_path, monkeypatch):
    import lm_pretrain

    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="n_layers"):
        lm_pretrain.experiment(TINY, {"model.n_layers": 3})
    with pytest.raises(UserError, match=r"--model.n_layer 0 is out of range"):
        lm_pretrain.experiment(TINY, {"data.data_dir": str(prepared), "model.n_layer": 0})
    with pytest.raises(UserError, match="does not exist"):
        lm_pretrain.experiment(TINY, {"data.data_dir": str(tmp_path / "nope")})
    assert list(tmp_path.iterdir()) == []  # nothing built, no run folder claimed
