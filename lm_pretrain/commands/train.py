"""The training command line: LightningCLI over LanguageModel and TokenDataModule.

Every constructor argument of the model, the data module, the Trainer and the checkpoint callback
is a flag (`--model.n_layer 6`) and a YAML key (see configs/); `python train.py fit --help` lists them.
"""

import contextlib
import importlib
import logging
import os
import signal
import sys
import warnings
from pathlib import Path

from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.callbacks import ProgressBar as LightningProgressBar
from jsonargparse import ArgumentError
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lm_pretrain.training import checkpoints
from lm_pretrain.utils import ranges
from lm_pretrain.training.callbacks import Preemption, ProgressBar, Throughput
from lm_pretrain.commands.parsing import show_progress
from lm_pretrain.data.datamodule import TokenDataModule
from lm_pretrain.utils.errors import Interrupted, UserError, exit_on_user_error
from lm_pretrain.utils.extras import require
from lm_pretrain.utils.files import check_can_create, refuse_output_over_inputs
from lm_pretrain.training.module import LanguageModel, network_on_meta
from lm_pretrain.model.config import check_tensor_parallel
from lm_pretrain.training.strategies import check_layout


# The settings every run starts from (seed, clipping, validation, logger, text samples), read by each
# subcommand before any --config: the presets hold only what differs. It lives in the package,
# beside this module, so that a clone, an editable install and a wheel all read it.
DEFAULTS_FILE = Path(__file__).resolve().parents[1] / "training" / "defaults.yaml"


def shards_the_model(config) -> bool:
    """Whether the run's trainer.strategy lays the model out over processes (a ModelParallelStrategy,
    as strategies.FSDP), rather than giving each process the whole of it."""
    strategy = config.trainer.get("strategy")
    if isinstance(strategy, ModelParallelStrategy):
        return True
    class_path = strategy.get("class_path") if hasattr(strategy, "get") else None
    if not class_path:  # a name ("ddp", "auto") or none
        return False
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return False  # LightningCLI names the class it cannot find, when it builds the strategy
    return isinstance(cls, type) and issubclass(cls, ModelParallelStrategy)


class PretrainCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # fit and validate: the model has no test_step or predict_step, and each subcommand's parser
        # costs start-up time (every one is built before the command line is read).
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name in ("fit", "validate")}

    def add_arguments_to_parser(self, parser) -> None:
        # This checkpoint callback keeps last.ckpt, the one to resume from, and gets its own flags:
        # --checkpoint.every_n_train_steps 500 (default: at each validation), --checkpoint.dirpath ...
        # A second one, always there, keeps the best checkpoint by validation loss.
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        # No last-v1.ckpt beside last.ckpt when a resumed run changes a checkpoint setting (Lightning
        # then no longer knows last.ckpt as its own): one last checkpoint per run, replaced whole.
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 0,
                             "checkpoint.enable_version_counter": False})

    claimed_version: int | None = None

    def run_config(self):
        """The run's config: the subcommand's (fit, validate), or without one (lm_pretrain.experiment,
        built with run=False) the whole."""
        subcommand = self.config.get("subcommand")
        return self.config[subcommand] if subcommand else self.config

    def instantiate_classes(self) -> None:
        # Under a sharding strategy no process builds the whole model: its network is made on the meta
        # device and each process materialises its own shard (LanguageModel.configure_model).
        with network_on_meta() if shards_the_model(self.run_config()) else contextlib.nullcontext():
            super().instantiate_classes()
        strategy = self.trainer.strategy
        if isinstance(strategy, ModelParallelStrategy) and strategy._tensor_parallel_size > 1:
            # before any process starts: a layout that does not divide is one line, said once
            check_layout(self.trainer.num_devices * self.trainer.num_nodes, strategy._tensor_parallel_size,
                         self.trainer.num_devices)
            check_tensor_parallel(self.model.config, strategy._tensor_parallel_size)

    def instantiate_trainer(self, **kwargs):
        # The logger (built by now) has the version claimed for it; the config saved beside the run
        # (config.yaml) goes back to none, so that a new run started from that file claims a folder
        # of its own instead of writing into this one.
        if self.claimed_version is not None:
            self.run_config().trainer.logger.init_args.version = None
        # Our progress bar (numbers read from the GPU only on log steps) unless the bar is switched
        # off or the config brings its own; Lightning refuses a bar in callbacks with the bar off.
        trainer = self._get(self.config_init, "trainer", default={})
        callbacks = list(trainer.get("callbacks") or [])
        if trainer.get("enable_progress_bar") is not False and not any(isinstance(c, LightningProgressBar)
                                                                       for c in callbacks):
            kwargs["callbacks"] = [*callbacks, ProgressBar()]
        # Checkpoint files renamed into place whole (checkpoints.AtomicCheckpointIO), unless the
        # config brings a checkpoint writer of its own (as a plugin, or in its strategy object).
        plugins = trainer.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        strategy = trainer.get("strategy")
        if not any(isinstance(plugin, CheckpointIO) for plugin in plugins) and \
                getattr(strategy, "_checkpoint_io", None) is None:
            kwargs["plugins"] = [*plugins, checkpoints.AtomicCheckpointIO()]
        return super().instantiate_trainer(**kwargs)

    def parse_arguments(self, parser, args) -> None:
        """After parsing, before anything is built: our checks of the config. Done here, before
        LightningCLI reads the hyperparameters saved in --ckpt_path over the model flags, so that a
        checkpoint whose architecture differs from the flags is refused instead of silently winning.
        --print_config prints the config as the run would use it: model.vocab_size filled in."""
        argv, printing = split_print_config(args)
        if printing:  # parsed without it first, to fill in what the printed config should show
            self.config = parser.parse_args(argv)
        else:
            super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.run_config()
        ranges.check_config(config)  # Lightning's settings, before the Trainer exists
        use_root_dir_for_runs(config)
        allow_mlflow_file_store(config)
        require_logger_packages(config)
        if subcommand == "fit":
            checkpoints.resolve_last(config)
        ckpt = config.get("ckpt_path")
        if ckpt in ("last", "best", "hpc", "registry"):  # Lightning's names, resolved as the run starts
            ckpt = None
        try:
            saved = checkpoints.read_hyperparameters(ckpt) if ckpt else None  # read once, for both uses below
            follow_the_tokenizer(config, saved)
        except UserError:
            if not printing:
                raise
        if printing:  # (left empty where the data cannot be read yet: the run itself would stop there)
            vocab = config.model.get("vocab_size")
            parser.parse_args([*argv, *([f"--model.vocab_size={vocab}"] if vocab else []), *printing])  # prints, exits
        if saved:
            # (validate may score a checkpoint on any data; fit resumes a run on its own)
            checkpoints.check_resumable(ckpt, saved, config.model.as_dict(),
                                        config.data.as_dict() if subcommand == "fit" else None)
        self.claimed_version = checkpoints.claim_run_folder(config)  # last; main removes it if left unused


