"""bench/gpu_acceptance.sh --cpu-smoke: the GPU acceptance steps, with tiny models on the CPU, so the
script that runs on a GPU machine (rarely at hand) cannot rot unnoticed."""

import os
import subprocess

import pytest

from helpers import python, ROOT

pytestmark = pytest.mark.slow  # multi-process and end-to-end runs


@pytest.mark.slow
def test_gpu_acceptance_steps_pass_on_a_cpu(tmp_path):
    record = tmp_path / "BENCHMARKS.md"
    env = {**os.environ, "PYTHON": os.environ.get("PYTHON", python())}
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_acceptance.sh"), "--cpu-smoke", "--record", str(record),
                           "--out", str(tmp_path / "out")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=480)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    section = record.read_text()
    rows = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    assert not [r for r in rows if "failed" in r or "skipped" in r], section
    for expected in ("gpt2-124m", "template / bare", "no host sync outside log steps",
                     "kill + resume, FSDP2 on 1 device | 8 steps, killed after step 6, resumed from the step-4 "
                     "checkpoint: **identical**", "folder checkpoint | generate: ok", "FSDP2, gpt2-1.5b", "aten::mm", "MoE, moe-1b-7b"):
        assert expected in section, (expected, section)
    assert {"section.md", "gpt2-124m.json", "resume-fsdp-resumed.log"} <= {p.name for p in (tmp_path / "out").iterdir()}
