"""Execute the notebooks headless against the test fixtures and check what they print and draw."""

import json
import os
import re
import shutil

import nbformat
import pytest
from nbclient import NotebookClient

from helpers import python, ROOT

NOTEBOOKS = ("01_data", "02_training_curves", "03_generate", "04_sizing", "05_experiment")


@pytest.fixture(scope="module")
def kernel(tmp_path_factory) -> str:
    """A kernel spec as Jupyter's own python3, started by the tests' python (warm: tests/warm.py)."""
    folder = tmp_path_factory.mktemp("jupyter")
    spec = folder / "kernels" / "tests-python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({"argv": [python(), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                                                  "display_name": "Python 3 (tests)", "language": "python"}))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JUPYTER_PATH", os.pathsep.join([str(folder), os.environ.get("JUPYTER_PATH", "")]))
        yield "tests-python3"


def execute(name: str, kernel: str) -> tuple[str, list]:
    """Run notebooks/NAME.ipynb top to bottom; returns (its stdout, all its outputs)."""
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name=kernel, resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    errors = [f"{o.ename}: {o.evalue}" for o in outputs if o.output_type == "error"]
    assert not errors, errors
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream" and o.get("name") == "stdout")
    return text, outputs


def pngs(outputs: list) -> int:
    return sum("image/png" in o.get("data", {}) for o in outputs)


def registered_kernel() -> str:
    """The kernel name scripts/setup.sh registers this repository's .venv under."""
    return re.search(r"ipykernel install --user --name (\S+)", (ROOT / "scripts" / "setup.sh").read_text()).group(1)


@pytest.mark.parametrize("name", [*NOTEBOOKS, "quickstart"])
def test_notebook_saved_clean(name):
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == registered_kernel() == "lm-pretrain"  # the .venv's, picked at once
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)
    assert any(cell.cell_type == "markdown" for cell in nb.cells)


@pytest.mark.slow
def test_data_notebook(prepared, kernel, monkeypatch):
    from lm_pretrain.data.prepared import load_metadata

    monkeypatch.setenv("LM_PRETRAIN_DATA_DIR", str(prepared))
    text, outputs = execute("01_data", kernel)
    metadata = load_metadata(prepared)
    assert f"dataset: {prepared}" in text
    for split, counts in metadata["splits"].items():
        docs, tokens = counts["documents"], counts["tokens"]
        assert f"{split}: {docs:,} documents, {tokens:,} tokens" in text  # the metadata summary
        assert f"{split}: read {tokens:,} tokens back" in text  # the shards hold what metadata says
        assert f"{split}: {docs:,} documents (metadata: {docs:,})" in text  # EOT splits give the documents back
    assert "first window matches the stream: True" in text
    assert text.count("--- train document") == 2
    assert re.search(r"\b(loves|fears|calls|follows|betrays|praises|forgives)\b", text)  # decoded corpus text
    top = re.findall(r"^\s+(\d+)\s+\d+\s+['\"]", text, re.M)
    assert top == [str(i) for i in range(1, 21)], text  # 20 most frequent tokens, ranked
    assert pngs(outputs) == 1  # the document-length histogram


@pytest.mark.slow
def test_training_curves_notebook(trained_run, kernel, tmp_path, monkeypatch):
    from torch.utils.tensorboard import SummaryWriter

    # A second run that logged train loss and a learning rate but stopped before validating.
    partial = tmp_path / "partial" / "version_0"
    with SummaryWriter(str(partial)) as writer:
        for step in range(0, 20, 5):
            writer.add_scalar("train/loss", 10.0 - step / 10, step)
            writer.add_scalar("lr-AdamW/pg1", 1e-3, step)
    monkeypatch.setenv("LM_PRETRAIN_RUNS", f"{trained_run['log_dir']}{os.pathsep}{partial}")
    text, outputs = execute("02_training_curves", kernel)
    assert str(trained_run["log_dir"]) in text and str(partial) in text
    assert "partial/version_0: no val/loss logged" in text
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.startswith(("tiny/", "partial/"))
            and len(line.split()) == 5}
    assert set(rows) == {"tiny/version_0", "partial/version_0"}, text
    assert 0 < int(rows["tiny/version_0"][1]) < 60 and float(rows["tiny/version_0"][3]) < 11  # 60 steps, validated
    assert rows["partial/version_0"][2:] == ["8.500", "n/a", "n/a"]
    assert pngs(outputs) == 2  # losses, learning rate


@pytest.mark.slow
def test_generate_notebook(trained_run, kernel, monkeypatch):
    monkeypatch.setenv("LM_PRETRAIN_CKPT", str(trained_run["ckpt"]))
    text, _ = execute("03_generate", kernel)
    assert f"checkpoint: {trained_run['ckpt']}" in text
    n = int(re.search(r"^(\d+) settings", text, re.M).group(1))
    headings = re.findall(r"^--- (temperature=\S+ top_k=\S+ top_p=\S+) ---\n(.*)", text, re.M)
    assert len(headings) == n >= 6 and len({h for h, _ in headings}) == n
    assert all(sample.startswith("ROMEO:") for _, sample in headings)
    assert "same seed, same text: True" in text


