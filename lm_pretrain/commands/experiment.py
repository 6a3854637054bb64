"""A run resolved exactly as `python train.py fit` resolves it, for notebooks and scripts.

    import lm_pretrain
    run = lm_pretrain.experiment("configs/tiny.yaml", {"model.mlp": "relu2", "trainer.max_steps": 300})
    run.fit()                   # trains as train.py fit would: the same logs, checkpoints and samples
    run.metrics                 # {"val/loss": ..., "val/ppl": ..., "val/bpb": ...} after it
    run.curve("train/loss")     # [(step, value), ...] read back from the run's logs

The configs and overrides go through train.py's own parser: its defaults (training/defaults.yaml),
checks, callbacks and one-line errors (a UserError here). An override is what a flag would be,
`{"model.n_layer": 6}` for `--model.n_layer 6`; `run.model`, `run.datamodule` and `run.trainer` are
what that parse built.
"""

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from lm_pretrain.commands.train import PretrainCLI, build
from lm_pretrain.training import checkpoints
from lm_pretrain.utils.errors import UserError


@dataclass
class Experiment:
    """A built run: its model, data module and Trainer, and once fit, its results."""

    cli: PretrainCLI
    seconds: float | None = None  # how long fit took
    metrics: dict[str, float] = field(default_factory=dict)  # the last validation's, after fit

    @property
    def model(self):
        return self.cli.model

    @property
    def datamodule(self):
        return self.cli.datamodule

    @property
    def trainer(self):
        return self.cli.trainer

    @property
    def log_dir(self) -> Path | None:
        """Where the logger writes (runs/NAME/version_N), or None without one."""
        return Path(self.trainer.log_dir) if self.trainer.logger is not None else None

    def fit(self, ckpt_path: str | None = None) -> dict[str, float]:
        """Train (from `ckpt_path` if given, as --ckpt_path) and return the last validation's metrics."""
        started = time.perf_counter()
        try:
            self.trainer.fit(self.model, datamodule=self.datamodule, ckpt_path=ckpt_path)
        finally:
            checkpoints.release_unused_run_folders()
        self.seconds = time.perf_counter() - started
        self.metrics = {name: float(value) for name, value in self.trainer.callback_metrics.items()
                        if name.startswith("val/")}
        return self.metrics

    def curve(self, tag: str) -> list[tuple[int, float]]:
        """The logged values of `tag` (e.g. "train/loss", "val/bpb") as (step, value), from the
        TensorBoard event files or the CSV file of the run."""
        if self.log_dir is None:
            raise UserError("this run has no logger: set trainer.logger to read its curves")
        csv = self.log_dir / "metrics.csv"
        if csv.is_file():
            import csv as csv_module

            with open(csv) as f:
                return [(int(row["step"]), float(row[tag])) for row in csv_module.DictReader(f) if row.get(tag)]
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(self.log_dir), size_guidance={"scalars": 0})
        events.Reload()
        if tag not in events.Tags()["scalars"]:
            return []
        return [(event.step, event.value) for event in events.Scalars(tag)]


def as_flag_value(value) -> str:
    """An override's value as its flag would read it: text as it is, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def experiment(config: str | Path | list[str | Path] | None = None, overrides: dict | None = None) -> Experiment:
    """The run that `python train.py fit --config CONFIG ... --KEY VALUE ...` would start, built but
    not started: call `.fit()`. `config` is one config file or several (later ones win, as repeated
    --config do); `overrides` maps flag names without the dashes to values."""
    configs = [config] if isinstance(config, (str, Path)) else list(config or [])
    args = [arg for path in configs for arg in ("--config", str(path))]
    args += [f"--{key}={as_flag_value(value)}" for key, value in (overrides or {}).items()]
    return Experiment(build(args, subcommand=False))
