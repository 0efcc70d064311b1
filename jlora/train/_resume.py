"""Which checkpoint a run resumes from, falling back past damaged ones, and which steps jlora may delete.

`plan` reads only metadata (before the model is built): it refuses step directories
jlora did not write and checkpoints of a different run. `restore` then tries the
candidates newest first; a damaged one (unreadable, failing its checksums, non-finite)
is reported on stderr and the next older one is tried. `save` lists the step in the
run directory's marker before writing it and afterwards deletes the oldest of jlora's
own steps beyond `checkpointing.keep`.
"""

from __future__ import annotations

import sys
from typing import NamedTuple

from jlora.train import _state
from jlora.train._rundir import RunDir

__all__ = ["Plan", "changed_keys", "owned_steps", "plan", "restore", "save", "warn"]


def warn(message: str) -> None:
  """Prints `jlora train: warning: <message>` on stderr."""
  print(f"jlora train: warning: {message}", file=sys.stderr, flush=True)


class Plan(NamedTuple):
  """What to do with the steps in `checkpoints/`: try `candidates` (newest first); delete `stale` before training."""

  candidates: list[int]
  stale: list[int]


def changed_keys(old: dict, new: dict) -> list[str]:
  """The top-level keys whose values differ."""
  return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def _meta(directory: str, step: int) -> dict | None:
  try:
    return _state.read_meta(directory, step)
  except _state.Damaged:
    return None


def owned_steps(directory: str, marker: dict) -> list[int]:
  """jlora's steps under `directory`, oldest first.

  Raises:
    ValueError: a step directory jlora did not write (neither listed in the marker nor
      with jlora's metadata).
  """
  steps = _state.list_steps(directory)
  foreign = [s for s in steps if s not in marker["checkpoints"] and _meta(directory, s) is None]
  if foreign:
    raise ValueError(f"`outputs.dir`: {directory!r} holds step directories jlora did not write ({foreign}); jlora "
                     "never deletes or reads them. Move them away, or choose another `outputs.dir`.")
  return steps


def plan(run_path: str, marker: dict | None, fingerprint: dict, *, resume: bool) -> Plan:
  """The checkpoints of the run directory `run_path` (reading metadata only).

  Raises:
    ValueError: foreign step directories, or (with `resume`) a directory or checkpoint
      of a run with another fingerprint.
  """
  if marker is None:
    return Plan([], [])
  directory = f"{run_path}/checkpoints"
  steps = owned_steps(directory, marker)
  if not resume:
    return Plan([], steps)
  hint = ("use another `outputs.dir`, or set `checkpointing.resume=false` to start over there (which deletes its "
          "checkpoints and, at the end, replaces its outputs)")
  if marker.get("fingerprint") not in (None, fingerprint):
    raise ValueError(f"`outputs.dir`: {run_path!r} holds a different run (changed: "
                     f"{changed_keys(marker['fingerprint'], fingerprint)}); {hint}.")
  candidates = []
  for step in reversed(steps):
    meta = _meta(directory, step)
    if meta is not None and meta.get("fingerprint") != fingerprint:
      raise ValueError(f"{directory!r} holds a checkpoint of a different run (changed: "
                       f"{changed_keys(meta.get('fingerprint') or {}, fingerprint)}); {hint}.")
    candidates.append(step)  # damaged metadata too: `restore` reports it and falls back
  return Plan(candidates, [])


def restore(checkpoints: _state.Checkpoints, template: _state.State, candidates: list[int]) -> tuple[
    _state.State | None, list[int]]:
  """`(state of the newest usable candidate or None, damaged steps)`; warns for each damaged one.

  Raises:
    ValueError: there were candidates and none could be restored.
  """
  damaged, reasons = [], []
  for step in candidates:
    try:
      state = checkpoints.restore(template, step)
    except _state.Damaged as e:
      damaged.append(step)
      reasons.append(str(e))
      continue
    for step_, reason in zip(damaged, reasons):
      warn(f"{reason}; it is deleted and training resumes from step {state.step} ({checkpoints.directory}/{step_}).")
    return state, damaged
  if candidates:
    raise ValueError(f"No usable checkpoint in {checkpoints.directory!r}: {'; '.join(reasons)}. Set "
                     "`checkpointing.resume=false` to start over.")
  return None, []


def save(checkpoints: _state.Checkpoints, run_dir: RunDir, state: _state.State, *, keep: int, fingerprint: dict,
         data_position: tuple[int, int]) -> None:
  """Saves `state` as jlora's step, then deletes jlora's steps older than the newest `keep`."""
  steps = owned_steps(checkpoints.directory, run_dir.marker)
  run_dir.update(checkpoints=sorted({*steps, state.step}))  # listed before it exists: never mistaken as foreign
  checkpoints.save(state, data_position=data_position, fingerprint=fingerprint)
  old = sorted({*steps, state.step})[:-keep]
  for step in old:
    checkpoints.delete(step)
  if old:
    run_dir.update(checkpoints=sorted({*steps, state.step} - set(old)))
