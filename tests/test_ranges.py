"""Every numeric flag of every entry point is range-checked before any work, in one line.

The flags are not listed here: they are read from the entry points' own signatures (and, for
Lightning's settings, from `ranges.TRAINER_RANGES`). A numeric flag without a declared range fails
the first test; every declared range is tried just outside its bounds (zero included where it is
out) and must end in one `error:` line naming the flag and the value, exit status 2, no traceback,
and nothing written.
"""

import dataclasses
import math
import types
import typing

import pytest

from helpers import ROOT, cli_error
from lm_pretrain import ranges
from lm_pretrain.callbacks import TextSamples
from lm_pretrain.data import TokenDataModule
from lm_pretrain.evaluate import evaluate
from lm_pretrain.generate import generate
from lm_pretrain.model import GPTConfig
from lm_pretrain.module import LanguageModel
from lm_pretrain.prepare import prepare_command

UNRESTRICTED = {"seed"}  # any integer is a seed


def parameters(function, skip=("self", "architecture")) -> dict:
    hints = typing.get_type_hints(function)
    return {name: hint for name, hint in hints.items() if name not in skip and name != "return"}


# entry point -> {flag: its type}, from the signatures behind the flags
FLAGS = {
    "train": {**{f"model.{k}": v for k, v in parameters(LanguageModel.__init__).items()},
              **{f"model.{f.name}": f.type for f in dataclasses.fields(GPTConfig)},
              **{f"data.{k}": v for k, v in parameters(TokenDataModule.__init__).items()},
              **{f"trainer.callbacks.init_args.{k}": v for k, v in parameters(TextSamples.__init__).items()},
              **ranges.TRAINER_RANGES},
    "prepare": parameters(prepare_command),
    "generate": parameters(generate),
    "evaluate": parameters(evaluate),
}


def numeric(annotation) -> bool:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, tuple):
        return any(numeric(a) for a in typing.get_args(annotation))
    return isinstance(annotation, type) and issubclass(annotation, (int, float)) and annotation is not bool


def bad_values(annotation) -> list:
    """Values just outside each bound of the range (as ints for an int type)."""
    restricted = ranges._first(annotation)
    integer = issubclass(restricted, int)
    values = []
    for op, bound in ranges.restrictions(restricted):
        step = 1 if integer else 0.5
        values += {">": [bound, bound - step], ">=": [bound - step], "<": [bound, bound + step],
                   "<=": [bound + step]}[op]
    values = [int(v) if integer else float(v) for v in values if math.isfinite(v)]
    if typing.get_origin(annotation) is tuple or any(typing.get_origin(a) is tuple for a in typing.get_args(annotation)):
        values = [[values[0]] + [0.5] * (len(typing.get_args(annotation)) - 1)] + [[v, 0.5] for v in values[1:]]
    return values


def test_every_numeric_flag_has_a_range():
    missing = [f"{entry}: --{flag}" for entry, flags in FLAGS.items() for flag, annotation in flags.items()
               if numeric(annotation) and not ranges._has_restrictions(annotation)
               and flag.rsplit(".", 1)[-1] not in UNRESTRICTED]
    assert missing == []
    assert sum(ranges._has_restrictions(a) for flags in FLAGS.values() for a in flags.values()) >= 35


CASES = [(entry, flag, value) for entry, flags in FLAGS.items() for flag, annotation in flags.items()
         if ranges._has_restrictions(annotation) for value in bad_values(annotation)]


@pytest.mark.parametrize("entry,flag,value", CASES, ids=[f"{e}--{f}={v}" for e, f, v in CASES])
def test_out_of_range_values_are_refused_before_any_work(entry, flag, value, prepared, corpus, tmp_path, monkeypatch,
                                                          capsys):
    from lm_pretrain.cli import main as train
    from lm_pretrain.evaluate import main as evaluate_main
    from lm_pretrain.generate import main as generate_main
    from lm_pretrain.prepare import main as prepare_main

    monkeypatch.chdir(tmp_path)
    text = str(value).replace(" ", "") if not isinstance(value, list) else "[" + ",".join(map(str, value)) + "]"
    main, argv = {
        "train": (train, ["fit", "--config", str(ROOT / "configs" / "tiny.yaml"), "--data.data_dir", str(prepared)]),
        "prepare": (prepare_main, [str(corpus[0]), "--output", str(tmp_path / "out")]),
        "generate": (generate_main, ["--ckpt_path", str(tmp_path / "absent.ckpt")]),
        "evaluate": (evaluate_main, ["--ckpt_path", str(tmp_path / "absent.ckpt"), "--tasks", "x"]),
    }[entry]
    line = cli_error(main, [*argv, f"--{flag}", text], capsys)
    assert "out of range" in line and flag.rsplit(".", 1)[-1] in line, line
    assert list(tmp_path.iterdir()) == []  # nothing written: no run folder, no output
