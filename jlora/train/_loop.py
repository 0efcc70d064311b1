"""The training steps: one jitted step, evaluation, and the loop that logs, checkpoints and stops.

The step is one jitted function of `(trainable, opt_state, frozen, batch, rng)` that
differentiates the task's loss with respect to the trainable tree only and donates the
trainable tree and optimizer state. It also returns whether the loss and the new state
are all finite, fetched with the loss (no extra host sync): a non-finite step is never
kept or saved, and the run stops with `Diverged`. The batch and the dropout key of step
`s` are pure functions of `(train.seed, s)`, so a resumed run repeats exactly the steps
an uninterrupted one takes.

On a device mesh (`setup.layout`, `jlora.train._mesh`) the step is jitted with
`out_shardings` that keep the trainable tree and the optimizer state where they are
(adapters by `jlora.init`'s rule, moments like their parameters), the frozen base keeps
its FSDP / tensor-parallel shards, and the batch of step `s` (the same rows as on one
device) is split over `("data", "fsdp")`, each process loading only its own rows. In a
run of several processes, Ctrl-C stops every process after the same step.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
from jlora.parallel import processes as _processes
from jlora.train import _data, _mesh, _report
from jlora.train._setup import Setup, rows
from jlora.train._state import State, all_finite

__all__ = ["Diverged", "Interrupted", "Throughput", "eval_batches", "make_evaluate", "make_train_step", "step_bytes",
           "train"]


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


class Diverged(RuntimeError):
  """Raised by `run` when a step's loss or new state, or the final merged check, is not finite.

  Nothing non-finite is saved or exported: the checkpoints hold the last finite state.

  Attributes:
    step: the step whose result was not finite.
  """

  def __init__(self, step: int, message: str):
    super().__init__(message)
    self.step = step


class Throughput(NamedTuple):
  """Seconds in all steps (`train_s`); tokens, seconds and count of the steps after the first (compiling) one.

  `step_bytes` is the compiled step's peak memory as XLA's buffer assignment gives it
  (`compiled.memory_analysis()`: arguments + outputs + temporaries - donated buffers
  reused for outputs, as `benchmarks/` measure it); None where the backend does not say.
  """

  train_s: float = 0.0
  tokens: int = 0
  step_s: float = 0.0
  timed_steps: int = 0
  step_bytes: int | None = None

  @property
  def tokens_per_s(self) -> float:
    return self.tokens / self.step_s if self.step_s > 0 else 0.0

  @property
  def seconds_per_step(self) -> float | None:
    """Mean seconds of a step after the first (None: no such step)."""
    return self.step_s / self.timed_steps if self.timed_steps else None


def step_bytes(compiled: Any) -> int | None:
  """Peak bytes of a compiled step from XLA's buffer assignment (None where the backend gives no analysis)."""
  mem = compiled.memory_analysis()
  if mem is None:
    return None
  return int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes)


def _bind(apply_fn: Any, params: Any, rng: jax.Array | None) -> Callable[..., jax.Array]:
  """`forward(*args, **kwargs)` of `apply_fn` with `params` (and a dropout key) bound."""
  return functools.partial(apply_fn, {"params": params}, rngs=None if rng is None else {"lora_dropout": rng})


def make_train_step(setup: Setup, *, temperature: float, dropout: bool, shardings: Any = None) -> Callable:
  """The jitted `step(trainable, opt_state, frozen, batch, rng) -> (trainable, opt_state, loss, finite)`.

  The one step of every `train.method` (`jlora.train._setup.adapt`): LoRA differentiates
  the adapters with the base frozen; full fine-tuning differentiates every weight (its
  frozen half is `{}`). `dropout` is LoRA dropout (ignored by full fine-tuning). On a
  mesh (`setup.layout`), `shardings` are those of `(trainable, opt_state)`: the new state
  keeps them; the loss and the finite flag are replicated. `step.lower(...)` compiles it
  ahead of time (`train` does, for `Throughput.step_bytes`).
  """
  task, model, apply_fn, tx = setup.task, setup.base.model, setup.apply_fn, setup.tx
  dropout = dropout and setup.method == "lora"
  # adapters stored split along their rank are gathered for the matmuls (`Layout.gathered`)
  compute = None if setup.layout is None or shardings is None else setup.layout.gathered(shardings[0])

  def step(trainable, opt_state, frozen, batch, rng):
    def loss_fn(t):
      if compute is not None and setup.method == "lora":
        t = jax.lax.with_sharding_constraint(t, compute)
      return task.loss(_bind(apply_fn, jlora.combine(t, frozen), rng if dropout else None), batch, model, temperature)

    loss, grads = jax.value_and_grad(loss_fn)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    return trainable, opt_state, loss, jnp.isfinite(loss) & all_finite((trainable, opt_state))

  if setup.layout is None:
    return jax.jit(step, donate_argnums=(0, 1))
  replicated = setup.layout.replicated
  return setup.layout.traced(jax.jit(step, donate_argnums=(0, 1), out_shardings=(*shardings, replicated, replicated)))


def eval_batches(arrays: _data.Dataset, size: int) -> Iterator[dict[str, np.ndarray]]:
  """Batches of `size` rows in order; the last is padded with copies of the last row, `weight` 0."""
  n = len(next(iter(arrays.values())))
  for start in range(0, n, size):
    idx = np.arange(start, start + size)
    yield {**rows(arrays, np.minimum(idx, n - 1)), "weight": (idx < n).astype(np.int32)}


