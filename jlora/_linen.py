"""Flax linen integration: `jlora.init` and `jlora.apply` by method interception.

This is the one module that intercepts linen methods. It touches `__call__` of
`nn.Dense`, `nn.DenseGeneral`, `nn.Einsum`, `nn.Conv` and `nn.Embed`, and
`nn.Embed.attend` (tied output heads), and only inside `jlora.init` / `jlora.apply`:
the `nn.intercept_methods` context is entered within those calls, so it lives
exactly as long as the trace that needs it (entered outside a jitted function, a
cached trace would keep or lose LoRA behind the user's back).

* `init` traces the model abstractly (`jax.eval_shape`: no FLOPs, no copy of the
  base) to find every adaptable module, its path and kernel layout, then adds
  adapter leaves to the param tree (`jlora._init`).
* `apply` runs the model, and each adapted layer returns
  `base(x) + s·(dropout(x)·A)·B`, factored: `A·B` is never formed.
"""

from __future__ import annotations

import contextvars
import warnings
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jlora import _ops
from jlora._config import LoraConfig
from jlora._init import add_adapters
from jlora._targets import HEAD_NAMES, Site, path_str, selects
from jlora._tree import Params, _check_tree, has_adapters

__all__ = ["init", "apply"]

# `apply` warns when a traced call carries more than this many bytes of concrete (closed-over) base leaves.
CLOSED_OVER_WARN_BYTES = 16 * 2**20

# Set while jlora runs a helper module of its own (the LoRA half of a Conv), so
# that the interceptor lets that inner call through untouched.
_BYPASS: contextvars.ContextVar[bool] = contextvars.ContextVar("jlora_bypass", default=False)


def _check_args(model: Any, config: Any) -> None:
  if not isinstance(config, LoraConfig):
    raise TypeError(f"`config` must be a jlora.LoraConfig, got {type(config).__name__}.")
  if not isinstance(model, nn.Module):
    raise TypeError(
        f"`model` must be a flax.linen Module, got {type(model).__name__}; for other models use jlora.init_tree "
        "and jlora.apply_merged."
    )


def _kind(module: nn.Module, method: str) -> str | None:
  if method == "__call__":
    # DenseGeneral and Einsum are not subclasses of Dense; order does not matter.
    for cls, kind in ((nn.Dense, "dense"), (nn.DenseGeneral, "dense_general"), (nn.Einsum, "einsum"),
                      (nn.Conv, "conv"), (nn.Embed, "embed")):
      if isinstance(module, cls):
        return kind
  elif method == "attend" and isinstance(module, nn.Embed):
    return "attend"
  return None


def _input(args: tuple, kwargs: Mapping[str, Any]) -> Any:
  if args:
    return args[0]
  for name in ("inputs", "query", "x"):
    if name in kwargs:
      return kwargs[name]
  raise TypeError("jlora: could not find the input of an intercepted layer call.")


def _einsum_str(module: nn.Einsum, args: tuple, kwargs: Mapping[str, Any]) -> str:
  eq = args[1] if len(args) > 1 else kwargs.get("einsum_str")
  return (eq or module.einsum_str).replace(" ", "")


def _site(module: nn.Module, kind: str, args: tuple, kwargs: Mapping[str, Any]) -> Site:
  path = tuple(module.path)
  kernel_name = "embedding" if kind == "embed" else "kernel"
  shape = tuple(module.get_variable("params", kernel_name).shape)
  n = len(shape)
  batch, why = (), ""
  if kind == "einsum":
    try:
      ins, outs, batch = _ops.einsum_axes(_einsum_str(module, args, kwargs))
    except ValueError as e:
      ins, outs, why = tuple(range(n - 1)), (n - 1,), str(e)
  elif kind == "dense_general":
    n_in = len(module.axis) if isinstance(module.axis, (tuple, list)) else 1
    ins, outs = tuple(range(n_in)), tuple(range(n_in, n))
    if module.batch_dims:
      why = "nn.DenseGeneral with batch_dims is not supported"
  elif kind == "conv":
    ins, outs = tuple(range(n - 1)), (n - 1,)
    if module.feature_group_count != 1:
      why = "grouped convolutions (feature_group_count > 1) are not supported"
    elif module.mask is not None:
      why = "masked convolutions are not supported"
  else:  # dense, embed
    ins, outs = (0,), (1,)
  is_head = path[-1] in HEAD_NAMES if path else False
  return Site(path, kind, kernel_name, shape, ins, outs, batch, is_head, why)


