"""Orbax checkpoints of the training state: trainable tree, optimizer state, step, data position and rng.

One `orbax.checkpoint.CheckpointManager` per run directory (`<outputs.dir>/checkpoints`),
one step directory per save. Saves are synchronous and orbax commits each step
directory atomically (written under a temporary name, renamed when complete), so a
process killed mid-save (even by SIGKILL) leaves the earlier checkpoints intact.

Each step's `meta` item (JSON) holds `format: jlora.train_state`, the step, the rng, the
data position, the run's fingerprint and a SHA-256 digest of every state leaf
(`jlora.formats.integrity`). `restore` recomputes the digests and checks that every value is
finite, so a truncated or corrupted checkpoint is a `Damaged` error (the caller falls
back to an older one) rather than wrong numbers. Which steps may be deleted is decided
by the caller (`jlora.train._resume`); this module deletes only what it is told to.

**Several processes.** In a multi-process JAX run every process calls `save` and
`restore` (orbax's save, commit and restore are collective) on a directory they
all see: each writes and reads its own shards, orbax commits the step atomically,
and `meta` is written once, by process 0. A leaf spread over several processes gets
block digests instead of one SHA-256 (`meta["block_digests"]`, see `jlora.formats.integrity`),
each block hashed by the process holding it; `restore` checks every block whatever
the template's layout (another mesh, one device), and the checksum and finiteness
verdicts are the same on every process, so they fall back to the same older step
together. (A read error that only some processes meet leaves the others in orbax's
restore barrier until its timeout.) `directory` may be a URL that orbax and
`etils.epath` open (`gs://bucket/run/checkpoints`; see `jlora.formats.versioned` for what
orbax's commit guarantees there).
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jlora.formats import integrity as _integrity
from jlora.formats.versioned import checkable, container, is_dir, quiet_failed_reads

__all__ = ["FORMAT", "Checkpoints", "Damaged", "State", "all_finite", "list_steps", "read_meta"]

FORMAT = "jlora.train_state"


class State(NamedTuple):
  """The training state. `step` counts finished optimizer steps; `rng` is the run's base key data (2,) uint32."""

  trainable: Any
  opt_state: Any
  step: int
  rng: np.ndarray


class Damaged(ValueError):
  """A checkpoint step that cannot be read, or whose contents fail their checksums."""


def all_finite(tree: Any) -> jax.Array:
  """Whether every floating-point value of `tree` is finite: a bool scalar (traceable, so it serves inside jit)."""
  checks = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.stack(checks).all() if checks else jnp.asarray(True)


def _flat(state: State) -> dict[tuple[str, ...], Any]:
  tree = {"trainable": state.trainable, "opt_state": state.opt_state}
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {tuple(jax.tree_util.keystr((k,)) for k in path): leaf for path, leaf in leaves}


def list_steps(directory: str) -> list[int]:
  """The step directories (decimal names) under `directory`, oldest first; nothing is created."""
  if not is_dir(directory):
    return []
  if "://" in directory:  # on gs:// a step is committed by a commit_success.txt, not a rename: orbax's rule
    from orbax.checkpoint.path import step as step_lib

    return sorted(m.step for m in step_lib.standard_name_format().find_all(directory))
  return sorted(int(e) for e in os.listdir(directory) if e.isdigit() and os.path.isdir(os.path.join(directory, e)))


def read_meta(directory: str, step: int) -> dict:
  """The `meta` item of step `step` (read directly, no orbax manager).

  Raises:
    Damaged: missing, not JSON, or not written by `jlora train`.
  """
  path = os.path.join(directory, str(step), "meta", "metadata")
  try:
    if "://" in path:
      from etils import epath

      meta = json.loads(epath.Path(path).read_text())
    else:
      with open(path, encoding="utf-8") as f:
        meta = json.load(f)
  except (OSError, ValueError) as e:
    raise Damaged(f"checkpoint step {step} has no readable metadata ({type(e).__name__}: {e})") from None
  if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("step") != step:
    raise Damaged(f"checkpoint step {step}: its metadata is not a `jlora train` state's")
  return meta


