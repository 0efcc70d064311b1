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
from jlora.core.targets import KERNEL_KEYS, LORA_KEYS, MAGNITUDE_KEY, Site, adapter_path
from jlora.core.variants import variant_of_leaves
from jlora.frontends.layers import NNX_STOCK, Call, Layer, describe, lookup, registered_layers
from jlora.frontends.nnx.vars import Trainable

__all__ = ["description", "described_equation", "kind_of", "site_of", "einsum_of", "adapted_class", "is_adapted", "install", "uninstall", "kernel_var",
           "leaves_of", "call_site", "ATTRS"]

_KINDS = ((nnx.Linear, "dense"), (nnx.LinearGeneral, "dense_general"), (nnx.Einsum, "einsum"), (nnx.Conv, "conv"),
          (nnx.Embed, "embed"))
# The attributes an adapted layer gains (and loses again on merge).
ATTRS = ("lora_a", "lora_b", "lora_magnitude", "lora_dropout", "lora_kind", "lora_scale", "lora_einsum", "lora_path",
         "lora_weight", "lora_axis")
# flax's own layers, whose output is exactly x·W0 (+ `bias`): DoRA may read x·W0 off it. A user subclass may add
# other terms after its product, which DoRA must not scale.
_STOCK = tuple(cls for cls, _ in _KINDS)


def description(module: Any) -> tuple[Layer, bool] | None:
  """`(jlora.Layer, stock)` of an NNX module jlora can adapt, else None: flax's own classes (`stock`, handled by
  their attributes) or a class described with `jlora.register_layer` (or a subclass of one)."""
  found = lookup(module, "__call__") if isinstance(module, nnx.Module) else None
  if found is None:
    return None
  key, layer = found
  return layer, (key, "__call__") in NNX_STOCK


def kind_of(module: Any) -> str | None:
  """The layer kind of an NNX module jlora can adapt, else None."""
  found = description(module)
  return found[0].kind if found is not None else None


def einsum_of(module: nnx.Einsum, args: tuple, kwargs: Mapping[str, Any]) -> str | None:
  """The equation of an `nnx.Einsum` call `(inputs, einsum_str=None)`, spaces removed."""
  eq = args[0] if args else kwargs.get("einsum_str")
  eq = eq or module.einsum_str
  return eq.replace(" ", "") if eq else None


def site_of(path: tuple[str, ...], module: Any, kind: str, einsum_str: str | None = None,
            is_head: bool = False, kernel_shape: tuple[int, ...] | None = None) -> Site:
  """The `Site` of an adaptable module: per-layer kernel shape (without stack axes) and its axes.

  `kernel_shape`: a described (registered) class's weight shape as its call saw it (inside `nnx.scan`, one layer's);
  without it, the whole variable's shape (no stack axes).
  """
  layer, stock = description(module)
  if not stock:
    return _described_site(path, module, layer, einsum_str, is_head, kernel_shape)
  why, groups = "", 1
  batch: tuple[int, ...] = ()
  if kind == "dense":
    shape = (module.in_features, module.out_features)
    ins, outs = (0,), (1,)
  elif kind == "dense_general":
    shape = tuple(module.batch_axis.values()) + tuple(module.in_features) + tuple(module.out_features)
    n_in = len(module.in_features)
    ins, outs = tuple(range(n_in)), tuple(range(n_in, len(shape)))
    why = layer.why_not(module)
  elif kind == "einsum":
    shape = tuple(module.kernel_shape)
    n = len(shape)
    ins, outs = tuple(range(n - 1)), (n - 1,)
    if einsum_str is None:
      why = _NO_EQUATION
    else:
      try:
        ins, outs, batch = _ops.einsum_axes(einsum_str)
      except ValueError as e:
        why = str(e)
  elif kind == "conv":
    shape = tuple(module.kernel_shape)
    ins, outs = tuple(range(len(shape) - 1)), (len(shape) - 1,)
    why, groups = layer.why_not(module), module.feature_group_count
  else:  # embed
    shape = (module.num_embeddings, module.features)
    ins, outs = (0,), (1,)
  name = "embedding" if kind == "embed" else "kernel"
  return Site(path, kind, name, shape, ins, outs, batch, is_head or _targets.is_head(path), why, groups=groups)


