"""The base model of a run: `model.source` loaded or initialized for a task, with its tokenizer.

Every mistake in `model.*` (a missing path, a model type that cannot do the task, a
`model.config` value of the wrong type, options the model does not take) is a one-line
`ValueError` naming the key, before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jlora import models
from jlora.train._data import ByteTokenizer
from jlora.train._tasks import Task

__all__ = ["Model", "build", "model_type", "shapes"]


@dataclasses.dataclass(frozen=True)
class Model:
  """A base model to adapt: `model`, its `params`, a `tokenizer`, and `checkpoint` (its directory, if any)."""

  model: nn.Module
  params: dict
  tokenizer: Any
  checkpoint: str | None
  model_type: str


def _dtype(name: str) -> Any:
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def _path(cfg: Any) -> str | None:
  """The checkpoint directory of `model.source` (None for random init)."""
  if cfg.source == "random":
    return None
  if cfg.source == "minilm":
    try:
      return models.minilm_path()
    except ImportError as e:
      raise ValueError(f"`model.source: minilm`: {e}") from None
  if not cfg.path:
    raise ValueError("`model.source: pretrained` needs `model.path`, a local Hugging Face checkpoint directory.")
  if not os.path.isfile(os.path.join(cfg.path, "config.json")):
    raise ValueError(f"`model.path`: {cfg.path!r} is not a Hugging Face checkpoint directory (no config.json).")
  return cfg.path


def model_type(cfg: Any) -> str:
  """The `model_type` of a `ModelConfig`, read from `model.config` or the checkpoint's config.json.

  Raises:
    ValueError: no `model_type`, an unreadable config.json, or an unsupported model type.
  """
  path = _path(cfg)
  if path is None:
    found, where = cfg.config.get("model_type"), "`model.config`"
    if found is None:
      raise ValueError("`model.source: random` needs `model.config` with a `model_type`, e.g. "
                       "{model_type: gpt2, n_layer: 2, n_embd: 64, n_head: 4, vocab_size: 259}.")
  else:
    where = f"`model.path` {os.path.join(path, 'config.json')!r}"
    try:
      with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        found = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
      raise ValueError(f"{where} cannot be read as a JSON object ({e}).") from None
  if found not in models.SUPPORTED_MODEL_TYPES:
    raise ValueError(f"{where}: `model_type` {found!r} is not supported; use one of "
                     f"{list(models.SUPPORTED_MODEL_TYPES)}.")
  return found


def build(cfg: Any, task: Task, *, num_labels: int | None, key: jax.Array, layout: Any = None) -> Model:
  """Loads or initializes the base model of a `ModelConfig` for `task`.

  Args:
    cfg: the `model` section.
    task: the task (its `model_types` and `model_options`).
    num_labels: SEQ_CLS classes (None for other tasks).
    key: initializes a random model, or the new head of a checkpoint (e.g. `classifier`).
    layout: a `jlora.train._mesh.Layout`: the params are created or loaded straight into
      their shards on its mesh (`jlora.models.mesh_shardings` with its rules); None: one device.

  Raises:
    ValueError: a missing `model.path` / `model.config`, a model type that cannot do
      `task`, or a `model.config` / `model.options` value the model cannot be built from.
  """
  return _make(cfg, task, num_labels, layout, key)


def shapes(cfg: Any, task: Task, *, num_labels: int | None, layout: Any = None) -> Model:
  """The `Model` that `build` gives, with `params` as `jax.ShapeDtypeStruct`s (sharded on `layout`'s mesh).

  No weight is read (of a checkpoint, only config.json and the tokenizer) and nothing is
  allocated: what `jlora plan` compiles a step from. Raises as `build`.
  """
  return _make(cfg, task, num_labels, layout, None)


def _make(cfg: Any, task: Task, num_labels: int | None, layout: Any, key: jax.Array | None) -> Model:
  """`build` (with `key`) or `shapes` (`key` None)."""
  kind = model_type(cfg)
  if kind not in task.model_types:
    raise ValueError(f"`lora.task_type: {task.name}` does not fit `{kind}` models; use one of {list(task.model_types)} "
                     f"(`model.config.model_type` / `model.path`).")
  options = {**task.model_options(num_labels), **cfg.options}
  path = _path(cfg)
  tokenizer = _tokenizer(cfg.tokenizer or ("bytes" if path is None else path))  # the cheap checks first
  placed = {} if layout is None else {"mesh": layout.mesh, "rules": layout.rules}
  try:
    if key is None:
      where = {"config": cfg.config} if path is None else {"path": path}
      model, params = models.param_shapes(**where, dtype=_dtype(cfg.dtype), **placed, **options)
    elif path is None:
      model, params = models.from_config(cfg.config, key=key, dtype=_dtype(cfg.dtype), **placed, **options)
    else:
      model, params = models.from_pretrained(path, key=key, dtype=_dtype(cfg.dtype), **placed, **options)
  except (ValueError, TypeError) as e:
    what = "`model.config`" if path is None else f"`model.path` ({path!r})"
    raise ValueError(f"cannot build a {kind} model from {what} and `model.options` ({' '.join(str(e).split())}).") \
      from None
  return Model(model, params, tokenizer, path, kind)


def _tokenizer(path: str) -> Any:
  if path == "bytes":
    return ByteTokenizer()
  try:
    return models.Tokenizer.from_pretrained(path)
  except (OSError, ValueError, TypeError) as e:
    raise ValueError(f"`model.tokenizer`: cannot load a tokenizer from {path!r} ({e}); give a directory with "
                     "tokenizer.json, or `bytes`.") from None
