"""Adapted NNX layers: module surgery that turns an `nnx.Linear` into a `LoraLinear` in place.

An adapted layer is the same object with a new class: `Lora<Base>`, a subclass of
its own class (`isinstance(layer, nnx.Linear)` still holds, user subclasses keep
their overrides) whose `__call__` runs the base call and hands `(x, y, kernel,
leaves)` to `jlora.core.adapted.adapted`, which adds the variant's term (LoRA:
`s·(dropout(x)·A)·B`, factored, `A·B` never formed; DoRA: see
`jlora.core.variants`). This module only discovers the call: the layer's input,
its einsum equation, its own convolution code for `x·A`, and the dropout key from
the layer's `nnx.Dropout`. Its state is the base layer's plus `lora_a`, `lora_b`
(and DoRA's `lora_magnitude`) beside the kernel, so state paths read like the
linen param tree (`layers/0/attn/query/{kernel, bias, lora_a, lora_b}`). A
quantized kernel (`QuantizedArray`, held by a `Frozen` variable) is dequantized
where the layer reads it.

Layer kinds (`jlora.core.targets.Site.kind`): `nnx.Linear` `dense`,
`nnx.LinearGeneral` `dense_general` (so `nnx.MultiHeadAttention`'s query, key,
value and out), `nnx.Einsum` `einsum`, `nnx.Conv` `conv` (A is a convolution with
the base's window, strides, padding and dilation; B is 1×1, as in PEFT) and
`nnx.Embed` `embed` (with `attend` for tied heads).
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jlora.core import ops as _ops
from jlora.core import targets as _targets
from jlora.core.adapted import adapted
from jlora.core.targets import LORA_KEYS, MAGNITUDE_KEY, Site
from jlora.core.variants import variant_of_leaves
from jlora.frontends.nnx.vars import Trainable

__all__ = ["kind_of", "site_of", "einsum_of", "adapted_class", "is_adapted", "install", "uninstall", "kernel_var",
           "leaves_of", "call_site", "ATTRS"]

_KINDS = ((nnx.Linear, "dense"), (nnx.LinearGeneral, "dense_general"), (nnx.Einsum, "einsum"), (nnx.Conv, "conv"),
          (nnx.Embed, "embed"))
# The attributes an adapted layer gains (and loses again on merge).
ATTRS = ("lora_a", "lora_b", "lora_magnitude", "lora_dropout", "lora_kind", "lora_scale", "lora_einsum", "lora_path")
# flax's own layers, whose output is exactly x·W0 (+ `bias`): DoRA may read x·W0 off it. A user subclass may add
# other terms after its product, which DoRA must not scale.
_STOCK = tuple(cls for cls, _ in _KINDS)


def kind_of(module: Any) -> str | None:
  """The layer kind of an NNX module jlora can adapt, else None."""
  for cls, kind in _KINDS:  # none of these classes subclasses another
    if isinstance(module, cls):
      return kind
  return None


def einsum_of(module: nnx.Einsum, args: tuple, kwargs: Mapping[str, Any]) -> str | None:
  """The equation of an `nnx.Einsum` call `(inputs, einsum_str=None)`, spaces removed."""
  eq = args[0] if args else kwargs.get("einsum_str")
  eq = eq or module.einsum_str
  return eq.replace(" ", "") if eq else None


def site_of(path: tuple[str, ...], module: Any, kind: str, einsum_str: str | None = None,
            is_head: bool = False) -> Site:
  """The `Site` of an adaptable module: per-layer kernel shape (without stack axes) and its axes."""
  why = ""
  batch: tuple[int, ...] = ()
  if kind == "dense":
    shape = (module.in_features, module.out_features)
    ins, outs = (0,), (1,)
  elif kind == "dense_general":
    shape = tuple(module.batch_axis.values()) + tuple(module.in_features) + tuple(module.out_features)
    n_in = len(module.in_features)
    ins, outs = tuple(range(n_in)), tuple(range(n_in, len(shape)))
    if module.batch_axis:
      why = "nn.LinearGeneral with batch_axis is not supported"
  elif kind == "einsum":
    shape = tuple(module.kernel_shape)
    n = len(shape)
    ins, outs = tuple(range(n - 1)), (n - 1,)
    if einsum_str is None:
      why = ("its equation is given at call time; pass example inputs to jlora.nnx.init (`*args`) so that jlora "
             "reads it from the call, or set `einsum_str` on the nnx.Einsum")
    else:
      try:
        ins, outs, batch = _ops.einsum_axes(einsum_str)
      except ValueError as e:
        why = str(e)
  elif kind == "conv":
    shape = tuple(module.kernel_shape)
    ins, outs = tuple(range(len(shape) - 1)), (len(shape) - 1,)
    if module.feature_group_count != 1:
      why = "grouped convolutions (feature_group_count > 1) are not supported"
    elif module.mask is not None:
      why = "masked convolutions are not supported"
  else:  # embed
    shape = (module.num_embeddings, module.features)
    ins, outs = (0,), (1,)
  name = "embedding" if kind == "embed" else "kernel"
  return Site(path, kind, name, shape, ins, outs, batch, is_head or _targets.is_head(path), why)


# ------------------------------------------------------------------ the adapted classes
class _Adapted(nnx.Module):
  """Mixin placed before the base layer class: hands each call to `jlora.core.adapted.adapted`."""

  def __call__(self, inputs, *args, **kwargs):
    y = super().__call__(inputs, *args, **kwargs)
    eq = None
    if self.lora_kind == "einsum":
      eq = einsum_of(self, args, kwargs)
      if eq != self.lora_einsum and _ops.einsum_axes(eq) != _ops.einsum_axes(self.lora_einsum):
        raise ValueError(
            f"This nnx.Einsum's adapters were made for the equation {self.lora_einsum!r}, but it is called with "
            f"{eq!r}, which gives its kernel axes other roles. Pass the model's example inputs to "
            "jlora.nnx.init(key, model, config, *inputs) so that the adapters are made for the equation it is called with."
        )
    return _adapted_call(self, self.lora_kind, inputs, y, eq)


class _AdaptedEmbed(_Adapted):
  """`nnx.Embed`: the adapter's term on the lookup and on `attend` (tied output heads)."""

  def attend(self, query, *args, **kwargs):
    y = super().attend(query, *args, **kwargs)
    return _adapted_call(self, "attend", query, y, None)


