"""Everything a run needs before its first step: keys, data, model, adapters and optimizer.

`run_keys` is the one place the run's random keys come from, so that `jlora train`
and `jlora merge` / `export-peft` (which rebuild the base model, including randomly
initialized weights and new heads) derive the same ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, NamedTuple

import jax
import numpy as np
import optax

import jlora
from jlora.quant.tree import is_weight
from jlora.train import _adapters, _data, _model, _tasks
from jlora.train._schema import Config

__all__ = ["RunKeys", "Setup", "adapt", "adapted_trees", "available_memory", "base_model", "check_data", "check_sizes",
           "fingerprint", "make_optimizer", "prepare", "rows", "run_keys"]


class RunKeys(NamedTuple):
  """The keys of a run, all from `train.seed`."""

  model: jax.Array  # random base weights and new heads (e.g. `classifier`)
  adapter: jax.Array  # `jlora.init` of the adapters
  data: jax.Array  # the base of the per-step dropout keys (`fold_in(data, step)`)


def run_keys(seed: int) -> RunKeys:
  """`RunKeys` of `train.seed`: `jax.random.split(jax.random.key(seed), 3)`, in that order."""
  return RunKeys(*jax.random.split(jax.random.key(seed), 3))


def fingerprint(config: Config, examples: _data.Examples) -> dict:
  """What must not change between a run and its resumption (`train.steps` may grow), with a digest of the data."""
  d = config.to_dict()
  train = {k: d["train"][k] for k in ("batch_size", "seq_len", "target_len", "temperature", "seed")}
  if config.train.method != "lora":  # absent for LoRA: the fingerprints of runs older than `train.method` still match
    train["method"] = config.train.method
  rows = json.dumps([examples.train, examples.eval], sort_keys=True, default=str).encode()
  return json.loads(json.dumps({"model": d["model"], "lora": d["lora"], "data": d["data"], "optimizer": d["optimizer"],
                                "train": train, "examples_sha256": hashlib.sha256(rows).hexdigest()}, default=str))


def make_optimizer(cfg: Any, steps: int, lora: jlora.LoraConfig | None) -> tuple[optax.GradientTransformation,
                                                                                 optax.Schedule]:
  """`(tx, schedule)`: AdamW with warmup + schedule and optional clipping / LoRA+ (via `jlora.optimizer`).

  With `lora` None (full fine-tuning) the AdamW transformation updates every leaf it is given.
  """
  peak, warm = cfg.learning_rate, min(cfg.warmup_steps, steps)
  after = max(1, steps - warm)
  decay = {"constant": optax.constant_schedule(peak), "cosine": optax.cosine_decay_schedule(peak, after),
           "linear": optax.linear_schedule(peak, 0.0, after)}[cfg.schedule]
  schedule = optax.join_schedules([optax.linear_schedule(0.0, peak, warm), decay], [warm]) if warm else decay
  tx = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
  if cfg.clip_norm is not None:
    tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
  return (tx if lora is None else jlora.optimizer(tx, lora, lora_plus_ratio=cfg.lora_plus_ratio)), schedule


def rows(arrays: _data.Dataset, idx: np.ndarray) -> dict[str, np.ndarray]:
  """The rows `idx` of every array."""
  return {k: v[idx] for k, v in arrays.items()}


def check_data(config: Config, examples: _data.Examples) -> None:
  """Raises a ValueError when the examples do not fit the `train` settings (before anything is written)."""
  if len(examples.train) < config.train.batch_size:
    raise ValueError(f"`train.batch_size` is {config.train.batch_size} but the training set has only "
                     f"{len(examples.train)} examples; lower it or add data.")


def available_memory() -> int | None:
  """Bytes of host memory available to this process now (`MemAvailable`, or free pages), None where unknown."""
  try:
    with open("/proc/meminfo", encoding="ascii") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  try:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (OSError, ValueError, AttributeError):
    return None


def _device_memory() -> int | None:
  """Bytes of memory of the first accelerator (None on CPU, where the host's memory is the limit)."""
  try:
    stats = jax.devices()[0].memory_stats() or {}
  except Exception:  # backends without memory statistics raise their own errors
    return None
  return stats.get("bytes_limit")


def _gb(n: float) -> str:
  return f"{n / 1e9:,.1f} GB" if n >= 1e8 else f"{n / 1e6:,.1f} MB"


def check_sizes(config: Config, task: _tasks.Task, base: _model.Model, examples: _data.Examples) -> None:
  """Raises a ValueError, before the data is encoded, for sequence lengths the model or the memory cannot take.

  `train.seq_len` must fit a model with a table of learned positions (GPT-2 `n_positions`, BERT
  `max_position_embeddings`); the encoded data (int32: ids and masks of every example) must fit
  the host's available memory; and one layer's attention scores for one batch (float32,
  `batch_size x seq_len**2`, a lower bound of what a step needs) the device's.
  """
  tc = config.train
  limit = base.model.input_limits().get("positions")
  if limit is not None and tc.seq_len > limit.size:
    where = "`model.config`" if config.model.source == "random" else "the checkpoint's config.json"
    raise ValueError(f"`train.seq_len` is {tc.seq_len:,} but the model has {limit.size:,} positions (`{limit.field}` in "
                     f"{where}); set `train.seq_len` to at most {limit.size:,}.")
  per_row = 4 * (2 * tc.seq_len * (2 if "document" in task.fields else 1) + (3 * tc.target_len if "target" in
                                                                               task.fields else 0))
  rows = len(examples.train) + len(examples.eval)
  host = available_memory()
  if host is not None and rows * per_row > host:
    raise ValueError(f"`train.seq_len` {tc.seq_len:,}" + (f" / `train.target_len` {tc.target_len:,}" if "target" in
                     task.fields else "") + f": the encoded data of {rows:,} examples would take {_gb(rows * per_row)}"
                     f", but {_gb(host)} of memory is available; lower `train.seq_len` (or `data.max_train` / "
                     "`data.max_eval`).")
  device = _device_memory() or host
  scores = 4 * max(tc.batch_size, tc.eval_batch_size) * max(tc.seq_len, tc.target_len) ** 2
  if device is not None and scores > device:
    raise ValueError(f"`train.seq_len` {tc.seq_len:,}: one layer's attention scores for a batch of "
                     f"{max(tc.batch_size, tc.eval_batch_size)} would take {_gb(scores)}, but the device has "
                     f"{_gb(device)}; lower `train.seq_len` or `train.batch_size` / `train.eval_batch_size`.")


def base_model(config: Config, task: _tasks.Task, examples: _data.Examples | None = None, *,
               layout: Any = None) -> _model.Model:
  """The run's base model (loaded, or initialized with `run_keys(train.seed).model`).

  Args:
    config: the run's config.
    task: its task.
    examples: the run's examples (for SEQ_CLS classes); read from `config.data` when
      None and the task has labels.
    layout: the run's `jlora.train._mesh.Layout` (the params go straight into their
      shards; the same values as on one device), or None.
  """
  if examples is None and "label" in task.fields:
    examples = _data.examples(config.data, task)
  num_labels = examples.num_labels if examples is not None else None
  return _model.build(config.model, task, num_labels=num_labels, key=run_keys(config.train.seed).model, layout=layout)


@dataclasses.dataclass(frozen=True)
class Setup:
  """A run ready to train: model, the trainable / frozen halves, optimizer, encoded data."""

  task: _tasks.Task
  base: _model.Model
  apply_fn: Any = dataclasses.field(repr=False)  # jlora.apply_fn(model, lora)
  trainable: Any = dataclasses.field(repr=False)
  frozen: Any = dataclasses.field(repr=False)
  tx: optax.GradientTransformation = dataclasses.field(repr=False)
  schedule: optax.Schedule = dataclasses.field(repr=False)
  train_arrays: _data.Dataset = dataclasses.field(repr=False)
  eval_arrays: _data.Dataset = dataclasses.field(repr=False)
  keys: RunKeys = dataclasses.field(repr=False)
  init_from: str | None = None  # the adapter checkpoint `trainable` was loaded from (`lora.init_from`)
  # `train.method`: `lora` (trainable = the adapters, frozen = the base) or `full` (trainable = every weight, frozen
  # = {}, apply_fn = the model's own apply)
  method: str = "lora"
  original: Any = dataclasses.field(default=None, repr=False)  # with model.quantize: the unquantized frozen half
  layout: Any = None  # the `jlora.train._mesh.Layout` of a run with a `mesh` section (None: one device)
  lora: jlora.LoraConfig | None = None  # the adapters' config, if init changed it (EVA's ranks); else `config.lora`

  @property
  def exported_base(self) -> Any:
    """The frozen half adapters are saved against (fingerprints, checksums): the base as loaded, never quantized."""
    return self.frozen if self.original is None else self.original

  def opt_state(self) -> Any:
    """The optimizer's initial state (on a mesh: each moment sharded like its parameter)."""
    return self.tx.init(self.trainable) if self.layout is None else self.layout.opt_state(self.tx, self.trainable)


def prepare(config: Config, task: _tasks.Task, examples: _data.Examples, *, init_from: bool = True,
            layout: Any = None) -> Setup:
  """Builds the model, encodes the data, adds adapters and makes the optimizer (writes nothing).

  With `lora.init_from` (and `init_from=True`: not when the run resumes from its own
  checkpoint), the trainable tree is the saved adapter's (`jlora.train._adapters.load_init`).
  With a `layout` (`jlora.train._mesh`), the base is sharded on its mesh, `jlora.init`
  creates each adapter on its kernel's devices, and `Layout.place_adapters` splits the
  adapters over `fsdp` too (along the rank, where the kernel's rule leaves them whole).
  """
  tc = config.train
  keys = run_keys(tc.seed)
  base = base_model(config, task, examples, layout=layout)
  check_sizes(config, task, base, examples)
  encode = lambda r: task.encode(r, base.tokenizer, tc.seq_len, tc.target_len)  # noqa: E731
  train_arrays, eval_arrays = encode(examples.train), encode(examples.eval)
  args, kwargs = task.inputs(rows(train_arrays, np.arange(1)), base.model)
  setup = adapt(config, task, base, keys, (args, kwargs), init_from=init_from,
                eva_batches=eva_batches(config, task, train_arrays))
  if layout is not None and setup.method == "lora":  # adapters split over `fsdp` too (`Layout.rank_axis`)
    setup = dataclasses.replace(setup, trainable=layout.place_adapters(setup.trainable, setup.exported_base, config.lora))
  return dataclasses.replace(setup, train_arrays=train_arrays, eval_arrays=eval_arrays, layout=layout)


# EVA (`lora.init_lora_weights: eva`) reads up to this many training batches, cycled until its components converge
EVA_BATCHES = 16


def eva_batches(config: Config, task: _tasks.Task, arrays: _data.Dataset) -> list | None:
  """The first `EVA_BATCHES` training batches (in file order), for EVA; None for any other init."""
  if config.train.method != "lora" or config.lora.init_lora_weights != "eva":
    return None
  n, size = len(next(iter(arrays.values()))), config.train.batch_size
  return [rows(arrays, np.arange(i, min(i + size, n))) for i in range(0, min(n, EVA_BATCHES * size), size)]


def adapt(config: Config, task: _tasks.Task, base: _model.Model, keys: RunKeys, sample: tuple[tuple, dict], *,
          init_from: bool = True, eva_batches: list | None = None) -> Setup:
  """What trains and how, for `train.method`: a `Setup` without data (its `train_arrays` / `eval_arrays` empty).

  `lora`: `jlora.init` adds the adapters (traced on the model inputs `sample = (args,
  kwargs)`, one example is enough), `jlora.split` makes the trainable half and the frozen
  base (packed with `model.quantize`), the forward is `jlora.apply_fn`, and the optimizer
  is `jlora.optimizer`'s; with EVA (`eva_batches`) `jlora.init_eva` adds them, and the
  `Setup`'s `lora` is the config with the ranks EVA chose. `full`: the trainable tree is the whole base tree, the frozen
  half is `{}`, the forward is the model's own `apply`, and AdamW updates every weight.
  `jlora.train._loop.make_train_step` builds the one step of both from the result.
  """
  if config.train.method == "full":
    tx, schedule = make_optimizer(config.optimizer, config.train.steps, None)
    return Setup(task, base, base.model.apply, base.params, {}, tx, schedule, {}, {}, keys, method="full")
  trainable, frozen, original, lora = adapted_trees(config, base.model, base.params, sample, keys.adapter,
                                                    eva_batches=eva_batches, task=task)
  tx, schedule = make_optimizer(config.optimizer, config.train.steps, lora)
  source = config.init_from if init_from else None
  if source is not None:
    trainable = _adapters.load_init(config, base.params, trainable)
  return Setup(task, base, jlora.apply_fn(base.model, lora), trainable, frozen, tx, schedule, {}, {}, keys,
               init_from=source, original=None if original is frozen else original,
               lora=None if lora == config.lora else lora)


def adapted_trees(config: Config, model: Any, params: Any, inputs: tuple[tuple, dict], key: jax.Array, *,
                  eva_batches: list | None = None, task: _tasks.Task | None = None) -> tuple[Any, Any, Any, Any]:
  """`(trainable, frozen, original, lora)` of a run's base params: adapters added, split, the frozen half quantized.

  `original` is the frozen half before `model.quantize` (the same tree without it); `lora` the adapters' config.
  Without `eva_batches` pure in the params, so `jax.eval_shape` of it gives a run's trees as shapes (`jlora plan`;
  EVA's adapters there have the config's ranks, whose sum EVA keeps).

  Args:
    config: the run's config (`lora`, `model.quantize`).
    model: the base model.
    params: its params (arrays, or tracers under `jax.eval_shape`).
    inputs: `(args, kwargs)` of one example batch (`task.inputs`), for `jlora.init`.
    key: `run_keys(train.seed).adapter`.
    eva_batches: with `lora.init_lora_weights: eva`, the batches EVA reads (`eva_batches`), with the `task` whose
      `inputs` run them; the model's second input (the attention mask of every task) leaves padding out, except for
      a sequence-to-sequence model, whose decoder reads other positions.
  """
  args, kwargs = inputs
  lora = config.lora
  if lora.init_lora_weights == "eva" and eva_batches is not None:
    mask = (lambda b: None) if task.name == "SEQ_2_SEQ_LM" else (lambda b: task.inputs(b, model)[0][1])
    adapted, lora = jlora.init_eva(key, model, params, lora, eva_batches, inputs=lambda b: task.inputs(b, model),
                                   mask=mask)
  else:  # without batches (`jlora plan`, shapes only) EVA's adapters are made at the config's ranks
    drawn = dataclasses.replace(lora, init_lora_weights=True) if lora.init_lora_weights == "eva" else lora
    adapted = jlora.init(key, model, params, drawn, *args, **kwargs)
  trainable, frozen = jlora.split(adapted, lora)
  return trainable, quantized(config, frozen, model), frozen, lora


def quantized(config: Config, frozen: Any, model: Any = None) -> Any:
  """QLoRA (`model.quantize`): the frozen half with its kernels packed, else `frozen` itself.

  Besides the `kernel`s, the weights a reference model keeps under their own names (`hf_spec().raw_leaves`:
  Mixtral's stacked experts `gate_up_proj`, `down_proj`, most of its parameters) are packed too, each expert with
  its own int8 scales.
  """
  if not config.model.quantize:
    return frozen
  scanned = bool(config.model.options.get("scan_layers"))  # int8 scales per layer of a scanned stack
  raw = tuple(model.hf_spec().raw_leaves) if hasattr(model, "hf_spec") else ()
  return jlora.quantize(frozen, config.model.quantize, select=lambda path, leaf: is_weight(path, leaf, ("kernel", *raw)),
                        stack=lambda path, leaf: leaf.ndim - 2 if is_weight(path, leaf, raw) else
                        int(scanned and leaf.ndim > 2))
