"""Reading the checkpoints train.py writes: one file, or (sharded training) a folder of shards.

A sharded checkpoint is a folder with one `.distcp` file per process and `meta.pt` (everything but
the weights and optimizer state). Sampling, export and `init_from` read either kind on one process:
a folder's shards are put together on the fly, no conversion step needed.
"""

import inspect
from pathlib import Path

import torch

from lm_pretrain.errors import UserError
from lm_pretrain.model import GPT, GPTConfig

META_FILE = "meta.pt"  # Lightning's name for the non-tensor part of a sharded checkpoint


def is_sharded(path: Path) -> bool:
    return path.is_dir() and (path / META_FILE).is_file()


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
            if not is_sharded(path):
                raise UserError(f"{what} {path} is a folder but not a sharded checkpoint (it has no {META_FILE})")
            checkpoint = torch.load(path / META_FILE, map_location="cpu", weights_only=False)
            checkpoint["state_dict"] = _gather_shards(path, checkpoint["hyper_parameters"])
            return checkpoint
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
            raise UserError(f"{what} {path} is not a checkpoint written by train.py")
        return checkpoint
    except UserError:
        raise
    except Exception as err:  # torch.load and the shard reader raise many kinds for a bad file
        first_line = str(err).splitlines()[0] if str(err) else "unreadable"
        raise UserError(f"{what} {path} is not a checkpoint of this project ({type(err).__name__}: {first_line})") from None


def _gather_shards(path: Path, hparams: dict) -> dict:
    """The LightningModule state dict of a sharded checkpoint, read into one process's memory."""
    import torch.distributed.checkpoint as dcp

    with torch.device("meta"):  # the shapes, without initialising weights that are about to be replaced
        model = GPT(config_from(hparams))
    model.to_empty(device="cpu")
    state = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}
    dcp.load(state, checkpoint_id=path)  # one process, no process group: reads every shard
    return state["state_dict"]


def config_from(hparams: dict) -> GPTConfig:
    """The GPTConfig that a checkpoint's hyperparameters describe."""
    return GPTConfig(**{k: v for k, v in hparams.items() if k in GPTConfig.__dataclass_fields__})


def model_weights(checkpoint: dict) -> dict:
    """The GPT's own state dict (keys without the LightningModule's "model." prefix)."""
    return {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}


def load_module(path: str | Path, device: str = "cpu"):
    """The LanguageModel saved at `path` (a file or a sharded folder), in eval mode on `device`."""
    from lm_pretrain.module import LanguageModel

    checkpoint = read(path)
    accepted = inspect.signature(LanguageModel).parameters
    hparams = {k: v for k, v in checkpoint["hyper_parameters"].items() if k in accepted}
    try:
        module = LanguageModel(**{**hparams, "compile": False, "init_from": None})
        module.load_state_dict(checkpoint["state_dict"])
    except (TypeError, RuntimeError) as err:
        raise UserError(f"{path} does not hold this project's model ({' '.join(str(err).split())[:300]})") from None
    return module.to(device).eval()
