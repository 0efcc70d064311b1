"""The outputs of a finished run, written so that the run directory always describes the adapter (or model) in it.

Order: the merged-vs-factored check first (a non-finite result raises `Diverged` and
nothing is written); then, if the directory holds the outputs of another run (another
fingerprint) or of another step, the files that describe them (`config.yaml`,
`summary.json`) and output directories this run does not rewrite (`peft/`, `merged/`;
`adapter/` after a LoRA run when this one is full fine-tuning, `model/` the other way
round) are removed; then `adapter/`, `peft/`, `merged/` (LoRA: `train.method: lora`) or
`model/` (full fine-tuning: the whole trained model, Hugging Face format), `curves.png`,
`config.yaml` and `summary.json` are written, each atomically, and the marker records
whose outputs they are.

In a run of several processes (`jlora.train._multihost`) every process calls `write`:
the merged check and `adapter/` (`jlora.save_adapter`, collective) are done by all, the
other files by process 0, from host copies of the leaves spread over processes. The
base's checksums in `adapter/` need every base leaf on each process: a base split over
processes (`mesh.fsdp` / `mesh.tensor` > 1) is saved without them (shapes and dtypes
are still checked on load).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp

import jlora
import jlora.formats.checkpoint
from jlora import models
from jlora.core.safe_load import dump_yaml
from jlora.formats import atomic as _io
from jlora.formats.checkpoint import FORMAT, MARKER
from jlora.formats.versioned import check_target
from jlora.parallel import processes as _processes
from jlora.train import _multihost, _report
from jlora.train._loop import Diverged, eval_batches
from jlora.train._resume import warn
from jlora.train._rundir import RunDir
from jlora.train._schema import Config
from jlora.train._setup import Setup
from jlora.train._state import State

__all__ = ["check_locations", "check_placement", "merge_gap", "write", "write_summary", "written_dirs"]


def merge_gap(setup: Setup, params: Any, merged: Any, batch_size: int) -> float:
  """Max |factored - merged| of the model outputs on the first eval rows (one jitted call); NaN if any is not finite."""
  model, task = setup.base.model, setup.task
  args, kwargs = task.inputs(next(eval_batches(setup.eval_arrays, min(batch_size, 8))), model)

  def gap(params, merged, args, kwargs):
    factored = setup.apply_fn({"params": params}, *args, **kwargs).astype(jnp.float32)
    diff = jnp.abs(factored - model.apply({"params": merged}, *args, **kwargs).astype(jnp.float32))
    return jnp.where(jnp.isfinite(diff).all(), diff.max(), jnp.nan)  # max() alone skips NaN (it gave -inf)

  # One compile for both forwards: run op by op, they took seconds even for a tiny T5. On a mesh, the result is
  # replicated (every process reads it).
  gap = jax.jit(gap) if setup.layout is None else jax.jit(gap, out_shardings=setup.layout.replicated)
  return float(gap(params, merged, args, kwargs))


def check_placement(config: Config, setup: Setup) -> None:
  """Raises a ValueError, before training, for outputs a run of several processes cannot write from this layout."""
  if config.outputs.adapter_set is not None and _multihost.spread(setup.exported_base):
    raise ValueError("`outputs.adapter_set` saves the adapter with its base's checksums, which need every base "
                     "leaf on each process, but this run splits the base over several processes (`mesh.fsdp` / "
                     "`mesh.tensor` > 1). Remove `outputs.adapter_set` and copy RUN_DIR/adapter into the set "
                     "afterwards, or use `mesh.fsdp=1 mesh.tensor=1`.")


def _symlink(path: str, what: str) -> None:
  if os.path.islink(path):
    raise ValueError(f"{what}: {path!r} is a symbolic link (to {os.readlink(path)!r}); jlora replaces it as a whole "
                     "(a new version is swapped in), which would replace the link, not what it points to. Remove the "
                     "link, then run again.")


def written_dirs(config: Config) -> dict[str, bool]:
  """Which output directories a run writes: `adapter/`, `peft/`, `merged/` (LoRA) or `model/` (full fine-tuning)."""
  lora = config.train.method == "lora"
  return {"adapter": lora, "peft": lora and config.outputs.peft, "merged": lora and config.outputs.merged,
          "model": not lora}


def check_locations(config: Config, out_dir: str) -> None:
  """Raises a ValueError, before training, for an output location inside `out_dir` that the run could not write.

  `adapter/` must be absent, empty or a jlora adapter checkpoint holding only jlora's files;
  `peft/` (with `outputs.peft`), `merged/` (with `outputs.merged`) and `model/` (with
  `train.method: full`) absent, empty or written by jlora (their manifest lists every entry);
  none of them a symbolic link. (`checkpoints/` is `jlora.train._resume.plan`'s, the
  adapter-set entry `jlora.train._adapters.check_entry`'s.) Collective in a run of several
  processes; process 0 reads.
  """
  wanted = written_dirs(config)

  def local() -> None:
    for name in ("adapter", "peft", "merged", "model"):
      path = os.path.join(out_dir, name)
      if wanted[name]:
        _symlink(path, "`outputs.dir`")
      if wanted[name] and name != "adapter":
        try:
          _io.check_replaceable(path, f"`outputs.{name}`" if name != "model" else "`outputs.dir`")
        except ValueError as e:
          raise ValueError(f"{e}" + (f" (Or set `outputs.{name}=false`.)" if name != "model" else "")) from None

  _processes.on_primary(local, send=False)
  if wanted["adapter"]:
    try:
      check_target(os.path.join(out_dir, "adapter"), MARKER, "adapter checkpoint", fmt=FORMAT)
    except ValueError as e:
      raise ValueError(f"`outputs.dir`: {str(e).removeprefix('`path`: ')}") from None


def _drop_stale(run_dir: RunDir, name: str) -> None:
  """Removes the output directory `name` of an earlier run, if jlora wrote it (else warns and keeps it)."""
  path = run_dir.join(name)
  if not os.path.exists(path):
    return
  try:
    if name == "adapter":
      check_target(path, MARKER, "adapter checkpoint", fmt=FORMAT)
    else:
      _io.check_replaceable(path, f"`{name}/`")
  except ValueError:
    warn(f"{path} is from an earlier adapter but holds files jlora did not write; it is kept. Remove it yourself.")
    return
  shutil.rmtree(path)


def write(run_dir: RunDir, config: Config, setup: Setup, state: State, *, fingerprint: dict,
          metrics: _report.Metrics, before: dict[str, float], after: dict[str, float],
          eval_examples: int) -> dict[str, Any]:
  """Writes the adapter and every other output of the run; returns the partial summary (sizes, merge_diff).

  Args:
    run_dir: the locked run directory (a `_multihost.FollowerDir` on processes other than 0).
    config: the run's config.
    setup: its model and data.
    state: the final (finite) training state.
    fingerprint: the run's fingerprint, recorded as the outputs' in the marker.
    metrics: the run's `metrics.jsonl` (for `curves.png`).
    before: held-out metrics before training.
    after: held-out metrics after training.
    eval_examples: the number of held-out examples.

  Raises:
    Diverged: the merged-vs-factored difference is not finite (nothing is written).
    ValueError: an output directory holds files jlora did not write.
  """
  lora, base, wanted = config.lora, setup.base, written_dirs(config)
  params = jlora.combine(state.trainable, setup.frozen)
  diff = None  # full fine-tuning: no adapter, nothing merged
  if wanted["adapter"]:
    merged = jlora.dequantize(jlora.merge(params, lora))  # QLoRA: the trained model is over the dequantized base
    diff = merge_gap(setup, params, merged, config.train.eval_batch_size)
    if not math.isfinite(diff):
      raise Diverged(state.step, f"The merged-vs-factored check is not finite ({diff}) after step {state.step}: the "
                     "merged kernels or the outputs overflow (e.g. in bfloat16). Nothing was exported; try "
                     "`model.dtype: float32` or a lower `optimizer.learning_rate`.")
  this = {"fingerprint": fingerprint, "step": state.step}
  plot = config.outputs.plot and _report.can_plot()
  if run_dir.marker.get("outputs") not in (None, this):  # the directory's outputs describe another adapter
    if run_dir.marker["outputs"].get("fingerprint") != fingerprint:
      run_dir.remove("config.yaml")  # first: without it, `jlora merge` refuses the directory until the end
    run_dir.remove("summary.json")
    if not plot:
      run_dir.remove("curves.png")
    for name, rewritten in wanted.items():
      if not rewritten:
        _drop_stale(run_dir, name)
    run_dir.update(outputs=None)
  if wanted["adapter"]:
    saved = {"adapter_dir": run_dir.join("adapter")}
    # With base checksums (of the frozen leaves), `jlora merge` refuses a base with other weights than this run's.
    jlora.formats.checkpoint.save_adapter(saved["adapter_dir"], jlora.combine(state.trainable, _multihost.local_copies(
      setup.exported_base)), lora, base_checksums=not _multihost.spread(setup.exported_base))
    saved["adapter_bytes"] = _report.dir_bytes(saved["adapter_dir"])
    stats = jlora.summary(params, lora)
    counts = {"trainable": stats.trainable, "total": stats.total, "percent": stats.percent}
  else:  # the whole trained model, as a Hugging Face checkpoint (gathered on each host, as writing one file takes)
    saved = {"model_dir": run_dir.join("model")}
    whole = _multihost.host(state.trainable)
    if _processes.primary():
      models.save_pretrained(saved["model_dir"], base.model, whole, copy_from=base.checkpoint)
    saved["model_bytes"] = _report.dir_bytes(os.path.join(saved["model_dir"], "model.safetensors"))
    n = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(state.trainable))
    counts = {"trainable": n, "total": n, "percent": 100.0}
  if wanted["peft"]:  # the adapter's leaves gathered (small); the base's are not read
    peft_params = jlora.combine(_multihost.host(state.trainable), setup.frozen)
    if _processes.primary():
      jlora.save_peft(run_dir.join("peft"), base.model, peft_params, lora)
  if wanted["merged"]:
    merged = _multihost.host(merged)  # the whole model on each host, as writing one file takes
    if _processes.primary():
      models.save_pretrained(run_dir.join("merged"), base.model, merged, copy_from=base.checkpoint)
  if plot:
    run_dir.write("curves.png", lambda tmp: _report.plot(metrics.read(), tmp, headline=setup.task.headline))
  run_dir.write_text("config.yaml", dump_yaml(config.to_dict(), sort_keys=False))  # reads back the same
  run_dir.update(outputs=this)
  if base.checkpoint:
    full = sum(_report.dir_bytes(os.path.join(base.checkpoint, f)) for f in os.listdir(base.checkpoint)
               if f.endswith(".safetensors"))
    full_what = "base checkpoint (model.safetensors)"
  else:  # shapes and dtypes only (with full fine-tuning the base's buffers went to the first step)
    full = sum(math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree.leaves(base.params))
    full_what = "base parameters (random init, in memory)"
  return {"method": config.train.method, **counts, **saved, "full_bytes": full, "full_what": full_what,
          "eval_examples": eval_examples, "before": before, "after": after, "headline": setup.task.headline,
          "merge_diff": diff}


def write_summary(run_dir: RunDir, result: dict[str, Any]) -> None:
  """`summary.json` (atomically), last: it describes the outputs written before it."""
  run_dir.write_text("summary.json", json.dumps(result, indent=2) + "\n")
