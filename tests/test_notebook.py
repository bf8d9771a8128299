"""colab/quickstart.ipynb: its offline part (everything before "Part 2") runs in a real
kernel, top to bottom, with a few training steps."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "colab", "quickstart.ipynb")


def test_the_offline_part_of_the_quickstart_runs(tmp_path, monkeypatch):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    part_2 = next(i for i, c in enumerate(notebook.cells)
                  if c.cell_type == "markdown" and c.source.startswith("## Part 2"))
    notebook.cells = notebook.cells[:part_2]
    monkeypatch.setenv("COACH_JAX_NOTEBOOK_STEPS", "3")
    monkeypatch.setenv("COACH_JAX_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # one device, as a user's machine
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": os.path.join(ROOT, "colab")}}).execute()
    outputs = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code"
                      for o in c.get("outputs", []))
    assert "model:" in outputs and "reference:" in outputs
    assert os.path.exists(tmp_path / "run" / "report.md")
    errors = [o for c in notebook.cells for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors


if __name__ == "__main__":
    pytest.main([__file__])