_CLASSES: dict[type, type] = {}


def adapted_class(base: type) -> type:
  """`Lora<Base>`: the adapted subclass of an NNX layer class (one class object per base class)."""
  cls = _CLASSES.get(base)
  if cls is None:
    mixin = _AdaptedEmbed if issubclass(base, nnx.Embed) else _Adapted

    def body(ns: dict) -> None:
      ns.update(__module__="jlora.nnx", __qualname__=f"Lora{base.__name__}", jlora_base=base,
                __doc__=f"`{base.__module__}.{base.__qualname__}` with a LoRA adapter (jlora.nnx).")

    cls = types.new_class(f"Lora{base.__name__}", (mixin, base), {"pytree": base._pytree__is_pytree}, body)
    _CLASSES[base] = cls
  return cls


def is_adapted(module: Any) -> bool:
  return isinstance(module, _Adapted)


def install(module: nnx.Module, path: tuple[str, ...], kind: str, a: jax.Array, b: jax.Array,
            magnitude: jax.Array | None = None, *, scale: float, einsum_str: str | None,
            dropout: nnx.Dropout | None) -> None:
  """Turns `module` into its adapted class in place, holding `A`, `B` (and DoRA's `m`) as `Trainable`, and the
  static settings."""
  object.__setattr__(module, "__class__", adapted_class(type(module)))
  module.lora_a = Trainable(a)
  module.lora_b = Trainable(b)
  if magnitude is not None:
    module.lora_magnitude = Trainable(magnitude)
  module.lora_kind = kind
  module.lora_path = tuple(path)
  module.lora_scale = float(scale)
  module.lora_einsum = einsum_str
  module.lora_dropout = dropout


