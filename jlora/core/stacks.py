"""Layers picked inside a scanned stack: `layers_to_transform` over `nn.scan`, by a per-layer mask.

A model built with `nn.scan` (the layout jlora's reference models take with `scan_layers=True`) holds each
layer's weights in one parameter with a leading layer axis `L`: one path for all the layers, so
`layers_to_transform` cannot leave some of them out of the tree as it does for an unrolled model's
`layers_0`, `layers_1`, .... Instead the adapter of such a stack keeps the leading axes `S` (`lora_a: S + in_shape
+ (r,)`, ...) and carries a mask `lora_layers: S` beside them (`LAYERS_KEY`), 1 at the layers it adapts and 0
elsewhere; layer `i` of the stack is index `i` of its first axis (the scan's iteration, counting from 0, as
`layers_i` of the unrolled model; `jlora.core.targets.layer_stack`). `nn.scan` slices the mask with the other
params, so each layer call reads its own entry (`select`):

* the forward of a masked layer is exactly the base's output (`jnp.where`, not a product: no rounding, and no
  gradient reaches that layer's `A`, `B` or magnitude, or the mask);
* `merge` and `unmerge` leave a masked layer's kernel as it is (`select` again);
* `jlora.init` creates the masked layers' `A` and `B` as zeros, which gradient optimizers leave at zero (SGD,
  Adam(W), Lion: zero gradient, and no weight decay of zero), and the mask itself is labelled `lora_layers`
  (`jlora.labels`), which `jlora.optimizer` keeps
  bit-identical; a layer counts as adapted wherever its entry is nonzero (`layers`), so even an optimizer that
  decays every leaf it is given cannot change which layers are adapted;
* `jlora.summary`, `save_peft` count and write only the adapted layers (`kept`), so they equal those of the same
  model unrolled.

The mask is part of the adapter: `jlora.split` puts it in the trainable half (what `save_adapter` writes and
`AdapterSet` holds), so that an adapter loaded onto a fresh base knows its layers.

Why a mask rather than adapters of the picked layers only: `nn.scan` slices every param alike, so inside the scan
body each layer's adapter must have the stack's shape; a stored subset would have to be scattered into a full stack
before every forward, and every consumer of adapters (shape checks, sharding, merge, banks) would need a second
layout. The mask leaves all of them as they are, at the cost of the left-out layers' zeros in memory.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora.core.config import LoraConfig
from jlora.core.targets import layer_stack, path_str, stack_layers

__all__ = ["make", "select", "layers", "kept", "check"]


def make(stack: tuple[int, ...], picked: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
  """The mask `S = stack` of the layers `picked` (indices along the first axis): 1 there, 0 elsewhere."""
  rows = np.isin(np.arange(stack[0]), picked).astype(np.float32)
  return jnp.asarray(np.broadcast_to(rows.reshape((stack[0],) + (1,) * (len(stack) - 1)), stack), dtype)


def select(mask: Any, new: Any, old: Any) -> Any:
  """`new` where the mask is nonzero, `old` elsewhere; the mask `S` is broadcast over the trailing axes of `new`
  (`S + ...`), or is a scalar (one layer's entry, inside the scan)."""
  on = jax.lax.stop_gradient(mask) != 0
  return jnp.where(on.reshape(on.shape + (1,) * (jnp.ndim(new) - on.ndim)), new, old)


def layers(mask: Any) -> tuple[int, ...]:
  """The adapted layers of a concrete mask: the indices along its first axis whose entries are nonzero."""
  on = np.asarray(jax.device_get(mask)) != 0
  return tuple(int(i) for i in np.flatnonzero(on.reshape(on.shape[0], -1).any(axis=1)))


def kept(mask: Any, size: int) -> int:
  """How many of a leaf's `size` elements belong to adapted layers: the leaf is `S + ...`, the mask `S`."""
  on = np.asarray(jax.device_get(mask)) != 0
  return size // math.prod(on.shape) * int(on.sum())


def check(where: str, path: tuple[str, ...], mask: Any, kernel_shape: tuple[int, ...], config: LoraConfig) -> None:
  """Raises unless a layer mask fits its kernel's stack axes and, when its values are known (outside `jit`), holds
  exactly the layers that `config.layers_to_transform` picks in this stack.

  Args:
    where: the adapter's name, for messages.
    path: the adapter's path.
    mask: the `lora_layers` leaf.
    kernel_shape: the kernel's shape, stack axes first.
    config: the config the adapter was made with.
  """
  shape = tuple(np.shape(mask))
  if not shape or tuple(kernel_shape[:len(shape)]) != shape or len(shape) >= len(kernel_shape):
    raise ValueError(f"The layer mask (lora_layers) at {where!r} has shape {shape}; its kernel {tuple(kernel_shape)} "
                     "needs the shape of its leading scan axes. Pass the params jlora.init made.")
  if config.layers_to_transform is None or not layer_stack(path, config.layers_pattern):
    raise ValueError(
        f"The adapter at {where!r} holds a layer mask (lora_layers: it adapts some layers of a scanned stack), but "
        f"the config (layers_to_transform={config.layers_to_transform!r}, layers_pattern={config.layers_pattern!r}) "
        "picks no layers inside this stack. Pass the LoraConfig that created it."
    )
  if isinstance(mask, jax.core.Tracer) or not getattr(mask, "is_fully_addressable", True):
    return  # values unknown here (under `jit`, or spread over several processes)
  rows = (np.asarray(jax.device_get(mask)) != 0).reshape(shape[0], -1)
  want, got = stack_layers(config, path, shape), layers(mask)
  if got != want or not (rows.all(axis=1) == rows.any(axis=1)).all():
    raise ValueError(
        f"The layer mask (lora_layers) at {path_str(path)!r} adapts layers {list(got)} of its stack of {shape[0]}, but "
        f"the config's layers_to_transform={list(config.layers_to_transform)} picks {list(want or ())} there. Pass "
        "the LoraConfig that created the adapter."
    )
