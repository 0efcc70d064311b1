"""A `jlora train` run of several processes: process 0 owns the run directory, every process joins every collective.

In a run launched as several JAX processes (`jlora.train._mesh`), every process runs the
same program: it loads the same examples, builds the same model on the global mesh,
trains the same steps and joins every collective (the jitted step, evaluation, orbax's
checkpoint saves, restores and deletes, `jlora.save_adapter`). Only process 0 touches the
run directory's own files: the lock and marker (`jlora.train._rundir`), `metrics.jsonl`,
`config.yaml`, `summary.json`, `curves.png`, `peft/` and `merged/`, and the printed
summary. The other processes see the directory through `FollowerDir` and `NullMetrics`,
whose writes do nothing.

What process 0 decides from the directory (the checkpoint plan, the steps to delete,
whether step 0 was evaluated) reaches the others through `jlora.parallel.processes.on_primary`, which also raises
process 0's errors (a refused `outputs.dir`, another run's checkpoints) on every
process, so that none waits in a collective that will not come. In one process every
function here is the plain single-process behaviour.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax

from jlora.parallel.processes import is_spread, on_primary, primary
from jlora.train import _resume, _state

__all__ = ["FollowerDir", "NullMetrics", "delete", "host", "local_copies", "save", "spread", "stack_run_dir"]



class FollowerDir:
  """The run directory as a process other than 0 sees it: its paths; its files are process 0's (writes do nothing)."""

  def __init__(self, path: str):
    self.path = path
    self.marker: dict[str, Any] = {"fingerprint": None, "outputs": None, "files": {}, "checkpoints": []}

  def join(self, *names: str) -> str:
    """A path inside the run directory."""
    return os.path.join(self.path, *names)

  def update(self, **fields: Any) -> None:
    """Process 0 writes the marker."""

  def write(self, name: str, write: Callable[[str], Any]) -> None:
    """Process 0 writes the file."""

  def write_text(self, name: str, text: str) -> None:
    """Process 0 writes the file."""

  def remove(self, name: str) -> None:
    """Process 0 removes the file."""


class NullMetrics:
  """`metrics.jsonl` on a process other than 0: nothing to read, nothing written."""

  def read(self) -> list[dict[str, Any]]:
    return []

  def write(self, row: Any) -> None:
    pass


@contextlib.contextmanager
def stack_run_dir(open_dir: Callable[[], contextlib.AbstractContextManager], path: str) -> Iterator[Any]:
  """Process 0 opens the run directory (`RunDir.open`: lock, marker); the others get a `FollowerDir` once it has.

  Raises:
    ValueError: process 0 could not open it (on every process).
  """
  with contextlib.ExitStack() as stack:
    run_dir = on_primary(lambda: stack.enter_context(open_dir()), send=False)
    yield run_dir if primary() else FollowerDir(path)


def delete(checkpoints: _state.Checkpoints, step: int) -> None:
  """Deletes checkpoint `step`: process 0 removes it, the others join orbax's delete (it is collective).

  The others do not re-read the directory first (`Checkpoints.delete` does, and process
  0 may have removed the step already): they go by the steps their manager listed when
  it opened or last saved, which are process 0's.
  """
  checkpoints.delete(step, reload=primary())


def save(checkpoints: _state.Checkpoints, run_dir: Any, state: _state.State, *, keep: int, fingerprint: dict,
         data_position: tuple[int, int]) -> None:
  """`jlora.train._resume.save` on every process: all save the (sharded) state; process 0 keeps the marker.

  Process 0 sends the steps it will delete (its rule: all but the newest `keep` of
  jlora's steps), so that every process joins the same orbax deletes.
  """
  if jax.process_count() == 1:
    _resume.save(checkpoints, run_dir, state, keep=keep, fingerprint=fingerprint, data_position=data_position)
    return
  old = on_primary(lambda: sorted({*_resume.owned_steps(checkpoints.directory, run_dir.marker), state.step})[:-keep])
  if primary():
    _resume.save(checkpoints, run_dir, state, keep=keep, fingerprint=fingerprint, data_position=data_position)
    return
  checkpoints.save(state, data_position=data_position, fingerprint=fingerprint)
  for step in old:
    delete(checkpoints, step)


def local_copies(tree: Any) -> Any:
  """`tree` with each array that every process holds whole (replicated) as this process's copy; others as they are.

  What `jlora.save_adapter(..., base_checksums=True)` hashes must be on this process.
  """
  return jax.tree.map(lambda x: x.addressable_data(0) if is_spread(x) and x.is_fully_replicated else x, tree)


def spread(tree: Any) -> bool:
  """Whether some array of `tree` is split over several processes (no process holds all of it)."""
  return any(is_spread(x) and not x.is_fully_replicated for x in jax.tree.leaves(tree))


def host(tree: Any) -> Any:
  """`tree` with every array spread over several processes gathered into host memory (collective where needed)."""
  if not any(is_spread(x) for x in jax.tree.leaves(tree)):
    return tree
  from jax.experimental import multihost_utils

  return jax.tree.map(lambda x: multihost_utils.process_allgather(x, tiled=True) if is_spread(x) else x, tree)
