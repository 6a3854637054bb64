"""The entry points built on lm_pretrain.commands.parsing: a yes/no option is a switch.

`--overwrite` alone means true; `--overwrite true`, `--overwrite false` and `overwrite: true` in a
--config file work as before, and a wrong flag or value is still one `error:` line, exit status 2.
Run in this process, through each entry point's own `main` or parser.
"""

import inspect
import typing

import pytest

from helpers import ROOT, cli_error
from lm_pretrain.commands import parsing as commands
from lm_pretrain.commands.evaluate import evaluate
from lm_pretrain.commands.export import export
from lm_pretrain.commands.generate import generate
from lm_pretrain.commands.prepare import prepare_command
from lm_pretrain.commands.sizes import sizes

# every function behind an entry point of lm_pretrain.commands.parsing
ENTRY_POINTS = {"lm-pretrain-prepare": prepare_command, "lm-pretrain-generate": generate,
                "lm-pretrain-export": export, "lm-pretrain-evaluate": evaluate, "lm-pretrain-sizes": sizes}
SWITCHES = [(prog, name) for prog, function in ENTRY_POINTS.items()
            for name, hint in typing.get_type_hints(function).items() if hint is bool]


def required_args(function) -> list[str]:
    return [arg for name, p in inspect.signature(function).parameters.items() if p.default is inspect.Parameter.empty
            for arg in (f"--{name}", "x")]


def test_the_entry_points_have_switches():
    assert {("lm-pretrain-prepare", "overwrite"), ("lm-pretrain-export", "overwrite"),
            ("lm-pretrain-generate", "stop_at_eot")} <= set(SWITCHES)


@pytest.mark.parametrize("prog,name", SWITCHES, ids=[f"{p}--{n}" for p, n in SWITCHES])
@pytest.mark.parametrize("given,expected", [([], None), (["{flag}"], True), (["{flag}", "true"], True),
                                            (["{flag}", "false"], False), (["{flag}=yes"], True),
                                            (["{flag}", "--{other}", "x"], True)],
                         ids=["absent", "bare", "true", "false", "equals", "bare-then-a-flag"])
def test_every_bool_option_is_a_switch(prog, name, given, expected):
    function = ENTRY_POINTS[prog]
    parser = commands.command_parser(prog, function)
    other = next(n for n in inspect.signature(function).parameters if n != name)
    args = [a.format(flag=f"--{name}", other=other) for a in given]
    parsed = commands.parse(parser, [*required_args(function), *args])
    default = inspect.signature(function).parameters[name].default
    assert parsed[name] is (default if expected is None else expected)


def test_a_config_file_sets_a_switch(tmp_path):
    parser = commands.command_parser("lm-pretrain-generate", generate)
    config = tmp_path / "sample.yaml"
    config.write_text("ckpt_path: run.ckpt\nstop_at_eot: false\n")
    assert commands.parse(parser, ["--config", str(config)]).stop_at_eot is False
    assert commands.parse(parser, ["--config", str(config), "--stop_at_eot"]).stop_at_eot is True  # the flag wins
    config.write_text("ckpt_path: run.ckpt\nstop_at_eot: maybe\n")
    with pytest.raises(commands.UserError, match=r"^--stop_at_eot 'maybe' is not one of true, false \(see "):
        commands.parse(parser, ["--config", str(config)])


@pytest.fixture
def existing_file_output(tmp_path):
    """A text input, and an output path that is a file: refused in one line, differently with and
    without --overwrite, before any work (which shows what --overwrite was parsed as)."""
    (tmp_path / "in.txt").write_text("To be, or not to be.\n")
    (tmp_path / "out").write_text("a file")
    return tmp_path / "in.txt", tmp_path / "out"


@pytest.mark.parametrize("given,overwrite", [([], False), (["--overwrite"], True), (["--overwrite", "true"], True),
                                             (["--overwrite", "false"], False), (["--overwrite", "--seed", "3"], True),
                                             (["--config", "{yaml_true}"], True),
                                             (["--config", "{yaml_true}", "--overwrite", "false"], False)],
                         ids=["absent", "bare", "true", "false", "bare-then-a-flag", "yaml", "yaml-then-false"])
def test_prepare_overwrite(given, overwrite, existing_file_output, tmp_path, capsys):
    """`lm-pretrain-prepare INPUT --output OUT --overwrite`: the switch last, after the INPUT."""
    from lm_pretrain.commands.prepare import main

    (tmp_path / "overwrite.yaml").write_text("overwrite: true\n")
    source, out = existing_file_output
    args = [a.format(yaml_true=tmp_path / "overwrite.yaml") for a in given]
    line = cli_error(main, [str(source), "--output", str(out), *args], capsys)
    assert line == (f"error: --output {out}: exists and is not a folder" if overwrite else
                    f"error: output {out} already exists; pass --overwrite to replace it")


@pytest.mark.parametrize("given,overwrite", [([], False), (["--overwrite"], True), (["--overwrite", "false"], False)],
                         ids=["absent", "bare", "false"])
def test_export_overwrite(given, overwrite, existing_file_output, capsys):
    from lm_pretrain.commands.export import main

    _, out = existing_file_output
    line = cli_error(main, ["--ckpt_path", "run.ckpt", "--output", str(out), *given], capsys)
    assert line == (f"error: --output {out}: exists and is not a folder" if overwrite else
                    f"error: output {out} already exists; pass --overwrite to replace it")


@pytest.mark.parametrize("given,stop", [([], True), (["--stop_at_eot"], True), (["--stop_at_eot", "false"], False),
                                        (["--stop_at_eot", "false", "--prompt", "false"], False)],
                         ids=["absent", "bare", "false", "false-and-a-prompt-of-false"])
def test_generate_stop_at_eot(given, stop, monkeypatch):
    """Through generate's main to the sampler; a text option keeps the word false as its text."""
    import lm_pretrain.commands.generate as generate_module
    import lm_pretrain.model.sampling

    calls = []
    monkeypatch.setattr(generate_module, "load_model", lambda ckpt, device: "model")
    monkeypatch.setattr(lm_pretrain.model.sampling, "sample", lambda model, prompt, *args: calls.append((prompt, args[-1])) or "")
    generate_module.main(["--ckpt_path", "run.ckpt", *given])
    assert calls == [("false" if "--prompt" in given else "", stop)]


@pytest.mark.parametrize("prog,function", ENTRY_POINTS.items(), ids=list(ENTRY_POINTS))
def test_an_unknown_flag_is_one_line_exit_2(prog, function, capsys):
    import importlib

    module = importlib.import_module(function.__module__)
    assert cli_error(module.main, [*required_args(function), "--no_such_flag"], capsys) == \
        f"error: unrecognized arguments: --no_such_flag (see {prog} --help)"


def test_help_shows_a_switch(capsys):
    from lm_pretrain.commands.prepare import main

    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code in (0, None)
    printed = " ".join(capsys.readouterr().out.split())
    assert "[--overwrite [{true,false}]]" in printed  # the usage line: the value may be left out
    assert "--overwrite [{true,false}] replace OUTPUT if it exists (only once the new one is complete); never an input. " \
           "(type: bool, default: False)" in printed


def test_reading_configs_imports_no_torch():
    """lm-pretrain-sizes and GPTConfig read configs without torch (seconds to import); GPT brings it."""
    import subprocess
    import sys

    code = ("import sys, lm_pretrain.commands.sizes, lm_pretrain.model; print('torch' in sys.modules); "
            "lm_pretrain.model.GPT; print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.stdout.split() == ["False", "True"], done.stderr[-2000:]

