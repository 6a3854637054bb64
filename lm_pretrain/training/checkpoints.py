"""Checkpoints: finding the last one, checking it fits the model, reading it, and the RNG state in it.

train.py writes one file per checkpoint, or under sharded training (FSDP) a folder with one `.distcp`
file per process and `meta.pt` (everything but the weights and optimizer state). Sampling, export
and `init_from` read either kind on one process: a folder's shards are put together on the fly.
"""

import dataclasses
import logging
import os
import random
import re
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint import CheckpointException
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from lm_pretrain.data import storage
from lm_pretrain.utils.errors import UserError
from lm_pretrain.utils.files import remove_orphans, write_atomically
from lm_pretrain.model import GPTConfig
from lm_pretrain.model.gpt import split_fused_weights

META_FILE = "meta.pt"  # Lightning's name for the non-tensor part of a sharded checkpoint
LAST = "last.ckpt"
LAST_NAME = re.compile(r"^last(-v\d+)?\.ckpt$")  # Lightning's name, versioned when one was there
# Every GPTConfig field but these describes the weights or what they compute; these only train them.
TRAINING_ONLY = ("dropout", "router_aux_loss", "router_z_loss", "router_bias_rate")
ARCHITECTURE_KEYS = tuple(name for name in GPTConfig.__dataclass_fields__ if name not in TRAINING_ONLY)

log = logging.getLogger("lm_pretrain")


# ---------------------------------------------------------------------------------------------
# Reading


def read(path: str | Path, what: str = "checkpoint") -> dict:
    """A checkpoint as one dict ("hyper_parameters", "state_dict", "global_step", ...), on the CPU.

    Sharded: meta.pt plus the model weights put together from the shards (not the optimizer state).
    `what` starts each error message (e.g. "model.init_from: checkpoint").
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} {path} does not exist")
    try:
        if path.is_dir():
            checkpoint = read_hyperparameters(path, what, full=True)
            checkpoint["state_dict"] = _gather_shards(path)
            return checkpoint
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
            raise UserError(f"{what} {path} is not a checkpoint written by train.py")
        return checkpoint
    except UserError:
        raise
    except (Exception, CheckpointException) as err:  # torch.load and the shard reader raise many kinds
        first_line = str(err).splitlines()[0] if str(err) else "unreadable"
        raise UserError(f"{what} {path} is not a checkpoint of this project ({type(err).__name__}: {first_line})") from None


def read_hyperparameters(path: str | Path, what: str = "checkpoint", full: bool = False) -> dict:
    """A checkpoint's dict without its weights (cheap for a folder; `full` returns the whole of
    meta.pt, else {"hyper_parameters": ...} only)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} {path} does not exist")
    if path.is_dir() and not (path / META_FILE).is_file():
        raise UserError(f"{what} {path} is a folder but not a sharded checkpoint (it has no {META_FILE})")
    try:
        saved = torch.load(path / META_FILE if path.is_dir() else path, map_location="cpu", weights_only=not full)
    except Exception as err:
        raise UserError(f"{what} {path} is not a checkpoint ({type(err).__name__})") from None
    if not isinstance(saved, dict) or "hyper_parameters" not in saved:
        raise UserError(f"{what} {path} is not a checkpoint written by train.py")
    if full:
        return saved
    return {"hyper_parameters": saved["hyper_parameters"], "streamed_from": streamed_from(saved),
            "fused_layout": fused_layout(path, saved)}


def fused_layout(path: Path, saved: dict) -> bool:
    """Whether a checkpoint keeps q, k and v in one attn.qkv matrix, as before they were separate."""
    if path.is_dir():
        import torch.distributed.checkpoint as dcp

        try:
            keys = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        except (Exception, CheckpointException):
            return False  # (an unreadable folder is refused where its weights are read)
    else:
        keys = saved.get("state_dict") or {}
    return any(".attn.qkv." in key for key in keys)