@pytest.mark.slow
def test_sizing_notebook(kernel):
    text, _ = execute("04_sizing", kernel)
    presets = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))
    assert presets and f"{len(presets)} presets" in text
    for name in presets:
        assert len(re.findall(rf"^{re.escape(name)}\s", text, re.M)) == 4, name  # sizes, memory, 2 budgets
    assert "H100 (bf16)" in text and "V100 (fp16)" in text
    assert "n/a" not in text  # every GPU has a peak for the precision used


@pytest.mark.slow
@pytest.mark.parametrize("downstream", [False, True], ids=["plain", "with downstream scores"])
def test_quickstart_notebook_runs(trained_run, kernel, monkeypatch, tmp_path, downstream):
    log_dir = trained_run["log_dir"]
    if downstream:  # the run as if trained with configs/overlays/downstream.yaml: its scores in an event file more
        from torch.utils.tensorboard import SummaryWriter

        log_dir = tmp_path / "version_0"
        shutil.copytree(trained_run["log_dir"], log_dir)
        with SummaryWriter(str(log_dir)) as writer:
            for step, value in ((20, 0.24), (40, 0.27)):
                writer.add_scalar("downstream/hellaswag/acc_norm", value, step)
                writer.add_scalar("downstream/piqa/acc_norm", value + 0.25, step)
                writer.add_scalar("downstream/centred", value - 0.25, step)
    monkeypatch.setenv("LM_PRETRAIN_LOG_DIR", str(log_dir))
    nb = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name=kernel, resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert str(log_dir) in text and "val loss:" in text
    assert text.count("--- temperature") == 2 and "ROMEO:" in text
    plots = sum("image/png" in o.get("data", {}) for o in outputs)  # the loss plot, the downstream one
    if downstream:
        assert "downstream/piqa/acc_norm: 0.520 at step 40" in text and "downstream/centred: 0.020 at step 40" in text
        assert plots == 2
    else:
        assert "no downstream scores in this run (train with --config configs/overlays/downstream.yaml)" in text
        assert plots == 1


@pytest.mark.slow
def test_experiment_notebook_trains_a_baseline_and_variants_and_compares_them(prepared, kernel, tmp_path, monkeypatch):
    monkeypatch.setenv("LM_PRETRAIN_NOTEBOOK_STEPS", "4")
    monkeypatch.setenv("LM_PRETRAIN_DATA_DIR", str(prepared))
    monkeypatch.setenv("LM_PRETRAIN_RUNS_DIR", str(tmp_path / "runs"))
    text, outputs = execute("05_experiment", kernel)
    names = ("baseline (SwiGLU)", "relu² MLP", "lr 1e-3")
    for name in names:
        assert re.search(rf"^{re.escape(name)}: val/loss \d+\.\d+, \d+ s \(version_\d\)$", text, re.M), text
    rows = [line.split() for line in text.splitlines() if line.startswith(names)]
    scores = [line for line in rows if len(line) >= 6 and line[-1].isdigit()]
    assert len(scores) == 3 and scores[0][-3] == "+0.000", text  # the baseline against itself
    assert pngs(outputs) == 1  # the curves
    assert sorted(p.name for p in (tmp_path / "runs" / "experiment").iterdir()) == ["version_0", "version_1", "version_2"]


@pytest.mark.parametrize("name", [*NOTEBOOKS, "quickstart"])
def test_each_notebook_links_a_rendered_copy_of_its_current_code_with_outputs_and_plots(name):
    """GitHub shows a notebook saved without outputs as code only: docs/notebooks/NAME.md holds it
    with the outputs of one run (notebooks/make_notebooks.py --render), from the code as it is now,
    without this machine's paths."""
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    first = next(cell for cell in nb.cells if cell.cell_type == "markdown")
    assert f"[docs/notebooks/{name}.md](../docs/notebooks/{name}.md)" in first.source
    rendered = (ROOT / "docs" / "notebooks" / f"{name}.md").read_text()
    code = [cell.source for cell in nb.cells if cell.cell_type == "code"]
    assert re.findall(r"^```python\n(.*?)\n```$", rendered, re.S | re.M) == code, "render it again"
    images = re.findall(r"!\[output\]\(([^)]+)\)", rendered)
    assert all((ROOT / "docs" / "notebooks" / image).is_file() for image in images)
    assert bool(images) == any("plt." in source for source in code)  # every plot there, and shown
    assert re.findall(r"^```text$", rendered, re.M)  # what it printed
    assert not re.search(r"(?<![\w.])/(work|tmp|home|root|Users|var)/", rendered)