def make_evaluate(setup: Setup, *, batch_size: int, n: int) -> Callable[[Any], dict[str, float]]:
  """`evaluate(trainable) -> metrics` over the eval set (the factored model, no dropout).

  On a mesh, each batch is split like a training batch (`batch_size` rounded up to a
  multiple of `data × fsdp` with padding rows of weight 0: the same metrics) and the
  outputs are replicated, so every process gets them.
  """
  task, model, apply_fn, layout = setup.task, setup.base.model, setup.apply_fn, setup.layout

  def eval_step(trainable, frozen, batch):
    return task.eval_outputs(_bind(apply_fn, jlora.combine(trainable, frozen), None), batch, model)

  if layout is None:
    eval_step = jax.jit(eval_step)
  else:
    eval_step = layout.traced(jax.jit(eval_step, out_shardings=layout.replicated))
    batch_size = layout.eval_size(batch_size)

  def evaluate(trainable: Any) -> dict[str, float]:
    outs = []
    for b in eval_batches(setup.eval_arrays, batch_size):
      b = b if layout is None else layout.batch(b, np.arange(batch_size))
      outs.append(jax.device_get(eval_step(trainable, setup.frozen, b)))
    return task.metrics(outs, n)

  return evaluate


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


def train(setup: Setup, state: State, config: Any, *, save: Callable[[State], None], metrics: _report.Metrics,
          evaluate: Callable[[Any], dict[str, float]], checkpoint_dir: str,
          on_step: Callable[[int, float], None] | None = None) -> tuple[State, Throughput]:
  """Runs steps `state.step + 1 ... train.steps`, logging, checkpointing and evaluating as `config` says.

  Args:
    setup: the model, optimizer and encoded data (`jlora.train._setup.prepare`).
    state: the state to continue from (step 0, or a restored checkpoint).
    config: the run's config (`train`, `checkpointing`, `lora`, `optimizer` sections).
    save: saves a (finite) state as a checkpoint.
    metrics: where `train` and `eval` rows go.
    evaluate: `evaluate(trainable) -> metrics` for `train.eval_every`.
    checkpoint_dir: named in messages.
    on_step: called as `on_step(step, loss)` after each finished step (and its checkpoint).

  Returns:
    The final state and the throughput.

  Raises:
    Interrupted: after Ctrl-C, once the state of the finished steps is saved.
    Diverged: a step's loss or new state is not finite (that state is not kept).
  """
  tc, every, layout = config.train, config.checkpointing.every, setup.layout
  placed = None if layout is None else _mesh.shardings((state.trainable, state.opt_state))
  step_fn = make_train_step(setup, temperature=tc.temperature, dropout=config.lora.lora_dropout > 0, shardings=placed)
  rng_key = jax.random.wrap_key_data(jnp.asarray(state.rng, jnp.uint32))
  n_train, first = len(next(iter(setup.train_arrays.values()))), state.step
  bar = _progress(tc.steps, state.step, tc.quiet or not _processes.primary())
  window: list[float] = []
  speed, compiled = Throughput(), None
  with _sigint_flag() as interrupted, warnings.catch_warnings(), contextlib.closing(bar):
    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
    while state.step < tc.steps:
      step = state.step
      idx = _data.batch_indices(step, n_train, tc.batch_size, tc.seed)
      if layout is None:
        batch = rows(setup.train_arrays, idx)
        rng, tokens = jax.random.fold_in(rng_key, step), setup.task.tokens(batch)
      else:  # this process's rows only (throughput: its tokens times the number of processes)
        batch, rng = layout.batch(setup.train_arrays, idx), jax.random.fold_in(rng_key, step)  # the key: replicated
        tokens = setup.task.tokens(rows(setup.train_arrays, idx[layout.local_rows(len(idx))])) * jax.process_count()
      t0 = time.perf_counter()
      if compiled is None:  # ahead of time, once: the same executable a call would build, and its memory analysis
        compiled = step_fn.lower(state.trainable, state.opt_state, setup.frozen, batch, rng).compile()
        speed = speed._replace(step_bytes=step_bytes(compiled))
      new_t, new_o, loss, finite = compiled(state.trainable, state.opt_state, setup.frozen, batch, rng)
      loss, finite = jax.device_get((loss, finite))
      loss, dt = float(loss), time.perf_counter() - t0
      if not finite:
        what = f"the loss is {loss}" if not np.isfinite(loss) else "the updated adapter or optimizer state is not finite"
        raise Diverged(step + 1, f"Training diverged at step {step + 1}: {what}. Nothing non-finite was saved or "
                       f"exported (the checkpoints in {checkpoint_dir} hold the last finite state). Lower "
                       f"`optimizer.learning_rate` (now {config.optimizer.learning_rate:g}) or raise "
                       "`optimizer.warmup_steps`, then run again with `checkpointing.resume=false`.")
      speed = speed._replace(train_s=speed.train_s + dt)
      if step > first:
        speed = speed._replace(tokens=speed.tokens + tokens, step_s=speed.step_s + dt,
                               timed_steps=speed.timed_steps + 1)
      state = state._replace(trainable=new_t, opt_state=new_o, step=step + 1)
      window.append(loss)
      bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{speed.tokens_per_s:,.0f}", refresh=False)
      bar.update(1)
      if state.step % tc.log_every == 0 or state.step == tc.steps:  # the mean loss since the last line
        metrics.write({"kind": "train", "step": state.step, "loss": float(np.mean(window)),
                       "lr": float(setup.schedule(step)), "tokens_per_s": speed.tokens_per_s})
        window = []
      if every and state.step % every == 0:
        save(state)
      if tc.eval_every and state.step % tc.eval_every == 0 and state.step < tc.steps:
        metrics.write({"kind": "eval", "step": state.step, **evaluate(state.trainable)})
      if on_step is not None:
        on_step(state.step, loss)
      if interrupted["set"] if layout is None else layout.any(interrupted["set"]):
        save(state)
        raise Interrupted(state.step, checkpoint_dir)
  return state, speed
