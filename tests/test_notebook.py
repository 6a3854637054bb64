
import nbformat
from nbclient import NotebookClient

from conftest import ROOT


def test_quickstart_notebook_runs(trained_run, monkeypatch):
    monkeypatch.setenv("LM_PRETRAIN_LOG_DIR", str(trained_run["log_dir"]))
    nb = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert str(trained_run["log_dir"]) in text and "val loss:" in text
    assert text.count("--- temperature") == 2 and "ROMEO:" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the loss plot was drawn
