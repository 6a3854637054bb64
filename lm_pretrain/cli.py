"""The training command line: LightningCLI over LanguageModel and TokenDataModule.

Every constructor argument of the model, the data module, the Trainer and the checkpoint callback
is a flag (`--model.n_layer 6`) and a YAML key (see configs/); `python train.py fit --help` lists them.
"""

import logging
import sys

from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from jsonargparse import ArgumentError
from lightning.pytorch.cli import LightningCLI

from lm_pretrain.data import TokenDataModule
from lm_pretrain.errors import UserError, exit_on_user_error
from lm_pretrain.module import LanguageModel


class PretrainCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The checkpoint callback gets its own flags (--checkpoint.every_n_train_steps 500, ...).
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.monitor": "val/loss",  # best by validation loss ...
            "checkpoint.mode": "min",
            "checkpoint.save_top_k": 1,
            "checkpoint.save_last": True,  # ... plus last.ckpt, to resume with --ckpt_path last
            "checkpoint.filename": "best-step{step:06d}",
            "checkpoint.auto_insert_metric_name": False,
        })


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
            "callbacks": [LearningRateMonitor(logging_interval="step")],
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
