"""Orbax checkpoints of the training state: trainable tree, optimizer state, step, data position and rng.

One `orbax.checkpoint.CheckpointManager` per run directory (`<outputs.dir>/checkpoints`),
keeping the `keep` most recent steps. Saves are synchronous and orbax commits each
step directory atomically (written under a temporary name, renamed when complete),
so a process killed mid-save (even by SIGKILL) leaves the earlier checkpoints intact
and `restore` picks the latest complete one.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["State", "Checkpoints"]


class State(NamedTuple):
  """The training state. `step` counts finished optimizer steps; `rng` is the run's base key data (2,) uint32."""

  trainable: Any
  opt_state: Any
  step: int
  rng: np.ndarray


class Checkpoints:
  """Save / restore `State`s under `directory`, keeping the `keep` newest.

  Args:
    directory: where step directories go (created if needed).
    keep: how many checkpoints to keep.
  """

  def __init__(self, directory: str | os.PathLike, *, keep: int):
    if keep < 1:
      raise ValueError(f"`checkpointing.keep` must be at least 1, got {keep}.")
    self.directory = os.path.abspath(os.fspath(directory))
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

  def latest(self) -> int | None:
    """The newest complete checkpoint's step, or None."""
    return self._manager.latest_step()

  def save(self, state: State, *, data_position: tuple[int, int], fingerprint: dict) -> None:
    """Writes `state` (blocking) as step `state.step`; a no-op if that step is already saved."""
    if state.step in self._manager.all_steps():
      return
    meta = {"step": state.step, "rng": np.asarray(state.rng).tolist(),
            "data_position": {"epoch": data_position[0], "offset": data_position[1]}, "fingerprint": fingerprint}
    self._manager.save(
      state.step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave({"trainable": state.trainable, "opt_state": state.opt_state}),
        meta=ocp.args.JsonSave(meta),
      ),
    )
    self._manager.wait_until_finished()

  def check(self, fingerprint: dict) -> int | None:
    """The newest checkpoint's step, or None; cheap (reads its metadata only).

    Raises:
      ValueError: the checkpoint was written by a run with a different config fingerprint
        (model, LoRA settings, data or batch size), which would not resume exactly.
    """
    step = self.latest()
    if step is None:
      return None
    saved = self._meta(step).get("fingerprint", {})
    if saved != fingerprint:
      changed = sorted(k for k in set(fingerprint) | set(saved) if fingerprint.get(k) != saved.get(k))
      raise ValueError(f"{self.directory} holds a checkpoint of a different run (changed: {changed}); "
                       "use another `outputs.dir`, delete the checkpoints, or set `checkpointing.resume=false`.")
    return step

  def restore(self, template: State, step: int) -> State:
    """Checkpoint `step` (one that `check` accepted), shaped like `template`."""
    meta = self._meta(step)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                            {"trainable": template.trainable, "opt_state": template.opt_state})
    out = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    return State(out["state"]["trainable"], out["state"]["opt_state"], int(meta["step"]),
                 np.asarray(meta["rng"], np.uint32))

  def _meta(self, step: int) -> dict:
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def close(self) -> None:
    """Releases the manager."""
    self._manager.close()
