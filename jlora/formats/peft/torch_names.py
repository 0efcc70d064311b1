"""How a Flax model's module paths are named in its PyTorch twin: the name map that PEFT files need.

A PEFT adapter file names each tensor by the module's path in the PyTorch model
(`transformer.h.0.attn.c_attn`). A Flax model names the same module by its linen
path (`('transformer', 'h_0', 'attn', 'c_attn')`). A `NameMap` translates one
into the other. A model that has a PyTorch twin can carry its own name map by
defining a method `peft_name_map(self) -> NameMap` (the `jlora.models` models do);
`save_peft` and `load_peft` use it unless the caller passes `name_map=`. The core
knows this protocol, never the models themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

__all__ = ["NameMap", "METHOD", "of_model"]

METHOD = "peft_name_map"


class NameMap(NamedTuple):
  """Flax module paths -> PyTorch module names.

  Attributes:
    module_name: a function from a module path tuple, e.g.
      `('model', 'layers', 'self_attn', 'q_proj')`, to the PyTorch module name,
      e.g. `'model.layers.{i}.self_attn.q_proj'`; `{i}` marks where the layer
      index of a scanned (`nn.scan`) stack goes.
    fan_in_fan_out: names (last path component) of modules whose PyTorch weight
      is stored `(in, out)` like a Flax kernel, e.g. GPT-2's `Conv1D` layers
      `c_attn`, `c_proj`, `c_fc` (PEFT's `fan_in_fan_out=True`).
    param_order: parameter names in the order the PyTorch modules register them,
      e.g. `("gate_up_proj", "down_proj")` (Mixtral's experts): PEFT nests the
      wrappers of a module's target parameters in that order. Listed names come
      first, in this order; the others follow in the Flax module's dict order
      (which `jax.jit` and `jax.tree.map` sort by name, hence this field).
    conv: names (last path component) of modules that are convolutions in PyTorch (`nn.Conv1d` / `2d` / `3d`,
      an `nn.Conv` in Flax), e.g. `("conv1", "conv2")`: PEFT stores their factors as convolution kernels
      (`jlora.formats.peft.layout`), which a Flax `nn.Conv` kernel's shape alone cannot tell apart from a
      multi-axis `DenseGeneral`'s. A grouped convolution's adapter is written as one whether listed or not.
  """

  module_name: Callable[[tuple[str, ...]], str]
  fan_in_fan_out: frozenset[str] = frozenset()
  param_order: tuple[str, ...] = ()
  conv: frozenset[str] = frozenset()


def of_model(model: Any) -> NameMap | None:
  """The name map a model carries (`model.peft_name_map()`), or None.

  Raises:
    TypeError: the model's `peft_name_map()` returns something other than a `NameMap`.
  """
  method = getattr(model, METHOD, None)
  if method is None or not callable(method):
    return None
  names = method()
  if not isinstance(names, NameMap):
    raise TypeError(f"{type(model).__name__}.{METHOD}() must return a jlora.NameMap, got {type(names).__name__}.")
  return names
