"""The LoRA interceptor of `jlora.apply` and `jlora.apply_bank`: one adapted layer call at a time.

`Forward` is what `nn.intercept_methods` calls for every linen method call
inside a LoRA forward. For a described layer (`jlora.frontends.layers`) whose module
holds adapter leaves it runs the base call, then adds the factored term
`s·(dropout(x)·A)·B` (`term`), and records which adapters it read so that
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
import jax.numpy as jnp

from jlora.core import ops as _ops
from jlora.core.config import LoraConfig
from jlora.frontends.linen_dora import dora_delta, norm_key
from jlora.core.targets import adapter_path, is_head, lora_keys, magnitude_key, path_str, selects
from jlora.core.tree import Params, check_magnitude, slots
from jlora.frontends.layers import Call, describe, kinds_listing

__all__ = ["BYPASS", "Forward", "term"]

# Set while jlora runs a helper module of its own (the LoRA half of a Conv), so
# that the interceptor lets that inner call through untouched.
BYPASS: contextvars.ContextVar[bool] = contextvars.ContextVar("jlora_bypass", default=False)
# The adapters whose layer call is running: a nested call of the same layer (a subclass calling
# `super().__call__`, the inner call of `nn.remat(nn.Dense)`) must not add the LoRA term twice.
_ACTIVE: contextvars.ContextVar[frozenset] = contextvars.ContextVar("jlora_active", default=frozenset())


def term(module: nn.Module, call: Call, kind: str, x: jax.Array, a: jax.Array, b: jax.Array,
         scale: Any) -> jax.Array:
  """`s·(x·A)·B` for one call of a layer, in the layer's output shape (`x` already dropped out and cast)."""
  precision = getattr(module, "precision", None)
  layer = call.layer
  if kind == "conv":
    lora_in = module.clone(parent=None, features=a.shape[-1], use_bias=False, mask=None, dtype=a.dtype,
                           param_dtype=a.dtype)
    token = BYPASS.set(True)
    try:
      u = lora_in.apply({"params": {"kernel": a}}, x)
    finally:
      BYPASS.reset(token)
    return _ops.contract_last(u * scale, b, precision)
  if kind in ("dense", "dense_general"):
    return _ops.lora_delta(kind, x, a, b, scale=scale, axis=layer.axes(module), precision=precision)
  return _ops.lora_delta(kind, x, a, b, scale=scale, einsum_str=call.equation if kind == "einsum" else None,
                         precision=precision)


