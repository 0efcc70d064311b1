"""Adapters rewritten into equivalent ones under another config: `convert_to_lora` and `pad_rank`.

`convert_to_lora`: a PiSSA / OLoRA adapter as a plain LoRA adapter of the original weights, as PEFT converts it.

PiSSA and OLoRA move `s·A₀·B₀` out of each kernel at init: the model trains `W_res + s·A·B` with
`W_res = W0 − s·A₀·B₀`. That adapter belongs to `W_res`, which nobody else has. Since
`W_res + s·A·B = W0 + s·(A·B − A₀·B₀) = W0 + s·[A | A₀]·[B ; −B₀]`, the adapter `A' = [A | A₀]`,
`B' = [B ; −B₀]` of rank `2r` with the same scale (`lora_alpha` doubled too, or times √2 with rsLoRA) gives
the trained model over the original `W0`: PEFT's `save_pretrained(...,
path_initial_model_for_weight_conversion=...)` (`LoraModel.subtract_mutated_init`).

`pad_rank`: an adapter of any ranks and scales as one of rank `target_rank` and scale 1 (PEFT's
`prepare_model_for_compiled_hotswap(target_rank=...)`): `A' = [A | 0]`, `B' = s·[B ; 0]`, so
`A'·B' = s·A·B`. Adapters of different ranks and alphas over the same targets then share one config and
one set of shapes, and a jitted step compiled for one runs every other without compiling again.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp

from jlora.core.config import LoraConfig
from jlora.core.fields import FrozenMapping, rewrites_base
from jlora.core.tree import Params, _check_tree, adapters, flatten, get_path, pad_axis, slots, split, unflatten

__all__ = ["convert_to_lora", "pad_rank"]


def convert_to_lora(trained: Params, initial: Params, config: LoraConfig) -> tuple[dict, LoraConfig]:
  """A plain LoRA adapter of the original weights from one whose init rewrote the kernels (PiSSA, OLoRA).

  Args:
    trained: the trained params (the residual kernels with the adapters, or the trainable half of `jlora.split`).
    initial: the params as `jlora.init` returned them (the adapters `A₀`, `B₀` at init; their trainable half
      will do when `trained` holds the kernels).
    config: the config both were made with (`init_lora_weights` `"pissa"`, `"pissa_niter_[n]"` or `"olora"`).

  Returns:
    `(tree, config)`: the trainable half of `trained` with each adapter replaced by `A' = [A | A₀]`
    (`S + in_shape + (2r,)`), `B' = [B ; −B₀]` (`S + (2r,) + out_shape`, or the broadcast layout), and the
    config with `r`, `lora_alpha`, `rank_pattern` and `alpha_pattern` doubled (alphas times √2 with rsLoRA, so
    every scale stays) and `init_lora_weights=True`. `jlora.combine(tree, base)` over the original base (the
    weights before the init rewrote them) computes what `trained` computes; `jlora.save_peft` exports it.

  Raises:
    TypeError: a tree is not a nested dict, or `config` not a `LoraConfig`.
    ValueError: the config's init left the kernels alone (nothing to convert), DoRA, neither tree holds the
      kernels, or `initial` lacks an adapter of `trained` or holds it in another shape.

  Example:
    >>> params0 = jlora.init(key, model, base, config, x)   # config.init_lora_weights == "pissa"  # doctest: +SKIP
    >>> trained = ...                                         # training moves the adapters          # doctest: +SKIP
    >>> tree, plain = jlora.convert_to_lora(trained, params0, config)                              # doctest: +SKIP
    >>> jlora.save_peft(directory, model, jlora.combine(tree, base), plain)                       # doctest: +SKIP
  """
  _check_tree(trained, "trained")
  _check_tree(initial, "initial")
  if not isinstance(config, LoraConfig):
    raise TypeError(f"`config` must be a jlora.LoraConfig, got {type(config).__name__}.")
  init = config.init_lora_weights
  if not rewrites_base(init):
    raise ValueError(f"convert_to_lora: the config's init_lora_weights={init!r} left the kernels alone, so the adapter "
                     "is already a plain LoRA adapter of the original weights; use it as it is.")
  if config.use_dora:
    raise ValueError("convert_to_lora: use_dora=True; a DoRA magnitude rescales its own W_res + s·A·B, which has no "
                     "plain-LoRA form over W0. Merge the adapter (jlora.merge) instead.")
  kernels = trained if _holds_kernels(trained) else initial
  if not _holds_kernels(kernels):
    raise ValueError("convert_to_lora: neither `trained` nor `initial` holds the kernels, which say how the adapters "
                     "are laid out; pass the whole params of one of them (e.g. what jlora.init returned).")
  out = flatten(split(trained, config)[0])
  for ad in adapters(trained, config, kernels=kernels):
    try:
      node = get_path(initial, ad.slot.module)
      a0, b0 = node[ad.slot.a_key], node[ad.slot.b_key]
    except (KeyError, TypeError):
      raise ValueError(f"convert_to_lora: `initial` has no adapter at {ad.slot.where!r}, where `trained` has one; "
                       "pass the params jlora.init returned for this run.") from None
    if (a0.shape, b0.shape) != (ad.a.shape, ad.b.shape):
      raise ValueError(f"convert_to_lora: the adapter at {ad.slot.where!r} has lora_a {tuple(ad.a.shape)}, lora_b "
                       f"{tuple(ad.b.shape)} in `trained` but {tuple(a0.shape)}, {tuple(b0.shape)} in `initial`; "
                       "pass the params jlora.init returned for this run.")
    out[(*ad.slot.module, ad.slot.a_key)] = jnp.concatenate([ad.a, a0.astype(ad.a.dtype)], -1)
    out[(*ad.slot.module, ad.slot.b_key)] = jnp.concatenate([ad.b, -b0.astype(ad.b.dtype)], ad.b_rank_axis)
  return unflatten(out), _doubled(config)


def _holds_kernels(tree: Params) -> bool:
  """Whether every adapter in `tree` has its kernel beside it."""
  found = False
  for slot in slots(tree):
    holder = get_path(tree, slot.module)
    try:
      if slot.resolve(holder).kernel_name not in holder:
        return False
    except ValueError:  # no weight to name: only the adapters are here
      return False
    found = True
  return found


def _doubled(config: LoraConfig) -> LoraConfig:
  """The config of the rank-`2r` adapter with every module's scale unchanged."""
  factor = math.sqrt(2) if config.use_rslora else 2  # α/r = 2α/2r;  α/√r = √2·α/√(2r)

  def alpha(value: Any) -> Any:
    new = value * factor
    return int(new) if isinstance(value, int) and float(new).is_integer() else new

  return dataclasses.replace(
      config, r=2 * config.r, lora_alpha=alpha(config.lora_alpha), init_lora_weights=True,
      rank_pattern=FrozenMapping({k: 2 * v for k, v in config.rank_pattern.items()}),
      alpha_pattern=FrozenMapping({k: alpha(v) for k, v in config.alpha_pattern.items()}))


