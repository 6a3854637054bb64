"""Fixtures: a small synthetic corpus, a prepared copy of it, and a tiny training run (helpers.py
holds the functions they use).

Everything is sized for a 2-core CPU: the tiny model keeps GPT-2's 50,257-token vocabulary (the
real tokenizer) but is narrow and short, so a step takes milliseconds.
"""

import subprocess
from pathlib import Path

import pytest

from helpers import run_cli, train_args, write_corpus


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    folder = tmp_path_factory.mktemp("corpus")
    return folder, write_corpus(folder)


@pytest.fixture(scope="session")
def prepared(corpus, tmp_path_factory) -> Path:
    from lm_pretrain.data.prepare import prepare
    from lm_pretrain.data.readers import find_inputs

    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare(find_inputs([str(corpus[0])]), out, val_fraction=0.2, workers=2, seed=0)
    return out


@pytest.fixture(scope="session")
def trained_run(prepared, tmp_path_factory) -> dict:
    """One tiny `train.py fit` run shared by the end-to-end and notebook tests."""
    workdir = tmp_path_factory.mktemp("train")
    # text samples to TensorBoard every 20 steps (the last callback in tiny.yaml is TextSamples)
    done = run_cli([*train_args(prepared), "--trainer.callbacks.init_args.every_n_steps", "20"], cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    log_dir = workdir / "runs" / "tiny" / "version_0"
    return {"workdir": workdir, "log_dir": log_dir, "ckpt": log_dir / "checkpoints" / "last.ckpt",
            "stdout": done.stdout, "stderr": done.stderr, "data": prepared}


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs at tmp_path/disk (root only; skipped where mounting is not allowed)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)
