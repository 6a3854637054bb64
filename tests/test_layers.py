"""The package is a one-way tree: folders in one order, and inside a folder, modules in layers.

A module may import a module of an earlier folder, or of its own folder's earlier layers; a folder's
`__init__` (its public names, e.g. `from lm_pretrain.model import GPT`) only from later folders.
Every `import lm_pretrain.X` / `from lm_pretrain.X import ...` counts, also one inside a function
(kept there only so that a command's --help does not pay for Lightning): an import moved into a
function can no longer hide a cycle. A new module must be given a layer here; a new upward or
sideways edge fails with the line that adds it.
"""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lm_pretrain"

# Folders lowest first, each with its modules' layers lowest first.
FOLDERS = {
    "utils": [["errors"], ["ranges", "files", "extras"], ["assets"]],  # small helpers every folder may use
    "model": [["config", "loss", "sampling", "scoring"], ["moe"], ["gpt"]],  # plain PyTorch: no Lightning, data or tokenizer
    "tokenizer": [["bpe"], ["encoding"]],  # what a tokenizer is
    "data": [["storage", "readers", "downstream"], ["prepared"], ["prepare"], ["train_tokenizer"], ["built_in"], ["datamodule"]],
    "training": [["steps", "optim", "loggers"], ["hardware", "checkpoints"], ["strategies", "callbacks", "debug", "experts"], ["downstream"], ["module"]],
    "commands": [["parsing"], ["train", "prepare", "tokenizer", "generate", "export", "evaluate", "sizes"], ["experiment"]],
}
FOLDER = {folder: i for i, folder in enumerate(FOLDERS)}
LAYER = {f"{folder}.{name}": i for folder, layers in FOLDERS.items() for i, names in enumerate(layers) for name in names}


def resolve(dotted: str) -> str:
    """`folder.module` for a module of the package, `folder` for a folder's __init__."""
    return dotted if dotted in LAYER or (PACKAGE / (dotted.replace(".", "/") + ".py")).exists() else dotted.split(".")[0]


def project_imports(path: Path) -> list[tuple[int, str]]:
    """(line, `folder.module` or `folder`) for each part of lm_pretrain that `path` imports, wherever."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, resolve(a.name.removeprefix("lm_pretrain."))) for a in node.names
                      if a.name.startswith("lm_pretrain.")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "lm_pretrain":
                found += [(node.lineno, a.name) for a in node.names]
            elif node.module.startswith("lm_pretrain."):
                base = node.module.removeprefix("lm_pretrain.")
                if "." in base or base not in FOLDERS:
                    found.append((node.lineno, resolve(base)))
                else:  # from lm_pretrain.folder import name: a module of the folder, or its __init__'s name
                    found += [(node.lineno, resolve(f"{base}.{a.name}")) for a in node.names]
    return found


def modules() -> list[Path]:
    return sorted(PACKAGE.glob("*/*.py"))


def test_the_package_is_folders_of_modules():
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert not loose, f"{loose}: every module goes in a folder of FOLDERS"
    missing = [f"{p.parent.name}.{p.stem}" for p in modules() if p.stem != "__init__" and f"{p.parent.name}.{p.stem}" not in LAYER]
    assert not missing, f"give {missing} a folder and a layer in tests/test_layers.py"


def is_below(imported: str, importer: Path) -> bool:
    folder = importer.parent.name
    if "." not in imported:  # a folder's __init__: from later folders only
        return FOLDER[imported] < FOLDER[folder] or (importer.stem == "__init__" and imported == folder)
    imported_folder = imported.split(".")[0]
    if imported_folder != folder:
        return FOLDER[imported_folder] < FOLDER[folder]
    return importer.stem == "__init__" or LAYER[imported] < LAYER[f"{folder}.{importer.stem}"]


def test_imports_only_point_down():
    upward = [f"lm_pretrain/{path.parent.name}/{path.name}:{line} imports {imported}"
              for path in modules() for line, imported in project_imports(path) if not is_below(imported, path)]
    assert not upward, "\n".join(upward)


def test_the_check_sees_imports_inside_functions_and_names_the_edge(tmp_path):
    source = tmp_path / "x.py"
    source.write_text("import os\n\ndef f():\n    from lm_pretrain.training.module import LanguageModel\n"
                      "    from lm_pretrain.data import datamodule, storage\n    import lm_pretrain.commands.train\n"
                      "    from lm_pretrain.model import GPT\n")
    assert project_imports(source) == [(4, "training.module"), (5, "data.datamodule"), (5, "data.storage"),
                                       (6, "commands.train"), (7, "model")]
    gpt = PACKAGE / "model" / "gpt.py"
    assert is_below("model.config", gpt) and is_below("utils.ranges", gpt)
    assert not is_below("training.module", gpt) and not is_below("model", gpt)  # up, and its own folder's face
    assert is_below("model", PACKAGE / "training" / "module.py")


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


def test_no_file_of_the_package_is_ignored_by_git():
    """A pattern of .gitignore (data/ for the prepared datasets) once hid lm_pretrain/data/'s new files:
    a fresh clone then lacked them."""
    import shutil
    import subprocess

    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    files = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    ignored = subprocess.run(["git", "check-ignore", *files], cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert ignored == []
