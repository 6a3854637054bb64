import subprocess

import pytest
import sys

from helpers import ROOT


@pytest.mark.slow
def test_config_reference_is_up_to_date():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "config_reference.py"), "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_readme_commands_name_real_entry_points():
    readme = (ROOT / "README.md").read_text()
    for module in ("prepare", "generate", "export", "sizes"):
        assert f"python -m lm_pretrain.{module}" in readme and (ROOT / "lm_pretrain" / f"{module}.py").is_file()
    for config in ("tiny", "tiny-llama", "gpt2-124m", "overlays/fsdp", "overlays/ddp"):
        assert f"configs/{config}.yaml" in readme and (ROOT / "configs" / f"{config}.yaml").is_file()
    assert "bash scripts/demo.sh" in readme and "bash scripts/test.sh" in readme
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()  # CI runs README's test command