class Checkpoints:
  """Save / restore / delete `State`s under `directory` with orbax; a context manager that closes the manager.

  Args:
    directory: where step directories go (created if needed, unless `read_only`).
    read_only: open it to restore only, for a process that reads the checkpoints
      of a run another process may be writing. A writer removes what a killed save
      left (orbax's `N.orbax-checkpoint-tmp` directories, in a background thread
      that its first save waits for); a reader must not: that may be the save in
      progress, and two removals of one directory race.
  """

  def __init__(self, directory: str | os.PathLike, *, read_only: bool = False):
    self.directory = container(directory)
    self.read_only = read_only
    # Retention is the caller's (it deletes only steps jlora wrote), so orbax keeps everything.
    options = ocp.CheckpointManagerOptions(max_to_keep=None, create=not read_only, enable_async_checkpointing=False,
                                           cleanup_tmp_directories=not read_only, read_only=read_only)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

  def __enter__(self) -> Checkpoints:
    return self

  def __exit__(self, *exc: object) -> None:
    self.close()

  def save(self, state: State, *, data_position: tuple[int, int], fingerprint: dict) -> bool:
    """Writes `state` (blocking) as step `state.step`, with its digests; False if that step is already saved.

    Collective in a multi-process run: every process calls it with its part of `state`.

    Raises:
      ValueError: opened `read_only`.
    """
    self._writable("save")
    self._manager.reload()
    if state.step in self._manager.all_steps():
      return False
    tree = {"trainable": state.trainable, "opt_state": state.opt_state}
    flat = _flat(state)
    meta = {"format": FORMAT, "step": state.step, "rng": np.asarray(state.rng).tolist(),
            "data_position": {"epoch": data_position[0], "offset": data_position[1]}, "fingerprint": fingerprint,
            "digests": _integrity.digests(checkable(flat))}
    blocks = _integrity.block_digests(flat)  # leaves spread over several processes (collective)
    if blocks:
      meta["block_digests"] = blocks
    self._manager.save(state.step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                                           meta=ocp.args.JsonSave(meta)))
    self._manager.wait_until_finished()
    return True

  def restore(self, template: State, step: int) -> State:
    """Step `step`, shaped like `template` and restored into its shardings, checked against its digests.

    Collective in a multi-process run: every process calls it with a template
    on the same shardings (any mesh, or one device).

    Raises:
      Damaged: unreadable metadata or arrays, a checksum mismatch, or non-finite values.
    """
    meta = read_meta(self.directory, step)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                            {"trainable": template.trainable, "opt_state": template.opt_state})
    try:
      with warnings.catch_warnings(), quiet_failed_reads():  # "Sharding info not provided…": single-device arrays
        warnings.simplefilter("ignore", UserWarning)
        out = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
      state = State(out["state"]["trainable"], out["state"]["opt_state"], int(meta["step"]),
                    np.asarray(meta["rng"], np.uint32))
      _integrity.verify(_flat(state), meta["digests"], what=f"training checkpoint {self.directory}/{step}",
                        blocks=meta.get("block_digests"))
    except Exception as e:  # tensorstore / orbax errors on damaged files, checksum mismatches
      detail = " ".join(str(e).split())
      raise Damaged(f"checkpoint step {step} cannot be restored ({type(e).__name__}: "
                    f"{detail[:240] + ' …' if len(detail) > 240 else detail})") from None
    if not bool(all_finite((state.trainable, state.opt_state))):
      raise Damaged(f"checkpoint step {step} holds non-finite values")
    return state

  def delete(self, step: int, *, reload: bool = True) -> None:
    """Removes step `step` (the caller checked that jlora wrote it).

    Args:
      step: the step.
      reload: list the directory again first. A process other than 0 of a
        multi-process run passes False: it joins orbax's (collective) delete by
        the steps its manager last listed, which process 0 may already be removing.
    """
    self._writable("delete")
    if reload:
      self._manager.reload()
    if step in self._manager.all_steps():
      self._manager.delete(step)

  def _writable(self, what: str) -> None:
    if self.read_only:  # orbax's read-only manager would skip it silently
      raise ValueError(f"Checkpoints.{what}: {self.directory} was opened with read_only=True, which only restores; "
                       "open it with read_only=False to write")

  def close(self) -> None:
    """Releases the manager."""
    self._manager.close()
