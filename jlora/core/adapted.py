"""The one adapted call: what every front-end hands an adapted layer's call to.

A front-end (the linen interceptor, NNX's adapted layers, Equinox's `LoraLinear`,
the Haiku interceptor) only discovers a call site: it runs the base layer, then
hands `(x, y, kernel, leaves)` with a `Site` describing the contraction to
`adapted`, which owns the rest for every variant (`jlora.core.variants`):

* dtypes: the term is computed in `result_type(x, A)` (A's dtype for embedding
  ids: float32 adapters over a bf16 base compute in float32) and cast to `y.dtype`;
* LoRA dropout of the LoRA input (not of embedding ids or `attend` queries);
* the scale `s`, applied to the r-wide `x·A` (`jlora.core.ops.lora_delta`);
* the variant's term (LoRA: `s·(x_d·A)·B`; DoRA: see `jlora.core.variants`) and the addition.

A mixed batch (`adapted_batch`, for `jlora.AdapterBank`) is the same term with
per-example leaves: each example's adapter is gathered from the stacked leaves and
the term is vmapped over the examples; id -1 adds nothing (the base output).
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jlora.core import ops as _ops
from jlora.core.targets import Site
from jlora.core.variants import DORA, Variant
from jlora.core.variants import A as _A
from jlora.core.variants import B as _B
from jlora.core.variants import M as _M

__all__ = ["OBSERVE", "adapted", "adapted_batch", "low_rank", "product"]

# Set while a data-driven initialisation (`jlora.init_eva`) reads the adapted layers' inputs: `adapted` first calls
# it with the call's site and input `x` (before LoRA dropout), in every front-end.
OBSERVE: contextvars.ContextVar[Callable[[Site, jax.Array], None] | None] = contextvars.ContextVar(
    "jlora_observe", default=None)


def low_rank(site: Site, x: jax.Array, a: jax.Array, b: jax.Array, scale: Any) -> jax.Array:
  """`s·(x·A)·B` for one call, in the layer's output shape, factored (2-D rank-r matmuls for dense kinds).

  Args:
    site: the call's site (`kind`, and `axis` / `equation` / `conv` / `precision` as its kind needs).
    x: the LoRA input (ids for `embed`).
    a: per-layer `A`.
    b: per-layer `B`.
    scale: `s` (a float, or a traced scalar in a bank).
  """
  if site.kind == "conv":
    if site.conv is None:
      raise ValueError(f"The conv site at {'/'.join(site.path)!r} has no `conv` callable: the front-end must give "
                       "the layer's own convolution (Site.conv).")
    # `x·A` by the layer's own convolution (over all input features), then B, a 1×1 convolution (grouped for a
    # grouped layer: PEFT's adapter, `jlora.core.ops`)
    return _ops.grouped_last(site.conv(x, a) * scale, b, site.precision)
  return _ops.lora_delta(site.kind, x, a, b, scale=scale, axis=site.axis, einsum_str=site.equation,
                         precision=site.precision, group_sizes=site.group_sizes)


def product(site: Site, x: jax.Array, w: Any) -> jax.Array:
  """The layer's own `x·W` without bias, computed from `x` (`w` per layer; a quantized kernel dequantizes)."""
  w = jnp.asarray(w)
  kind = site.kind
  if kind == "einsum":
    return jnp.einsum(site.equation, x, w, precision=site.precision)
  if kind == "embed":
    return jnp.take(w, x, axis=0)
  if kind == "ragged_dot":
    return jax.lax.ragged_dot(x, w, site.group_sizes, precision=site.precision)
  if kind == "attend":
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())), precision=site.precision)
  if kind == "conv":
    return site.conv(x, w)
  return _ops.contract(kind, x, w, site.axis, site.precision)


def _dtype(site: Site, x: jax.Array, a: jax.Array) -> Any:
  return a.dtype if site.kind == "embed" else jnp.result_type(x.dtype, a.dtype)


