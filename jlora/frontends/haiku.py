"""Haiku: the factored LoRA (and DoRA) forward of `hk.Linear` layers: the interceptor hands each call to
`jlora.core.adapted`; and the trainable tokens of `hk.Embed` tables (`jlora.core.tokens`).

The public names are re-exported by `jlora.haiku`, whose docstring describes them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import haiku as hk
import jax.numpy as jnp

from jlora.core import tokens as _tokens
from jlora.core.adapted import adapted
from jlora.core.config import LoraConfig
from jlora.core.keys import stringify
from jlora.core.parameters import refuse as refuse_parameters
from jlora.core.targets import Site, is_head, selects
from jlora.core.tree import Adapter, Params, _check_tree, adapters, get_path
from jlora.core.variants import variant_of_leaves

__all__ = ["apply"]


def apply(fn: Callable[..., Any], params: Params, config: LoraConfig, *args, **kwargs) -> Any:
  """Runs `fn(params, *args, **kwargs)` (a Haiku `apply`) with the LoRA term of every adapted `hk.Linear`, factored.

  Args:
    fn: `transformed.apply` (or `transform_with_state(...).apply`).
    params: the Haiku params with adapters (`jlora.init_tree`): `lora_a: (in, r)`, `lora_b: (r, out)` beside `w`
      (and DoRA's `lora_magnitude: (1, out)` with `use_dora=True`), and `embeddings_trainable_tokens: (n_ids, dim)`
      beside an `hk.Embed`'s `embeddings` (`trainable_token_indices`): its lookup adds the rows to the looked-up
      vectors (the table is not copied), and a read of `embeddings` outside the lookup (a tied head
      `h @ embed.embeddings.T`) gets the table with the rows added, `table.at[ids].add(delta)`.
    config: the config the adapters were created with.
    *args: passed to `fn` after the params: the rng (or None), then the inputs.
    **kwargs: passed to `fn`.

  Returns:
    What `fn` returns.

  Raises:
    TypeError: `fn` is not callable (pass `transformed.apply`) or `config` is not a `LoraConfig`.
    ValueError: an adapter is not the `(in, r)`, `(r, out)` one of a 2-D `w`
      (stacked or another layout), trainable tokens are not an `embeddings` table's (or do not fit it and the
      config), or an adapter was not used by any `hk.Linear` call, or trainable tokens by no `hk.Embed` (the
      message names it: run such models with `jlora.apply_merged`).
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
  refuse_parameters("jlora.haiku.apply", config)
  rows = _rows(tree, config)
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
  looking_up: set[str] = set()  # the hk.Embed modules whose own lookup is running

  def tokens(next_fun: Callable, a: tuple, kw: dict, method: str, module: hk.Embed, tk: _tokens.Tokens) -> Any:
    """An `hk.Embed` with trainable tokens: its lookup corrected, a read of its table outside it folded."""
    name = module.module_name
    if method == "embeddings" and name not in looking_up:  # the table read by hand (a tied head)
      used.add(name)
      return _tokens.fold(next_fun(*a, **kw), tk.delta, tk.ids, tk.where)
    if method != "__call__" or type(module) is not hk.Embed:  # a subclass's lookup reads `embeddings`: folded
      return next_fun(*a, **kw)
    used.add(name)
    looking_up.add(name)
    try:
      y = next_fun(*a, **kw)
    finally:
      looking_up.discard(name)
    return _tokens.lookup(y, jnp.asarray(a[0] if a else kw["ids"]), tk.delta, tk.ids, tk.table.shape[0])

  def interceptor(next_fun: Callable, a: tuple, kw: dict, context: Any) -> Any:
    if isinstance(context.module, hk.Embed) and context.method_name != "__init__":
      tk = rows.get(context.module.module_name)
      if tk is not None:
        return tokens(next_fun, a, kw, context.method_name, context.module, tk)
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
  unused = sorted(set(found) - used) + [f"{n} (trainable tokens)" for n in sorted(set(rows) - used)]
  if unused:
    raise ValueError(f"jlora.haiku.apply: the adapters at {unused} were not used: no hk.Linear call (hk.Embed for "
                     "trainable tokens) has those names (another layer kind, or hk.layer_stack). Run this model with "
                     "jlora.apply_merged.")
  return out


def _rows(tree: Params, config: LoraConfig) -> dict[str, _tokens.Tokens]:
  """`{Haiku module name: Tokens}` of the trainable tokens of `tree`, checked: an `embeddings` table's, alone.

  Raises:
    ValueError: tokens of another weight, or beside a LoRA adapter; see `jlora.core.tokens.tokens`.
  """
  out = {}
  for tk in _tokens.tokens(tree, config):
    _tokens.check_alone(get_path(tree, tk.module), tk.module, "jlora.haiku.apply")
    if tk.kernel_name != "embeddings":
      raise ValueError(f"jlora.haiku.apply: the trainable tokens at {tk.where!r} belong to {tk.kernel_name!r}; it "
                       "applies them to an hk.Embed's `embeddings` table. Run this model with jlora.apply_merged.")
    out["/".join(tk.module)] = tk
  return out
