import re
import subprocess

import pytest

from helpers import python, ROOT


@pytest.mark.slow
def test_config_reference_is_up_to_date():
    done = subprocess.run([python(), str(ROOT / "scripts" / "config_reference.py"), "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_readme_commands_name_real_entry_points():
    readme = (ROOT / "README.md").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    section = pyproject[pyproject.index("[project.scripts]"):].split("\n\n")[0]
    scripts = dict(re.findall(r'^([\w-]+) = "([\w.:]+)"', section, re.M))
    assert len(scripts) >= 5
    for command, target in scripts.items():
        module = target.split(":")[0]
        assert command in readme and (ROOT / (module.replace(".", "/") + ".py")).is_file(), command
    for config in ("tiny", "gpt2-124m", "gpt2-1.5b", "overlays/fsdp", "overlays/ddp", "overlays/csv"):
        assert f"configs/{config}.yaml" in readme and (ROOT / "configs" / f"{config}.yaml").is_file()
    for doc in re.findall(r"\]\((docs/[^)]+)\)", readme):
        path, _, anchor = doc.partition("#")
        assert (ROOT / path).is_file(), doc
        if anchor:  # a heading of that page, as GitHub spells its anchor
            headings = re.findall(r"^#+ (.+)$", (ROOT / path).read_text(), re.M)
            assert anchor in {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}, doc
    assert "bash scripts/demo.sh" in readme and "bash scripts/test.sh" in readme
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()  # CI runs README's test command


def test_readme_file_table_matches_the_tree():
    """README's table lists every folder of the package and of the repository, and each folder's
    __init__ names each of its modules; everything listed exists."""
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| path | what it holds |"):]
    table = table[:table.index("\n\n")]
    listed = set(re.findall(r"^\| `([^`]+)` \|", table, re.M))
    package = {f"lm_pretrain/{p.parent.name}/" for p in (ROOT / "lm_pretrain").glob("*/__init__.py")}
    folders = {f"{p.name}/" for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")
               and p.name not in ("lm_pretrain", "data", "runs") and not p.name.endswith(".egg-info")}
    assert package - listed == set() and folders - listed == set()
    assert [p for p in listed if not (ROOT / p).exists()] == []
    unnamed = [f"{p.parent.name}/{p.name}" for p in (ROOT / "lm_pretrain").glob("*/*")
               if p.suffix in (".py", ".yaml") and p.name != "__init__.py"
               and not re.search(rf"^\s+{re.escape(p.name)}\s", (p.parent / "__init__.py").read_text(), re.M)]
    assert unnamed == [], "name each module in its folder's __init__.py docstring"
