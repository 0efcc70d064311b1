"""PEFT module names of Flax module paths, for `save_peft` / `load_peft`.

A PEFT file names every tensor after the module's name in the PyTorch model
(`base_model.model.transformer.h.0.attn.c_attn.lora_A.weight`). The names come
from a `jlora.formats.peft.torch_names.NameMap`: the one given as `name_map=`, else the one the
model carries (`model.peft_name_map()`). Without either, jlora refuses rather
than guess: PyTorch PEFT loads a file whose names fit nothing without an error
(it only warns about missing keys) and runs the base model unadapted.
`name_map="flax"` opts in to the Flax paths joined by `.`, for a PyTorch twin
whose modules carry exactly those names.

In a name, `{i}` marks the layer index of a scanned (`nn.scan`) stack: the
module `("model", "layers", "self_attn", "q_proj")` with leaves `(L, ...)` named
`"model.layers.{i}.self_attn.q_proj"` stands for L PEFT modules.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from jlora.formats.peft.torch_names import NameMap, of_model

__all__ = ["FLAX", "NameLike", "resolve", "module_name", "per_layer", "name_table"]

FLAX = "flax"
Path = tuple[str, ...]
NameLike = NameMap | Callable[[Path], str] | str | None


def _joined(path: Path) -> str:
  return ".".join(path)


def resolve(model: Any, name_map: NameLike, *, caller: str) -> NameMap:
  """The name map to use: `name_map` (a `NameMap`, a function, or `"flax"`), else the model's own.

  Args:
    model: the linen model, or None.
    name_map: what the caller passed as `name_map=`.
    caller: `"save_peft"` or `"load_peft"`, for messages.

  Raises:
    TypeError: `name_map` is neither a `NameMap`, a function nor a string.
    ValueError: `name_map` is an unknown string, or neither it nor the model
      gives names (the message explains why jlora refuses and the fix).
  """
  if isinstance(name_map, NameMap):
    return name_map
  if isinstance(name_map, str):
    if name_map != FLAX:
      raise ValueError(f"{caller}: `name_map`={name_map!r} is not a name scheme jlora knows; the only string "
                       f"accepted is {FLAX!r} (the Flax module paths joined by '.'). Otherwise pass a function from "
                       "a module path tuple to the PyTorch module name, or a jlora.NameMap.")
    return NameMap(_joined)
  if name_map is not None:
    if not callable(name_map):
      raise TypeError(f"{caller}: `name_map` must be a function from a module path tuple to a PyTorch module name, a "
                      f"jlora.NameMap or {FLAX!r}, got {type(name_map).__name__}.")
    return NameMap(name_map)
  names = of_model(model) if model is not None else None
  if names is None:
    what = "no `model`" if model is None else f"the model ({type(model).__name__}) has no `peft_name_map()`"
    raise ValueError(
        f"{caller}: no PEFT module names: {what} and no `name_map=` was given. PEFT files name each tensor after "
        "the module's name in the PyTorch model (e.g. 'model.layers.0.self_attn.q_proj'); with names that fit "
        "nothing, PyTorch PEFT loads no adapter at all and only warns about missing keys. Pass `name_map=`: a "
        "function from a Flax module path tuple to the PyTorch module name (or a jlora.NameMap), or "
        f"`name_map={FLAX!r}` to use the Flax paths joined by '.' when the PyTorch model's modules carry exactly "
        "those names."
    )
  return names


def module_name(names: NameMap, path: Path) -> str:
  """The PEFT name of the module at `path`, checked to be a non-empty string.

  Raises:
    ValueError: the name map returned something else.
  """
  name = names.module_name(path)
  if not isinstance(name, str) or not name:
    raise ValueError(f"`name_map` returned {name!r} for the module {'/'.join(path)!r}; it must return a module name.")
  return name


def per_layer(name: str, leaf: Any, where: str) -> list[tuple[str, np.ndarray]]:
  """`[(name, host array)]`: one entry, or one per layer `leaf[i]` when `name` has `{i}`.

  Raises:
    ValueError: `name` has `{i}` but `leaf` is a scalar (no layer axis).
  """
  arr = np.asarray(jax.device_get(leaf))
  if "{i}" not in name:
    return [(name, arr)]
  if arr.ndim == 0:
    raise ValueError(f"{where!r} is named {name!r} (stacked, with {{i}}) but has no layer axis.")
  return [(name.format(i=i), arr[i]) for i in range(arr.shape[0])]


def name_table(base: Mapping[Path, Any], names: NameMap) -> dict[str, tuple[Path, int | None]]:
  """`{PEFT module name: (Flax module path, layer index or None)}` for every module holding leaves."""
  modules: dict[Path, Any] = {}
  for path, leaf in base.items():
    modules.setdefault(path[:-1], leaf)
  table: dict[str, tuple[Path, int | None]] = {}
  for module, leaf in modules.items():
    if not module:
      continue
    name = module_name(names, module)
    if "{i}" in name:
      for i in range(np.shape(leaf)[0]):
        table[name.format(i=i)] = (module, i)
    else:
      table[name] = (module, None)
  return table