def _discover(model: nn.Module, params: Params, args, kwargs, variables) -> list[Site]:
  """Every adaptable module that the model calls on these inputs, in call order."""
  found: dict[tuple[str, ...], Site] = {}
  outputs: dict[tuple[str, ...], Any] = {}

  def record(next_fun, args, kwargs, context):
    kind = _kind(context.module, context.method_name)
    y = next_fun(*args, **kwargs)
    if kind in (None, "attend"):
      return y
    site = _site(context.module, kind, args, kwargs)
    known = found.setdefault(site.path, site)
    if known.kernel_shape != site.kernel_shape:
      raise ValueError(f"Module {path_str(site.path)!r} is called with two kernel shapes.")
    outputs[site.path] = y
    return y

  def trace(p):
    with nn.intercept_methods(record):
      out = model.apply({"params": p, **(variables or {})}, *args, **kwargs)
    leaves = jax.tree.leaves(out)
    heads = [path for path, y in outputs.items() if any(y is leaf for leaf in leaves)]
    for path in heads:
      found[path] = found[path]._replace(is_head=True)
    return out

  jax.eval_shape(trace, params)
  return list(found.values())


def init(key: jax.Array, model: nn.Module, params: Params, config: LoraConfig, *args,
         dtype: Any = jnp.float32, variables: Mapping[str, Any] | None = None, **kwargs) -> dict:
  """Adds LoRA adapters to a linen model's params.

  The model is traced abstractly on the example inputs `*args, **kwargs` (as for
  `model.apply`; `method=`, `rngs=` and flags such as `train=False` pass
  through) to find every `nn.Dense`, `nn.DenseGeneral`, `nn.Einsum`, `nn.Conv` and
  `nn.Embed` it calls; those that `config` targets get `lora_a` and `lora_b`
  leaves beside their kernel. Works through `nn.scan` / `nn.vmap` (stacked
  adapters, e.g. `lora_a: (L, d_in, r)`, a different draw per layer),
  `nn.remat`, nested and shared modules.

  Args:
    key: PRNG key for the adapter init.
    model: the linen module.
    params: its `'params'` collection (`variables['params']`).
    config: what to adapt and how.
    *args: example inputs, e.g. a batch of token ids.
    dtype: adapter dtype; float32 by default even over a bf16 base.
    variables: other collections the model needs (e.g. `{'batch_stats': ...}`).
    **kwargs: passed to `model.apply`.

  Returns:
    A new params tree: the base leaves (the same arrays) plus, per adapted
    module, `lora_a: in_shape + (r,)` and `lora_b: (r,) + out_shape` (layouts per
    layer kind in `jlora._ops`).

  Raises:
    ValueError: `target_modules` matches nothing (the message lists the module
      paths that exist), `r` exceeds a module's dimensions, and the other
      config/model mismatches listed in `jlora._targets.select_sites`.
    TypeError: `params` is not a nested dict.

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, jlora
    >>> model = nn.Dense(64)
    >>> x = jnp.ones((1, 512))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> config = jlora.LoraConfig(r=8, target_modules=".*")
    >>> params = jlora.init(jax.random.key(1), model, params, config, x)
    >>> params["lora_a"].shape, params["lora_b"].shape
    ((512, 8), (8, 64))
  """
  _check_args(model, config)
  _check_tree(params)
  sites = _discover(model, params, args, kwargs, variables)
  return add_adapters(key, params, config, sites, dtype=dtype)


