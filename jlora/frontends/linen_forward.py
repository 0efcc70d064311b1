"""The LoRA interceptor of `jlora.apply` (one adapter, or a bank): one adapted layer call at a time.

`Forward` is what `nn.intercept_methods` calls for every linen method call
inside a LoRA forward. For a described layer (`jlora.frontends.layers`) whose module
holds adapter leaves it runs the base call, then hands `(x, y, kernel, leaves)`
to `jlora.core.adapted` (which adds the variant's term: LoRA's
`s·(dropout(x)·A)·B`, or DoRA's), and records which adapters it read so that
`check_consumed` can refuse a forward that silently skipped one.

With a `bank` (`jlora.AdapterBank`) the module's leaves are a stack of adapters,
the adapter axis last, and `ids` choose one per example (or one for the whole
batch): the term of example `i` is the one of adapter `ids[i]`, and `-1` adds
nothing, so those examples get the base output; a traced id outside -1..n-1 gives NaN rows.
"""

from __future__ import annotations

import contextvars
from typing import Any

import flax.linen as nn
import jax

from jlora.core import ops as _ops
from jlora.core import stacks as _stacks
from jlora.core import tokens as _tokens
from jlora.core.adapted import adapted, adapted_batch
from jlora.core.config import LoraConfig
from jlora.core.merge import norm_key
from jlora.core.parameters import moe_hint
from jlora.core.targets import (
  LAYERS_KEY,
  MAGNITUDE_KEY,
  TOKENS_KEY,
  Site,
  Slot,
  is_head,
  is_tokens_key,
  leaf_name,
  path_str,
  selects,
  targets_parameter,
)
from jlora.core.tree import Params, check_magnitude, module_dicts, slots
from jlora.core.variants import variant_of_leaves
from jlora.frontends.layers import Call, describe, kinds_listing
from jlora.frontends.linen_run import is_foreign

__all__ = ["BYPASS", "Forward", "call_site", "feature_groups"]

# Set while jlora runs a helper module of its own (the LoRA half of a Conv), so
# that the interceptor lets that inner call through untouched.
BYPASS: contextvars.ContextVar[bool] = contextvars.ContextVar("jlora_bypass", default=False)
# The adapters whose layer call is running: a nested call of the same layer (a subclass calling
# `super().__call__`, the inner call of `nn.remat(nn.Dense)`) must not add the LoRA term twice.
_ACTIVE: contextvars.ContextVar[frozenset] = contextvars.ContextVar("jlora_active", default=frozenset())


def _conv(module: nn.Module):
  """`conv(x, w)`: the module's own convolution (flax's padding, strides, dilation) with kernel `w`, no bias, in
  `x`'s features / `w`'s input features groups (the layer's own kernel, or a grouped layer's full-input `A`)."""

  def conv(x: jax.Array, w: jax.Array) -> jax.Array:
    layer = module.clone(parent=None, features=w.shape[-1], use_bias=False, mask=None, dtype=x.dtype,
                         param_dtype=w.dtype, feature_group_count=x.shape[-1] // w.shape[-2])
    token = BYPASS.set(True)
    try:
      return layer.apply({"params": {"kernel": w}}, x)
    finally:
      BYPASS.reset(token)

  return conv


def feature_groups(module: nn.Module, kind: str) -> int:
  """A convolution's feature groups (1 for other kinds)."""
  return getattr(module, "feature_group_count", 1) if kind == "conv" else 1


def call_site(module: nn.Module, call: Call, kind: str, path: tuple[str, ...], kernel_name: str,
              kernel_shape: tuple[int, ...]) -> Site:
  """The `Site` that `jlora.core.adapted` needs for one call: kind, contraction and precision."""
  return Site(path, kind, kernel_name, tuple(kernel_shape), (), (),
              axis=call.layer.axes(module) if kind in ("dense", "dense_general") else (-1,),
              equation=call.equation if kind == "einsum" else None, precision=getattr(module, "precision", None),
              conv=_conv(module) if kind == "conv" else None,
              group_sizes=call.group_sizes if kind == "ragged_dot" else None, groups=feature_groups(module, kind))


# flax's own layers, whose output is exactly x·W0 (+ `bias`): DoRA may read x·W0 off it. A registered class may add
# other terms after its product, which DoRA must not scale.
_STOCK = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.Einsum, nn.Embed)