def _lora_input(site: Site, x: jax.Array, dt: Any, rate: Any, dropout_key: jax.Array | None) -> tuple[jax.Array, bool]:
  """`(x_d, dropped)`: the LoRA input after dropout, in the term's dtype; ids and `attend` queries are not dropped."""
  if site.kind == "embed":
    return x, False
  if site.kind == "attend":
    return x.astype(dt), False
  off = dropout_key is None or (isinstance(rate, (int, float)) and rate == 0.0)
  return _ops.dropout(None if off else dropout_key, x, rate).astype(dt), not off


def _term(site: Site, variant: Variant, x: jax.Array, y: jax.Array, kernel: Any, leaves: Mapping[str, Any],
          scale: Any, norm: Any, dropped: bool, bias: Any, y_is_product: bool) -> jax.Array:
  """The variant's term for the LoRA input `x` (already dropped out and cast), in the term's dtype."""
  dt = x.dtype if site.kind != "embed" else leaves[_A].dtype
  cast = {**leaves, _A: leaves[_A].astype(dt), _B: leaves[_B].astype(dt)}
  lora = low_rank(site, x, cast[_A], cast[_B], scale)

  def base() -> jax.Array:
    # x·W0 is read off the base output only where the front-end says it is exactly x·W0 (+ `bias`) and the LoRA
    # input is the layer's input; otherwise it is computed from x
    if y_is_product and not dropped:
      return y.astype(dt) if bias is None else y.astype(dt) - jnp.asarray(bias).astype(dt)
    return product(site, x, kernel).astype(dt)

  return variant.term(site, x, y, kernel, cast, scale, lora, base, norm)


def adapted(site: Site, variant: Variant, x: jax.Array, y: jax.Array, kernel: Any, leaves: Mapping[str, Any], *,
            scale: Any, rate: Any = 0.0, dropout_key: jax.Array | None = None, bias: Any = None,
            y_is_product: bool = False, norm: Any = None) -> jax.Array:
  """The adapted output `y' = y + term` of one layer call.

  Args:
    site: the call site: `kind` (`dense`, `dense_general`, `einsum`, `conv`, `embed`, `attend`), `path` (for
      messages), `axis` (dense kinds), `equation` (einsum), `conv` (conv: the layer's own convolution
      `conv(x, w)`), `precision`.
    variant: `jlora.core.variants.LORA` or `DORA`.
    x: the layer's input, e.g. `(..., d_in)`; ids for `embed`; queries `(..., features)` for `attend`.
    y: the base layer's output, e.g. `(..., d_out)` (with its bias).
    kernel: the layer's weight `W0`, per layer (an array, or a `QuantizedArray`: dequantized only where the
      variant reads it). LoRA never reads it.
    leaves: `{role: leaf}` per layer: `lora_a` `in_shape + (r,)`, `lora_b` `(r,) + out_shape`, DoRA's
      `lora_magnitude` (`jlora.core.ops.magnitude_shape`).
    scale: `s` (`lora_alpha / r`, or `/ sqrt(r)` with rsLoRA).
    rate: the LoRA dropout rate (a float, or an array broadcastable to `x`).
    dropout_key: the key for LoRA dropout; None: no dropout.
    bias: the layer's bias (DoRA reads `x·W0` as `y - bias` where `y_is_product`).
    y_is_product: whether `y` is exactly `x·W0` plus `bias` (flax's own layers, `hk.Linear`,
      `eqx.nn.Linear`); otherwise DoRA computes `x·W0` again.
    norm: DoRA: a cached `‖W0 + s·A·B‖` (`jlora.dora_norms`), or None to compute it.

  Returns:
    `y + term`, in `y`'s dtype and shape.
  """
  observe = OBSERVE.get()
  if observe is not None:
    observe(site, x)
  dt = _dtype(site, x, leaves[_A])
  xd, dropped = _lora_input(site, x, dt, rate, dropout_key)
  delta = _term(site, variant, xd, y, kernel, leaves, scale, norm, dropped, bias, y_is_product)
  return y + delta.astype(y.dtype)


