"""The reference training loop: `run(config)` trains a LoRA adapter as a `Config` says and writes the outputs.

The step is one jitted function of `(trainable, opt_state, frozen, batch, rng)` that
differentiates the loss with respect to the trainable tree only (`jlora.split` /
`jlora.combine`) and donates the trainable tree and optimizer state. The batch and the
dropout key of step `s` are pure functions of `(train.seed, s)`, and the state is saved
by orbax every `checkpointing.every` steps, so a run that is stopped (Ctrl-C, or even
SIGKILL) and started again with the same config ends with exactly the same adapter as
an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml

import jlora
import jlora.checkpoint
from jlora.train import _data, _report, _state, _tasks
from jlora.train._schema import Config

__all__ = ["Interrupted", "run"]


class Interrupted(Exception):
  """Raised by `run` after Ctrl-C (SIGINT): the state of the finished steps is saved.

  Attributes:
    step: the last finished step (saved).
    directory: the checkpoint directory to resume from.
  """

  def __init__(self, step: int, directory: str):
    super().__init__(f"Interrupted at step {step}; the training state is saved in {directory}. "
                     "Run the same command again to resume.")
    self.step, self.directory = step, directory


def make_optimizer(cfg: Any, steps: int, trainable: Any,
                   lora: jlora.LoraConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """`(tx, schedule)`: AdamW with warmup + schedule and optional clipping / LoRA+, for the trainable tree."""
  peak, warm = cfg.learning_rate, min(cfg.warmup_steps, steps)
  after = max(1, steps - warm)
  decay = {"constant": optax.constant_schedule(peak), "cosine": optax.cosine_decay_schedule(peak, after),
           "linear": optax.linear_schedule(peak, 0.0, after)}[cfg.schedule]
  schedule = optax.join_schedules([optax.linear_schedule(0.0, peak, warm), decay], [warm]) if warm else decay
  tx = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
  if cfg.clip_norm is not None:
    tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
  return jlora.optimizer(tx, lora, lora_plus_ratio=cfg.lora_plus_ratio), schedule


def _forward(model, params, lora, rng):
  rngs = {"lora_dropout": rng} if rng is not None and lora.lora_dropout > 0 else None
  return lambda *a, **k: jlora.apply(model, params, lora, *a, rngs=rngs, **k)


def _rows(arrays: _data.Dataset, idx: np.ndarray) -> dict[str, np.ndarray]:
  return {k: v[idx] for k, v in arrays.items()}


def _eval_batches(arrays: _data.Dataset, size: int) -> Iterator[dict[str, np.ndarray]]:
  n = len(next(iter(arrays.values())))
  for start in range(0, n, size):
    idx = np.arange(start, start + size)
    weight = (idx < n).astype(np.int32)
    yield {**_rows(arrays, np.minimum(idx, n - 1)), "weight": weight}


@contextlib.contextmanager
def _sigint_flag() -> Iterator[dict[str, bool]]:
  """A flag set by the first Ctrl-C (a second one interrupts at once); main thread only."""
  flag = {"set": False}
  if threading.current_thread() is not threading.main_thread():
    yield flag
    return

  def handler(signum, frame):
    if flag["set"]:
      raise KeyboardInterrupt
    flag["set"] = True
    print("\nCtrl-C: finishing this step and saving a checkpoint (Ctrl-C again to abort)...", file=sys.stderr)

  old = signal.signal(signal.SIGINT, handler)
  try:
    yield flag
  finally:
    signal.signal(signal.SIGINT, old)


def _fingerprint(config: Config) -> dict:
  """What must not change between a run and its resumption (`train.steps` may grow)."""
  d = config.to_dict()
  train = {k: d["train"][k] for k in ("batch_size", "seq_len", "target_len", "temperature", "seed")}
  return json.loads(json.dumps({"model": d["model"], "lora": d["lora"], "data": d["data"],
                                "optimizer": d["optimizer"], "train": train}, default=str))


def save_merged(directory: str, model: Any, merged: Any, checkpoint: str | None) -> None:
  """Writes a merged model in Hugging Face format, with the base checkpoint's other files.

  `jlora.models.save_pretrained` writes `config.json` and `model.safetensors`; the
  tokenizer and any sentence-transformers files (`modules.json`, `1_Pooling/`, ...) of
  the base checkpoint directory are copied beside them, so the directory loads like the base.
  """
  from jlora import models

  models.save_pretrained(directory, model, merged)
  if checkpoint is None:
    return
  for name in sorted(os.listdir(checkpoint)):
    src, dst = os.path.join(checkpoint, name), os.path.join(directory, name)
    if name in ("config.json", "README.md") or name.endswith((".safetensors", ".safetensors.index.json", ".bin")):
      continue
    if os.path.isdir(src):
      shutil.copytree(src, dst, dirs_exist_ok=True)
    else:
      shutil.copy2(src, dst)


def run(config: Config, *, on_step: Callable[[int, float], None] | None = None,
        log: Callable[[str], None] = print) -> dict[str, Any]:
  """Trains a LoRA adapter as `config` says and writes everything into `config.outputs.dir`.

  Writes `config.yaml` (the resolved config), `checkpoints/` (the training state),
  `adapter/` (`jlora.checkpoint.save_adapter`), `peft/` (PEFT format, if
  `outputs.peft`), `merged/` (Hugging Face format, if `outputs.merged`),
  `metrics.jsonl`, `curves.png` and `summary.json`.

  Args:
    config: the validated config (`jlora.train.load`).
    on_step: called as `on_step(step, loss)` after each finished step (and its checkpoint).
    log: where the summary and messages go.

  Returns:
    The summary as a dict: `before` / `after` metrics, `trainable`, `percent`,
    `adapter_bytes`, `merge_diff`, `wall_s`, `tokens_per_s`, ...

  Raises:
    Interrupted: after Ctrl-C, once the state of the finished steps is saved.
    ValueError: a config that does not fit the model or data.
  """
  t_start = time.perf_counter()
  tc, lora = config.train, config.lora
  if lora.task_type is None:
    raise ValueError(f"`lora.task_type` is required by `jlora train`; one of {list(_tasks.HEADLINE)}.")
  task = getattr(lora.task_type, "value", lora.task_type)
  if task not in _tasks.HEADLINE:
    raise ValueError(f"`lora.task_type: {task}` is not trained by `jlora train`; use one of {list(_tasks.HEADLINE)}.")
  out_dir = os.path.abspath(config.outputs.dir)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "config.yaml"), "w", encoding="utf-8") as f:
    yaml.safe_dump(config.to_dict(), f, sort_keys=False)

  # Data, and whether a checkpoint of this very run exists (checked before the model loads).
  train_rows, eval_rows = _data.examples(config.data, task)
  fingerprint = {**_fingerprint(config), "examples_sha256": hashlib.sha256(
    json.dumps([train_rows, eval_rows], sort_keys=True, default=str).encode()).hexdigest()}
  ckpt_dir = os.path.join(out_dir, "checkpoints")
  if not config.checkpointing.resume and os.path.isdir(ckpt_dir):
    shutil.rmtree(ckpt_dir)
  checkpoints = _state.Checkpoints(ckpt_dir, keep=config.checkpointing.keep)
  try:
    resumed_from = checkpoints.check(fingerprint) if config.checkpointing.resume else None

    # Model, adapters, optimizer.
    num_labels = _data.num_labels(task, train_rows, eval_rows)
    key = jax.random.key(tc.seed)
    model_key, lora_key, data_key = jax.random.split(key, 3)
    base = _tasks.build_model(config.model, task, num_labels=num_labels, key=model_key)
    model = base.model
    enc = lambda rows: _data.encode(rows, task, base.tokenizer, seq_len=tc.seq_len, target_len=tc.target_len)  # noqa: E731
    train_arrays, eval_arrays = enc(train_rows), enc(eval_rows)
    n_train = len(train_rows)
    args, kwargs = _tasks.example_inputs(task, _rows(train_arrays, np.arange(1)), model)
    params = jlora.init(lora_key, model, base.params, lora, *args, **kwargs)
    trainable, frozen = jlora.split(params, lora)
    tx, schedule = make_optimizer(config.optimizer, tc.steps, trainable, lora)
    state = _state.State(trainable, tx.init(trainable), 0, np.asarray(jax.random.key_data(data_key)))
    if resumed_from is not None:
      state = checkpoints.restore(state, resumed_from)
      log(f"Resuming from step {resumed_from} ({ckpt_dir}).")
  except BaseException:
    checkpoints.close()
    raise
  metrics_log = _report.Metrics(os.path.join(out_dir, "metrics.jsonl"), resume_step=resumed_from)
  rng_key = jax.random.wrap_key_data(jnp.asarray(state.rng, jnp.uint32))

  @jax.jit
  def eval_step(trainable, frozen, batch):
    return _tasks.eval_outputs(_forward(model, jlora.combine(trainable, frozen), lora, None), task, batch, model)

  def evaluate(trainable) -> dict[str, float]:
    outs = [jax.device_get(eval_step(trainable, frozen, b)) for b in _eval_batches(eval_arrays, tc.eval_batch_size)]
    return _tasks.metrics(task, outs, len(eval_rows))

  def train_step(trainable, opt_state, frozen, batch, rng):
    def loss_fn(t):
      fwd = _forward(model, jlora.combine(t, frozen), lora, rng)
      return _tasks.loss(fwd, task, batch, model, temperature=tc.temperature)

    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  step_fn = jax.jit(train_step, donate_argnums=(0, 1))
  headline, _ = _tasks.HEADLINE[task]
  prior = [r for r in metrics_log.read() if r.get("kind") == "eval" and r["step"] == 0]
  before = {k: prior[0][k] for k in prior[0] if k not in ("kind", "step")} if prior else evaluate(trainable)
  if not prior:
    metrics_log.write({"kind": "eval", "step": 0, **before})

  def save() -> None:
    checkpoints.save(state, data_position=_data.position(state.step, n_train, tc.batch_size), fingerprint=fingerprint)

  bar = _progress(tc.steps, state.step, tc.quiet)
  window: list[float] = []
  # train_s: seconds in all steps; trained_tokens / step_s: the steps after the first (compiling) one.
  trained_tokens, step_s, train_s = 0, 0.0, 0.0
  with _sigint_flag() as interrupted, warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
    while state.step < tc.steps:
      step = state.step
      batch = _rows(train_arrays, _data.batch_indices(step, n_train, tc.batch_size, tc.seed))
      t0 = time.perf_counter()
      new_t, new_o, loss = step_fn(state.trainable, state.opt_state, frozen, batch, jax.random.fold_in(rng_key, step))
      loss = float(loss)
      dt = time.perf_counter() - t0
      train_s += dt
      if step > (resumed_from or 0):
        trained_tokens, step_s = trained_tokens + _tasks.tokens(task, batch), step_s + dt
      state = state._replace(trainable=new_t, opt_state=new_o, step=step + 1)
      window.append(loss)
      tps = trained_tokens / step_s if step_s > 0 else 0.0
      bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:,.0f}", refresh=False)
      bar.update(1)
      if state.step % tc.log_every == 0 or state.step == tc.steps:  # the mean loss since the last line
        metrics_log.write({"kind": "train", "step": state.step, "loss": float(np.mean(window)),
                           "lr": float(schedule(step)), "tokens_per_s": tps})
        window = []
      if config.checkpointing.every and state.step % config.checkpointing.every == 0:
        save()
      if tc.eval_every and state.step % tc.eval_every == 0 and state.step < tc.steps:
        metrics_log.write({"kind": "eval", "step": state.step, **evaluate(state.trainable)})
      if on_step is not None:
        on_step(state.step, loss)
      if interrupted["set"]:
        save()
        bar.close()
        checkpoints.close()
        raise Interrupted(state.step, ckpt_dir)
    bar.close()
  save()  # the finished state: running the same command again only rewrites the outputs
  checkpoints.close()

  # Outputs.
  params = jlora.combine(state.trainable, frozen)
  after = evaluate(state.trainable)
  if not any(r.get("kind") == "eval" and r["step"] == state.step for r in metrics_log.read()):
    metrics_log.write({"kind": "eval", "step": state.step, **after})
  adapter_dir = os.path.join(out_dir, "adapter")
  jlora.checkpoint.save_adapter(adapter_dir, params, lora)
  if config.outputs.peft:
    jlora.save_peft(os.path.join(out_dir, "peft"), params, lora, model=model)
  merged = jlora.merge(params, lora)
  probe = next(_eval_batches(eval_arrays, min(tc.eval_batch_size, 8)))
  args, kwargs = _tasks.example_inputs(task, probe, model)

  @jax.jit  # one compile for both forwards: run op by op, they took seconds even for a tiny T5
  def merge_gap(params, merged, args, kwargs):
    factored_out = jlora.apply(model, params, lora, *args, **kwargs).astype(jnp.float32)
    return jnp.max(jnp.abs(factored_out - model.apply({"params": merged}, *args, **kwargs).astype(jnp.float32)))

  merge_diff = float(merge_gap(params, merged, args, kwargs))
  if config.outputs.merged:
    save_merged(os.path.join(out_dir, "merged"), model, merged, base.checkpoint)
  if config.outputs.plot:
    _report.plot(metrics_log.read(), os.path.join(out_dir, "curves.png"), headline=headline)
  if base.checkpoint:
    full = sum(_report.dir_bytes(os.path.join(base.checkpoint, f)) for f in os.listdir(base.checkpoint)
               if f.endswith(".safetensors"))
    full_what = "base checkpoint (model.safetensors)"
  else:
    full = sum(leaf.nbytes for leaf in jax.tree.leaves(base.params))
    full_what = "base parameters (random init, in memory)"
  stats = jlora.summary(params, lora)
  result = {
    "task": task, "model": config.model.path or config.model.config.get("model_type") or config.model.source,
    "steps": state.step, "resumed_from": resumed_from, "trainable": stats.trainable, "total": stats.total,
    "percent": stats.percent, "adapter_bytes": _report.dir_bytes(adapter_dir), "adapter_dir": adapter_dir,
    "full_bytes": full, "full_what": full_what, "eval_examples": len(eval_rows), "before": before, "after": after,
    "headline": headline, "merge_diff": merge_diff, "wall_s": time.perf_counter() - t_start, "train_s": train_s,
    "tokens_per_s": trained_tokens / step_s if step_s > 0 else 0.0, "dir": out_dir,
  }
  with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
  log(_report.summary_text(result))
  return result


class _NoBar:
  def update(self, n: int) -> None:
    pass

  def set_postfix(self, **kwargs: Any) -> None:
    pass

  def close(self) -> None:
    pass


def _progress(total: int, initial: int, quiet: bool) -> Any:
  if quiet:
    return _NoBar()
  try:
    from tqdm.auto import tqdm
  except ImportError:
    return _NoBar()
  return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


def replace(config: Config, **sections: dict[str, Any]) -> Config:
  """`config` with some keys of some sections replaced, e.g. `replace(cfg, train={"steps": 3})`."""
  return dataclasses.replace(config, **{k: dataclasses.replace(getattr(config, k), **v) for k, v in sections.items()})