def _gather_shards(path: Path) -> dict:
    """The LightningModule state dict of a sharded checkpoint, read into one process's memory: the
    weights alone (torch's dcp_to_torch_save would read the optimizer's moments too, twice the
    weights with AdamW, and write them all to a file first)."""
    import warnings

    import torch.distributed.checkpoint as dcp

    # The model's tensors as the checkpoint names and shapes them (one written before q, k and v were
    # separate matrices holds attn.qkv: loading splits it, model.gpt.split_fused_weights)
    stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    state = {"state_dict": {key.removeprefix("state_dict."): torch.empty(meta.size, dtype=meta.properties.dtype)
                            for key, meta in stored.items()
                            if key.startswith("state_dict.model.") and hasattr(meta, "size")}}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=path)  # one process, no process group: reads every shard
    return state["state_dict"]


def model_weights(checkpoint: dict) -> dict:
    """The GPT's own state dict (keys without the LightningModule's "model." prefix)."""
    return {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}


def load_weights(path: str, config: GPTConfig) -> dict:
    """The model weights of a checkpoint (file or sharded folder), refused with a UserError unless its
    architecture is `config`'s (for `--model.init_from`), in this version's layout."""
    checkpoint = read(path, what="model.init_from: checkpoint")
    check_architecture(checkpoint["hyper_parameters"], config, f"model.init_from: {path}")
    weights = model_weights(checkpoint)
    split_fused_weights(weights, config)  # (also loaded into shards, where no load hook of the model runs)
    return weights


# ---------------------------------------------------------------------------------------------
# Checking


def check_architecture(saved_hparams: dict, config: GPTConfig, what: str) -> None:
    """UserError unless hyperparameters saved in a checkpoint describe `config`'s architecture."""
    try:
        saved = dataclasses.asdict(GPTConfig.from_dict(saved_hparams))
    except (TypeError, ValueError) as err:
        raise UserError(f"{what} holds no valid model configuration ({err})") from None
    ours = dataclasses.asdict(config)
    different = [f"{k}={saved[k]} (config: {ours[k]})" for k in ARCHITECTURE_KEYS if ours[k] != saved[k]]
    if different:
        raise UserError(f"{what} has another architecture: {', '.join(different)}")


def check_resumable(ckpt: str, saved: dict, model_args: dict, data_args: dict | None = None) -> None:
    """UserError unless the checkpoint at `ckpt` (`saved`: its read_hyperparameters) holds the
    architecture that the model flags describe (LightningCLI would rebuild the model from the
    checkpoint's hyperparameters and silently ignore the flags) and was trained on the data the flags
    name (the run resumes at its place in those shards; litdata would stop with a traceback deep in
    the restore)."""
    try:
        config = GPTConfig.from_dict(model_args)
    except (TypeError, ValueError) as err:
        raise UserError(f"model: {err}") from None
    check_architecture(saved["hyper_parameters"], config, f"checkpoint {ckpt}")
    if saved.get("fused_layout"):
        raise UserError(f"checkpoint {ckpt} was written before q, k and v (and SwiGLU's two halves) were separate "
                        f"matrices: its optimizer state cannot continue here; start a new run from its weights with "
                        f"--model.init_from {ckpt}")
    if data_args is not None and saved["streamed_from"] and saved["streamed_from"] != train_splits(data_args):
        trained_on = ", ".join(sorted(str(Path(p).parent) for p in saved["streamed_from"]))
        given = ", ".join(sorted(str(Path(p).parent) for p in train_splits(data_args)))
        raise UserError(f"checkpoint {ckpt} was trained on {trained_on}, not {given}: --ckpt_path continues a run "
                        f"where it stopped in its own data; to train its weights on other data, start a new run "
                        f"with --model.init_from {ckpt} instead")


