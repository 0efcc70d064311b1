"""`run(config)`: check everything, then train a LoRA adapter (or, `train.method: full`, every weight) and write
the outputs.

1. **Check** (`check`, writes nothing): the task, the data (every line), the run directory
   (`jlora.train._rundir.inspect`: not someone else's files), the checkpoints
   (`jlora.train._resume.plan`: not another run's, no foreign step directories), the
   `outputs.adapter_set` entry (`jlora.train._adapters.check_entry`), the output
   directories `adapter/`, `peft/`, `merged/`, `model/` (`jlora.train._outputs.check_locations`); then the
   model, adapters (`lora.init_from`, for a run that does not resume) and optimizer
   (`jlora.train._setup.prepare`).
2. **Train**, holding the run directory's lock: restore the newest usable checkpoint
   (falling back past damaged ones), record the run in the marker, train
   (`jlora.train._loop.train`), save the final state. The orbax manager is closed on
   every path.
3. **Outputs** (`jlora.train._outputs`), the copy in `outputs.adapter_set`, then
   `summary.json` and the printed summary.

With a `mesh` section, `jlora.train._mesh.start` comes first (it may start JAX's
distributed runtime, which must precede every other JAX call) and the run is placed on
the mesh. In a run of several processes, process 0 checks, locks and writes the run
directory, and every process trains and joins the checkpoint saves
(`jlora.train._multihost`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

import jlora
from jlora.formats.versioned import dropping_unraisable, is_closed_loop_report
from jlora.parallel.processes import on_primary, primary
from jlora.train import (
  _adapters,
  _data,
  _loop,
  _mesh,
  _multihost,
  _outputs,
  _report,
  _resume,
  _rundir,
  _setup,
  _state,
  _tasks,
)
from jlora.train._schema import Config

__all__ = ["Checked", "check", "run"]


class Checked(NamedTuple):
  """What `check` found: the task, the examples, the run's fingerprint, `outputs.dir` (absolute) and the checkpoints."""

  task: _tasks.Task
  examples: _data.Examples
  fingerprint: dict
  out_dir: str
  plan: _resume.Plan


def check(config: Config, layout: Any = None) -> Checked:
  """The refusals of `run` before the model loads; writes nothing (decided by process 0 where there are several).

  The task, the data (every line), the batch against the mesh (`layout`), the run
  directory and its checkpoints, the `outputs.adapter_set` entry and the output
  directories (`adapter/`, `peft/`, `merged/`, `model/`).

  Raises:
    ValueError: as `run`, for anything that would make the run fail or write over files jlora did not write.
  """
  task = _tasks.get(config.lora.task_type)
  examples = _data.examples(config.data, task)
  _setup.check_data(config, examples)
  if layout is not None:
    layout.check_batch(config.train.batch_size)
  fingerprint = _setup.fingerprint(config, examples)
  out_dir = os.path.abspath(config.outputs.dir)
  first = _resume.Plan(*on_primary(lambda: _resume.plan(out_dir, _rundir.inspect(out_dir), fingerprint,
                                                        resume=config.checkpointing.resume)))
  on_primary(lambda: _adapters.check_entry(config))
  _outputs.check_locations(config, out_dir)  # refused now, not after training
  return Checked(task, examples, fingerprint, out_dir, first)


