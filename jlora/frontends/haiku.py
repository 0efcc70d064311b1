"""Haiku: the factored LoRA forward of `hk.Linear` layers.

The public names are re-exported by `jlora.haiku`, whose docstring describes them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import haiku as hk
import jax.numpy as jnp

from jlora.core import ops as _ops
from jlora.core.config import LoraConfig, refuse_dora
from jlora.core.keys import stringify
from jlora.core.targets import is_head, selects
from jlora.core.tree import Adapter, Params, _check_tree, adapters

__all__ = ["apply"]


def apply(fn: Callable[..., Any], params: Params, config: LoraConfig, *args, **kwargs) -> Any:
  """Runs `fn(params, *args, **kwargs)` (a Haiku `apply`) with the LoRA term of every adapted `hk.Linear`, factored.

  Args:
    fn: `transformed.apply` (or `transform_with_state(...).apply`).
    params: the Haiku params with adapters (`jlora.init_tree`): `lora_a: (in, r)`, `lora_b: (r, out)` beside `w`.
    config: the config the adapters were created with.
    *args: passed to `fn` after the params: the rng (or None), then the inputs.
    **kwargs: passed to `fn`.

  Returns:
    What `fn` returns.

  Raises:
    TypeError: `fn` is not callable (pass `transformed.apply`) or `config` is not a `LoraConfig`.
    ValueError: an adapter is not the `(in, r)`, `(r, out)` one of a 2-D `w`
      (stacked or another layout), or an adapter was not used by any `hk.Linear`
      call (the message names it: run such models with `jlora.apply_merged`).
  """
  if not callable(fn):
    raise TypeError(f"jlora.haiku.apply: `fn` must be a Haiku apply function, e.g. transformed.apply; got "
                    f"{type(fn).__name__}.")
  if not isinstance(config, LoraConfig):
    raise TypeError(f"`config` must be a jlora.LoraConfig, got {type(config).__name__}.")
  refuse_dora(config, "jlora.haiku.apply", "it adds the plain LoRA term to hk.Linear")
  _check_tree(params)
  found: dict[str, Adapter] = {}
  for ad in adapters(stringify(params), config):
    if ad.kernel_name != "w" or ad.layout != "concat" or ad.stack or ad.kernel.ndim != 2:
      raise ValueError(f"jlora.haiku.apply: the adapter at {ad.where!r} is not one of an hk.Linear `w` (in, out) "
                       f"(weight {ad.kernel_name!r} {tuple(ad.kernel.shape)}); use jlora.apply_merged for this model.")
    if not selects(config, ad.path, "dense", is_head=is_head(ad.module)):
      raise ValueError(
          f"`params` holds an adapter at {ad.where!r}, which the config (target_modules={config.target_modules!r}, "
          f"exclude_modules={config.exclude_modules!r}) does not select. Pass the LoraConfig that created it."
      )
    found["/".join(ad.module)] = ad
  used: set[str] = set()

  def interceptor(next_fun: Callable, a: tuple, kw: dict, context: Any) -> Any:
    y = next_fun(*a, **kw)
    if context.method_name != "__call__" or not isinstance(context.module, hk.Linear):
      return y
    ad = found.get(context.module.module_name)
    if ad is None:
      return y
    used.add(context.module.module_name)
    x = a[0] if a else kw["inputs"]
    dt = jnp.result_type(x.dtype, ad.a.dtype)
    # LoRA dropout draws from the transform's rng (`fn(params, rng, ...)`); with rng None it is off.
    key = hk.maybe_next_rng_key() if config.lora_dropout else None
    x = _ops.dropout(key, x.astype(dt), config.lora_dropout)
    delta = _ops.lora_delta("dense", x, ad.a.astype(dt), ad.b.astype(dt), scale=ad.scale,
                            precision=kw.get("precision"))
    return y + delta.astype(y.dtype)

  with hk.intercept_methods(interceptor):
    out = fn(params, *args, **kwargs)
  unused = sorted(set(found) - used)
  if unused:
    raise ValueError(f"jlora.haiku.apply: the adapters at {unused} were not used: no hk.Linear call has those names "
                     "(another layer kind, or hk.layer_stack). Run this model with jlora.apply_merged.")
  return out
