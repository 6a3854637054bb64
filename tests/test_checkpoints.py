"""lm_pretrain.checkpoints: reading a checkpoint (or refusing it in one line), checking its
architecture, finding the last one of a run, and the RNG states saved in it."""

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from jsonargparse import Namespace

from helpers import tiny_checkpoint
from lm_pretrain.checkpoints import (LAST, check_architecture, read, read_hyperparameters, resolve_last, rng_states,
                                     set_rng_states)
from lm_pretrain.errors import UserError
from lm_pretrain.module import LanguageModel

TINY = dict(vocab_size=300, block_size=16, n_layer=1, n_head=2, n_embd=16)
TINY_ROPE_BASE = dict(vocab_size=50257, block_size=16, n_layer=2, n_head=2, n_embd=32)


def test_what_is_not_a_checkpoint_is_refused_in_one_line(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read(tmp_path / "missing.ckpt")
    (tmp_path / "garbage.ckpt").write_bytes(b"not a pickle at all")
    with pytest.raises(UserError, match="garbage.ckpt is not a checkpoint of this project"):
        read(tmp_path / "garbage.ckpt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.ckpt")
    with pytest.raises(UserError, match="other.ckpt is not a checkpoint written by train.py"):
        read(tmp_path / "other.ckpt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(UserError, match="is a folder but not a sharded checkpoint"):
        read_hyperparameters(tmp_path / "folder")


def test_a_saved_module_reads_back_whole(tmp_path):
    module, path = tiny_checkpoint(tmp_path / "m.ckpt", steps=1, **TINY)
    assert read(path)["global_step"] == 1 and read_hyperparameters(path)["hyper_parameters"]["n_embd"] == 16
    loaded = LanguageModel.from_checkpoint(path)
    assert not loaded.training and all(torch.equal(a, b) for a, b in zip(loaded.parameters(), module.parameters()))


@pytest.mark.parametrize("field,value", [("rope_theta", 500000.0), ("norm_eps", 1e-6), ("n_kv_head", 1)])
def test_a_checkpoint_of_another_architecture_is_refused(field, value):
    saved = LanguageModel(**{**TINY_ROPE_BASE, "position": "rope"}).hparams
    check_architecture(saved, LanguageModel(**{**TINY_ROPE_BASE, "position": "rope", "dropout": 0.1}).config, "checkpoint")
    with pytest.raises(UserError, match=f"another architecture: {field}="):
        check_architecture(saved, LanguageModel(**{**TINY_ROPE_BASE, "position": "rope", field: value}).config, "checkpoint")


def run_config(save_dir: Path, ckpt_path: str = "last") -> Namespace:
    logger = Namespace(class_path="lightning.pytorch.loggers.TensorBoardLogger",
                       init_args=Namespace(save_dir=str(save_dir), name="tiny", version=None))
    return Namespace(ckpt_path=ckpt_path, checkpoint=Namespace(dirpath=None), trainer=Namespace(logger=logger))


def test_ckpt_path_last_resumes_the_newest_run_and_logs_into_it(tmp_path):
    for version, age in ((0, 100), (1, 10), (2, None)):  # version_2 has no checkpoint yet
        folder = tmp_path / "tiny" / f"version_{version}" / "checkpoints"
        folder.mkdir(parents=True)
        if age is not None:
            (folder / LAST).write_bytes(b"x")
            stamp = (folder / LAST).stat().st_mtime - age
            os.utime(folder / LAST, (stamp, stamp))
    config = run_config(tmp_path)
    resolve_last(config)
    assert config.ckpt_path == str(tmp_path / "tiny" / "version_1" / "checkpoints" / LAST)
    assert config.trainer.logger.init_args.version == 1
    fresh = run_config(tmp_path / "elsewhere")
    resolve_last(fresh)  # no run yet: start from scratch with the same command
    assert fresh.ckpt_path == "last" and fresh.trainer.logger.init_args.version is None


def test_rng_states_survive_a_weights_only_round_trip(tmp_path):
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    torch.save(rng_states(), tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    set_rng_states(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]
