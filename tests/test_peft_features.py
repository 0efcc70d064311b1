"""docs/peft-features.md, the table of PEFT's LoRA features in jlora, against the installed PEFT and jlora itself: a
PEFT upgrade that adds a config field, an init or a combination type fails here until the page has a row for it, and
the page's count, and the statuses of what jlora's config accepts or refuses, cannot drift from the rows."""

import collections
import dataclasses
import pathlib
import re

import pytest

import jlora
from jlora.core import config as _config
from jlora.core import fields as _fields

PAGE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "peft-features.md"
STATUSES = ("yes", "partly", "no", "n/a")
Row = collections.namedtuple("Row", "section peft status")


def _rows() -> list[Row]:
  """Every table row of the page as (section heading, PEFT cell, status cell)."""
  rows, section = [], None
  for line in PAGE.read_text().splitlines():
    if line.startswith("## "):
      section = line[3:].strip()
    elif line.startswith("|"):
      cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
      assert len(cells) == 4, f"a row of four cells (PEFT, status, jlora, notes): {line!r}"
      if cells[1] != "status" and not set(cells[1]) <= set("-"):
        rows.append(Row(section, cells[0], cells[1]))
  return rows


ROWS = _rows()


def _named(name: str, rows=ROWS) -> list[Row]:
  """The rows whose PEFT cell names `name` in backticks (alone, or quoted as a string value)."""
  return [r for r in rows if re.search(rf"`{re.escape(name)}`|`\"{re.escape(name)}\"`", r.peft)]


def test_statuses_are_known_and_the_count_matches_the_rows():
  assert ROWS and {r.status for r in ROWS} <= set(STATUSES), {r.status for r in ROWS} - set(STATUSES)
  count = re.search(r"^\*\*Count:\*\* (.*) \((\d+) rows\)\.$", PAGE.read_text(), flags=re.M)
  assert count, "the page states its count on one line: **Count:** N yes · ... (N rows)."
  stated = {status: int(n) for n, status in re.findall(r"(\d+) (yes|partly|no|n/a)", count.group(1))}
  assert stated == dict(collections.Counter(r.status for r in ROWS)) and int(count.group(2)) == len(ROWS)


def test_every_field_init_and_combination_type_of_the_installed_peft_has_a_row():
  peft = pytest.importorskip("peft")
  from peft.tuners.lora import LoraModel

  missing = [f.name for f in dataclasses.fields(peft.LoraConfig) if not _named(f.name)]
  assert not missing, f"LoraConfig fields of PEFT {peft.__version__} without a row: {missing}"
  fields = {f.name: f for f in dataclasses.fields(peft.LoraConfig)}
  inits = [v for v in re.findall(r"'([^']+)'", str(fields["init_lora_weights"].type)) if not v.startswith("pissa_niter")]
  init_rows = [r for r in ROWS if r.section == "Initialisations"]
  assert inits and not [v for v in inits if not _named(v, init_rows)], inits
  assert _named("pissa_niter_[n]", init_rows) and _named("True", init_rows) and _named("False", init_rows)
  annotation = LoraModel.add_weighted_adapter.__annotations__["combination_type"]
  kinds = re.findall(r"'([^']+)'", str(annotation))
  merge_rows = [r for r in ROWS if r.section == "Multi-adapter and merging"]
  assert kinds and not [k for k in kinds if not _named(k, merge_rows)], kinds


def test_rows_agree_with_what_jlora_config_accepts_and_refuses():
  """A field jlora refuses when set is never `yes`; a field of `jlora.LoraConfig` is never `no`; the inits that
  `jlora.init` runs are `yes`, those it only reads from a file are `no`."""
  for name in _config._UNSUPPORTED:
    assert [r.status for r in _named(name)] and all(r.status in ("no", "n/a") for r in _named(name)), name
  for f in dataclasses.fields(jlora.LoraConfig):
    assert [r.status for r in _named(f.name)] and all(r.status != "no" for r in _named(f.name)), f.name
  inits = [r for r in ROWS if r.section == "Initialisations"]
  for value in _fields.INIT_METHODS:
    assert [r.status for r in _named(str(value), inits)] == ["yes"], value
  assert [r.status for r in _named("pissa_niter_[n]", inits)] == ["yes"]
  for value in _fields.DATA_INITS:
    assert [r.status for r in _named(value, inits)] == ["yes"], value
  for value in _fields.PEFT_ONLY_INITS:
    assert [r.status for r in _named(value, inits)] == ["no"], value