def adapted_batch(site: Site, variant: Variant, x: jax.Array, y: jax.Array, kernel: Any, leaves: Mapping[str, Any],
                  *, ids: jax.Array, scales: Sequence[float], rates: Sequence[float],
                  magnitudes: Sequence[bool] = (), dropout_key: jax.Array | None = None, bias: Any = None,
                  y_is_product: bool = False, caller: str = "jlora.apply") -> jax.Array:
  """`adapted` with each example's own adapter, from leaves stacked on a last adapter axis.

  Args:
    site, variant, x, y, kernel, bias, y_is_product: as for `adapted` (`variant` is `DORA` when any adapter
      here has a magnitude: the others then get `g = 1`, i.e. their LoRA term).
    leaves: `{role: leaf + (n,)}`: the n adapters' leaves stacked last (ranks zero-padded; zeros for an adapter
      absent here).
    ids: int32 `()` (one adapter for the batch) or `(batch,)` (one per example, indexing axis 0 of `x` and
      `y`); -1: nothing added. A traced id outside -1..n-1 gives NaN rows.
    scales: each adapter's `s` here (0 where absent).
    rates: each adapter's dropout rate.
    magnitudes: with `DORA`: which adapters hold a magnitude here.
    dropout_key: the key for LoRA dropout, or None.
    caller: the public function, for messages.

  Returns:
    `y + term`, in `y`'s dtype and shape.
  """
  n = len(scales)
  safe = jnp.clip(ids, 0, n - 1)
  # -1: the base (nothing added); an id outside -1..n-1 (possible only when traced) makes its rows NaN, never a
  # plausible wrong output
  picked = jnp.where((ids >= 0) & (ids < n), jnp.asarray(scales, jnp.float32)[safe], jnp.nan)
  dt = _dtype(site, x, leaves[_A])
  scale = jnp.where(ids == -1, 0.0, picked).astype(dt)
  rate = jnp.asarray(rates, jnp.float32)[safe] if any(rates) else 0.0
  chosen = {role: jnp.take(v, safe, axis=-1) for role, v in leaves.items() if role != _M}
  norm = None
  if variant is DORA:  # each adapter's own norm; g = 1 (its LoRA term) for adapters without a magnitude, and id -1
    w0 = jnp.asarray(kernel)
    norms = jax.vmap(lambda a, b, s: _ops.column_norm(w0, a.astype(dt), b.astype(dt), s), in_axes=(-1, -1, 0),
                     out_axes=-1)(leaves[_A], leaves[_B], jnp.asarray(scales, jnp.float32))
    norm = jax.lax.stop_gradient(jnp.take(norms, safe, axis=-1))  # a constant, as in `adapted` (paper §4.3)
    own = jnp.asarray(magnitudes, bool)[safe] & (ids >= 0)
    chosen[_M] = jnp.where(own, jnp.take(leaves[_M], safe, axis=-1).astype(jnp.float32), norm)
  if ids.ndim == 0:  # one adapter for the whole batch: the single-adapter path, with a traced scale
    xd, dropped = _lora_input(site, x, dt, rate, dropout_key)
    return y + _term(site, variant, xd, y, kernel, chosen, scale, norm, dropped, bias, y_is_product).astype(y.dtype)
  if x.ndim == 0 or x.shape[0] != ids.shape[0]:
    raise ValueError(
        f"{caller}: the layer at {'/'.join(site.path)!r} is called with an input of shape {tuple(x.shape)}, whose "
        f"axis 0 is not the batch of {ids.shape[0]} examples that `ids` ({tuple(ids.shape)}) covers. Per-example "
        "adapters need every adapted layer's input to keep the examples on axis 0; pass one id for the whole "
        "batch (ids of shape ()) otherwise."
    )
  rate = rate if isinstance(rate, float) else rate.reshape((-1,) + (1,) * (x.ndim - 1))
  xd, dropped = _lora_input(site, x, dt, rate, dropout_key)

  def one(xi, yi, li, si, ni):
    return _term(site, variant, xi[None], yi[None], kernel, li, si, ni, dropped, bias, y_is_product)[0]

  moved = {role: jnp.moveaxis(v, -1, 0) for role, v in chosen.items()}
  delta = jax.vmap(one)(xd, y, moved, scale, None if norm is None else jnp.moveaxis(norm, -1, 0))
  return y + delta.astype(y.dtype)