def streamed_from(saved: dict) -> set[str]:
    """The train splits a checkpoint's data loader was reading, as litdata saved them in its state
    (absolute paths as they were in training, or s3:// URLs): what litdata checks on resume."""
    found = set()

    def walk(node) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("input_dir_url"), str) or isinstance(node.get("input_dir_path"), str):
                found.add(node.get("input_dir_url") or node["input_dir_path"])
            for value in node.values():
                walk(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                walk(value)

    walk(saved.get("loops") or {})
    return found


def train_splits(data_args: dict) -> set[str]:
    """The train splits a data module's arguments name (data_dir, or each of a mixture), as litdata
    records them: absolute paths, or URLs."""
    mixture = data_args.get("mixture")
    named = [m.get("data_dir") for m in mixture if isinstance(m, dict)] if mixture else [data_args.get("data_dir")]
    return {f"{str(d).rstrip('/')}/train" if storage.is_remote(d) else str(Path(d).resolve() / "train")
            for d in named if d}


# ---------------------------------------------------------------------------------------------
# Finding the last checkpoint of a run (--ckpt_path last)
#
# Lightning keeps a run's checkpoints in SAVE_DIR/NAME/VERSION/checkpoints, where the logger says
# what SAVE_DIR, NAME and VERSION are. For each logger: where its runs are, which argument names the
# run to continue, and that argument's value for a run folder.


def _versioned_root(args: dict) -> Path:
    """Where a TensorBoard or CSV logger puts its version_N folders (no name: the save_dir itself)."""
    return Path(args.get("save_dir") or ".") / (args.get("name") or "")


def _versioned(args: dict) -> tuple[list[Path], str, callable]:
    root = _versioned_root(args)
    return sorted(root.glob("version_*")), "version", lambda run: int(run.name.removeprefix("version_"))


def _wandb(args: dict) -> tuple[list[Path], str, callable]:
    import os

    project = args.get("project") or os.environ.get("WANDB_PROJECT", "lightning_logs")
    return sorted((Path(args.get("save_dir") or ".") / project).glob("*")), "version", lambda run: run.name


def _mlflow(args: dict) -> tuple[list[Path], str, callable]:
    root = Path(args.get("save_dir") or "./mlruns")
    name = args.get("experiment_name") or "lightning_logs"
    experiments = [meta.parent for meta in root.glob("*/meta.yaml") if f"name: {name}\n" in meta.read_text()]
    return sorted(run for e in experiments for run in e.glob("*") if run.is_dir()), "run_id", lambda run: run.name


RUN_LAYOUTS = {"TensorBoardLogger": _versioned, "CSVLogger": _versioned, "WandbLogger": _wandb, "MLFlowLogger": _mlflow}


def resolve_last(config) -> None:
    """`--ckpt_path last`: resume from the newest last checkpoint among the runs of this config's logger
    and keep logging into that run. (Lightning alone would look in a new, empty run.) With none, the
    run starts from scratch, so one command serves a first start and every restart."""
    logger = config.trainer.logger
    if config.ckpt_path != "last" or config.checkpoint.dirpath or not hasattr(logger, "class_path"):
        return
    layout = RUN_LAYOUTS.get(str(logger.class_path).rsplit(".", 1)[-1])
    if layout is None:
        return
    runs, run_argument, run_id = layout(logger.init_args)
    if logger.init_args.get(run_argument) is not None:
        return  # the user chose the run: Lightning finds last.ckpt in it
    # last.ckpt, or last-vN.ckpt written by an older run whose checkpoint settings changed on resume:
    # the newest of them all, as Lightning picks within one folder
    found = sorted((path for run in runs for path in (run / "checkpoints").glob("last*.ckpt")
                    if LAST_NAME.match(path.name)), key=lambda p: p.stat().st_mtime)
    if found:
        config.ckpt_path = str(found[-1])
        logger.init_args[run_argument] = run_id(found[-1].parent.parent)
        log.info("resuming from %s", found[-1])


CLAIMED_VERSION = "LM_PRETRAIN_RUN_VERSION"  # the version folder the launching process claimed, for its children


def claim_run_folder(config) -> int | None:
    """Give a new TensorBoard or CSV run its version_N folder atomically: created exclusively, the
    next number taken on a clash, and set as the logger's version; returns N (None when nothing was
    claimed). Lightning lists the folders and creates the next one later, in two steps, so two runs
    started at once could both take version_N and one's checkpoints replace the other's. The first
    process claims; the processes Lightning's launcher starts for the other devices inherit its
    number through the environment (torchrun's other ranks need none: Lightning gives them the
    first one's checkpoint folder). The caller keeps N out of the run's saved config.yaml, so that
    a new run started from that file claims a folder of its own."""
    logger = config.trainer.get("logger")
    if not hasattr(logger, "class_path") or RUN_LAYOUTS.get(str(logger.class_path).rsplit(".", 1)[-1]) is not _versioned:
        return None
    args = logger.init_args
    if args.get("version") is not None or "://" in str(args.get("save_dir") or ""):
        return None  # the user chose the run (or resolve_last did); a remote file system is left to Lightning
    if any(os.environ.get(var, "0") != "0" for var in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")):
        if os.environ.get(CLAIMED_VERSION, "").isdigit():
            args["version"] = int(os.environ[CLAIMED_VERSION])
            return args["version"]
        return None
    root = _versioned_root(args)
    created = []  # the folders above it that this claim creates (runs/, runs/NAME/)
    for folder in (root, *root.parents):
        if folder.exists():
            break
        created.append(folder)
    taken = [int(p.name.removeprefix("version_")) for p in root.glob("version_*")
             if p.name.removeprefix("version_").isdigit()]
    version = max(taken, default=-1) + 1
    while True:
        try:
            (root / f"version_{version}").mkdir(parents=True)
            break
        except FileExistsError:  # another run took it a moment ago
            version += 1
        except OSError as err:
            raise UserError(f"cannot create the run folder {root / f'version_{version}'}: {err.strerror or err}") from None
    args["version"] = version
    os.environ[CLAIMED_VERSION] = str(version)
    _claimed.extend([root / f"version_{version}", *created])
    return version


_claimed: list[Path] = []  # run folders this process claimed, each followed by the folders made for it


def release_unused_run_folders() -> None:
    """Remove the run folders this process claimed and left empty (a config refused after the claim,
    e.g. by the model's own checks): a refused run leaves nothing behind."""
    for folder in _claimed:  # deepest first
        try:
            folder.rmdir()  # only if empty
        except OSError:
            pass
    _claimed.clear()


# ---------------------------------------------------------------------------------------------
# Random number generators


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, but whole or absent on any layout of disks: each checkpoint file
    is written beside its final name and renamed into place (lm_pretrain.utils.files.write_atomically).
    Lightning's own writes into a temporary file under $TMPDIR and moves it, which is a copy straight
    into last.ckpt when the runs live on another file system, and a kill during it truncates the only
    checkpoint. The partial files of a killed run are removed at the next save. Object storage
    (s3://...) keeps Lightning's path, where an upload is published whole."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None or storage.is_remote(str(path)):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_orphans(path.parent)
        write_atomically(path, lambda f: torch.save(checkpoint, f), needed_bytes=tensor_bytes(checkpoint))


def tensor_bytes(tree) -> int:
    """The bytes of all tensors in a nested dict/list (a checkpoint's size, near enough)."""
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(tensor_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(tensor_bytes(v) for v in tree)
    return 0


def rng_states() -> dict:
    """This process's Python, NumPy, torch and (when it uses one) its GPU's RNG states, as types that
    torch.load(weights_only=True) accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states = {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                      cached), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()  # its own device's: every other process saves its own
    return states


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        if isinstance(states["cuda"], (list, tuple)):  # checkpoints of before, with every device's
            torch.cuda.set_rng_state_all(states["cuda"])
        else:
            torch.cuda.set_rng_state(states["cuda"])
