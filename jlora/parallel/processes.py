"""Several JAX processes: arrays no process holds whole, and process 0 deciding for all.

A multi-process run (`jax.distributed.initialize`) runs the same program on every
process. What must happen once — checking or writing a directory, reading a run's
files — is done by process 0, and its result or its error reaches the others by a
broadcast, so that every process goes on (or fails) alike and none waits in a
collective that will not come. In one process these are plain calls.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import numpy as np

__all__ = ["is_spread", "on_primary", "primary"]

T = TypeVar("T")
_ERRORS = {"ValueError": ValueError, "TypeError": TypeError, "FileNotFoundError": FileNotFoundError}


def is_spread(x: Any) -> bool:
  """Whether `x` is an array that no single process holds all of (spread over several processes)."""
  return isinstance(x, jax.Array) and not x.is_fully_addressable


def primary() -> bool:
  """Whether this is process 0 (always, in one process)."""
  return jax.process_index() == 0


def _broadcast(text: str) -> str:
  """Process 0's `text` on every process (collective; buffers of a few compiled sizes: powers of two)."""
  from jax.experimental import multihost_utils

  data = text.encode()
  size = int(multihost_utils.broadcast_one_to_all(np.asarray([len(data)], np.int64))[0])
  buffer = np.zeros(max(256, 1 << (size - 1).bit_length()), np.uint8)
  if primary():
    buffer[: len(data)] = np.frombuffer(data, np.uint8)
  return np.asarray(multihost_utils.broadcast_one_to_all(buffer), np.uint8)[:size].tobytes().decode()


def on_primary(fn: Callable[[], T], *, send: bool = True) -> T | Any:
  """Runs `fn` on process 0 only; the others get its result as JSON (lists for tuples) or raise its error.

  Collective in a run of several processes: every process must call it at the same
  point. In one process it is `fn()`.

  Args:
    fn: what process 0 computes (reads or writes files the processes share).
    send: whether the others need the result (else they get None).

  Returns:
    `fn()` on process 0; on the others its JSON round trip (or None without `send`).

  Raises:
    Exception: `fn`'s error on process 0; a `ValueError`, `TypeError` or
      `FileNotFoundError` (else `RuntimeError`) with its message on the others.
  """
  if jax.process_count() == 1:
    return fn()
  result, error = None, None
  if primary():
    try:
      result = fn()
    except Exception as e:  # sent to the others before it is raised here
      error = e
  message = json.loads(_broadcast(json.dumps(
    {"error": [type(error).__name__, str(error)]} if error is not None else {"result": result if send else None})))
  if error is not None:
    raise error
  if "error" in message:
    kind, text = message["error"]
    raise _ERRORS.get(kind, RuntimeError)(text)
  return result if primary() else message["result"]
