"""The model protocol, stated once: what an architecture provides to the rest of jlora.

An architecture module (`gpt2`, `llama`, `bert`, `t5`) provides three things:

* a **config class** (:class:`HFConfig`): a frozen dataclass with `from_hf(dict)`, which
  reads a Hugging Face `config.json` dict (unknown keys ignored, unsupported settings a
  `ValueError`), and `to_hf()`, which writes one back;
* **model classes** subclassing :class:`HFModel` (the top-level linen modules `build`
  returns), each with its Hugging Face tensor layout (`hf_spec`), inputs for `model.init`
  (`example_inputs`) and the index ranges of its integer inputs (`input_limits`);
  decoders subclass :class:`CausalLM`, which adds the KV cache that `generate` uses;
* an :class:`Architecture` record named `ARCHITECTURE`, which ties the config class to
  `build(config, *, dtype, **options)`, names the options `build` accepts and derives
  default options from the files of a checkpoint directory.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Protocol

import flax.linen as nn
import jax.numpy as jnp

from jlora.formats.peft.torch_names import NameMap
from jlora.models._checkpoint import HFSpec, name_map
from jlora.models._checks import Limit, check_length, check_values
from jlora.models._layers import KVCache

__all__ = ["Architecture", "AxisTable", "CausalLM", "HFConfig", "HFModel", "checked_model", "config_fields", "hashable"]

AxisTable = Mapping[str, tuple[str | None, ...]]
"""Logical axis names of a model's parameters by module-path suffix (see `HFModel.param_axes`)."""


class HFConfig(Protocol):
  """A model config that reads and writes Hugging Face `config.json` dicts."""

  @classmethod
  def from_hf(cls, config: Mapping[str, Any]) -> HFConfig:
    """The config of a `config.json` dict; raises `ValueError` for settings the model does not support."""
    ...

  def to_hf(self) -> dict[str, Any]:
    """A `config.json` dict that `transformers` and `from_hf` read back to this config."""
    ...


def hashable(value: Any) -> Any:
  """Config values as hashable types (JSON lists -> tuples), so that modules stay hashable."""
  if isinstance(value, list):
    return tuple(hashable(v) for v in value)
  return value


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true/false", str: "a string"}


def _check_type(key: str, value: Any, hint: Any) -> None:
  """Raises unless `value` has a type the field's annotation `hint` allows (a finite number for `float`)."""
  kinds = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
  if value is None and type(None) in kinds:
    return
  simple = [k for k in kinds if k in _TYPE_NAMES]
  others = [typing.get_origin(k) or k for k in kinds if k not in _TYPE_NAMES and k is not type(None)]
  if not simple or any(isinstance(value, k) for k in others if isinstance(k, type)):
    return
  number = isinstance(value, (int, float)) and not isinstance(value, bool)
  ok = any(isinstance(value, k) and (k is bool or not isinstance(value, bool)) for k in simple)
  ok = ok or (float in simple and number)
  if ok and isinstance(value, float) and not math.isfinite(value):
    ok = False
  if not ok:
    raise ValueError(f"config `{key}` must be {' or '.join(_TYPE_NAMES[k] for k in simple)}, got {value!r} "
                     f"({type(value).__name__}); correct it in config.json (or the config dict given).")


def config_fields(cls: type, config: Mapping[str, Any]) -> dict[str, Any]:
  """The entries of a `config.json` dict that are fields of the dataclass `cls`, with hashable values.

  Raises:
    ValueError: a value whose type the field does not take (e.g. `n_embd: "abc"`), naming the key.
  """
  hints = typing.get_type_hints(cls)
  out = {}
  for f in dataclasses.fields(cls):
    if f.name in config:
      out[f.name] = hashable(config[f.name])
      _check_type(f.name, out[f.name], hints[f.name])
  return out