class Forward:
  """The interceptor: adds the LoRA term to each adapted layer, and records which adapters it read.

  Args:
    config: the adapters' config (single-adapter mode).
    bank: an `AdapterBank` (mixed mode; `config` is then None).
    ids: with `bank`: int32 `()` (one adapter for the batch) or `(batch,)`
      (one per example, indexing axis 0 of every adapted layer's input); -1 is
      the base model.
  """

  def __init__(self, config: LoraConfig | None, bank: Any = None, ids: jax.Array | None = None):
    self.config, self.bank, self.ids = config, bank, ids
    self.consumed: set[tuple[tuple[str, ...], str]] = set()  # (module path, A leaf name)

  def __call__(self, next_fun, args, kwargs, context):
    module = context.module
    layer = describe(module, context.method_name)
    if layer is None or BYPASS.get():
      return next_fun(*args, **kwargs)
    kernel_name = layer.weight_name(module)
    a_key, b_key = lora_keys(kernel_name)
    active = (tuple(module.path), a_key)
    if not module.has_variable("params", a_key) or active in _ACTIVE.get():
      return next_fun(*args, **kwargs)
    token = _ACTIVE.set(_ACTIVE.get() | {active})
    try:
      y = next_fun(*args, **kwargs)
    finally:
      _ACTIVE.reset(token)
    call = Call(module, layer, args, kwargs)
    kind = layer.kind
    a = module.get_variable("params", a_key)
    b = module.get_variable("params", b_key)
    path = adapter_path(tuple(module.path), kernel_name)
    where = path_str(path)
    kernel_shape = module.get_variable("params", kernel_name).shape
    if self.bank is None:
      self._validate(path, kind, module, kernel_name, kernel_shape, a, b)
    else:
      _ops.check_adapter(where, kernel_shape, a.shape[:-1], b.shape[:-1], a.shape[-2])
    if kind == "einsum":
      _ops.check_equation(where, call.equation, kernel_shape, a.shape if self.bank is None else a.shape[:-1])
    self.consumed.add(active)
    x = call.input
    dt = a.dtype if kind == "embed" else jnp.result_type(x.dtype, a.dtype)
    if self.bank is None:
      rate = self.config.lora_dropout
      xd = self._input(module, kind, x, rate, dt)
      scale = self.config.scale_for(where)
      delta = term(module, call, kind, xd, a.astype(dt), b.astype(dt), scale)
      m_key = magnitude_key(kernel_name)
      if module.has_variable("params", m_key):
        dropped = bool(rate) and module.has_rng("lora_dropout") and kind not in ("embed", "attend")
        kernel = module.get_variable("params", kernel_name)
        n_key = norm_key(m_key)
        norm = module.get_variable("params", n_key) if module.has_variable("params", n_key) else None
        delta = dora_delta(module, call, kind, y, xd, dropped, delta, kernel, a.astype(dt), b.astype(dt), scale,
                           module.get_variable("params", m_key), where, norm)
    else:
      delta = self._mixed(module, call, kind, where, x, a.astype(dt), b.astype(dt), (tuple(module.path), a_key))
    return y + delta.astype(y.dtype)

  def _input(self, module: nn.Module, kind: str, x: jax.Array, rate: Any, dt: Any) -> jax.Array:
    """The LoRA input: dropped out (not for embeddings, whose input is ids) and cast to the term's dtype."""
    if kind in ("embed", "attend"):
      return x if kind == "embed" else x.astype(dt)
    enabled = not isinstance(rate, (int, float)) or rate > 0
    key = module.make_rng("lora_dropout") if enabled and module.has_rng("lora_dropout") else None
    return _ops.dropout(key, x, rate).astype(dt)

  def _mixed(self, module, call, kind, where, x, a, b, slot) -> jax.Array:
    """The term of each example's adapter from the bank's stacked leaves `a: a_shape + (n,)`, `b: b_shape + (n,)`."""
    scales, rates = self.bank.lookup(slot, where)
    ids, n = self.ids, len(scales)
    safe = jnp.clip(ids, 0, n - 1)
    # -1: the base (nothing added); an id outside -1..n-1 (possible only when traced) makes its rows NaN, never a
    # plausible wrong output
    picked = jnp.where((ids >= 0) & (ids < n), jnp.asarray(scales, jnp.float32)[safe], jnp.nan)
    scale = jnp.where(ids == -1, 0.0, picked).astype(a.dtype)
    rate = jnp.asarray(rates, jnp.float32)[safe] if any(rates) else 0.0
    a_sel, b_sel = jnp.take(a, safe, axis=-1), jnp.take(b, safe, axis=-1)
    if ids.ndim == 0:  # one adapter for the whole batch: the single-adapter path, with a traced scale
      return term(module, call, kind, self._input(module, kind, x, rate, a.dtype), a_sel, b_sel, scale)
    if x.ndim == 0 or x.shape[0] != ids.shape[0]:
      raise ValueError(
          f"jlora.apply_bank: the layer at {where!r} is called with an input of shape {tuple(x.shape)}, whose "
          f"axis 0 is not the batch of {ids.shape[0]} examples that `ids` ({tuple(ids.shape)}) covers. Per-example "
          "adapters need every adapted layer's input to keep the examples on axis 0; pass one id for the whole "
          "batch (ids of shape ()) otherwise."
      )
    rate = rate if isinstance(rate, float) else rate.reshape((-1,) + (1,) * (x.ndim - 1))
    x = self._input(module, kind, x, rate, a.dtype)

    def one(xi, ai, bi, si):
      return term(module, call, kind, xi[None], ai, bi, si)[0]

    return jax.vmap(one)(x, jnp.moveaxis(a_sel, -1, 0), jnp.moveaxis(b_sel, -1, 0), scale)

  def _validate(self, path, kind, module, kernel_name, kernel_shape, a, b) -> None:
    where = path_str(path)
    cfg = self.config
    kind = "embed" if kind == "attend" else kind
    if not selects(cfg, path, kind, is_head=is_head(module.path)):
      raise ValueError(
          f"`params` holds an adapter at {where!r}, which the config (target_modules={cfg.target_modules!r}, "
          f"exclude_modules={cfg.exclude_modules!r}, layers_to_transform={cfg.layers_to_transform!r}) does not "
          "select. Pass the LoraConfig that created it."
      )
    _ops.check_adapter(where, kernel_shape, a.shape, b.shape, cfg.rank_for(where))
    m_key = magnitude_key(kernel_name)
    magnitude = module.get_variable("params", m_key) if module.has_variable("params", m_key) else None
    check_magnitude(where, cfg, magnitude, _ops.magnitude_shape(a.shape, b.shape, kernel_shape))

  def check_consumed(self, params: Params, fn: str = "jlora.apply") -> None:
    """Raises naming every adapter in `params` that no intercepted call read: the forward would ignore it."""
    unused = [s for s in slots(params) if (s.module, s.a_key) not in self.consumed]
    if not unused:
      return
    names = [path_str(s.module if s.weight is None else (*s.module, s.weight)) for s in unused]
    listed = ", ".join(repr(n) for n in names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    raise ValueError(
        f"{fn}: {len(names)} adapter(s) were not used by this forward: {listed}. No layer that jlora intercepts "
        "read them, so the output there would be the base model's. Causes: the module's class is not one jlora "
        f"adapts (it adapts {kinds_listing()}; teach it yours with jlora.register_layer); adapters made by "
        "jlora.init_tree for a linen model (use jlora.init); a `method=` or inputs that do not run those modules; "
        "or modules renamed since the adapters were made. If this forward is meant to skip them (e.g. "
        "method=encode of an encoder-decoder), pass allow_unused=True."
    )