def split_print_config(args) -> tuple:
    """(the arguments without --print_config, [--print_config and its value if given]); the
    arguments as they came and [] when there is none to print."""
    if isinstance(args, dict):
        return args, []
    argv = list(sys.argv[1:] if args is None else args)
    for i, arg in enumerate(argv):
        if arg.split("=")[0] == "--print_config":
            given_value = "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("-")
            return argv[:i] + argv[i + 1 + given_value:], argv[i:i + 1 + given_value]
    return args, []


def follow_the_tokenizer(config, saved: dict | None) -> None:
    """model.vocab_size, when not given, is the tokenizer's: that of the checkpoint resumed or
    validated (`saved`: its read_hyperparameters), else the data's (TokenDataModule.tokenizer_vocab_size).
    A value given is checked against the data as the run starts (TokenDataModule.check_compatible)."""
    if config.model.get("vocab_size") is not None:
        return
    if saved:
        config.model.vocab_size = saved["hyper_parameters"]["vocab_size"]
    else:
        config.model.vocab_size = TokenDataModule(**config.data.as_dict()).tokenizer_vocab_size()


def allow_mlflow_file_store(config) -> None:
    """MLflow 3 refuses a local file store (its default, and configs/overlays/mlflow.yaml's) unless
    MLFLOW_ALLOW_FILE_STORE is set: set it for a logger with no tracking server."""
    logger = config.trainer.get("logger")
    if str(getattr(logger, "class_path", "")).endswith("MLFlowLogger") and \
            str(logger.init_args.get("tracking_uri") or "file:").startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def require_logger_packages(config) -> None:
    """The wandb and MLflow loggers (configs/overlays/) need the [loggers] extra: without it, one line
    saying so, before any work (Lightning would raise ModuleNotFoundError when building the Trainer)."""
    packages = {"WandbLogger": "wandb", "MLFlowLogger": "mlflow"}
    loggers = config.trainer.get("logger")
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        name = str(getattr(logger, "class_path", "")).rpartition(".")[2]
        if name in packages:
            require(packages[name], "loggers", f"--trainer.logger {name}",
                    "mlflow-skinny" if name == "MLFlowLogger" else None)