_NO_EQUATION = ("its equation is given at call time; pass example inputs to jlora.nnx.init (`*args`) so that jlora "
                "reads it from the call, or set `einsum_str` on the nnx.Einsum")


def _described_site(path: tuple[str, ...], module: Any, layer: Layer, einsum_str: str | None, is_head: bool,
                    kernel_shape: tuple[int, ...] | None) -> Site:
  """The `Site` of a registered class, from its `jlora.Layer`: the weight it names, and its dense axes or einsum."""
  name = layer.weight_name(module)
  var = getattr(module, name, None)
  head = is_head or _targets.is_head(path)
  if not isinstance(var, nnx.Variable) or not hasattr(var, "shape"):
    return Site(adapter_path(path, name), layer.kind, name, (), (), (), (), head,
                f"its jlora.Layer names the weight {name!r}, but {type(module).__name__} holds no variable of that "
                "name; fix `weight=` in jlora.register_layer")
  shape = tuple(kernel_shape if kernel_shape is not None else var.shape)
  why, batch = layer.why_not(module), ()
  if name not in KERNEL_KEYS:
    why = why or (f"jlora.nnx adapts the weight of a described layer when it is named one of {KERNEL_KEYS}, and "
                  f"{type(module).__name__}'s is {name!r}; use jlora.init_tree + jlora.apply_merged for it")
  if layer.kind == "einsum":
    ins, outs = tuple(range(len(shape) - 1)), (len(shape) - 1,)
    if einsum_str is None:
      why = why or _NO_EQUATION.replace("or set `einsum_str` on the nnx.Einsum", "or set `equation=` in its jlora.Layer")
    else:
      try:
        ins, outs, batch = _ops.einsum_axes(einsum_str)
      except ValueError as e:
        why = why or str(e)
  else:
    n_in = len(layer.axes(module))
    ins, outs = tuple(range(n_in)), tuple(range(n_in, len(shape)))
  return Site(adapter_path(path, name), layer.kind, name, shape, ins, outs, batch, head, why)


def described_equation(module: Any, args: tuple, kwargs: Mapping[str, Any]) -> str | None:
  """The einsum equation of a call of a module of an einsum kind (stock `nnx.Einsum` or described), else None."""
  layer, stock = description(module)
  if layer.kind != "einsum":
    return None
  if stock:
    return einsum_of(module, args, kwargs)
  try:
    return Call(module, layer, (None, *args), kwargs, cls=_base(module)).equation
  except TypeError:
    return None


def _base(module: Any) -> type:
  return getattr(type(module), "jlora_base", type(module))


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


class _AdaptedDescribed(nnx.Module):
  """Mixin of a registered class (`jlora.register_layer`): its described method gets the adapter's term."""

  def _jlora_call(self, method: str, args: tuple, kwargs: dict) -> Any:
    y = getattr(super(), method)(*args, **kwargs)
    base = type(self).jlora_base
    call = Call(self, describe(self, method), args, kwargs, cls=base)
    eq = call.equation if self.lora_kind == "einsum" else None
    if eq is not None and eq != self.lora_einsum and _ops.einsum_axes(eq) != _ops.einsum_axes(self.lora_einsum):
      raise ValueError(f"This {base.__name__}'s adapters were made for the equation {self.lora_einsum!r}, but it is "
                       f"called with {eq!r}; pass example inputs to jlora.nnx.init.")
    return _adapted_call(self, self.lora_kind, call.input, y, eq)


_CLASSES: dict[type, type] = {}


def adapted_class(base: type) -> type:
  """`Lora<Base>`: the adapted subclass of an NNX layer class (one class object per base class)."""
  cls = _CLASSES.get(base)
  if cls is None:
    layer, stock = _class_description(base)
    mixin = (_AdaptedEmbed if issubclass(base, nnx.Embed) else _Adapted) if stock else _AdaptedDescribed

    def body(ns: dict) -> None:
      ns.update(__module__="jlora.nnx", __qualname__=f"Lora{base.__name__}", jlora_base=base,
                __doc__=f"`{base.__module__}.{base.__qualname__}` with a LoRA adapter (jlora.nnx).")
      if not stock:
        method = layer.method
        ns[method] = lambda self, *args, **kwargs: self._jlora_call(method, args, kwargs)

    cls = types.new_class(f"Lora{base.__name__}", (mixin, base), {"pytree": base._pytree__is_pytree}, body)
    _CLASSES[base] = cls
  return cls


