"""Optimizers that train the adapter and leave the base bit-identical."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jlora.core.config import LoraConfig
from jlora.core.targets import LAYERS_KEY
from jlora.core.tree import Params, labels
from jlora.quant.array import QuantizedArray

__all__ = ["optimizer"]


class _KeepState(NamedTuple):
  pass


def _keep_bits() -> optax.GradientTransformation:
  """Updates of `-0.0` and no state: `optax.apply_updates` leaves every leaf bit-identical.

  (`-0.0` rather than `0.0`, because `-0.0 + 0.0` is `+0.0` while `x + -0.0` is `x`
  for every `x`; `optax.set_to_zero` would flip the sign of negative zeros.)
  """

  def init_fn(params):
    if any(isinstance(x, QuantizedArray) for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(
        x, QuantizedArray))):
      raise ValueError("jlora.optimizer: the tree holds quantized kernels (jlora.quantize), which have no gradient; "
                       "differentiate and optimize only the trainable half: trainable, frozen = jlora.split(params, "
                       "config), then jlora.combine(trainable, frozen) in the loss.")
    return _KeepState()

  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(lambda u: jnp.full_like(u, -0.0), updates), state

  return optax.GradientTransformation(init_fn, update_fn)


def optimizer(tx: optax.GradientTransformation, config: LoraConfig, *,
              lora_plus_ratio: float | None = None) -> optax.GradientTransformation:
  """An optax transformation for a LoRA tree: `tx` on trainable leaves, frozen elsewhere.

  Which leaves train is read from the tree the optimizer is given (`init`,
  `update`), by `jlora.labels(tree, config)`: adapters, the biases that
  `config.bias` trains, and `modules_to_save` (not a scanned stack's layer mask,
  `lora_layers`, which stays as it is). Frozen leaves get no optimizer
  state and an update that keeps them bit-identical. (Plain
  `optax.masked(tx, mask)` would pass the frozen gradients through as updates.)
  Under `jit`, the frozen leaves' gradients are then dead code and XLA drops
  them. Works as well on the whole tree as on the trainable half of `jlora.split`.

  Args:
    tx: the optimizer for the trainable leaves, e.g. `optax.adamw(1e-4)`.
    config: the LoRA config.
    lora_plus_ratio: LoRA+ — `lora_b` updates are scaled by this factor after
      `tx`, i.e. B gets `ratio ×` the learning rate of A (the paper suggests 16).
      For per-group optimizers, use `jlora.labels` with `optax.partition`.

  Returns:
    An `optax.GradientTransformation`.

  Raises:
    TypeError: `config` is not a `LoraConfig`.
    ValueError: `lora_plus_ratio` is not a positive number.

  Example:
    >>> import optax, jlora
    >>> tx = jlora.optimizer(optax.adamw(1e-3), jlora.LoraConfig(target_modules=["q", "v"]))
    >>> isinstance(tx, optax.GradientTransformation)
    True
  """
  if not isinstance(config, LoraConfig):
    raise TypeError(
        f"`jlora.optimizer(tx, config)` takes a jlora.LoraConfig second, got {type(config).__name__}. The trainable "
        "leaves are read from the tree the optimizer is given, so no params argument is needed."
    )
  if lora_plus_ratio is not None and not (isinstance(lora_plus_ratio, (int, float)) and 0 < lora_plus_ratio < float("inf")):
    raise ValueError(f"`lora_plus_ratio` must be a positive number (e.g. 16), got {lora_plus_ratio!r}.")

  def groups(tree: Params) -> Any:
    return jax.tree.map(lambda label: "frozen" if label in ("frozen", LAYERS_KEY) else "train", labels(tree, config))

  # One `tx` over all trainable leaves, so global-norm clipping stays global.
  out = optax.partition({"train": tx, "frozen": _keep_bits()}, groups)
  if lora_plus_ratio is not None:

    def is_b(tree: Params) -> Any:
      return jax.tree.map(lambda label: label == "lora_b", labels(tree, config))

    out = optax.chain(out, optax.masked(optax.scale(float(lora_plus_ratio)), is_b))
  return out
