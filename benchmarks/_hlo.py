"""Reading the collectives of a compiled XLA program: which ones, and how many bytes each moves.

A collective's bytes are the bytes of its result per device (an all-reduce
returns what it reduces; a reduce-scatter its shard; an all-gather the gathered
array). Asynchronous pairs (`all-reduce-start` / `-done`) count once.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

__all__ = ["OPS", "collectives", "collective_bytes"]

OPS = ("all-reduce", "reduce-scatter", "all-gather", "all-to-all", "collective-permute")
_DTYPES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
           "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_LINE = re.compile(r"=\s*(?P<type>\(.*?\)|\S+)\s+(?P<op>" + "|".join(OPS) + r")(?P<start>-start)?\(")
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPES) + r")\[([0-9,]*)\]")


def _bytes(type_text: str) -> int:
  return sum(_DTYPES[d] * int(np.prod([int(n) for n in dims.split(",") if n] or [1]))
             for d, dims in _ARRAY.findall(type_text))


def collectives(hlo_text: str) -> list[tuple[str, int, str]]:
  """`(op, bytes per device, result type)` of every collective in an HLO module's text."""
  out = []
  for line in hlo_text.splitlines():
    m = _LINE.search(line)
    if m:
      out.append((m["op"], _bytes(m["type"]), m["type"]))
  return out


def collective_bytes(hlo_text: str) -> Counter:
  """Total bytes per device moved by each kind of collective (`Counter({'all-reduce': n, ...})`)."""
  total: Counter = Counter()
  for op, n, _ in collectives(hlo_text):
    total[op] += n
  return total