def pad_rank(params: Params, config: LoraConfig, target_rank: int, *,
             kernels: Params | None = None) -> tuple[dict, LoraConfig]:
  """An adapter of rank `target_rank` and scale 1 that computes what `params` computes under `config`.

  For swapping adapters of different ranks and alphas into one compiled step (PEFT's
  `prepare_model_for_compiled_hotswap(target_rank=...)`): `A' = [A | 0]` and `B' = s·[B ; 0]` with `s` each
  module's scale (after `rank_pattern`, `alpha_pattern` and rsLoRA), so `A'·B' = s·A·B` and the DoRA
  magnitudes are unchanged. Every adapter padded to the same `target_rank` over the same targets has the
  same shapes and the same returned config, so `jax.jit(lambda t, f: jlora.apply(model, jlora.combine(t, f),
  config, x))` compiles once for all of them. The padded rows and columns get zero gradients, so training a
  padded adapter trains the original rank.

  Args:
    params: a tree holding the adapters (the whole params, or the trainable half of `jlora.split` with
      `kernels` given); other leaves (biases, `modules_to_save`, trainable tokens) are kept as they are.
    config: the config the adapters were made with.
    target_rank: the rank to pad to: at least every module's rank.
    kernels: a tree to read the kernels from (their layout says where `B` holds its rank), when `params`
      holds only adapters.

  Returns:
    `(tree, config)`: `params` with every `lora_a` / `lora_b` padded and scaled, and `config` with
    `r=target_rank`, `lora_alpha=target_rank`, no `rank_pattern` / `alpha_pattern` and `use_rslora=False`
    (scale 1 everywhere).

  Raises:
    TypeError: `params` is not a nested dict, `config` not a `LoraConfig`, `target_rank` not an int.
    ValueError: `target_rank` below a module's rank (the message names it), or an adapter that does not fit
      its kernel.

  Example:
    >>> tree_a, canonical = jlora.pad_rank(trainable_a, config_a, 16, kernels=frozen)  # doctest: +SKIP
    >>> tree_b, _ = jlora.pad_rank(trainable_b, config_b, 16, kernels=frozen)          # doctest: +SKIP
    >>> step(tree_a, frozen); step(tree_b, frozen)         # one compile for both       # doctest: +SKIP
  """
  _check_tree(params, "params")
  if not isinstance(config, LoraConfig):
    raise TypeError(f"`config` must be a jlora.LoraConfig, got {type(config).__name__}.")
  if not isinstance(target_rank, int) or isinstance(target_rank, bool) or target_rank < 1:
    raise TypeError(f"`target_rank` must be a positive int (the rank every adapter is padded to), got {target_rank!r}.")
  out = flatten(params)
  for ad in adapters(params, config, kernels=kernels):
    if ad.rank > target_rank:
      raise ValueError(f"pad_rank: the adapter at {ad.slot.where!r} has rank {ad.rank}, above `target_rank`="
                       f"{target_rank}; pass target_rank >= {ad.rank} (the largest rank of the adapters you swap).")
    if ad.groups > 1:
      raise ValueError(f"pad_rank: the adapter at {ad.slot.where!r} belongs to a grouped convolution, whose B is "
                       "grouped by rank blocks that padding at the end would break; leave the layer out "
                       "(exclude_modules) of adapters you hotswap.")
    out[(*ad.slot.module, ad.slot.a_key)] = pad_axis(ad.a, ad.a.ndim - 1, target_rank)
    out[(*ad.slot.module, ad.slot.b_key)] = pad_axis(ad.b * jnp.asarray(ad.scale, ad.b.dtype), ad.b_rank_axis,
                                                     target_rank)
  return unflatten(out), dataclasses.replace(config, r=target_rank, lora_alpha=target_rank, use_rslora=False,
                                             rank_pattern=FrozenMapping({}), alpha_pattern=FrozenMapping({}))