def run(config: Config, *, on_step: Callable[[int, float], None] | None = None,
        log: Callable[[str], None] = print) -> dict[str, Any]:
  """Trains a LoRA adapter (or the whole model) as `config` says and writes everything into `config.outputs.dir`.

  Writes `config.yaml` (the resolved config), `checkpoints/` (the training state),
  `adapter/` (`jlora.save_adapter`), `peft/` (PEFT format, if `outputs.peft`),
  `merged/` (Hugging Face format, if `outputs.merged`) or, with `train.method: full`,
  `model/` (the trained model in Hugging Face format) instead of those three, `metrics.jsonl`, `curves.png`,
  `summary.json` and the marker `.jlora-run.json`; with `outputs.adapter_set`, also the
  adapter as `ADAPTER_SET/NAME` (a new version of that adapter checkpoint). Nothing is written before the
  config, the data, the directory, the checkpoints and the adapter-set entry are checked.

  With a `mesh` section the run is spread over a device mesh (its axes and, for several
  processes, how JAX's distributed runtime starts); in a
  run of several processes every process calls `run`, and process 0 writes the files.

  Args:
    config: the validated config (`jlora.train.load`).
    on_step: called as `on_step(step, loss)` after each finished step (and its checkpoint).
    log: where the summary and messages go (process 0 only).

  Returns:
    The summary as a dict: `method`, `before` / `after` metrics, `trainable`, `percent`,
    `adapter_bytes` (or `model_bytes`), `merge_diff` (None for full fine-tuning), `wall_s`,
    `tokens_per_s`, `step_s` (mean seconds of a step after the first), `step_bytes` (the
    compiled step's peak memory, XLA's buffer assignment), ... (on every process).

  Raises:
    Interrupted: after Ctrl-C, once the state of the finished steps is saved.
    Diverged: a non-finite loss, state or merged check (nothing non-finite is saved).
    ValueError: a config that does not fit the model, data, devices or run directory, or
      another run writing into the same directory.
  """
  t_start = time.perf_counter()
  layout = _mesh.start(config.mesh)  # first: jax.distributed.initialize() must precede any other JAX call
  is_primary = primary()
  log = log if is_primary else lambda text: None
  task, examples, fingerprint, out_dir, first = check(config, layout)
  resume = config.checkpointing.resume
  # `lora.init_from` starts a new run only: a resumed one continues from its own checkpoint (`restore` either
  # restores one of the candidates or refuses).
  setup = _setup.prepare(config, task, examples, init_from=not first.candidates, layout=layout)
  if setup.lora is not None:  # EVA chose the ranks: `config.yaml` and every output describe the adapter as made
    config = dataclasses.replace(config, lora=setup.lora)
  _outputs.check_placement(config, setup)
  # tensorstore's "Event loop is closed" reports after a failed write (a full disk) are dropped while the run writes;
  # only from here on: the stdlib data sources read `sys`, whose `unraisablehook` must be the interpreter's then
  with (_multihost.stack_run_dir(lambda: _rundir.RunDir.open(out_dir), out_dir) as run_dir,
        dropping_unraisable(is_closed_loop_report)):
    plan = _resume.Plan(*on_primary(
      lambda: _resume.plan(out_dir, run_dir.marker, fingerprint, resume=resume)))  # again, under the lock
    if config.init_from is not None and not plan.candidates and setup.init_from is None:
      raise ValueError(f"`outputs.dir`: the checkpoints in {out_dir!r} were removed while this run started (by "
                       "another `jlora train`?); nothing was written. Run again to start from `lora.init_from`.")
    ckpt_dir = run_dir.join("checkpoints")
    with _state.Checkpoints(ckpt_dir) as checkpoints:
      rng = np.asarray(jax.random.key_data(setup.keys.data))
      template = _state.State(setup.trainable, setup.opt_state(), 0, rng)  # on a mesh: restored into its shardings
      restored, damaged = _resume.restore(checkpoints, template, plan.candidates)
      for step in plan.stale + damaged:  # jlora's own steps (checked by `plan`)
        _multihost.delete(checkpoints, step)
      resumed_from = restored.step if restored is not None else None
      if resumed_from is not None:
        log(f"Resuming from step {resumed_from} ({ckpt_dir}).")
      state = restored if restored is not None else template
      run_dir.update(fingerprint=fingerprint, checkpoints=_state.list_steps(ckpt_dir),
                     files={**run_dir.marker["files"], "metrics.jsonl": None})
      metrics = (_report.Metrics(run_dir.join("metrics.jsonl"), resume_step=resumed_from) if is_primary else
                 _multihost.NullMetrics())
      evaluate = _loop.make_evaluate(setup, batch_size=config.train.eval_batch_size, n=len(examples.eval))
      prior = on_primary(lambda: [r for r in metrics.read() if r.get("kind") == "eval" and r["step"] == 0])
      before = {k: v for k, v in prior[0].items() if k not in ("kind", "step")} if prior else evaluate(state.trainable)
      if not prior:
        metrics.write({"kind": "eval", "step": 0, **before})

      def save(state: _state.State) -> None:
        position = _data.position(state.step, len(examples.train), config.train.batch_size)
        _multihost.save(checkpoints, run_dir, state, keep=config.checkpointing.keep, fingerprint=fingerprint,
                        data_position=position)

      state, speed = _loop.train(setup, state, config, save=save, metrics=metrics, evaluate=evaluate,
                                 checkpoint_dir=ckpt_dir, on_step=on_step)
      save(state)  # the finished state: running the same command again only rewrites the outputs
    after = evaluate(state.trainable)
    if not any(r.get("kind") == "eval" and r["step"] == state.step for r in metrics.read()):
      metrics.write({"kind": "eval", "step": state.step, **after})
    written = _outputs.write(run_dir, config, setup, state, fingerprint=fingerprint, metrics=metrics, before=before,
                             after=after, eval_examples=len(examples.eval))
    written["adapter_set_entry"] = _adapters.save_to_set(
      config, jlora.combine(state.trainable, _multihost.local_copies(setup.exported_base)))
    model_name = config.model.path or config.model.config.get("model_type") or config.model.source
    result = {"task": task.name, "model": model_name, "steps": state.step, "resumed_from": resumed_from, **written,
              "wall_s": time.perf_counter() - t_start, "train_s": speed.train_s,
              "tokens_per_s": speed.tokens_per_s, "step_s": speed.seconds_per_step, "step_bytes": speed.step_bytes,
              "dir": out_dir}
    if examples.label_names is not None:
      result["labels"] = list(examples.label_names)
    _outputs.write_summary(run_dir, result)
  log(_report.summary_text(result))
  return result
