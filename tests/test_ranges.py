"""Every numeric flag of every entry point is range-checked before any work, in one line, and so
is every flag that takes one of a fixed set of strings (typed `Literal[...]`).

The flags are not listed here: they are read from the entry points' own signatures (and, for
Lightning's settings, from `ranges.TRAINER_RANGES`). A numeric flag without both bounds declared fails
the first test; every declared range is tried just outside its bounds (zero included where it is
out), and every Literal flag with a value not among its choices; each must end in one `error:` line
naming the flag and the value (and the choices), exit status 2, no traceback, and nothing written.
"""

import dataclasses
import math
import types
import typing

import pytest

from helpers import ROOT, cli_error
from lm_pretrain.utils import ranges
from lm_pretrain.training.callbacks import TextSamples
from lm_pretrain.data.datamodule import TokenDataModule
from lm_pretrain.commands.evaluate import evaluate
from lm_pretrain.commands.generate import generate
from lm_pretrain.model import GPTConfig
from lm_pretrain.utils.errors import UserError
from lm_pretrain.training.module import LanguageModel
from lm_pretrain.commands.prepare import prepare_command
from lm_pretrain.data.prepare import CORPORA, Corpus, prepare
from lm_pretrain.data.train_tokenizer import train_tokenizer



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
    "tokenizer": parameters(train_tokenizer),
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


def both_bounds(annotation) -> bool:
    """A lower and an upper bound (a finite float's `< inf` counts: it refuses inf)."""
    ops = {op for op, _ in ranges.restrictions(ranges._first(annotation))}
    return bool(ops & {">", ">="}) and bool(ops & {"<", "<="})


def test_every_numeric_flag_has_both_bounds():
    missing = [f"{entry}: --{flag}" for entry, flags in FLAGS.items() for flag, annotation in flags.items()
               if numeric(annotation) and not (ranges._has_restrictions(annotation) and both_bounds(annotation))]
    assert missing == []
    assert sum(ranges._has_restrictions(a) for flags in FLAGS.values() for a in flags.values()) >= 35


CASES = [(entry, flag, value) for entry, flags in FLAGS.items() for flag, annotation in flags.items()
         if ranges._has_restrictions(annotation) for value in bad_values(annotation)]


@pytest.mark.parametrize("entry,flag,value", CASES, ids=[f"{e}--{f}={v}" for e, f, v in CASES])
def test_out_of_range_values_are_refused_before_any_work(entry, flag, value, prepared, corpus, tmp_path, monkeypatch,
                                                          capsys):
    monkeypatch.chdir(tmp_path)
    text = str(value).replace(" ", "") if not isinstance(value, list) else "[" + ",".join(map(str, value)) + "]"
    main, argv = entry_point(entry, prepared, corpus, tmp_path)
    line = cli_error(main, [*argv, f"--{flag}", text], capsys)
    assert "out of range" in line and flag.rsplit(".", 1)[-1] in line, line
    assert list(tmp_path.iterdir()) == []  # nothing written: no run folder, no output


def is_float(annotation) -> bool:
    restricted = ranges._first(annotation)
    return issubclass(restricted, float)


NONFINITE = [(entry, flag, value) for entry, flags in FLAGS.items() for flag, annotation in flags.items()
             if ranges._has_restrictions(annotation) and is_float(annotation) and typing.get_origin(annotation) is not tuple
             for value in ("nan", "inf")]


@pytest.mark.parametrize("entry,flag,value", NONFINITE, ids=[f"{e}--{f}={v}" for e, f, v in NONFINITE])
def test_nan_and_inf_are_refused_in_every_float_setting(entry, flag, value, prepared, corpus, tmp_path, monkeypatch,
                                                        capsys):
    monkeypatch.chdir(tmp_path)
    main, argv = entry_point(entry, prepared, corpus, tmp_path)
    line = cli_error(main, [*argv, f"--{flag}", value], capsys)
    # (Lightning's val_check_interval also takes a time, "DD:HH:MM:SS": it refuses "nan" as one)
    assert value in line and flag.rsplit(".", 1)[-1] in line and ("out of range" in line or "time format" in line), line
    assert list(tmp_path.iterdir()) == []


def test_nan_and_inf_are_refused_from_python_and_in_betas():
    for value in (math.nan, math.inf):
        with pytest.raises(UserError, match="learning_rate .* must be a finite number > 0"):
            ranges.check(LanguageModel.__init__, {"learning_rate": value}, "model")
        with pytest.raises(UserError, match="betas"):
            ranges.check(LanguageModel.__init__, {"betas": (0.9, value)}, "model")
    assert len(NONFINITE) >= 2 * 12  # every float setting is in the table above


