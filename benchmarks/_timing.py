"""Timing that notices a stolen CPU: medians of rounds, redoing rounds another process disturbed.

Around each timed call we read the machine's busy CPU time (`/proc/stat`) and this
process's own CPU time. Busy time that is not ours means another process ran
while we measured; a round where it exceeds `steal_limit` of the round's
wall time × cores is discarded and redone (up to `max_redo` times in total), and
the report says how many rounds were disturbed.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _busy_seconds() -> float | None:
  try:
    with open("/proc/stat") as f:
      fields = [int(v) for v in f.readline().split()[1:]]
  except OSError:
    return None
  idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
  return (sum(fields[:8]) - idle) / _TICK


def _own_seconds() -> float:
  t = os.times()
  return t.user + t.system + t.children_user + t.children_system


class Timing(NamedTuple):
  median_ms: float
  rounds: int
  disturbed: int  # rounds discarded because another process took CPU
  steal_fraction: float  # median share of the machine's CPU taken by others over the kept rounds


def measure(fn: Callable[[], Any], *, repeats: int, warmup: int = 2, steal_limit: float = 0.10,
            max_redo: int | None = None) -> Timing:
  """Median wall time of `fn()` (blocked until ready) over `repeats` undisturbed rounds."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  cores = os.cpu_count() or 1
  max_redo = repeats if max_redo is None else max_redo
  kept, steals, disturbed = [], [], 0
  while len(kept) < repeats:
    busy0, own0, t0 = _busy_seconds(), _own_seconds(), time.perf_counter()
    jax.block_until_ready(fn())
    wall = time.perf_counter() - t0
    busy1, own1 = _busy_seconds(), _own_seconds()
    steal = 0.0
    if busy0 is not None and busy1 is not None:
      steal = max(0.0, (busy1 - busy0) - (own1 - own0)) / (wall * cores)
    if steal > steal_limit and disturbed < max_redo:
      disturbed += 1
      continue
    kept.append(wall)
    steals.append(steal)
  return Timing(1000 * statistics.median(kept), len(kept), disturbed, statistics.median(steals))
