"""Timing that notices a stolen CPU, and compares functions in interleaved rounds.

Around each timed call we read the machine's busy CPU time (`/proc/stat`, steal
included) and this process's own CPU time. Busy time that is not ours means
another process ran while we measured; a call where it exceeds `steal_limit` of
the call's wall time × cores is discarded and redone (up to `max_redo` times in
total), and the report says how many calls were disturbed.

Functions compared with `measure_side_by_side` run in rounds: each round calls
every function once, in a fresh random order that never runs one function twice
in a row (one that did would find its data in cache: a reversed order biased
the function at the round boundary by 5-10 %). A slow spell of a shared host
(which `/proc/stat` of a VM cannot always see) then slows every function of the
round alike, and the median of the per-round ratios (`paired_ratio`) stays put
where ratios of separately taken medians drift by ±10 %.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import statistics
import time
from collections.abc import Callable, Mapping
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
  min_ms: float
  rounds: int
  disturbed: int  # calls discarded because another process took CPU
  steal_fraction: float  # median share of the machine's CPU taken by others over the kept calls
  samples_ms: tuple[float, ...]  # one per round, in round order


def _timed_call(fn: Callable[[], Any]) -> tuple[float, float]:
  """Wall seconds of `fn()` (blocked until ready), and the share of the machine others took meanwhile."""
  busy0, own0, t0 = _busy_seconds(), _own_seconds(), time.perf_counter()
  jax.block_until_ready(fn())
  wall = time.perf_counter() - t0
  busy1, own1 = _busy_seconds(), _own_seconds()
  if busy0 is None or busy1 is None:
    return wall, 0.0
  return wall, max(0.0, (busy1 - busy0) - (own1 - own0)) / (wall * (os.cpu_count() or 1))


def measure_side_by_side(fns: Mapping[str, Callable[[], Any]], *, repeats: int, warmup: int = 2,
                         steal_limit: float = 0.10, max_redo: int | None = None) -> dict[str, Timing]:
  """Times each function in `repeats` interleaved rounds; a disturbed call is redone in its round."""
  for fn in fns.values():
    for _ in range(warmup):
      jax.block_until_ready(fn())
  max_redo = repeats * len(fns) if max_redo is None else max_redo
  names = list(fns)
  kept = {n: [] for n in names}
  steals = {n: [] for n in names}
  disturbed = dict.fromkeys(names, 0)
  redone, order, rng = 0, [], random.Random(0)
  for _ in range(repeats):
    last = order[-1] if order else None
    order = rng.sample(names, len(names))
    if len(order) > 1 and order[0] == last:
      order[0], order[1] = order[1], order[0]
    for name in order:
      while True:
        wall, steal = _timed_call(fns[name])
        if steal <= steal_limit or redone >= max_redo:
          break
        disturbed[name] += 1
        redone += 1
      kept[name].append(1000 * wall)
      steals[name].append(steal)
  return {n: Timing(statistics.median(kept[n]), min(kept[n]), repeats, disturbed[n], statistics.median(steals[n]),
                    tuple(kept[n])) for n in names}


def measure(fn: Callable[[], Any], *, repeats: int, warmup: int = 2, steal_limit: float = 0.10,
            max_redo: int | None = None) -> Timing:
  """Median wall time of `fn()` (blocked until ready) over `repeats` undisturbed calls."""
  return measure_side_by_side({"fn": fn}, repeats=repeats, warmup=warmup, steal_limit=steal_limit,
                              max_redo=repeats if max_redo is None else max_redo)["fn"]


def paired_ratio(timings: Mapping[str, Timing], num: str, den: str) -> float:
  """Median over rounds of `num`'s time / `den`'s time in the same round."""
  return statistics.median(a / b for a, b in zip(timings[num].samples_ms, timings[den].samples_ms, strict=True))


def write_report(report: dict, out: str) -> None:
  """Writes `report` as JSON to `out`, creating its folder."""
  path = pathlib.Path(out)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(report, indent=2))
  print(f"wrote {path}")
