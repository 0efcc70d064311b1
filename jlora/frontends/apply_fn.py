"""`LoraApply`: the factored LoRA forward in the `apply_fn` slot that `model.apply` fills (`jlora.apply_fn`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax

from jlora.core.config import LoraConfig
from jlora.frontends.linen import apply

__all__ = ["LoraApply"]


@dataclasses.dataclass(frozen=True)
class LoraApply:
  """`fn(variables, *args, **kwargs)`: the factored LoRA forward of `model` in the `apply_fn` slot.

  Takes a variables dict (`{'params': params_with_adapters, **other_collections}`),
  as `model.apply` does, so it fits flax's `TrainState.apply_fn`,
  `jlora.models.generate(apply_fn=...)` and loops written for `model.apply`.
  Instances are immutable and compare equal when their model and config do, so
  it is a static `jax.jit` argument that does not recompile per call.

  Attributes:
    model: the linen module.
    config: the config the adapters were created with.
    allow_unused: as for `jlora.apply`.
  """

  model: nn.Module
  config: LoraConfig
  allow_unused: bool = False

  def __call__(self, variables: Mapping[str, Any], *args, rngs: Mapping[str, jax.Array] | None = None,
               **kwargs) -> Any:
    if not isinstance(variables, Mapping) or "params" not in variables:
      got = f"a mapping with keys {sorted(variables)}" if isinstance(variables, Mapping) else type(variables).__name__
      raise TypeError(
          f"`variables` must be a variables dict such as {{'params': params}} (as for model.apply), got {got}; "
          "for a bare params tree call jlora.apply(model, params, config, ...)."
      )
    others = {k: v for k, v in variables.items() if k != "params"}
    return apply(self.model, variables["params"], self.config, *args, rngs=rngs, variables=others,
                 allow_unused=self.allow_unused, **kwargs)
