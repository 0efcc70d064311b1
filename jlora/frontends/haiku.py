"""Haiku: the factored LoRA (and DoRA) forward of `hk.Linear` layers: the interceptor hands each call to
`jlora.core.adapted`.

The public names are re-exported by `jlora.haiku`, whose docstring describes them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import haiku as hk

from jlora.core.adapted import adapted
from jlora.core.config import LoraConfig
from jlora.core.keys import stringify
from jlora.core.parameters import refuse as refuse_parameters
from jlora.core.targets import Site, is_head, selects
from jlora.core.tokens import refuse as refuse_tokens
from jlora.core.tree import Adapter, Params, _check_tree, adapters, get_path
from jlora.core.variants import variant_of_leaves

__all__ = ["apply"]


def apply(fn: Callable[..., Any], params: Params, config: LoraConfig, *args, **kwargs) -> Any:
  """Runs `fn(params, *args, **kwargs)` (a Haiku `apply`) with the LoRA term of every adapted `hk.Linear`, factored.

  Args:
    fn: `transformed.apply` (or `transform_with_state(...).apply`).
    params: the Haiku params with adapters (`jlora.init_tree`): `lora_a: (in, r)`, `lora_b: (r, out)` beside `w`
      (and DoRA's `lora_magnitude: (1, out)` with `use_dora=True`).
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
  _check_tree(params)
  found: dict[str, Adapter] = {}
  biases: dict[str, Any] = {}
  tree = stringify(params)
  refuse_tokens("jlora.haiku.apply", config, tree)
  refuse_parameters("jlora.haiku.apply", config)
  for ad in adapters(tree, config):
    if ad.slot.kernel_name != "w" or ad.layout != "concat" or ad.stack or ad.kernel.ndim != 2:
      raise ValueError(f"jlora.haiku.apply: the adapter at {ad.slot.where!r} is not one of an hk.Linear `w` (in, out) "
                       f"(weight {ad.slot.kernel_name!r} {tuple(ad.kernel.shape)}); use jlora.apply_merged for this model.")
    if not selects(config, ad.slot.path, "dense", is_head=is_head(ad.slot.module)):
      raise ValueError(
          f"`params` holds an adapter at {ad.slot.where!r}, which the config (target_modules={config.target_modules!r}, "
          f"exclude_modules={config.exclude_modules!r}) does not select. Pass the LoraConfig that created it."
      )
    found["/".join(ad.slot.module)] = ad
    biases["/".join(ad.slot.module)] = get_path(tree, ad.slot.module).get("b")
  used: set[str] = set()

  def interceptor(next_fun: Callable, a: tuple, kw: dict, context: Any) -> Any:
    y = next_fun(*a, **kw)
    if context.method_name != "__call__" or not isinstance(context.module, hk.Linear):
      return y
    ad = found.get(context.module.module_name)
    if ad is None:
      return y
    name = context.module.module_name
    used.add(name)
    x = a[0] if a else kw["inputs"]
    # LoRA dropout draws from the transform's rng (`fn(params, rng, ...)`); with rng None it is off.
    key = hk.maybe_next_rng_key() if config.lora_dropout else None
    site = Site(ad.slot.path, "dense", ad.slot.kernel_name, tuple(ad.kernel.shape), (0,), (1,), precision=kw.get("precision"))
    leaves = ad.leaves
    return adapted(site, variant_of_leaves(leaves), x, y, ad.kernel, leaves, scale=ad.scale,
                   rate=config.lora_dropout, dropout_key=key, bias=biases[name], y_is_product=True)

  with hk.intercept_methods(interceptor):
    out = fn(params, *args, **kwargs)
  unused = sorted(set(found) - used)
  if unused:
    raise ValueError(f"jlora.haiku.apply: the adapters at {unused} were not used: no hk.Linear call has those names "
                     "(another layer kind, or hk.layer_stack). Run this model with jlora.apply_merged.")
  return out