def uninstall(module: nnx.Module) -> None:
  """Undoes `install`: the module is an instance of its base class again, without the LoRA attributes."""
  for name in ATTRS:
    if name in vars(module):
      delattr(module, name)
  object.__setattr__(module, "__class__", type(module).jlora_base)


def kernel_var(module: nnx.Module) -> nnx.Variable:
  """The variable of the weight an adapted layer's adapter belongs to: `embedding` or `kernel`."""
  return module.embedding if module.lora_kind == "embed" else module.kernel


def leaves_of(module: nnx.Module) -> dict[str, jax.Array]:
  """`{role: value}` of an adapted layer's adapter leaves (`lora_a`, `lora_b`, DoRA's `lora_magnitude`)."""
  roles = (*LORA_KEYS, MAGNITUDE_KEY) if "lora_magnitude" in vars(module) else LORA_KEYS
  return {role: getattr(module, role).get_value() for role in roles}


# --------------------------------------------------------------------------- forward
def call_site(module: Any, kind: str, einsum_str: str | None) -> Site:
  """The `Site` that `jlora.core.adapted` needs for one call: kind, contraction, precision and convolution."""
  kernel = kernel_var(module)
  conv = (lambda x, w: _conv(module, x, w)) if kind == "conv" else None
  return Site(module.lora_path, kind, "embedding" if kind in ("embed", "attend") else "kernel",
              tuple(kernel.shape), (), (), axis=_axis(getattr(module, "axis", -1)), equation=einsum_str,
              precision=getattr(module, "precision", None), conv=conv)


def _axis(axis: Any) -> tuple[int, ...]:
  return (axis,) if isinstance(axis, int) else tuple(axis)


def _adapted_call(module: Any, kind: str, x: jax.Array, y: jax.Array, einsum_str: str | None) -> jax.Array:
  """`y` plus the adapter's term for one call (`kind`: the layer's, or `attend` for a tied head)."""
  leaves = leaves_of(module)
  drop = module.lora_dropout
  key = None
  if drop is not None and kind not in ("embed", "attend") and drop.rate > 0 and not drop.deterministic:
    key = drop.rngs()  # the layer's own stream (one key per layer of an nnx.vmap stack, sliced by nnx.scan)
  bias = getattr(module, "bias", None) if kind not in ("embed", "attend") else None
  bias = None if bias is None else bias[...]
  stock = type(module).jlora_base in _STOCK
  return adapted(call_site(module, kind, einsum_str), variant_of_leaves(leaves), x, y, kernel_var(module).get_value(),
                 leaves, scale=module.lora_scale, rate=0.0 if drop is None else drop.rate, dropout_key=key, bias=bias,
                 y_is_product=stock and not (kind == "einsum" and bias is not None))


def _conv(module: nnx.Conv, x: jax.Array, w: jax.Array) -> jax.Array:
  """`x` convolved with `w: kernel_size + (in, k)` by `nnx.Conv`'s own code (its padding modes, strides, dilation),
  without bias: `x·A` (and DoRA's `x·W0`)."""
  w = jnp.asarray(w)
  layer = types.SimpleNamespace(
      kernel=w, bias=None, use_bias=False, mask=None, feature_group_count=1, kernel_size=module.kernel_size,
      strides=module.strides, padding=module.padding, input_dilation=module.input_dilation,
      kernel_dilation=module.kernel_dilation, in_features=module.in_features, out_features=w.shape[-1],
      kernel_shape=w.shape, promote_dtype=module.promote_dtype, dtype=x.dtype, param_dtype=w.dtype,
      precision=module.precision, conv_general_dilated=module.conv_general_dilated, preferred_element_type=None,
  )
  return nnx.Conv.__call__(layer, x)
