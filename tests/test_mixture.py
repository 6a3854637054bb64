"""Weighted mixtures of prepared datasets (`data.mixture`).

Two corpora with disjoint words, so every window of tokens can be traced to the corpus it came from.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from helpers import assert_same_run, attach, callback, ROOT, run_cli, train_args, write_corpus, write_greek_corpus
from lm_pretrain.training.debug import read_records
from lm_pretrain.data.datamodule import TokenDataModule
from lm_pretrain.utils.errors import UserError
from lm_pretrain.data.prepare import prepare
from lm_pretrain.data.readers import find_inputs
from lm_pretrain.tokenizer.encoding import get_tokenizer

WEIGHTS = (0.75, 0.25)


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory) -> dict:
    """Two prepared datasets, and for each the token ids that only it holds."""
    root = tmp_path_factory.mktemp("mixture")
    texts = {"plays": write_corpus(root / "plays-text", sentences=200, seed=1),
             "greek": write_greek_corpus(root / "greek-text")}
    enc = get_tokenizer()
    ids = {name: {t for text in group for t in enc.encode_ordinary(text)} for name, group in texts.items()}
    only = {"plays": ids["plays"] - ids["greek"], "greek": ids["greek"] - ids["plays"]}
    dirs = {}
    for name in texts:
        dirs[name] = root / name
        prepare(find_inputs([str(root / f"{name}-text")]), dirs[name], val_fraction=0.2, workers=1)
    return {"dirs": dirs, "only": only}


def source_of(window: torch.Tensor, only: dict) -> str:
    """The one corpus whose own tokens this window holds (windows span ~5 sentences: each has some)."""
    tokens = set(window.tolist())
    found = [name for name, ids in only.items() if tokens & ids]
    assert len(found) == 1, found
    return found[0]


def mixture(two_datasets, weights=WEIGHTS) -> list[dict]:
    return [{"data_dir": str(two_datasets["dirs"][name]), "weight": w} for name, w in zip(("plays", "greek"), weights)]


def test_training_draws_each_dataset_by_its_weight(two_datasets):
    dm = attach(TokenDataModule(mixture=mixture(two_datasets), batch_size=8))
    dm.setup("fit")
    windows = [w for batch in dm.train_dataloader() for w in batch]  # one epoch: until a dataset runs out
    counts = {"plays": 0, "greek": 0}
    for w in windows:
        counts[source_of(w, two_datasets["only"])] += 1
    assert len(windows) > 800, counts  # enough draws for a +-0.04 tolerance (3.3 standard deviations)
    share = counts["plays"] / len(windows)
    assert abs(share - WEIGHTS[0]) < 0.04, counts
    assert len({tuple(w.tolist()) for w in windows}) == len(windows)  # no window twice in an epoch

    flipped = attach(TokenDataModule(mixture=mixture(two_datasets, weights=(1, 3)), batch_size=8))
    flipped.setup("fit")
    batches = [b for _, b in zip(range(60), flipped.train_dataloader())]
    greek = sum(source_of(w, two_datasets["only"]) == "greek" for b in batches for w in b)
    assert abs(greek / (8 * len(batches)) - 0.75) < 0.06  # weights need not sum to 1


def test_validation_covers_every_val_split_the_same_way_each_time(two_datasets):
    dm = attach(TokenDataModule(mixture=mixture(two_datasets), batch_size=8))
    dm.setup("fit")
    first = [b for b in dm.val_dataloader()]
    again = [b for b in dm.val_dataloader()]
    assert len(first) == len(again) and all(torch.equal(a, b) for a, b in zip(first, again))
    windows = [w for b in first for w in b]
    singles = {}
    for name in ("plays", "greek"):
        single = attach(TokenDataModule(str(two_datasets["dirs"][name]), batch_size=8))
        single.setup("fit")
        singles[name] = len(single.val_dataset)
    assert len(windows) == sum(singles.values())  # all of both val splits, each once
    sources = [source_of(w, two_datasets["only"]) for w in windows]
    assert sources.count("greek") == singles["greek"]
    assert "greek" in sources[:len(sources) // 4]  # interleaved, not one after the other


def test_mixture_arguments_are_checked(two_datasets, tmp_path):
    plays = str(two_datasets["dirs"]["plays"])
    bad = {
        "not both": dict(data_dir=plays, mixture=[{"data_dir": plays, "weight": 1}]),
        "needs a weight greater than 0": dict(mixture=[{"data_dir": plays, "weight": 0}]),
        "needs a data_dir": dict(mixture=[{"weight": 1}]),
        "unknown key.*dir": dict(mixture=[{"dir": plays, "weight": 1}]),
        "names a dataset twice": dict(mixture=[{"data_dir": plays, "weight": 1}] * 2),
        "must be a list": dict(mixture=[]),
    }
    for message, args in bad.items():
        with pytest.raises(UserError, match=message):
            TokenDataModule(**args)

    other = tmp_path / "other-tokenizer"
    shutil.copytree(two_datasets["dirs"]["greek"], other)
    meta = json.loads((other / "metadata.json").read_text())
    (other / "metadata.json").write_text(json.dumps({**meta, "tokenizer": "r50k_base"}))
    dm = attach(TokenDataModule(mixture=[{"data_dir": plays, "weight": 1}, {"data_dir": str(other), "weight": 1}]))
    with pytest.raises(UserError, match="tokenizer 'r50k_base'.*'gpt2'.*same --tokenizer"):
        dm.setup("fit")
    with pytest.raises(UserError, match="nope does not exist"):
        TokenDataModule(mixture=[{"data_dir": plays, "weight": 1}, {"data_dir": str(tmp_path / "nope"), "weight": 1}])


def fit_args(two_datasets, folder: Path, max_steps: int, val_every: int, *extra: str) -> list[str]:
    """train.py fit on the mixture, set in a YAML overlay (instead of --data.data_dir)."""
    overlay = folder / "mixture.yaml"
    overlay.write_text(json.dumps({"data": {"data_dir": None, "mixture": mixture(two_datasets)}}))  # JSON is YAML
    args = train_args("unused", max_steps=max_steps, val_every=val_every)
    at = args.index("--data.data_dir")
    return [*args[:at], *args[at + 2:], "--config", str(overlay), *extra]


@pytest.mark.slow
def test_train_py_fit_with_a_mixture_from_yaml(two_datasets, tmp_path):
    done = run_cli(fit_args(two_datasets, tmp_path, 4, 2), cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt = tmp_path / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=False)
    assert state["global_step"] == 4
    assert state["datamodule_hyper_parameters"]["mixture"] == mixture(two_datasets)
    assert (tmp_path / "runs" / "tiny" / "version_0" / "config.yaml").read_text().count("weight:") == 2


def test_example_overlay_parses_over_tiny(capsys):
    from lm_pretrain.commands.train import run

    with pytest.raises(SystemExit):  # --print_config prints the resolved config and exits
        run(["fit", "--config", str(ROOT / "configs" / "tiny.yaml"), "--config",
             str(ROOT / "configs" / "overlays" / "mixture.yaml"), "--print_config"])
    printed = capsys.readouterr().out
    assert "data_dir: data/shakespeare-bpe2k" in printed and "data_dir: data/other" in printed


@pytest.mark.slow
def test_killed_and_resumed_mixture_run_matches_a_straight_one(two_datasets, tmp_path):
    """The loader's place in the mixture is in the checkpoint, as for one dataset (tests/test_long_runs.py)."""
    def run(folder: Path, *extra: str):
        folder.mkdir(exist_ok=True)
        record = callback("RecordBatches", path=str(folder / "rec"))
        return run_cli(fit_args(two_datasets, folder, 8, 1000, "--trainer.log_every_n_steps", "1",
                                "--checkpoint.every_n_train_steps", "4", record, *extra), cwd=folder, timeout=300)

    assert run(tmp_path / "straight").returncode == 0
    assert run(tmp_path / "resumed", callback("SignalAt", step=6)).returncode == -9  # SIGKILL after step 6
    done = run(tmp_path / "resumed", "--ckpt_path", "last")  # from the step-4 checkpoint
    assert done.returncode == 0, done.stderr[-3000:]
    straight, resumed = read_records(tmp_path / "straight" / "rec"), read_records(tmp_path / "resumed" / "rec")
    assert len(straight) == 8
    assert_same_run(resumed, straight)  # the same batches, the same losses
