"""Shared test helpers: a small synthetic corpus, a prepared copy of it, and a tiny training run.

Everything is sized for a 2-core CPU: the tiny model keeps GPT-2's 50,257-token vocabulary (the
real tokenizer) but is narrow and short, so a step takes milliseconds.
"""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

WORDS = {
    "subject": ["the king", "the queen", "a fool", "my lord", "the duke", "sweet Juliet", "good Romeo"],
    "verb": ["loves", "fears", "calls", "follows", "betrays", "praises", "forgives"],
    "object": ["the crown", "his brother", "the night", "her father", "the sea", "a rose", "the moon"],
}


def make_document(rng: random.Random, sentences: int) -> str:
    lines = []
    for _ in range(sentences):
        s, v, o = (rng.choice(WORDS[k]) for k in ("subject", "verb", "object"))
        lines.append(f"{s.capitalize()} {v} {o}.")
    return "\n".join(lines) + "\n"


def write_corpus(folder: Path, n_txt: int = 12, n_jsonl: int = 12, sentences: int = 60, seed: int = 0) -> list[str]:
    """n_txt .txt files and one .jsonl file with n_jsonl records; returns all documents' texts."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    docs = []
    for i in range(n_txt):
        text = make_document(rng, sentences)
        (folder / f"doc{i:02d}.txt").write_text(text)
        docs.append(text)
    with open(folder / "more.jsonl", "w") as f:
        for _ in range(n_jsonl):
            text = make_document(rng, sentences)
            f.write(json.dumps({"text": text, "id": len(docs)}) + "\n")
            docs.append(text)
    return docs


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    folder = tmp_path_factory.mktemp("corpus")
    return folder, write_corpus(folder)


@pytest.fixture(scope="session")
def prepared(corpus, tmp_path_factory) -> Path:
    from lm_pretrain.prepare import find_inputs, prepare

    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare(find_inputs([str(corpus[0])]), out, val_fraction=0.2, workers=2, seed=0)
    return out


TINY_MODEL = ["--model.block_size", "32", "--model.n_layer", "2", "--model.n_head", "2", "--model.n_embd", "32",
              "--model.learning_rate", "0.01", "--model.warmup_steps", "5"]


def run_cli(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python ARGS` in a fresh interpreter, as a user would from a shell."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}  # tests: helpers.py
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def train_args(data_dir: Path, max_steps: int = 60, val_every: int = 20, config: str = "tiny") -> list[str]:
    return [str(ROOT / "train.py"), "fit", "--config", str(ROOT / "configs" / f"{config}.yaml"),
            "--data.data_dir", str(data_dir), "--data.batch_size", "8", *TINY_MODEL,
            "--trainer.max_steps", str(max_steps), "--trainer.val_check_interval", str(val_every),
            "--trainer.limit_val_batches", "4", "--trainer.log_every_n_steps", "5",
            "--trainer.enable_progress_bar", "false"]


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
