"""What the tests share: a synthetic corpus, running the entry points as a user would, and
callbacks that tests add to train.py runs with --trainer.callbacks+=... (tests/ is on PYTHONPATH;
the probes that bench/ uses too, RecordBatches and SignalAt, are in lm_pretrain/training/debug.py).

Fixtures live in conftest.py; everything else a test file needs from another lives here.
"""

import atexit
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch

from lm_pretrain.training import debug

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


GREEK = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "kappa", "lambda", "sigma", "omega"]
NUMBERS = ["seven", "eleven", "ninety", "twelve", "forty", "three"]


def write_greek_corpus(folder: Path, documents: int = 24, sentences: int = 200) -> list[str]:
    rng, texts = random.Random(1), []
    folder.mkdir(parents=True)
    for i in range(documents):
        text = "\n".join(f"{rng.choice(GREEK).capitalize()} {rng.choice(NUMBERS)} {rng.choice(GREEK)} "
                         f"{rng.choice(NUMBERS)}." for _ in range(sentences)) + "\n"
        (folder / f"greek{i:02d}.txt").write_text(text)
        texts.append(text)
    return texts


# tiny.yaml's model made smaller, over GPT-2's vocabulary: the data the tests prepare is GPT-2's
TINY_MODEL = ["--model.block_size", "32", "--model.n_layer", "2", "--model.n_head", "2",
              "--model.n_embd", "32", "--model.learning_rate", "0.01", "--model.warmup_steps", "5"]


_warm = None


def env() -> dict:
    """The environment of the commands the tests run: this one, with the checkout and tests/
    (helpers.py's callbacks) on PYTHONPATH, and one intra-op thread per process, set here for every
    process a test starts: rounding depends on the count, and one is what each of 2 DDP processes
    on 2 cores gets (torchrun leaves the variable unset, and a lone process would take both cores),
    so the bitwise comparisons hold whatever the launcher and the load (assert_same_run)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1"}


def assert_same_run(got: list[dict], want: list[dict]) -> None:
    """Bitwise the same RecordBatches records: the same steps, batches and losses. The thread counts
    recorded beside them are compared first, so that a mismatch fails by name."""
    def threads(rows):
        return sorted({(r["rank"], r["threads"]) for r in rows})

    assert threads(got) == threads(want), f"intra-op thread counts (rank, threads) differ: {threads(got)} against " \
                                          f"{threads(want)}; rounding depends on them (helpers.env)"
    assert got == want


def python() -> str:
    """The interpreter for the commands the tests run: tests/warm.py's client (a new process that
    finds torch and Lightning imported), or sys.executable with TESTS_WARM=0."""
    global _warm
    if os.environ.get("TESTS_WARM", "1") == "0" or len(sys.executable) > 120 or any(c.isspace() for c in sys.executable):
        return sys.executable  # (the client's first line, #!PYTHON, must be short and unquoted)
    if _warm is None:
        from warm import WarmServer

        _warm = WarmServer(["lm_pretrain.commands.train"], env())
        atexit.register(_warm.close)
    return _warm.client


def run_cli(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python ARGS` in a new process, as a user would from a shell."""
    return subprocess.run([python(), *args], cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)


def train_args(data_dir: Path, max_steps: int = 60, val_every: int = 20, config: str = "tiny") -> list[str]:
    return [str(ROOT / "train.py"), "fit", "--config", str(ROOT / "configs" / f"{config}.yaml"),
            "--data.data_dir", str(data_dir), "--data.batch_size", "8", *TINY_MODEL,
            "--trainer.max_steps", str(max_steps), "--trainer.val_check_interval", str(val_every),
            "--trainer.limit_val_batches", "4", "--trainer.log_every_n_steps", "5",
            "--trainer.enable_progress_bar", "false"]


def callback(name: str, **init_args) -> str:
    """The train.py flag that adds callback `name`: lm_pretrain.training.debug's (RecordBatches, SignalAt) or
    one of this file's."""
    module = "lm_pretrain.training.debug" if hasattr(debug, name) else "helpers"
    return "--trainer.callbacks+=" + json.dumps({"class_path": f"{module}.{name}", "init_args": init_args})