class HFModel(nn.Module, abc.ABC):
  """Base of the top-level jlora models.

  Attributes:
    config: the architecture (an :class:`HFConfig`).
    dtype: dtype of parameters and computation.
    param_axes: (class attribute) the logical axis names of every parameter, by module-path
      suffix: `{'self_attn/q_proj/kernel': ('embed', 'heads'), ...}`; the longest suffix of a
      parameter's path wins, and a scanned stack adds `'layers'` first (see
      `jlora.models._partitioning`). A parameter that no entry covers is an error there.
  """

  config: Any
  dtype: Any = jnp.float32
  param_axes: ClassVar[AxisTable] = {}

  @abc.abstractmethod
  def hf_spec(self) -> HFSpec:
    """How this model's params map to Hugging Face tensor names (see `_checkpoint.HFSpec`)."""

  def example_inputs(self) -> tuple:
    """Positional inputs for `model.init`: input_ids (1, 2) int32."""
    return (jnp.zeros((1, 2), jnp.int32),)

  def input_limits(self) -> dict[str, Limit]:
    """Index ranges of integer inputs, by argument name: `input_ids` in `[0, vocab_size)`, and so on."""
    return {"input_ids": Limit(self.config.vocab_size, "vocab_size")}

  def check_inputs(self, **inputs: Any) -> None:
    """Checks concrete integer inputs (by argument name) against `input_limits()`; tracers pass unchecked.

    Raises:
      ValueError: an input holds an index outside its table (see `jlora.models._checks`).
    """
    limits = self.input_limits()
    for arg, value in inputs.items():
      check_values(type(self).__name__, arg, value, limits[arg])

  def check_length(self, arg: str, length: Any) -> None:
    """Checks that positions `0 .. length-1` fit a learned position table (`input_limits()['positions']`)."""
    limit = self.input_limits().get("positions")
    if limit is not None:
      check_length(type(self).__name__, arg, length, limit)

  def peft_name_map(self) -> NameMap:
    """PEFT/`transformers` module names of this model (see `jlora.formats.peft.torch_names`)."""
    return name_map(self.hf_spec())


class CausalLM(HFModel):
  """Base of the decoders that `generate` runs.

  A subclass is called as `model.apply(variables, input_ids, attention_mask=None,
  positions=None, cache=None)` and returns logits (B, T, V), or `(logits, cache)` when a
  :class:`KVCache` is passed; it defines `cache_dims`.
  """

  @abc.abstractmethod
  def cache_dims(self) -> tuple[int, int, int]:
    """`(num_layers, num_kv_heads, head_dim)` of the KV cache."""

  def init_cache(self, batch: int, length: int) -> KVCache:
    """An empty :class:`KVCache` of `length` slots for `batch` sequences."""
    layers, heads, head_dim = self.cache_dims()
    return KVCache.create(
      num_layers=layers, batch=batch, length=length, num_kv_heads=heads, head_dim=head_dim, dtype=self.dtype
    )


def _no_options(config: Mapping[str, Any], path: str) -> dict[str, Any]:
  return {}


@dataclasses.dataclass(frozen=True)
class Architecture:
  """How a Hugging Face config of one model family becomes a jlora model.

  Attributes:
    config: the config class (:class:`HFConfig`).
    build: `build(config, *, dtype, **options) -> HFModel`.
    options: the names of the keyword options `build` takes besides `dtype`.
    default_options: `(config_dict, checkpoint_dir) -> options` implied by the files of
      a checkpoint directory (e.g. a sentence-transformers `Normalize` step); options the
      caller passes override them.
  """

  config: type
  build: Callable[..., HFModel]
  options: tuple[str, ...] = ()
  default_options: Callable[[Mapping[str, Any], str], dict[str, Any]] = _no_options

  def model(self, config: Mapping[str, Any], *, dtype: Any, options: Mapping[str, Any]) -> HFModel:
    """Builds the model of a `config.json` dict with `options`.

    Raises:
      ValueError: for options `build` does not take, or config settings the model does not support.
    """
    unknown = sorted(set(options) - set(self.options))
    if unknown:
      raise ValueError(
        f"Unknown option(s) {unknown} for model_type `{config.get('model_type')}`; valid options: "
        f"{list(self.options)}. Drop them or pick a model type that takes them."
      )
    return self.build(self.config.from_hf(dict(config)), dtype=jnp.float32 if dtype is None else dtype, **options)


def checked_model(model: Any) -> HFModel:
  """`model`, if it is a jlora reference model.

  Raises:
    ValueError: naming the type given.
  """
  if not isinstance(model, HFModel):
    raise ValueError(
      f"`model` must be a jlora.models model (from `models.from_config` / `models.from_pretrained`), got "
      f"{type(model).__name__}."
    )
  return model