def entry_point(entry: str, prepared, corpus, tmp_path) -> tuple:
    """(main, the arguments of a run that would otherwise start work) of an entry point."""
    from lm_pretrain.commands.train import main as train
    from lm_pretrain.commands.evaluate import main as evaluate_main
    from lm_pretrain.commands.generate import main as generate_main
    from lm_pretrain.commands.prepare import main as prepare_main
    from lm_pretrain.commands.tokenizer import main as tokenizer_main

    return {
        "train": (train, ["fit", "--config", str(ROOT / "configs" / "tiny.yaml"), "--data.data_dir", str(prepared),
                           "--model.vocab_size", "50257"]),
        "prepare": (prepare_main, [str(corpus[0]), "--output", str(tmp_path / "out")]),
        "generate": (generate_main, ["--ckpt_path", str(tmp_path / "absent.ckpt")]),
        "evaluate": (evaluate_main, ["--ckpt_path", str(tmp_path / "absent.ckpt"), "--tasks", "x"]),
        "tokenizer": (tokenizer_main, [str(corpus[0]), "--vocab_size", "300", "--output", str(tmp_path / "tok.json")]),
    }[entry]


# every flag typed Literal[...] (or Literal[...] | None): (entry point, flag, its choices)
CHOICES = [(entry, flag, ranges.choices(annotation)) for entry, flags in FLAGS.items()
           for flag, annotation in flags.items() if ranges.choices(annotation)]


def test_flags_with_fixed_choices_are_literals():
    flags = {(entry, flag) for entry, flag, _ in CHOICES}
    assert {("train", "data.verify"), ("prepare", "encoding_errors"), ("prepare", "corpus")} <= flags
    assert typing.get_args(Corpus) == tuple(CORPORA)  # the names of the built-in corpora, declared once


@pytest.mark.parametrize("entry,flag,allowed", CHOICES, ids=[f"{e}--{f}" for e, f, _ in CHOICES])
def test_a_value_not_among_the_choices_is_refused_before_any_work(entry, flag, allowed, prepared, corpus, tmp_path,
                                                                 monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main, argv = entry_point(entry, prepared, corpus, tmp_path)
    line = cli_error(main, [*argv, f"--{flag}", "nope"], capsys)
    optional = type(None) in typing.get_args(FLAGS[entry][flag])
    choices = ", ".join(allowed) + (", or null" if optional else "")
    named = flag.replace("trainer.callbacks.init_args.", "trainer.callbacks (TextSamples) ")
    assert line.startswith(f"error: --{named} 'nope' is not one of {choices} (see ") and line.endswith("--help)"), line
    assert list(tmp_path.iterdir()) == []  # nothing written: no run folder, no output


def test_one_line_for_a_refused_yes_or_no(prepared, corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    train, argv = entry_point("train", prepared, corpus, tmp_path)
    assert cli_error(train, [*argv, "--model.compile", "maybe"], capsys).startswith(
        "error: --model.compile 'maybe' is not one of true, false (see python train.py fit --help)")
    assert cli_error(train, [*argv, "--trainer.enable_progress_bar", "maybe"], capsys).startswith(
        "error: --trainer.enable_progress_bar 'maybe' is not one of true, false, or null (see ")
    prepare_main, argv = entry_point("prepare", prepared, corpus, tmp_path)
    assert cli_error(prepare_main, [*argv, "--overwrite", "maybe"], capsys) == \
        "error: --overwrite 'maybe' is not one of true, false (see lm-pretrain-prepare --help)"
    # a setting that takes a class too (or false) keeps jsonargparse's own message, on one line
    assert 'Parser key "trainer.logger"' in cli_error(train, ["fit", "--trainer.logger", "maybe"], capsys)


def test_python_calls_refuse_a_value_not_among_the_choices(prepared, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"^--data.verify 'md5' is not one of sha256, size, none$"):
        TokenDataModule(data_dir=str(prepared), verify="md5")
    with pytest.raises(UserError, match=r"^--encoding_errors 'latin-1' is not one of strict, replace, skip$"):
        prepare([], tmp_path / "out", encoding_errors="latin-1")
    with pytest.raises(UserError, match=r"^--corpus 'wikipedia' is not one of shakespeare, or null$"):
        prepare_command(str(tmp_path / "out"), corpus="wikipedia")
    assert list(tmp_path.iterdir()) == []
    TokenDataModule(data_dir=str(prepared), verify="size")  # each choice is accepted as it is
    ranges.check(prepare_command, {"corpus": None, "encoding_errors": "skip"}, "")


def test_help_lists_the_choices(capsys):
    from lm_pretrain.commands.train import main as train
    from lm_pretrain.commands.prepare import main as prepare_main

    for main, argv in ((prepare_main, ["--help"]), (train, ["fit", "--help"])):
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code in (0, None)
    printed = " ".join(capsys.readouterr().out.split())
    assert "--encoding_errors {strict,replace,skip}" in printed
    assert "Optional[Literal['shakespeare']]" in printed  # --corpus: one of them, or none
    assert "--data.verify {sha256,size,none}" in printed
