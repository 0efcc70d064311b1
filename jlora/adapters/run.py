"""`jlora.apply` and `jlora.apply_fn`: the one public door for running a linen model with adapters.

A `LoraConfig` runs one adapter (`jlora.frontends.linen.apply`); an `AdapterBank`
in its place runs a mixed batch, each example with its own adapter
(`adapter_ids=`, `jlora.adapters.bank.apply_bank`). Both go through the same
interceptor and the same adapted call (`jlora.core.adapted`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax

from jlora.adapters.bank import AdapterBank, BankApply, apply_bank
from jlora.core.config import LoraConfig
from jlora.core.tree import Params
from jlora.frontends import linen as _linen
from jlora.frontends.apply_fn import LoraApply

__all__ = ["apply", "apply_fn"]


def apply(model: nn.Module, params: Params, config: LoraConfig | AdapterBank, *args, adapter_ids: Any = None,
          rngs: Mapping[str, jax.Array] | None = None, variables: Mapping[str, Any] | None = None,
          allow_unused: bool = False, dora_norms: Params | None = None, **kwargs) -> Any:
  """The factored forward of a linen model with adapters: pure, jittable, differentiable.

  With a `LoraConfig`, `params` holds the base and one adapter (from `jlora.init`,
  or `jlora.combine(trainable, frozen)`), and each adapted layer computes
  `y = base(x) + s·(dropout(x)·A)·B` factored (the r-wide product `x·A` first;
  `A·B` is never formed), or DoRA's forward for a DoRA adapter. The term is
  computed in `result_type(x.dtype, A.dtype)` (float32 for float32 adapters over
  a bf16 base) and added in the base output's dtype. LoRA dropout
  (`lora_dropout`) acts on the LoRA input only, and only when `rngs` holds a
  stream named `'lora_dropout'`. (Inside `nn.scan`, list `'lora_dropout'` in
  `split_rngs` for a different mask per layer.)

  With an `AdapterBank` (`jlora.stack_adapters`) in place of the config, `params`
  is the base alone and `adapter_ids` picks each example's adapter: example `i`
  gets adapter `adapter_ids[i]`'s term at every adapted layer (its own scale,
  dropout rate, and for DoRA its own magnitude and norm), -1 (`'__base__'`) gets
  the base output, and a scalar id applies one adapter to the whole batch. Ids
  are traced: changing them never recompiles; a traced id outside -1..n-1 gives
  NaN rows (concrete ones are refused). Per-example ids index axis 0 of every
  adapted layer's input.

  Args:
    model: the linen module.
    params: the params: base and adapter (a config), or the base (a bank).
    config: the `LoraConfig` the adapters were created with, or an `AdapterBank`.
    *args: model inputs.
    adapter_ids: with a bank: int32 `()` or `(batch,)` ids (`bank.ids(names)`), or names.
    rngs: rng streams, e.g. `{'dropout': k1, 'lora_dropout': k2}`.
    variables: other collections (e.g. `{'batch_stats': ...}`).
    allow_unused: let adapters that this forward does not reach pass (e.g.
      `method=encode` of an encoder-decoder); by default they raise.
    dora_norms: with a config, for serving unmerged DoRA adapters:
      `jlora.dora_norms(params, config)` of these very params, computed once.
      Inference only: under training the norms change every step.
    **kwargs: passed to `model.apply` (`method=`, `mutable=`, model flags).

  Returns:
    What `model.apply` returns.

  Raises:
    TypeError: `adapter_ids` without a bank, or a bank without `adapter_ids`;
      `model` is not a linen Module (Equinox, Haiku, NNX and plain functions have
      their own doors, which the message names).
    ValueError: `params` holds no adapter (a config) or holds adapters (a bank);
      an adapter does not match the config (rank, shape, or a module the config
      does not target); an adapter was not read by any intercepted layer call,
      unless `allow_unused`; ids out of range (when concrete); with per-example
      ids, an adapted layer whose input does not keep the examples on axis 0.
      The checks run when the forward is traced: free per step under `jit`.
  """
  if isinstance(config, AdapterBank):
    if adapter_ids is None:
      raise TypeError("jlora.apply: `config` is an AdapterBank, so `adapter_ids=` must say which adapter each example "
                      "(or the whole batch) uses, e.g. adapter_ids=bank.ids(['sql', '__base__']) or adapter_ids=0.")
    if dora_norms is not None:
      raise ValueError("jlora.apply: `dora_norms` caches one adapter's norms; a bank computes each adapter's own. "
                       "Drop `dora_norms` or run that adapter alone with its LoraConfig.")
    return apply_bank(model, params, config, adapter_ids, *args, rngs=rngs, variables=variables,
                      allow_unused=allow_unused, **kwargs)
  if adapter_ids is not None:
    raise TypeError("jlora.apply: `adapter_ids` picks adapters of a bank, so `config` must be a jlora.AdapterBank "
                    f"(jlora.stack_adapters(adapter_set, base)), got {type(config).__name__}.")
  return _linen.apply(model, params, config, *args, rngs=rngs, variables=variables, allow_unused=allow_unused,
                      dora_norms=dora_norms, **kwargs)


def apply_fn(model: nn.Module, config: LoraConfig | AdapterBank, *,
             allow_unused: bool = False) -> LoraApply | BankApply:
  """`jlora.apply` in `model.apply`'s slot: a hashable `fn(variables, *args, **kwargs)`.

  With a `LoraConfig`, `variables` is `{'params': params_with_adapters, **other_collections}`;
  with an `AdapterBank` (whose type alone is read: the bank itself travels in
  `variables`, so a trained or swapped bank needs no new function), it is
  `{'params': base, 'lora_bank': bank, 'lora_ids': ids, **others}`. The result
  fits flax's `TrainState.apply_fn` and `jlora.models.generate(apply_fn=...)`;
  equal models and configs give equal functions, so it is a static `jax.jit`
  argument that does not recompile per call.

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, jlora
    >>> model, x = nn.Dense(4), jnp.ones((1, 8))
    >>> config = jlora.LoraConfig(r=2, target_modules=".*")
    >>> params = jlora.init(jax.random.key(1), model, model.init(jax.random.key(0), x)["params"], config, x)
    >>> fn = jlora.apply_fn(model, config)
    >>> fn({"params": params}, x).shape
    (1, 4)
    >>> fn == jlora.apply_fn(model, config)  # a static jit argument: no recompiles
    True

  Raises:
    TypeError: `model` is not a linen Module, or `config` neither a `LoraConfig` nor an `AdapterBank`.
  """
  _linen.check_model(model)
  if isinstance(config, AdapterBank):
    return BankApply(model, bool(allow_unused))
  _linen._check_args(model, config)
  return LoraApply(model, config, bool(allow_unused))
