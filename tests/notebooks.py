"""The notebook tests' one routine: read the committed, executed notebook; re-execute it in its quick mode."""

import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def committed(path: pathlib.Path):
  """The notebook at `path` as committed (nbformat's node); every code cell must show its outputs."""
  nbformat = pytest.importorskip("nbformat")
  pytest.importorskip("nbclient")
  nb = nbformat.read(path, as_version=4)
  assert all(cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), "commit the executed notebook"
  return nb


def rerun_quick(nb, monkeypatch, *, timeout: int = 600) -> None:
  """Executes `nb` again in place with `JLORA_NOTEBOOK_QUICK=1`, from the repository root."""
  import nbclient

  monkeypatch.setenv("JLORA_NOTEBOOK_QUICK", "1")  # the kernel inherits the environment
  nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                          resources={"metadata": {"path": str(ROOT)}}).execute()
