"""Pieces shared by the reference models: masks, attention, KV cache, layer loop, activations.

Shape letters used throughout: `B` batch, `T` query length, `S` key length
(the cache length when decoding), `H` query heads, `K` key/value heads,
`D` head dim, `L` layers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["KVCache", "activation", "attention", "attention_mask", "constrain", "dtypes", "run_layers",
           "update_layer_cache"]

LayerKV = tuple[jax.Array, jax.Array]
RESIDUAL = ("batch", "length", "act_embed")  # the logical axes of the residual stream (B, T, d)


def constrain(x: jax.Array, *names: str | None) -> jax.Array:
  """`x` constrained to the logical axes `names` (one per axis), e.g. `('batch', 'length', 'act_embed')`.

  A no-op unless the step is traced with logical axis rules and a mesh in
  context (`with jax.set_mesh(mesh), nn.logical_axis_rules(models.DEFAULT_RULES):`):
  then it pins activations, e.g. the residual stream to the batch split, so that
  XLA gathers FSDP-sharded weights instead of reducing activations.
  """
  return nn.with_logical_constraint(x, names)


def dtypes(dtype: Any, **extra: Any) -> dict[str, Any]:
  """Keyword arguments of a linen layer computing and storing parameters in `dtype` (plus `extra`)."""
  return {"dtype": dtype, "param_dtype": dtype, **extra}


class KVCache(NamedTuple):
  """Key/value cache of a decoder, one slot per position, all layers stacked.

  Attributes:
    keys: (L, B, S, K, D) cached keys.
    values: (L, B, S, K, D) cached values.
    index: () int32, number of slots already filled (the next write position).
    valid: (B, S) bool, whether a slot holds a real (non-padding) token.
  """

  keys: jax.Array
  values: jax.Array
  index: jax.Array
  valid: jax.Array

  @classmethod
  def create(
    cls,
    *,
    num_layers: int,
    batch: int,
    length: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: jnp.dtype = jnp.float32,
  ) -> KVCache:
    """An empty cache with `length` slots, shapes as in the class docstring."""
    shape = (num_layers, batch, length, num_kv_heads, head_dim)
    return cls(
      keys=jnp.zeros(shape, dtype),
      values=jnp.zeros(shape, dtype),
      index=jnp.zeros((), jnp.int32),
      valid=jnp.zeros((batch, length), bool),
    )

  def advance(self, kv: LayerKV, length: int) -> KVCache:
    """The cache holding the updated `(keys, values)` (each (L, B, S, K, D)), `length` slots further on."""
    return self._replace(keys=kv[0], values=kv[1], index=self.index + length)


def attention_mask(
  input_mask: jax.Array | None,
  batch: int,
  length: int,
  *,
  cache: KVCache | None = None,
  causal: bool = True,
  sliding_window: int | None = None,
) -> tuple[jax.Array, jax.Array, KVCache | None]:
  """Builds the boolean attention mask of a (possibly cached) self-attention.

  Args:
    input_mask: (B, T) 1 for real tokens, 0 for padding, or None (all real).
    batch: B.
    length: T, the number of new tokens.
    cache: when given, the new tokens occupy slots `cache.index + arange(T)`
      and may attend to every earlier valid slot.
    causal: whether a query may only attend to slots at or before its own.
    sliding_window: if set, a query only attends to the last `sliding_window` slots.

  Returns:
    `(mask, slots, cache)`: mask (B, 1, T, S) bool, slots (T,) int32 slot index of
    each new token, and the cache with `valid` updated (index not yet advanced).
  """
  new_valid = jnp.ones((batch, length), bool) if input_mask is None else input_mask.astype(bool)
  if cache is None:
    slots = jnp.arange(length, dtype=jnp.int32)
    valid, key_slots = new_valid, slots
  else:
    slots = cache.index + jnp.arange(length, dtype=jnp.int32)
    valid = jax.lax.dynamic_update_slice(cache.valid, new_valid, (0, cache.index))
    key_slots = jnp.arange(valid.shape[1], dtype=jnp.int32)
    cache = cache._replace(valid=valid)
  mask = valid[:, None, None, :]
  if causal:
    mask = mask & (key_slots[None, :] <= slots[:, None])[None, None]
  if sliding_window is not None:
    mask = mask & (slots[:, None] - key_slots[None, :] < sliding_window)[None, None]
  return mask, slots, cache


def update_layer_cache(
  layer_cache: tuple[jax.Array, jax.Array], k: jax.Array, v: jax.Array, index: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Writes new keys/values (B, T, K, D) into one layer's cache (B, S, K, D) at `index`."""
  ck, cv = layer_cache
  ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, index, 0, 0))
  cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, index, 0, 0))
  return ck, cv


def run_layers(
  blocks: Sequence[Callable[[jax.Array, LayerKV | None, Any], tuple[jax.Array, LayerKV | None]]],
  h: jax.Array,
  kv: LayerKV | None,
  ctx: Any,
) -> tuple[jax.Array, LayerKV | None]:
  """Runs decoder blocks one after another, each on its layer of a stacked KV cache.

  Args:
    blocks: L callables `block(h, layer_kv, ctx) -> (h, layer_kv)`, layer_kv (B, S, K, D) keys and values or None.
    h: (B, T, d) hidden states.
    kv: `(keys, values)`, each (L, B, S, K, D), or None without a cache.
    ctx: passed to every block unchanged (masks, positions, cache index).

  Returns:
    `(h, kv)`: the last block's hidden states and the updated, restacked cache (None without one).
  """
  new = []
  for i, block in enumerate(blocks):
    h, layer_kv = block(h, None if kv is None else (kv[0][i], kv[1][i]), ctx)
    new.append(layer_kv)
  if kv is None:
    return h, None
  return h, (jnp.stack([k for k, _ in new]), jnp.stack([v for _, v in new]))


def attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  mask: jax.Array | None,
  *,
  scale: float = 1.0,
  bias: jax.Array | None = None,
) -> jax.Array:
  """Multi-head / grouped-query dot-product attention, softmax in float32.

  Args:
    q: (B, T, H, D) queries.
    k: (B, S, K, D) keys; H must be a multiple of K (grouped-query attention).
    v: (B, S, K, D) values.
    mask: bool, broadcastable to (B, H, T, S); False entries are excluded.
    scale: multiplies the scores (`D**-0.5` for most models, 1 for T5).
    bias: optional additive bias broadcastable to (B, H, T, S) (T5 position bias).

  Returns:
    (B, T, H, D) attention output in the dtype of `v`.
  """
  num_heads, num_kv = q.shape[2], k.shape[2]
  if num_heads != num_kv:
    k = jnp.repeat(k, num_heads // num_kv, axis=2)
    v = jnp.repeat(v, num_heads // num_kv, axis=2)
  scores = jnp.einsum("bthd,bshd->bhts", q, k).astype(jnp.float32) * scale
  if bias is not None:
    scores = scores + bias.astype(jnp.float32)
  if mask is not None:
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bhts,bshd->bthd", probs, v)


_ACTIVATIONS = {
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),
  "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
  "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
  "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
  "relu": jax.nn.relu,
  "silu": jax.nn.silu,
  "swish": jax.nn.silu,
}


def activation(name: str):
  """The activation function called `name` in a Hugging Face config.

  Raises:
    ValueError: if `name` is not one of the supported activations.
  """
  if name not in _ACTIVATIONS:
    raise ValueError(f"Unsupported activation `{name}` in the model config; supported: {sorted(_ACTIVATIONS)}.")
  return _ACTIVATIONS[name]