def use_root_dir_for_runs(config) -> None:
    """`--trainer.default_root_dir DIR`: the run (logs, config, checkpoints) goes under DIR. Lightning
    alone ignores it when the logger has a save_dir of its own, as the configs' loggers do. Either
    folder must be one that can be created: checked now, before any work."""
    root, logger = config.trainer.get("default_root_dir"), config.trainer.get("logger")
    if root and hasattr(logger, "init_args") and "save_dir" in logger.init_args:
        logger.init_args.save_dir = str(root)
    if root:
        check_can_create(root, "--trainer.default_root_dir")
    if hasattr(logger, "init_args") and logger.init_args.get("save_dir"):
        check_can_create(logger.init_args.save_dir, "--trainer.logger.init_args.save_dir")
    if config.get("checkpoint.dirpath"):
        check_can_create(config.checkpoint.dirpath, "--checkpoint.dirpath")
        # Checkpoints are never written into what the run reads: into the dataset, or as last.ckpt over
        # the init_from file (the writer only writes files at the folder's top level). A resumed run's
        # own checkpoint is not listed: replacing it is resuming.
        mixture = config.get("data.mixture") or []
        refuse_output_over_inputs(config.checkpoint.dirpath, {
            "--data.data_dir": [config.get("data.data_dir"), *(m.get("data_dir") for m in mixture if isinstance(m, dict))],
            "--model.tokenizer": config.get("model.tokenizer")}, "--checkpoint.dirpath", contains_depth=0)
        refuse_output_over_inputs(config.checkpoint.dirpath, {"--model.init_from": config.get("model.init_from")},
                                  "--checkpoint.dirpath", contains_depth=1)


def quiet_lightning() -> None:
    """Silence what a user of this template cannot act on: Lightning 2.6's own use of a torch API it
    deprecated, its warning that workers may duplicate an IterableDataset's items (litdata and
    data.EvenSplit deal the items to workers themselves), and its tip to install litlogger."""
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: "litlogger" not in record.getMessage())


def use_omp_num_threads() -> None:
    """OMP_NUM_THREADS, when given, is the intra-op thread count, whoever started this process. torch
    reads it only as it starts: a process forked from a running interpreter (or a notebook) would
    keep that one's count, and Lightning, seeing the variable set, changes nothing. Rounding depends
    on the count, so a bitwise comparison depends on this. Without it, Lightning gives each process
    of a machine its share of the cores."""
    import torch

    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))


def run(args: list[str] | None = None, subcommand: bool = True) -> PretrainCLI:
    """Parse `args` (None: sys.argv) and run the subcommand they name; with subcommand=False, args
    name none and the model, data module and Trainer are only built (lm_pretrain.experiment)."""
    use_omp_num_threads()
    quiet_lightning()
    show_progress()  # e.g. "preparing the default corpus ..."
    # jsonargparse would silently skip a missing defaults file, and the presets would quietly change.
    if not DEFAULTS_FILE.is_file():
        raise UserError(f"{DEFAULTS_FILE} is missing: reinstall lm-pretrain (the file is package data)")
    defaults = str(DEFAULTS_FILE)
    return PretrainCLI(
        LanguageModel,
        TokenDataModule,
        trainer_defaults={
            # Always added after the config's callbacks (LightningCLI appends these): a config that
            # sets trainer.callbacks cannot drop them. Everything else is in defaults.yaml.
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
        parser_kwargs={"exit_on_error": False,
                       **({name: {"default_config_files": [defaults]} for name in PretrainCLI.subcommands()}
                          if subcommand else {"default_config_files": [defaults]})},
        run=subcommand,
    )


def build(args: list[str] | None = None, subcommand: bool = True) -> PretrainCLI:
    """`run`, with a parse error or a combination Lightning refuses as a UserError of one line."""
    try:
        return run(args, subcommand)  # None: LightningCLI reads sys.argv
    except ArgumentError as err:
        given = (args if args is not None else sys.argv[1:])[:1]
        command = " ".join(["python train.py", *[a for a in given if a in PretrainCLI.subcommands()]])
        raise UserError(f"{ranges.describe(str(err))} (see {command} --help)") from None
    except MisconfigurationException as err:  # Lightning refusing a combination of settings
        raise UserError(" ".join(str(err).split())) from None


@exit_on_user_error
def main(args: list[str] | None = None) -> None:
    try:
        cli = build(args)
    finally:
        checkpoints.release_unused_run_folders()
    stopped = next((c for c in getattr(cli.trainer, "callbacks", []) if isinstance(c, Preemption)), None)
    if stopped is not None and stopped.requested == signal.SIGINT and stopped.saved:  # Ctrl-C: stopped and saved
        if cli.trainer.global_rank == 0:
            raise Interrupted(stopped.saved)
        sys.exit(130)  # the other processes of the run: the first one says it
