"""The presets hold only what differs; lm_pretrain/training/defaults.yaml holds what they share.

Every train.py run reads the defaults file first (lm_pretrain/commands/train.py, `run`), then its --config
files and flags. These tests keep that honest: no preset repeats a default, every shared value
reaches every preset, each preset still resolves to the recipe it had when the shared blocks were
moved out of it (the values pinned below: change them only on purpose, since changing a default
changes every preset), and overlays and flags still compose on top.
"""

import sys

import pytest
import yaml

from helpers import ROOT

DEFAULTS = ROOT / "lm_pretrain" / "training" / "defaults.yaml"
PRESETS = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))
GPU = [p for p in PRESETS if not p.startswith("tiny")]
CPU = [p for p in PRESETS if p.startswith("tiny")]


def leaves(tree: dict, prefix: str = "") -> dict:
    """{"trainer.logger.init_args.name": value, ...}; a list is one value."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(leaves(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def within(resolved, given) -> bool:
    """Whether `resolved` holds `given`: the same values, where a class's spec may also list the
    init_args left at their defaults."""
    if isinstance(given, dict):
        return isinstance(resolved, dict) and all(k in resolved and within(resolved[k], v) for k, v in given.items())
    if isinstance(given, list):
        return isinstance(resolved, list) and len(resolved) == len(given) and all(map(within, resolved, given))
    return resolved == given


def resolve(*args: str, monkeypatch, capsys, subcommand: str = "fit") -> dict:
    """The config train.py would run with, as `--print_config` prints it (in this process)."""
    from lm_pretrain.commands.train import run

    monkeypatch.setattr(sys, "argv", ["train.py"])  # LightningCLI warns when pytest's flags are there too
    with pytest.raises(SystemExit) as done:
        run([subcommand, *args, "--print_config"])
    assert done.value.code in (0, None)
    return leaves(yaml.safe_load(capsys.readouterr().out))


def preset(name: str) -> list[str]:
    return ["--config", str(ROOT / "configs" / f"{name}.yaml")]


def test_there_are_presets_of_both_kinds():
    assert len(GPU) == 9 and len(CPU) == 3


@pytest.mark.parametrize("name", PRESETS)
def test_a_preset_does_not_repeat_a_default(name):
    defaults = leaves(yaml.safe_load(DEFAULTS.read_text()))
    mine = leaves(yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text()))
    assert {key: value for key, value in mine.items() if key in defaults and defaults[key] == value} == {}
    assert "model" not in {key.split(".")[0] for key in defaults}  # lm-pretrain-sizes reads a preset's model alone


@pytest.mark.parametrize("name", PRESETS)
def test_a_preset_resolves_to_its_recipe(name, monkeypatch, capsys):
    resolved = resolve(*preset(name), monkeypatch=monkeypatch, capsys=capsys)
    mine = leaves(yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text()))
    for key, value in leaves(yaml.safe_load(DEFAULTS.read_text())).items():  # the shared values arrive ...
        assert within(resolved[key], mine.get(key, value)), key  # ... unless the preset sets its own
    # What every preset said itself before the shared blocks moved to defaults.yaml:
    pinned = {"seed_everything": 1337, "trainer.num_sanity_val_steps": 0, "trainer.gradient_clip_val": 1.0,
              "trainer.check_val_every_n_epoch": None, "trainer.enable_model_summary": False,
              "trainer.logger.class_path": "lm_pretrain.training.loggers.TensorBoardLogger",
              "trainer.logger.init_args.save_dir": "runs", "trainer.logger.init_args.name": name}
    if name in GPU:
        pinned.update({"trainer.limit_val_batches": 50, "trainer.log_every_n_steps": 20, "trainer.callbacks": [
            {"class_path": "lm_pretrain.training.callbacks.TextSamples",
             "init_args": {"prompts": ["The meaning of life is", "Once upon a time,"], "max_new_tokens": 100,
                           "temperature": 0.8, "top_k": 200, "every_n_steps": 1000, "seed": 1234}}]})
    else:
        pinned.update({"trainer.log_every_n_steps": 10, "trainer.callbacks": [
            {"class_path": "lm_pretrain.training.callbacks.TextSamples",
             "init_args": {"prompts": ["ROMEO:", "To be, or not to be"], "max_new_tokens": 60, "temperature": 0.8,
                           "top_k": 200, "every_n_steps": 1050 if name == "tiny" else 100, "seed": 1234}}]})
    assert {key: resolved[key] for key in pinned} == pinned


def test_validate_reads_the_defaults_too(monkeypatch, capsys):
    resolved = resolve(*preset("tiny"), monkeypatch=monkeypatch, capsys=capsys, subcommand="validate")
    assert resolved["seed_everything"] == 1337 and resolved["trainer.logger.init_args.name"] == "tiny"


def test_a_run_without_a_preset_starts_from_the_defaults(monkeypatch, capsys):
    resolved = resolve("--data.data_dir", "data/shakespeare", monkeypatch=monkeypatch, capsys=capsys)
    defaults = leaves(yaml.safe_load(DEFAULTS.read_text()))
    assert [key for key, value in defaults.items() if not within(resolved[key], value)] == []
    assert [c["class_path"] for c in resolved["trainer.callbacks"]] == ["lm_pretrain.training.callbacks.TextSamples"]


def test_flags_override_the_defaults_and_the_preset(monkeypatch, capsys):
    resolved = resolve(*preset("gpt2-124m"), "--trainer.max_steps", "50", "--trainer.gradient_clip_val", "0.5",
                       "--trainer.callbacks.init_args.every_n_steps", "20", monkeypatch=monkeypatch, capsys=capsys)
    assert resolved["trainer.max_steps"] == 50 and resolved["trainer.gradient_clip_val"] == 0.5
    assert resolved["trainer.callbacks"][0]["init_args"]["every_n_steps"] == 20
    assert resolve(*preset("gpt2-124m"), "--trainer.logger", "false", monkeypatch=monkeypatch,
                   capsys=capsys)["trainer.logger"] is False
    appended = resolve(*preset("tiny"), "--trainer.callbacks+=lm_pretrain.training.callbacks.Preemption",
                       monkeypatch=monkeypatch, capsys=capsys)["trainer.callbacks"]
    assert [c["class_path"].rsplit(".", 1)[1] for c in appended] == ["TextSamples", "Preemption"]


def test_overlays_compose_over_a_preset(monkeypatch, capsys):
    overlay = str(ROOT / "configs" / "overlays" / "{}.yaml")
    fsdp = resolve(*preset("tiny"), "--config", overlay.format("fsdp"), monkeypatch=monkeypatch, capsys=capsys)
    assert fsdp["trainer.strategy.class_path"] == "lm_pretrain.training.strategies.FSDP"
    assert fsdp["model.activation_checkpointing"] is True and fsdp["trainer.precision"] == "32-true"
    csv = resolve(*preset("tiny"), "--config", overlay.format("csv"), "--config", overlay.format("ddp"),
                  monkeypatch=monkeypatch, capsys=capsys)
    assert csv["trainer.logger.class_path"] == "lightning.pytorch.loggers.CSVLogger"
    assert csv["trainer.logger.init_args.name"] == "tiny" and csv["trainer.logger.init_args.save_dir"] == "runs"
    assert csv["trainer.devices"] == 2 and csv["trainer.strategy"] == "ddp"
    assert csv["seed_everything"] == 1337 and csv["trainer.gradient_clip_val"] == 1.0
    # the downstream overlay appends its callback to the preset's, whose settings stay; a flag reaches it
    downstream = resolve(*preset("tiny"), "--config", overlay.format("downstream"), "--trainer.callbacks.init_args.limit",
                         "100", monkeypatch=monkeypatch, capsys=capsys)
    text_samples, evaluation = downstream["trainer.callbacks"]
    assert text_samples["init_args"]["prompts"] == ["ROMEO:", "To be, or not to be"]
    assert evaluation["class_path"] == "lm_pretrain.training.downstream.DownstreamEval"
    assert evaluation["init_args"]["limit"] == 100 and evaluation["init_args"]["every_n_steps"] == 1000


def test_a_missing_defaults_file_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    """jsonargparse would skip a missing default config silently, and every preset would change."""
    from helpers import cli_error
    from lm_pretrain.commands import train as cli

    monkeypatch.setattr(cli, "DEFAULTS_FILE", tmp_path / "defaults.yaml")
    line = cli_error(cli.main, ["fit", "--config", str(ROOT / "configs" / "tiny.yaml"), "--print_config"], capsys)
    assert line == f"error: {tmp_path / 'defaults.yaml'} is missing: reinstall lm-pretrain (the file is package data)"
