"""Jitted autoregressive generation with a KV cache for the decoder models (GPT-2, Llama).

The model only needs `init_cache(batch, length)` and a `__call__` that accepts
`attention_mask`, `positions` and `cache` and then returns `(logits, cache)`, as the
:class:`~jlora.models._arch.CausalLM` models (:class:`~jlora.models.gpt2.GPT2LMHeadModel`,
:class:`~jlora.models.llama.LlamaForCausalLM`) do.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jlora.models._checks import is_concrete

__all__ = ["generate"]

ApplyFn = Callable[..., tuple[jax.Array, Any]]


def generate(
  model: nn.Module,
  params: Any,
  input_ids: jax.Array,
  attention_mask: jax.Array | None = None,
  *,
  max_new_tokens: int,
  key: jax.Array | None = None,
  temperature: float = 0.0,
  top_k: int | None = None,
  eos_token_id: int | None = None,
  pad_token_id: int = 0,
  apply_fn: ApplyFn | None = None,
  adapters: Any = None,
  adapter_ids: Any = None,
) -> jax.Array:
  """Generates tokens greedily (`temperature=0`) or by temperature / top-k sampling.

  Prompts in a batch must be left-padded (`Tokenizer(..., padding_side="left")`); positions
  are counted from each prompt's first real token.

  Args:
    model: a decoder with `init_cache` (GPT-2 or Llama family).
    params: the `'params'` tree; extra leaves such as `lora_a`/`lora_b` are ignored by
      the plain model (pass `apply_fn` to use them).
    input_ids: (B, T) int prompt tokens.
    attention_mask: (B, T) 0/1, 0 for left padding; default all ones.
    max_new_tokens: number of tokens to generate (N).
    key: PRNG key, required when `temperature > 0`.
    temperature: 0 for greedy decoding, else the softmax temperature.
    top_k: sample only among the `top_k` most likely tokens.
    eos_token_id: when given, a sequence that produced it continues with `pad_token_id`.
    pad_token_id: token emitted after `eos_token_id`.
    apply_fn: the forward in `model.apply`'s slot: `apply_fn({'params': params}, input_ids,
      attention_mask=..., positions=..., cache=...)` returning `(logits, cache)`; default
      `model.apply`. For a LoRA forward pass `jlora.apply_fn(model, config)`. It is a
      static argument of the jitted loop, so equal functions (two `apply_fn` objects of
      the same model and config compare equal) share one compiled loop.
    adapters: a `jlora.AdapterBank` (`jlora.stack_adapters`): each row generates
      with its own adapter, chosen by `adapter_ids`, all in one batch; `params`
      is then the base. Replaces `apply_fn`.
    adapter_ids: with `adapters`: (B,) int ids or names (`'__base__'` / -1 for
      the base model), or one id or name for every row.

  Returns:
    (B, N) int32 generated tokens (the prompt is not included).

  Raises:
    ValueError: if `model` is not a decoder, sampling without a `key`, `max_new_tokens < 1`,
      a prompt token outside the vocabulary, or (GPT-2) a prompt plus `max_new_tokens` that
      needs more positions than the model has (checked when the inputs are concrete).
  """
  if not hasattr(model, "init_cache"):
    raise ValueError(
      f"`generate` needs a decoder with a KV cache (GPT-2 or the Llama family), got {type(model).__name__}."
    )
  if max_new_tokens < 1:
    raise ValueError(f"`max_new_tokens` must be >= 1, got {max_new_tokens}.")
  if temperature > 0 and key is None:
    raise ValueError("Sampling (`temperature > 0`) needs an explicit `key=jax.random.key(...)`.")
  input_ids = jnp.asarray(input_ids, jnp.int32)
  mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
  _check_prompt(model, input_ids, mask, max_new_tokens)
  key = jax.random.key(0) if key is None else key
  variables = {"params": params}
  if adapters is not None or adapter_ids is not None:
    apply_fn, variables = _bank_variables(model, params, apply_fn, adapters, adapter_ids, input_ids.shape[0])
  cache = model.init_cache(input_ids.shape[0], input_ids.shape[1] + max_new_tokens)
  return _generate(
    model,
    apply_fn,
    max_new_tokens,
    temperature > 0,
    top_k,
    eos_token_id,
    pad_token_id,
    variables,
    input_ids,
    mask,
    cache,
    key,
    jnp.float32(temperature or 1.0),
  )


def _bank_variables(model: nn.Module, params: Any, apply_fn: Any, bank: Any, ids: Any,
                    batch: int) -> tuple[Any, dict]:
  """`jlora.apply_fn(model, bank)` and its variables, for per-row adapters from a bank."""
  import jlora

  if not isinstance(bank, jlora.AdapterBank):
    raise TypeError(f"`adapters` must be a jlora.AdapterBank (jlora.stack_adapters), got {type(bank).__name__}.")
  if ids is None or apply_fn is not None:
    raise ValueError("`adapters=` needs `adapter_ids=` (a name or id per row) and no `apply_fn` (it supplies one).")
  ids = bank.ids(ids)
  if ids.ndim == 0:
    ids = jnp.full((batch,), ids)
  if ids.shape != (batch,):
    raise ValueError(f"`adapter_ids` has shape {ids.shape}; it needs one id per prompt row ({batch},).")
  return jlora.apply_fn(model, bank), {"params": params, "lora_bank": bank, "lora_ids": ids}


def _check_prompt(model: nn.Module, input_ids: jax.Array, mask: jax.Array, max_new_tokens: int) -> None:
  """Checks the prompt's token ids, and that the positions generation reaches fit a learned position table."""
  if hasattr(model, "check_inputs"):
    model.check_inputs(input_ids=input_ids)
  limits = model.input_limits() if hasattr(model, "input_limits") else {}
  table = limits.get("positions")
  if table is None or not is_concrete(mask):
    return
  prompt = int(np.asarray(mask).sum(1).max())
  last = prompt + max_new_tokens - 2  # the last generated token is returned, never fed back
  if last >= table.size:
    raise ValueError(
      f"`max_new_tokens={max_new_tokens}` after a prompt of {prompt} tokens needs positions up to {last}, but "
      f"{type(model).__name__} has learned positions 0..{table.size - 1} only (`{table.field}={table.size}`). "
      f"Lower `max_new_tokens` to at most {table.size - prompt + 1}, or shorten the prompt."
    )


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5, 6))
def _generate(
  model, apply_fn, max_new_tokens, sample, top_k, eos, pad, variables, input_ids, mask, cache, key, temperature
):
  # `model` rather than its bound `model.apply` is the static argument: equal models share a compiled loop.
  apply_fn = model.apply if apply_fn is None else apply_fn

  def select(logits, k):
    logits = logits.astype(jnp.float32)
    if not sample:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:
      kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
      logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(k, logits, axis=-1).astype(jnp.int32)

  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  keys = jax.random.split(key, max_new_tokens)
  logits, cache = apply_fn(variables, input_ids, attention_mask=mask, positions=positions, cache=cache)
  first = select(logits[:, -1], keys[0])
  done = jnp.zeros_like(first, bool) if eos is None else first == eos

  def step(carry, k):
    tok, pos, cache, done = carry
    logits, cache = apply_fn(
      variables, tok[:, None], attention_mask=jnp.ones_like(tok)[:, None], positions=pos[:, None], cache=cache
    )
    new = select(logits[:, -1], k)
    if eos is not None:
      new = jnp.where(done, pad, new)
      done = done | (new == eos)
    return (new, pos + 1, cache, done), new

  carry = (first, positions[:, -1] + 1, cache, done)
  _, rest = jax.lax.scan(step, carry, keys[1:])
  return jnp.concatenate([first[:, None], rest.T], axis=1)