def run_args(data: Path, steps: int, record: Path, every: int = 4, extra: tuple = ()) -> list[str]:
    """A run whose records (RecordBatches) a resumed or relaunched run must reproduce bit for bit:
    dropout draws random numbers, and each process draws its own (RankDraws)."""
    return [*train_args(data, max_steps=steps, val_every=1000), "--trainer.log_every_n_steps", "1",
            "--checkpoint.every_n_train_steps", str(every), "--model.dropout", "0.1",
            callback("RecordBatches", path=str(record)), callback("RankDraws"), *extra]


def last_line(done) -> str:
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return done.stderr.strip().splitlines()[-1]


def one_line_error(done) -> str:
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("error: "), line
    return line


def cli_error(main, argv: list[str], capsys, status: int = 2, starts: str = "error: ") -> str:
    """Run an entry point's main in this process; it must exit with `status` and one line on stderr
    that starts with `starts` (what a user sees last), no traceback. Returns that line."""
    import pytest

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == status, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    line = err.splitlines()[-1]
    assert line.startswith(starts), line
    return line


def interrupted_at(monkeypatch, target, name: str, main, argv: list[str], capsys) -> str:
    """Run an entry point's main in this process with `target.name` raising KeyboardInterrupt (Ctrl-C
    at that moment); it must exit 130 with one `error: interrupted` line. Returns that line."""

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(target, name, ctrl_c)
        return cli_error(main, argv, capsys, status=130, starts="error: interrupted")


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def tiny_checkpoint(path: Path, steps: int = 2, seed: int = 0, **model_args):
    """(module, path): a small LanguageModel trained `steps` steps on fixed random tokens (so no weight
    is at its initial value) and saved by Lightning at `path`, as train.py saves one."""
    from torch.utils.data import DataLoader

    from lm_pretrain.training.module import LanguageModel

    L.seed_everything(seed)
    module = LanguageModel(**{"block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32, "warmup_steps": 1,
                              **model_args})
    tokens = torch.randint(0, module.config.vocab_size, (4, module.config.block_size + 1))
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, DataLoader([(tokens[:, :-1], tokens[:, 1:])] * steps, batch_size=None))
    trainer.save_checkpoint(path)
    return module, Path(path)


def attach(dm, **model_args):
    """A TokenDataModule wired to a Trainer and a small model, as Lightning would before setup."""
    from lm_pretrain.training.module import LanguageModel

    module = LanguageModel(**{"block_size": 32, "n_layer": 1, "n_head": 1, "n_embd": 8, **model_args})
    trainer = L.Trainer(logger=False, max_steps=1)
    trainer.strategy.connect(module)
    dm.trainer = trainer
    return dm


# ---------------------------------------------------------------------------------------------
# Callbacks for train.py runs


class PoisonAt(L.Callback):
    """Make the final norm's weights NaN before optimizer step `step`: the loss is NaN from there.
    With restore, put them back after that batch (only that one batch's loss is NaN)."""

    def __init__(self, step: int, restore: bool = False):
        self.step, self.restore, self.saved = step, restore, None

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and self.saved is None:
            with torch.no_grad():
                self.saved = module.model.ln_f.weight.clone()
                module.model.ln_f.weight.fill_(float("nan"))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.restore and self.saved is not None:
            with torch.no_grad():
                module.model.ln_f.weight.copy_(self.saved)
            self.restore = False


class RankDraws(L.Callback):
    """Process r draws r + 1 numbers as training starts, so that each process's generator is in a
    state of its own, as each GPU's generator is: a resume must give every process back its own."""

    def on_train_start(self, trainer, module) -> None:
        torch.rand(trainer.global_rank + 1)


class ReadLossEveryStep(L.Callback):
    """Reads the loss back to the host after every batch, as careless code would (a host sync)."""

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if outputs:
            float(outputs["loss"])


class SaveFullWeights(L.Callback):
    """At the end of training (or at its start), gather the model's whole weights (also when sharded)
    and save them to `path` from the first process: what a sharded checkpoint of the same step must
    hold."""

    def __init__(self, path: str, at_start: bool = False):
        self.path, self.at_start = path, at_start

    def on_train_start(self, trainer, module) -> None:
        if self.at_start:
            self.save(trainer, module)

    def on_train_end(self, trainer, module) -> None:
        if not self.at_start:
            self.save(trainer, module)

    def save(self, trainer, module) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if trainer.global_rank == 0:
            torch.save(state, self.path)