class _Forward:
  """The interceptor of `apply`: adds `s·(dropout(x)·A)·B` to each adapted layer."""

  def __init__(self, config: LoraConfig):
    self.config = config

  def __call__(self, next_fun, args, kwargs, context):
    module = context.module
    kind = _kind(module, context.method_name)
    if kind is None or _BYPASS.get() or not module.has_variable("params", "lora_a"):
      return next_fun(*args, **kwargs)
    y = next_fun(*args, **kwargs)
    a = module.get_variable("params", "lora_a")
    b = module.get_variable("params", "lora_b")
    path = tuple(module.path)
    where = path_str(path)
    self._validate(path, kind, module, a, b)
    x = _input(args, kwargs)
    if kind in ("embed", "attend"):
      dt = a.dtype if kind == "embed" else jnp.result_type(x.dtype, a.dtype)
    else:
      dt = jnp.result_type(x.dtype, a.dtype)
      x = self._dropout(module, x)
    a, b = a.astype(dt), b.astype(dt)
    x = x if kind == "embed" else x.astype(dt)
    precision = getattr(module, "precision", None)
    scale = self.config.scale_for(where)
    if kind == "conv":
      lora_in = module.clone(parent=None, features=a.shape[-1], use_bias=False, mask=None, dtype=dt, param_dtype=dt)
      token = _BYPASS.set(True)
      try:
        u = lora_in.apply({"params": {"kernel": a}}, x)
      finally:
        _BYPASS.reset(token)
      delta = _ops.contract_last(u * scale, b, precision)
    else:
      delta = _ops.lora_delta(kind, x, a, b, scale=scale, axis=getattr(module, "axis", (-1,)),
                              einsum_str=_einsum_str(module, args, kwargs) if kind == "einsum" else None,
                              precision=precision)
    return y + delta.astype(y.dtype)

  def _dropout(self, module: nn.Module, x: jax.Array) -> jax.Array:
    rate = self.config.lora_dropout
    if rate == 0.0 or not module.has_rng("lora_dropout"):
      return x
    keep = jax.random.bernoulli(module.make_rng("lora_dropout"), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))

  def _validate(self, path, kind, module, a, b) -> None:
    where = path_str(path)
    cfg = self.config
    kind = "embed" if kind == "attend" else kind
    if not selects(cfg, path, kind, is_head=bool(path) and path[-1] in HEAD_NAMES):
      raise ValueError(
          f"`params` holds an adapter at {where!r}, which the config (target_modules={cfg.target_modules!r}, "
          f"exclude_modules={cfg.exclude_modules!r}, layers_to_transform={cfg.layers_to_transform!r}) does not "
          "select. Pass the LoraConfig that created it."
      )
    kernel = module.get_variable("params", "embedding" if kind in ("embed", "attend") else "kernel")
    _ops.check_adapter(where, kernel.shape, a.shape, b.shape, cfg.rank_for(where))


def apply(model: nn.Module, params: Params, config: LoraConfig, *args, rngs: Mapping[str, jax.Array] | None = None,
          variables: Mapping[str, Any] | None = None, **kwargs) -> Any:
  """The LoRA forward of a linen model: pure, jittable, differentiable.

  Each adapted layer computes `y = base(x) + s·(dropout(x)·A)·B` factored (the
  r-wide product `x·A` first; `A·B` is never formed). The LoRA term is computed
  in `result_type(x.dtype, A.dtype)` — float32 for float32 adapters over a bf16
  base — and added to the base output in the base output's dtype.

  LoRA dropout (`config.lora_dropout`) acts on the LoRA input only, and only
  when `rngs` holds a stream named `'lora_dropout'`; without it the forward is
  deterministic. (Inside `nn.scan`, list `'lora_dropout'` in `split_rngs` for a
  different mask per layer.)

  Args:
    model: the linen module.
    params: the params with adapters (from `jlora.init`, or `combine(trainable, frozen)`).
    config: the config the adapters were created with.
    *args: model inputs.
    rngs: rng streams, e.g. `{'dropout': k1, 'lora_dropout': k2}`.
    variables: other collections (e.g. `{'batch_stats': ...}`).
    **kwargs: passed to `model.apply` (`method=`, `mutable=`, model flags).

  Returns:
    What `model.apply` returns.

  Raises:
    ValueError: `params` holds no adapter, or an adapter does not match the
      config (rank, shape, or a module the config does not target).
  """
  _check_args(model, config)
  _check_tree(params)
  if not has_adapters(params):
    raise ValueError(
        "`params` holds no LoRA adapter (no lora_a/lora_b leaves), so jlora.apply would run the bare base model. "
        "Create adapters with jlora.init, or pass jlora.combine(trainable, frozen)."
    )
  _warn_if_closed_over(params)
  with nn.intercept_methods(_Forward(config)):
    return model.apply({"params": params, **(variables or {})}, *args, rngs=rngs, **kwargs)


def _warn_if_closed_over(params: Params) -> None:
  """Warns when a traced (jitted) call sees large concrete leaves: a base closed over, baked into the program."""
  if not isinstance(jnp.zeros(()), jax.core.Tracer):  # not being staged out (eager, or eager grad / vmap)
    return
  concrete = [x for x in jax.tree.leaves(params)
              if isinstance(x, (jax.Array, np.ndarray)) and not isinstance(x, jax.core.Tracer)]
  nbytes = sum(x.nbytes for x in concrete)
  if nbytes > CLOSED_OVER_WARN_BYTES:
    warnings.warn(
        f"jlora.apply is being traced with {len(concrete)} parameter leaves ({nbytes / 2**20:,.1f} MiB) that are "
        "concrete arrays, not arguments of the traced function: they were closed over, so jax compiles them into "
        "the program as constants (slow compiles and a huge program; a 7B base will not compile at all). Pass the "
        "frozen tree as an argument: `step = jax.jit(lambda trainable, frozen, x: ...)` and call "
        "`step(trainable, frozen, x)`.",
        UserWarning,
        stacklevel=3,
    )
