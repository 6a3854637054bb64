"""Optional packages (pyproject.toml's extras): a command that needs one that is missing ends with one
`error: ... pip install 'lm-pretrain[EXTRA]'` line and exit status 2. A missing package is simulated
in-process: `sys.modules[name] = None` makes `import name` raise ImportError."""

import sys

import pytest

from helpers import ROOT, cli_error
from lm_pretrain.utils.errors import UserError
from lm_pretrain.utils.extras import require


def test_require_returns_the_module_when_it_is_there():
    import json

    assert require("json", "dev", "this test") is json


@pytest.mark.parametrize("module", ["transformers", "pyarrow.parquet"])
def test_require_names_the_extra_of_a_missing_package(module, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(UserError) as err:
        require(module, "export", "lm-pretrain-export")
    package = module.partition(".")[0]
    assert str(err.value) == f"lm-pretrain-export needs {package}, which is not installed: pip install 'lm-pretrain[export]'"


def test_require_tells_a_broken_install_from_a_missing_one(tmp_path, monkeypatch):
    (tmp_path / "half_installed.py").write_text("import its_missing_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError) as err:
        require("half_installed", "eval", "lm-pretrain-evaluate", "half-installed")
    message = str(err.value)
    assert message.startswith("lm-pretrain-evaluate needs half-installed, which failed to import (ModuleNotFoundError: ")
    assert "its_missing_dependency" in message and message.endswith("pip install 'lm-pretrain[eval]'")
    assert "\n" not in message


@pytest.mark.parametrize("missing", ["transformers", "safetensors"])
def test_export_without_its_extra(missing, tmp_path, monkeypatch, capsys):
    from lm_pretrain.commands import export

    monkeypatch.setitem(sys.modules, missing, None)
    line = cli_error(export.main, ["--ckpt_path", str(tmp_path / "any.ckpt"), "--output", str(tmp_path / "hf")], capsys)
    # (transformers itself imports safetensors: when it is not loaded yet, it is what fails to import)
    assert line.startswith("error: lm-pretrain-export needs ") and missing in line
    assert line.endswith("pip install 'lm-pretrain[export]'")
    assert not (tmp_path / "hf").exists()


def test_evaluate_without_its_extra(tmp_path, monkeypatch, capsys):
    from lm_pretrain.commands import evaluate

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    line = cli_error(evaluate.main, ["--ckpt_path", str(tmp_path / "any.ckpt"), "--tasks", "hellaswag"], capsys)
    assert line == "error: lm-pretrain-evaluate needs lm-eval, which is not installed: pip install 'lm-pretrain[eval]'"


@pytest.mark.parametrize("overlay, module, message", [
    ("wandb", "wandb", "--trainer.logger WandbLogger needs wandb"),
    ("mlflow", "mlflow", "--trainer.logger MLFlowLogger needs mlflow-skinny"),
])
def test_logger_overlay_without_its_extra(overlay, module, message, tmp_path, monkeypatch, capsys):
    from lm_pretrain.commands import train as cli

    monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["train.py"])  # LightningCLI warns when pytest's flags are there too
    argv = ["fit", "--config", str(ROOT / "configs" / "overlays" / f"{overlay}.yaml"),
            "--data.data_dir", str(tmp_path / "never-read"), "--trainer.max_steps", "1"]
    line = cli_error(cli.main, argv, capsys)
    assert line == f"error: {message}, which is not installed: pip install 'lm-pretrain[loggers]'"
    assert not (tmp_path / "runs").exists() and not (tmp_path / "never-read").exists()


def test_every_version_range_is_declared_once():
    """pyproject.toml holds the dependencies; requirements.txt only installs the package with its extras."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    assert [line for line in lines if line] == ["-e .[dev]"]
    extras = project["optional-dependencies"]
    assert set(extras) >= {"data", "export", "eval", "loggers", "dev"}
    core = " ".join(project["dependencies"])
    for heavy in ("pytest", "transformers", "lm-eval", "wandb", "mlflow", "datasets", "moto"):
        assert heavy not in core, heavy
    (everything,) = [r for r in extras["dev"] if r.startswith("lm-pretrain[")]
    assert set(everything.removeprefix("lm-pretrain[").removesuffix("]").split(",")) == set(extras) - {"dev"}


@pytest.mark.parametrize("module, name, message", [
    ("pyarrow.parquet", "corpus.parquet", "reading .parquet files needs pyarrow"),
    ("datasets", "saved_dataset", "reading a Hugging Face dataset folder needs datasets"),
])
def test_prepare_formats_of_the_data_extra_without_it(module, name, message, tmp_path, monkeypatch, capsys):
    from lm_pretrain.commands.prepare import main

    path = tmp_path / name
    if name.endswith(".parquet"):
        path.write_bytes(b"PAR1")
    else:
        path.mkdir()
        (path / "dataset_info.json").write_text("{}")
    monkeypatch.setitem(sys.modules, module, None)
    line = cli_error(main, [str(path), "--output", str(tmp_path / "out"), "--workers", "1"], capsys)
    assert message in line and line.endswith("pip install 'lm-pretrain[data]'")
    assert not (tmp_path / "out").exists()
