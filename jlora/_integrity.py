"""Checksums of array leaves, so that a corrupted checkpoint is an error instead of wrong numbers.

A digest is the SHA-256 of a leaf's dtype, shape and bytes (in C order). Writers
store `{path: digest}` beside the data; readers recompute it on what they read
and refuse a mismatch, naming the leaf.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jlora._quant import QuantizedArray

__all__ = ["digest", "digests", "verify"]


def digest(leaf: Any) -> str:
  """SHA-256 hex digest of one array's dtype, shape and contents (fetched to the host).

  A quantized kernel (`jlora.quantize`) is hashed by its metadata and packed
  children: a quantized base is another base than the one it was made from.
  """
  if isinstance(leaf, QuantizedArray):
    parts = [repr(leaf.meta)] + [digest(child) for child in jax.tree.leaves(leaf)]
    return hashlib.sha256("".join(parts).encode()).hexdigest()
  arr = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
  h = hashlib.sha256(f"{arr.dtype.str}{arr.shape}".encode())
  h.update(arr.view(np.uint8).reshape(-1).data if arr.size else b"")
  return h.hexdigest()


def digests(flat: Mapping[tuple[str, ...], Any]) -> dict[str, str]:
  """`{'a/b/leaf': digest}` of a flat `{path: array}` dict."""
  return {"/".join(path): digest(leaf) for path, leaf in flat.items()}


def verify(flat: Mapping[tuple[str, ...], Any], expected: Mapping[str, str], *, what: str) -> None:
  """Raises a `ValueError` naming each leaf of `flat` whose digest differs from `expected`.

  Args:
    flat: `{path: array}` as read back.
    expected: the digests stored at write time.
    what: what was read (e.g. "adapter checkpoint '/runs/x/adapter'"), for the message.
  """
  got = digests(flat)
  missing = sorted(set(expected) ^ set(got))
  bad = sorted(p for p in set(expected) & set(got) if expected[p] != got[p])
  if missing or bad:
    problems = [f"leaf {p!r} does not match its checksum" for p in bad]
    problems += [f"leaf {p!r} is {'missing' if p in expected else 'not in the checksum list'}" for p in missing]
    raise ValueError(
        f"The {what} is corrupt: {'; '.join(problems[:5])}{' …' if len(problems) > 5 else ''}. The files changed "
        "after they were written (disk or copy error, or an edit); restore them from a good copy."
    )
