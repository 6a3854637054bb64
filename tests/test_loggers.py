"""Any logger: TensorBoard (the default, tested throughout), CSV, W&B (offline) and MLflow (a local
file store), each with text samples and `--ckpt_path last` continuing the same run, and
`--trainer.default_root_dir` choosing where runs go."""

import json

import pytest
import torch

from helpers import callback, ROOT, run_cli, train_args
from lm_pretrain.training.debug import read_records

pytestmark = pytest.mark.slow  # multi-process and end-to-end runs

# where each logger keeps a run's checkpoints under the root folder, and where its text samples go
LOGGERS = {
    "csv": ("tiny/version_*/checkpoints", "tiny/version_0/samples.md"),
    "wandb": ("lm-pretrain/*/checkpoints", "wandb/offline-run-*/files/media/table/samples/0_*.table.json"),
    "mlflow": ("*/*/checkpoints", "*/*/artifacts/samples/0/step000002.txt"),
}


@pytest.mark.slow
@pytest.mark.parametrize("logger", sorted(LOGGERS))
def test_logger_overlay_logs_samples_and_resumes_its_run(logger, prepared, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # no network here; W&B's offline mode
    root = tmp_path / "out"

    def fit(*extra: str):
        return run_cli([*train_args(prepared, max_steps=6, val_every=1000), "--config",
                        str(ROOT / "configs" / "overlays" / f"{logger}.yaml"), "--trainer.default_root_dir", str(root),
                        "--trainer.log_every_n_steps", "1", "--checkpoint.every_n_train_steps", "2",
                        "--trainer.callbacks.init_args.every_n_steps", "2",
                        "--trainer.callbacks.init_args.max_new_tokens", "5",
                        callback("RecordBatches", path=str(tmp_path / "rec")), *extra], cwd=tmp_path)

    killed = fit(callback("SignalAt", step=3))
    assert killed.returncode == -9
    checkpoint_dirs, samples = LOGGERS[logger]
    (run,) = root.glob(checkpoint_dirs)  # one run so far, with the step-2 checkpoint
    assert torch.load(run / "last.ckpt", weights_only=False)["global_step"] == 2

    resumed = fit("--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert list(root.glob(checkpoint_dirs)) == [run]  # the same run continued, no new one
    assert torch.load(run / "last.ckpt", weights_only=False)["global_step"] == 6
    steps = [r["step"] for r in read_records(tmp_path / "rec")]
    assert steps == list(range(1, 7))
    assert not (tmp_path / "runs").exists()  # everything went under --trainer.default_root_dir
    assert list(root.glob(samples)), sorted(str(p.relative_to(root)) for p in root.rglob("*"))[:40]
    if logger == "wandb":
        table = json.loads(next(root.glob(samples)).read_text())
        assert table["columns"] == ["step", "text"] and table["data"][0][1].startswith("ROMEO:")


def test_tensorboard_lists_each_runs_settings_beside_its_val_metrics_and_no_placeholder_cards(trained_run):
    """The HParams tab: the run's settings, and val/loss and val/bpb as its columns; Time Series
    starts with the loss, not with Lightning's hp_metric (-1) and epoch cards."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    events = EventAccumulator(str(trained_run["log_dir"]), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "epoch" not in tags and "hp_metric" not in tags and {"train/loss", "val/loss", "val/bpb"} <= set(tags)
    content = [HParamsPluginData.FromString(c) for c in events.PluginTagToContent("hparams").values()]
    columns = {info.name.tag for c in content for info in c.experiment.metric_infos}
    settings = {name: value for c in content for name, value in c.session_start_info.hparams.items()}
    assert columns == {"val/loss", "val/bpb"}
    assert settings["n_embd"].number_value == 32 and settings["learning_rate"].number_value == 0.01
    assert settings["data_dir"].string_value == str(trained_run["data"])