def _class_description(cls: type) -> tuple[Layer, bool]:
  for c in cls.__mro__:
    for key in (c, f"{c.__module__}.{c.__qualname__}"):
      if (key, "__call__") in NNX_STOCK:
        return NNX_STOCK[(key, "__call__")], True
      layer = registered_layers().get((key, "__call__"))
      if layer is not None:
        return layer, False
  raise TypeError(f"{cls.__name__} is not a layer class jlora.nnx adapts.")


def is_adapted(module: Any) -> bool:
  return isinstance(module, (_Adapted, _AdaptedDescribed))


def install(module: nnx.Module, path: tuple[str, ...], kind: str, a: jax.Array, b: jax.Array,
            magnitude: jax.Array | None = None, *, scale: float, einsum_str: str | None,
            dropout: nnx.Dropout | None, weight: str = "kernel") -> None:
  """Turns `module` into its adapted class in place, holding `A`, `B` (and DoRA's `m`) as `Trainable`, and the
  static settings (`weight`: the name of the variable the adapter belongs to)."""
  layer, stock = description(module)
  module.lora_weight = weight
  module.lora_axis = _axis(getattr(module, "axis", -1)) if stock else layer.axes(module)
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
  """The variable of the weight an adapted layer's adapter belongs to (`kernel`, `embedding`, or what its
  `jlora.Layer` names)."""
  return getattr(module, module.lora_weight)


def leaves_of(module: nnx.Module) -> dict[str, jax.Array]:
  """`{role: value}` of an adapted layer's adapter leaves (`lora_a`, `lora_b`, DoRA's `lora_magnitude`)."""
  roles = (*LORA_KEYS, MAGNITUDE_KEY) if "lora_magnitude" in vars(module) else LORA_KEYS
  return {role: getattr(module, role).get_value() for role in roles}


# --------------------------------------------------------------------------- forward
def call_site(module: Any, kind: str, einsum_str: str | None) -> Site:
  """The `Site` that `jlora.core.adapted` needs for one call: kind, contraction, precision and convolution."""
  kernel = kernel_var(module)
  conv = (lambda x, w: _conv(module, x, w)) if kind == "conv" else None
  return Site(module.lora_path, kind, module.lora_weight,
              tuple(kernel.shape), (), (), axis=module.lora_axis, equation=einsum_str,
              precision=getattr(module, "precision", None), conv=conv,
              groups=module.feature_group_count if kind == "conv" else 1)


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
  bias = bias[...] if isinstance(bias, nnx.Variable) else None
  stock = type(module).jlora_base in _STOCK
  return adapted(call_site(module, kind, einsum_str), variant_of_leaves(leaves), x, y, kernel_var(module).get_value(),
                 leaves, scale=module.lora_scale, rate=0.0 if drop is None else drop.rate, dropout_key=key, bias=bias,
                 y_is_product=stock and not (kind == "einsum" and bias is not None))


def _conv(module: nnx.Conv, x: jax.Array, w: jax.Array) -> jax.Array:
  """`x` convolved with `w: kernel_size + (c, k)` by `nnx.Conv`'s own code (its padding modes, strides, dilation),
  without bias, in `x`'s features / `c` groups: `x·A` (over all input features for a grouped layer) and DoRA's
  `x·W0`."""
  w = jnp.asarray(w)
  layer = types.SimpleNamespace(
      kernel=w, bias=None, use_bias=False, mask=None, feature_group_count=x.shape[-1] // w.shape[-2],
      kernel_size=module.kernel_size,
      strides=module.strides, padding=module.padding, input_dilation=module.input_dilation,
      kernel_dilation=module.kernel_dilation, in_features=module.in_features, out_features=w.shape[-1],
      kernel_shape=w.shape, promote_dtype=module.promote_dtype, dtype=x.dtype, param_dtype=w.dtype,
      precision=module.precision, conv_general_dilated=module.conv_general_dilated, preferred_element_type=None,
  )
  return nnx.Conv.__call__(layer, x)
