"""The package is a one-way tree: each module imports only from the layers below its own.

Every `import lm_pretrain.X` / `from lm_pretrain import X` counts, also one inside a function (kept
there only so that a command's --help does not pay for Lightning): an import moved into a function
can no longer hide a cycle. A new module must be given a layer here; a new upward or sideways edge
fails with the line that adds it.
"""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lm_pretrain"

# Lowest first. A module may import modules of earlier layers only.
LAYERS = [
    ["errors"],  # the one user error
    ["ranges", "files", "steps", "storage", "extras"],  # foundations
    ["commands", "assets", "loss", "optim", "config", "readers", "bpe"],
    ["model", "tokenizer", "prepared"],
    ["hardware", "checkpoints", "sampling", "prepare"],  # what reads or feeds a model
    ["train_tokenizer"],  # a tokenizer trained on what prepare reads
    ["strategies", "callbacks", "debug", "data"],  # training's parts: how the model is laid out, what runs beside it
    ["module"],  # the LightningModule: ties them together
    ["cli", "generate", "export", "evaluate", "sizes"],  # entry points
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def project_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) for each lm_pretrain module that `path` imports, wherever the import is."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name.split(".")[1]) for a in node.names if a.name.startswith("lm_pretrain.")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "lm_pretrain":
                found += [(node.lineno, a.name) for a in node.names]
            elif node.module.startswith("lm_pretrain."):
                found.append((node.lineno, node.module.split(".")[1]))
    return found


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def test_every_module_has_a_layer():
    missing = [p.stem for p in modules() if p.stem not in LAYER]
    assert not missing, f"give {missing} a layer in tests/test_layers.py"


def test_imports_only_point_down():
    upward = []
    for path in modules():
        for line, imported in project_imports(path):
            if imported in LAYER and LAYER[imported] >= LAYER[path.stem]:
                upward.append(f"lm_pretrain/{path.name}:{line} imports {imported} "
                              f"(layer {LAYER[imported]}, not below its own {LAYER[path.stem]})")
    assert not upward, "\n".join(upward)


def test_the_check_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "x.py"
    source.write_text("import os\n\ndef f():\n    from lm_pretrain.module import LanguageModel\n"
                      "    from lm_pretrain import data, steps\n    import lm_pretrain.cli\n")
    assert project_imports(source) == [(4, "module"), (5, "data"), (5, "steps"), (6, "cli")]


@pytest.mark.parametrize("folder", ["bench", "scripts", "notebooks"])
def test_benchmarks_and_scripts_never_import_the_tests(folder):
    test_modules = {p.stem for p in (ROOT / "tests").glob("*.py")} | {"tests"}
    offending = []
    for path in sorted((ROOT / folder).glob("*.py")):
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            offending += [f"{path.name}:{node.lineno} imports {n}" for n in names if n.split(".")[0] in test_modules]
        if re.search(r"/\s*[\"']tests[\"']", text):  # ROOT / "tests" on sys.path or PYTHONPATH
            offending.append(f"{path.name} puts the tests folder on its path")
    assert not offending, offending
