"""Checksums of array leaves, so that a corrupted checkpoint is an error instead of wrong numbers.

A digest is the SHA-256 of a leaf's dtype, shape and bytes (in C order). Writers
store `{path: digest}` beside the data; readers recompute it on what they read
and refuse a mismatch, naming the leaf.

**Arrays spread over several processes** (`not x.is_fully_addressable`, in a
multi-process JAX run) are never gathered to be saved: they get *block digests*
instead, one per distinct shard of their sharding (`{'0:8,0:16': digest}`, the
block's start:stop per axis), each the digest of that block as an array. Every
block is hashed once, by the process holding its `replica_id == 0` shard, and
the digests are exchanged (`block_digests` is collective), so together they cover
every element. A reader checks each block against the restored array whatever
its layout (another mesh, one device): from its own shards where one process
holds the whole block, else by gathering that leaf to every process (device and
host memory for one such leaf at a time). `check` is collective too, so every
process reaches the same verdict and none is left waiting in a later collective.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jlora.parallel.processes import is_spread
from jlora.quant.array import QuantizedArray

__all__ = ["digest", "digests", "block_digests", "check", "verify"]

_Bounds = tuple[tuple[int, int], ...]


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


# ------------------------------------------------------------- blocks of arrays
def _bounds(index: tuple[slice, ...], shape: tuple[int, ...]) -> _Bounds:
  return tuple((s.start or 0, n if s.stop is None else s.stop) for s, n in zip(index, shape))


def _name(bounds: _Bounds) -> str:
  return ",".join(f"{lo}:{hi}" for lo, hi in bounds)


def _parse(name: str) -> _Bounds:
  return tuple(tuple(int(v) for v in part.split(":")) for part in name.split(",")) if name else ()


def _gather(x: Any) -> np.ndarray:
  """Collective: a global array `x` whole, on every process; a host array, every process's, stacked on axis 0."""
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(x, tiled=is_spread(x)))


def block_digests(flat: Mapping[tuple[str, ...], Any]) -> dict[str, dict[str, str]]:
  """`{'a/b/leaf': {block: digest}}` of the leaves of `flat` spread over several processes (see the module docstring).

  Collective: in a multi-process run every process calls it with the same tree
  and gets the same digests. Leaves that one process holds whole are left out
  (`digests` covers them).
  """
  spread = sorted((p, x) for p, x in flat.items() if is_spread(x))
  if not spread:
    return {}
  names, rows = [], []
  for path, x in spread:
    blocks = sorted({_bounds(i, x.shape) for i in x.sharding.devices_indices_map(x.shape).values()})
    mine = {_bounds(s.index, x.shape): s.data for s in x.addressable_shards if s.replica_id == 0}
    for b in blocks:
      names.append(("/".join(path), _name(b)))
      rows.append(bytes.fromhex(digest(mine[b])) if b in mine else bytes(32))
  table = np.bitwise_or.reduce(_gather(np.frombuffer(b"".join(rows), np.uint8).reshape(-1, 32)), axis=0)
  out: dict[str, dict[str, str]] = {}
  for (leaf, block), row in zip(names, table):
    out.setdefault(leaf, {})[block] = row.tobytes().hex()
  return out


def _assemble(x: jax.Array, block: _Bounds) -> np.ndarray | None:
  """The values of `block` from this process's shards of `x`; None unless they cover all of it."""
  pieces = {_bounds(s.index, x.shape): s.data for s in x.addressable_shards}
  out, covered = np.empty(tuple(hi - lo for lo, hi in block), x.dtype), 0
  for bounds, data in pieces.items():
    cut = [(max(lo, blo), min(hi, bhi)) for (lo, hi), (blo, bhi) in zip(bounds, block)]
    if any(lo >= hi for lo, hi in cut) and out.size:
      continue
    src = tuple(slice(lo - b[0], hi - b[0]) for (lo, hi), b in zip(cut, bounds))
    out[tuple(slice(lo - b[0], hi - b[0]) for (lo, hi), b in zip(cut, block))] = np.asarray(data)[src]
    covered += int(np.prod([hi - lo for lo, hi in cut]))
  return out if covered == out.size else None


def _status(x: Any, blocks: Mapping[str, str], host: np.ndarray | None) -> list[int]:
  """Per block of `blocks`: 1 matches, 2 differs, 0 cannot be told here (not all of it on this process)."""
  if sum(int(np.prod([hi - lo for lo, hi in _parse(n)])) for n in blocks) != int(np.prod(np.shape(x))):
    return [2] * len(blocks)  # the blocks do not add up to the array: some elements would go unchecked
  if host is None and not is_spread(x):
    host = np.asarray(jax.device_get(x))
  out = []
  for name, expected in blocks.items():
    b = _parse(name)
    values = host[tuple(slice(lo, hi) for lo, hi in b)] if host is not None else _assemble(x, b)
    out.append(0 if values is None else 1 if digest(values) == expected else 2)
  return out


def check(flat: Mapping[tuple[str, ...], Any], expected: Mapping[str, str],
          blocks: Mapping[str, Mapping[str, str]] | None = None) -> list[str]:
  """The `/`-joined paths of the leaves of `flat` whose values differ from their stored digests, sorted.

  Checks every leaf listed in `expected` (whole-array digests) or `blocks`
  (block digests), whatever its layout now; other leaves are not checked.
  Collective in a multi-process run (every process calls it and gets the same list).
  """
  want = {}
  for path, x in sorted(flat.items()):
    name = "/".join(path)
    if name in expected:
      want[name] = (x, {_name(tuple((0, n) for n in np.shape(x))): expected[name]})
    elif blocks and name in blocks:
      want[name] = (x, dict(blocks[name]))
  status = {name: _status(x, b, None) for name, (x, b) in want.items()}
  if jax.process_count() > 1 and want:  # agree: a block differs if it differs anywhere, is known if known anywhere
    merged = _gather(np.array([s for name in want for s in status[name]], np.int8)).max(axis=0)
    it = iter(merged.tolist())
    status = {name: [next(it) for _ in b] for name, (_, b) in want.items()}
    for name, (x, b) in want.items():
      if 0 in status[name]:  # no process holds some block whole: every process checks the gathered leaf
        status[name] = _status(x, b, _gather(x) if is_spread(x) else None)
  return sorted(name for name, s in status.items() if 2 in s or 0 in s)


def verify(flat: Mapping[tuple[str, ...], Any], expected: Mapping[str, str], *, what: str,
           blocks: Mapping[str, Mapping[str, str]] | None = None) -> None:
  """Raises a `ValueError` naming each leaf of `flat` whose digest differs from `expected` (or `blocks`).

  Args:
    flat: `{path: array}` as read back.
    expected: the digests stored at write time.
    what: what was read (e.g. "adapter checkpoint '/runs/x/adapter'"), for the message.
    blocks: the block digests stored for leaves spread over several processes
      (`block_digests`); collective in a multi-process run, like `check`.
  """
  listed = set(expected) | set(blocks or {})
  got = {"/".join(p) for p in flat}
  missing = sorted(listed ^ got)
  bad = check(flat, expected, blocks)
  if missing or bad:
    problems = [f"leaf {p!r} does not match its checksum" for p in bad]
    problems += [f"leaf {p!r} is {'missing' if p in listed else 'not in the checksum list'}" for p in missing]
    raise ValueError(
        f"The {what} is corrupt: {'; '.join(problems[:5])}{' …' if len(problems) > 5 else ''}. The files changed "
        "after they were written (disk or copy error, or an edit); restore them from a good copy."
    )
