"""Optimizers that train the adapter and leave the base bit-identical."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jlora._config import LoraConfig
from jlora._tree import Params, labels

__all__ = ["optimizer", "freeze"]


class _FreezeState(NamedTuple):
  pass


def freeze() -> optax.GradientTransformation:
  """Updates of `-0.0` and no state: `optax.apply_updates` leaves every leaf bit-identical.

  (`-0.0` rather than `0.0`, because `-0.0 + 0.0` is `+0.0` while `x + -0.0` is `x`
  for every `x`; `optax.set_to_zero` would flip the sign of negative zeros.)
  """

  def init_fn(params):
    del params
    return _FreezeState()

  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(lambda u: jnp.full_like(u, -0.0), updates), state

  return optax.GradientTransformation(init_fn, update_fn)


def optimizer(tx: optax.GradientTransformation, params: Params, config: LoraConfig, *,
              lora_plus_ratio: float | None = None) -> optax.GradientTransformation:
  """An optax transformation for a whole LoRA tree: `tx` on trainable leaves, frozen elsewhere.

  Trainable leaves (see `jlora.trainable_mask`) get `tx`; frozen leaves get no
  optimizer state and an update that keeps them bit-identical. (Plain
  `optax.masked(tx, mask)` would pass the frozen gradients through as updates.)
  Under `jit`, the frozen leaves' gradients are then dead code and XLA drops
  them. Works as well on the trainable half of `jlora.split`.

  Args:
    tx: the optimizer for the trainable leaves, e.g. `optax.adamw(1e-4)`.
    params: the tree the optimizer will see (only its structure and names are used).
    config: the LoRA config.
    lora_plus_ratio: LoRA+ — `lora_b` updates are scaled by this factor after
      `tx`, i.e. B gets `ratio ×` the learning rate of A (the paper suggests 16).
      For per-group optimizers, use `jlora.labels` with `optax.partition`.

  Returns:
    An `optax.GradientTransformation`.

  Example:
    >>> import optax, jlora
    >>> tx = jlora.optimizer(optax.adamw(1e-3), params, config)  # doctest: +SKIP
    >>> opt_state = tx.init(params)  # doctest: +SKIP
  """
  if lora_plus_ratio is not None and not lora_plus_ratio > 0:
    raise ValueError(f"`lora_plus_ratio` must be a positive number (e.g. 16), got {lora_plus_ratio!r}.")
  leaf_labels = labels(params, config)
  groups = jax.tree.map(lambda label: "frozen" if label == "frozen" else "train", leaf_labels)
  # One `tx` over all trainable leaves, so global-norm clipping stays global.
  out = optax.partition({"train": tx, "frozen": freeze()}, groups)
  if lora_plus_ratio is not None:
    is_b = jax.tree.map(lambda label: label == "lora_b", leaf_labels)
    out = optax.chain(out, optax.masked(optax.scale(float(lora_plus_ratio)), is_b))
  return out
