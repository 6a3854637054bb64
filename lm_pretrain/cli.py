"""The training command line: LightningCLI over LanguageModel and TokenDataModule.

Every constructor argument of the model, the data module, the Trainer and the checkpoint callback
is a flag (`--model.n_layer 6`) and a YAML key (see configs/); `python train.py fit --help` lists them.
"""

import logging
import sys
from pathlib import Path

from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.callbacks import ProgressBar as LightningProgressBar
import torch
from jsonargparse import ArgumentError
from lightning.pytorch.cli import LightningCLI

from lm_pretrain.callbacks import Preemption, ProgressBar, Throughput
from lm_pretrain.data import TokenDataModule
from lm_pretrain.errors import UserError, exit_on_user_error
from lm_pretrain.module import LanguageModel


class PretrainCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # This checkpoint callback keeps last.ckpt, the one to resume from, and gets its own flags:
        # --checkpoint.every_n_train_steps 500 (default: at each validation), --checkpoint.dirpath ...
        # A second one, always there, keeps the best checkpoint by validation loss.
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 0})

    def instantiate_trainer(self, **kwargs):
        # Our progress bar (numbers read from the GPU only on log steps) unless the bar is switched
        # off or the config brings its own; Lightning refuses a bar in callbacks with the bar off.
        trainer = self._get(self.config_init, "trainer", default={})
        callbacks = list(trainer.get("callbacks") or [])
        if trainer.get("enable_progress_bar") is not False and not any(isinstance(c, LightningProgressBar)
                                                                       for c in callbacks):
            kwargs["callbacks"] = [*callbacks, ProgressBar()]
        return super().instantiate_trainer(**kwargs)

    def _parse_ckpt_path(self) -> None:
        # LightningCLI rebuilds the model from the hyperparameters saved in --ckpt_path, silently
        # overriding the model flags; refuse a checkpoint whose architecture differs from them instead.
        subcommand = self.config.get("subcommand")
        if subcommand:
            config = self.config[subcommand]
            if subcommand == "fit":
                resolve_last_checkpoint(config)
            ckpt = config.get("ckpt_path")
            if ckpt and ckpt not in ("last", "best", "hpc", "registry"):
                check_checkpoint(ckpt, config.model)
        super()._parse_ckpt_path()


def check_checkpoint(ckpt: str, model_args) -> None:
    """UserError unless `ckpt` (a file or a sharded folder) exists and holds this model's architecture."""
    from lm_pretrain.checkpoints import META_FILE, config_from
    from lm_pretrain.model import GPTConfig
    from lm_pretrain.module import check_architecture

    path = Path(ckpt)
    if not path.exists():
        raise UserError(f"checkpoint {ckpt} does not exist")
    if path.is_dir() and not (path / META_FILE).is_file():
        raise UserError(f"checkpoint {ckpt} is a folder but not a sharded checkpoint (it has no {META_FILE})")
    try:  # the hyperparameters alone: no weights are read here
        saved = torch.load(path / META_FILE if path.is_dir() else path, weights_only=True, map_location="cpu")
        saved = saved.get("hyper_parameters", {})
    except Exception as err:
        raise UserError(f"{ckpt} is not a checkpoint ({type(err).__name__})") from None
    try:
        config = config_from({k: model_args[k] for k in GPTConfig.__dataclass_fields__ if k in model_args})
    except ValueError as err:
        raise UserError(f"model: {err}") from None
    check_architecture(saved, config, f"checkpoint {ckpt}")


def resolve_last_checkpoint(config) -> None:
    """`--ckpt_path last` with the default versioned TensorBoard folders: resume from the newest
    runs/NAME/version_N/checkpoints/last.ckpt and keep logging into that version_N.

    (Lightning alone would look for last.ckpt in a new, empty version_N+1.) With no such checkpoint
    the run starts from scratch, so one command serves a first start and every restart.
    """
    logger = config.trainer.logger
    if config.ckpt_path != "last" or config.checkpoint.dirpath or not hasattr(logger, "class_path") \
            or not str(logger.class_path).endswith("TensorBoardLogger"):
        return
    args = logger.init_args
    if args.get("version") is not None:
        return  # the user chose the folder: Lightning finds last.ckpt there
    root = Path(args.get("save_dir") or ".") / (args.get("name") or "lightning_logs")
    found = sorted(root.glob("version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if found:
        config.ckpt_path = str(found[-1])
        args.version = found[-1].parent.parent.name.removeprefix("version_")
        logging.getLogger("lm_pretrain").info("resuming from %s", found[-1])


def run(args: list[str] | None = None) -> PretrainCLI:
    logging.getLogger("litdata").setLevel(logging.WARNING)  # its cache-size notices are noise here
    ours = logging.getLogger("lm_pretrain")  # e.g. "preparing the default corpus ..."
    if not ours.handlers:
        ours.addHandler(logging.StreamHandler())
        ours.setLevel(logging.INFO)
    return PretrainCLI(
        LanguageModel,
        TokenDataModule,
        trainer_defaults={
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": "runs", "name": "default"}},
            "callbacks": [
                ModelCheckpoint(monitor="val/loss", mode="min", save_top_k=1, filename="best-step{step:06d}",
                                auto_insert_metric_name=False),
                LearningRateMonitor(logging_interval="step"),
                Preemption(),
                Throughput(),
            ],
        },
        args=args,
        # The run's full config is saved beside its logs; without a logger it lands in the working
        # folder, where a second run must be allowed to replace it.
        save_config_kwargs={"overwrite": True},
        # Raise parse errors (unknown keys, wrong types, bad YAML) instead of printing the whole usage
        # text: `main` reports them in one line.
        parser_kwargs={"exit_on_error": False},
    )


@exit_on_user_error
def main(args: list[str] | None = None) -> None:
    try:
        run(args)  # None: LightningCLI reads sys.argv
    except ArgumentError as err:
        command = " ".join(["python train.py", *(args if args is not None else sys.argv[1:])[:1]])
        raise UserError(f"{' '.join(str(err).split())} (see {command} --help)") from None