class Forward:
  """The interceptor: adds the adapter's term to each adapted layer, and records which adapters it read.

  It only discovers the call (its input, base output, kernel and adapter leaves); `jlora.core.adapted` computes
  the term, for every variant.

  Args:
    config: the adapters' config (single-adapter mode).
    bank: an `AdapterBank` (mixed mode; `config` is then None).
    ids: with `bank`: int32 `()` (one adapter for the batch) or `(batch,)`
      (one per example, indexing axis 0 of every adapted layer's input); -1 is
      the base model.
  """

  def __init__(self, config: LoraConfig | None, bank: Any = None, ids: jax.Array | None = None):
    self.config, self.bank, self.ids = config, bank, ids
    self.consumed: set[Slot] = set()
    self.tokens_read: set[tuple[str, ...]] = set()

  def __call__(self, next_fun, args, kwargs, context):
    module = context.module
    layer = describe(module, context.method_name)
    if layer is None or BYPASS.get() or is_foreign(module):  # re-applied with weights given at call time: not ours
      return next_fun(*args, **kwargs)
    slot = Slot(tuple(module.path), layer.weight_name(module))
    t_key = leaf_name(TOKENS_KEY, slot.kernel_name)
    if layer.kind in ("embed", "attend") and module.has_variable("params", t_key) and slot not in _ACTIVE.get():
      return self._tokens(next_fun, args, kwargs, module, layer, slot, t_key)
    if not module.has_variable("params", slot.a_key) or slot in _ACTIVE.get():
      return next_fun(*args, **kwargs)
    token = _ACTIVE.set(_ACTIVE.get() | {slot})
    try:
      y = next_fun(*args, **kwargs)
    finally:
      _ACTIVE.reset(token)
    call = Call(module, layer, args, kwargs)
    kind = layer.kind
    a = module.get_variable("params", slot.a_key)
    b = module.get_variable("params", slot.b_key)
    path, where = slot.path, slot.where
    kernel = module.get_variable("params", slot.kernel_name)
    kernel_shape = tuple(kernel.shape)
    m_key = slot.m_key
    magnitude = module.get_variable("params", m_key) if module.has_variable("params", m_key) else None
    l_key = slot.key(LAYERS_KEY)
    mask = module.get_variable("params", l_key) if module.has_variable("params", l_key) else None
    if self.bank is None:
      self._validate(slot, kind, module, kernel_shape, a, b, magnitude, mask)
    else:
      _ops.check_adapter(where, kernel_shape, a.shape[:-1], b.shape[:-1], a.shape[-2])
      self.bank.check_selected(slot, kind, is_head(module.path))
    if kind == "einsum":
      _ops.check_equation(where, call.equation, kernel_shape, a.shape if self.bank is None else a.shape[:-1])
    self.consumed.add(slot)
    site = call_site(module, call, kind, path, slot.kernel_name, kernel_shape)
    leaves = {"lora_a": a, "lora_b": b} if magnitude is None else {"lora_a": a, "lora_b": b, MAGNITUDE_KEY: magnitude}
    variant = variant_of_leaves(leaves)
    has_bias = module.has_variable("params", "bias")
    bias = module.get_variable("params", "bias") if has_bias else None
    y_is_product = type(module) in _STOCK and not (kind == "einsum" and has_bias)
    if self.bank is None:
      rate = self.config.lora_dropout
      key = self._dropout_key(module, kind, bool(rate))
      n_key = norm_key(m_key)
      norm = module.get_variable("params", n_key) if module.has_variable("params", n_key) else None
      out = adapted(site, variant, call.input, y, kernel, leaves, scale=self.config.scale_for(where), rate=rate,
                    dropout_key=key, bias=bias, y_is_product=y_is_product, norm=norm)
      return out if mask is None else _stacks.select(mask, out, y)  # a layer `layers_to_transform` leaves out
    scales, rates, magnitudes = self.bank.lookup(slot)
    return adapted_batch(site, variant, call.input, y, kernel, leaves, ids=self.ids, scales=scales, rates=rates,
                         magnitudes=magnitudes, dropout_key=self._dropout_key(module, kind, any(rates)),
                         bias=bias, y_is_product=y_is_product)

  def _tokens(self, next_fun, args, kwargs, module: nn.Module, layer: Any, slot: Slot, t_key: str) -> Any:
    """An `nn.Embed` lookup or `attend` whose table has trainable tokens: the base call, then the rows' correction
    (`jlora.core.tokens`)."""
    where = slot.where
    if self.bank is not None:
      raise ValueError(f"A mixed batch (jlora.AdapterBank) cannot hold the trainable tokens at {where!r}; run that "
                       "adapter alone with jlora.apply.")
    if module.has_variable("params", slot.a_key):
      raise ValueError(f"{where!r} holds both a LoRA adapter and trainable tokens; jlora.init gives a table one of "
                       "them. Pass the params it made.")
    if type(module) is not nn.Embed:
      raise ValueError(f"The trainable tokens at {where!r} sit in a {type(module).__name__}, not flax's nn.Embed, "
                       "whose lookup is exactly its table's rows; jlora corrects only that lookup.")
    token = _ACTIVE.set(_ACTIVE.get() | {slot})
    try:
      y = next_fun(*args, **kwargs)
    finally:
      _ACTIVE.reset(token)
    x = Call(module, layer, args, kwargs).input
    delta = module.get_variable("params", t_key)
    table = module.get_variable("params", slot.kernel_name)
    ids = _tokens.ids_for(self.config, slot.module)
    if tuple(delta.shape) != (len(ids), table.shape[-1]):
      raise ValueError(f"The trainable tokens at {where!r} have shape {tuple(delta.shape)}; the table "
                       f"{tuple(table.shape)} and the config's {len(ids)} ids need ({len(ids)}, {table.shape[-1]}).")
    self.tokens_read.add(slot.module)
    if layer.kind == "embed":
      return _tokens.lookup(y, x, delta, ids, table.shape[0])
    return _tokens.attend(y, x, delta, ids, precision=getattr(module, "precision", None))

  @staticmethod
  def _dropout_key(module: nn.Module, kind: str, enabled: bool) -> jax.Array | None:
    """A key from the `'lora_dropout'` stream when dropout acts (a rate, a stream, and an input that is not ids)."""
    if kind in ("embed", "attend") or not enabled or not module.has_rng("lora_dropout"):
      return None
    return module.make_rng("lora_dropout")

  def _validate(self, slot: Slot, kind, module, kernel_shape, a, b, magnitude, mask) -> None:
    where = slot.where
    cfg = self.config
    kind = "embed" if kind == "attend" else kind
    if mask is not None and jax.numpy.shape(mask) != ():
      raise ValueError(f"The layer mask (lora_layers) at {where!r} reaches its layer with shape {jax.numpy.shape(mask)}"
                       "; a mask is sliced to one entry per layer by the nn.scan that stacks the layer's params "
                       "(variable_axes={'params': 0}). Pass the params jlora.init made for this model.")
    if not selects(cfg, slot.path, kind, is_head=is_head(module.path), param=(*slot.module, slot.kernel_name),
                   masked=mask is not None):
      raise ValueError(
          f"`params` holds an adapter at {where!r}, which the config (target_modules={cfg.target_modules!r}, "
          f"exclude_modules={cfg.exclude_modules!r}, layers_to_transform={cfg.layers_to_transform!r}"
          f"{f', target_parameters={cfg.target_parameters!r}' if cfg.target_parameters else ''}) does not select. "
          "Pass the LoraConfig that created it."
      )
    _ops.check_adapter(where, kernel_shape, a.shape, b.shape, cfg.rank_for(where), feature_groups(module, kind))
    check_magnitude(where, cfg, magnitude, _ops.magnitude_shape(a.shape, b.shape, kernel_shape))

  def check_consumed(self, params: Params, fn: str = "jlora.apply") -> None:
    """Raises naming every adapter in `params` that no intercepted call read: the forward would ignore it."""
    read = {s.leaf("lora_a") for s in self.consumed}  # the same adapter whether or not its weight is named
    unread = [s for s in slots(params) if s.leaf("lora_a") not in read]
    for s in unread:
      if self.config is not None and targets_parameter(self.config, (*s.module, s.kernel_name or "")):
        raise ValueError(f"{fn}: the adapter of {s.where!r} (`target_parameters`) was not used by this forward: "
                         f"{moe_hint(path_str((*s.module, s.kernel_name)))}.")
    names = [s.where for s in unread]
    names += [f"{path_str(p)} (trainable tokens)" for p, node in module_dicts(params)
              if any(map(is_tokens_key, node)) and p not in self.tokens_read]
    if not names:
      return
    listed = ", ".join(repr(n) for n in names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    raise ValueError(
        f"{fn}: {len(names)} adapter(s) were not used by this forward: {listed}. No layer that jlora intercepts "
        "read them, so the output there would be the base model's. Causes: the module's class is not one jlora "
        f"adapts (it adapts {kinds_listing()}; teach it yours with jlora.register_layer); adapters made by "
        "jlora.init_tree for a linen model (use jlora.init); a `method=` or inputs that do not run those modules; "
        "or modules renamed since the adapters were made. If this forward is meant to skip them (e.g. "
        "method=encode of an encoder-decoder), pass allow_unused=True."
    )
