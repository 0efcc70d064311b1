"""GPT-2 causal language model (Flax linen), Hugging Face module names.

Parameter paths mirror `GPT2LMHeadModel`: `transformer/wte`, `transformer/wpe`,
`transformer/h_0/ln_1`, `h_0/attn/c_attn`, `h_0/attn/c_proj`, `h_0/ln_2`,
`h_0/mlp/c_fc`, `h_0/mlp/c_proj`, `transformer/ln_f`. The LM head is tied
(`wte.attend`). GPT-2's `Conv1D` weights are already `(in, out)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from jlora.models._arch import Architecture, AxisTable, CausalLM, config_fields
from jlora.models._checkpoint import HFSpec
from jlora.models._checks import Limit, is_concrete
from jlora.models._layers import (
  RESIDUAL,
  KVCache,
  activation,
  attention,
  constrain,
  dtypes,
  run_layers,
  update_layer_cache,
)
from jlora.models._layers import attention_mask as make_mask

__all__ = ["ARCHITECTURE", "GPT2Config", "GPT2LMHeadModel"]


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  """The subset of Hugging Face's `GPT2Config` that the model uses."""

  vocab_size: int = 50257
  n_positions: int = 1024
  n_embd: int = 768
  n_layer: int = 12
  n_head: int = 12
  n_inner: int | None = None
  activation_function: str = "gelu_new"
  layer_norm_epsilon: float = 1e-5
  bos_token_id: int = 50256
  eos_token_id: int = 50256

  @classmethod
  def from_hf(cls, config: dict[str, Any]) -> GPT2Config:
    """Reads a Hugging Face `config.json` dict.

    Raises:
      ValueError: for options this implementation does not support.
    """
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
      if config.get(flag):
        raise ValueError(f"GPT-2 config option `{flag}=True` is not supported; set it to false.")
    if config.get("scale_attn_weights", True) is False:
      raise ValueError("GPT-2 config option `scale_attn_weights=False` is not supported.")
    return cls(**config_fields(cls, config))

  def to_hf(self) -> dict[str, Any]:
    """A Hugging Face `config.json` dict for this config."""
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], **dataclasses.asdict(self)}


class GPT2Block(nn.Module):
  """One pre-LayerNorm transformer block (`h_i`): `(h, layer_cache, (mask, index)) -> (h, layer_cache)`."""

  config: GPT2Config
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h, layer_cache, ctx):
    mask, index = ctx
    c, kw = self.config, dtypes(self.dtype)
    h = constrain(h, *RESIDUAL)
    x = nn.LayerNorm(epsilon=c.layer_norm_epsilon, name="ln_1", **kw)(h)
    y, layer_cache = _Attention(c, self.dtype, name="attn")(x, mask, layer_cache, index)
    h = constrain(h + y, *RESIDUAL)
    x = nn.LayerNorm(epsilon=c.layer_norm_epsilon, name="ln_2", **kw)(h)
    return constrain(h + _MLP(c, self.dtype, name="mlp")(x), *RESIDUAL), layer_cache


class _Attention(nn.Module):
  config: GPT2Config
  dtype: Any

  @nn.compact
  def __call__(self, x, mask, layer_cache, index):
    c, kw = self.config, dtypes(self.dtype)
    b, t, d = x.shape
    q, k, v = jnp.split(nn.Dense(3 * d, name="c_attn", **kw)(x), 3, axis=-1)
    q, k, v = (a.reshape(b, t, c.n_head, d // c.n_head) for a in (q, k, v))
    if layer_cache is not None:
      k, v = layer_cache = update_layer_cache(layer_cache, k, v, index)
    y = attention(q, k, v, mask, scale=(d // c.n_head) ** -0.5).reshape(b, t, d)
    return nn.Dense(d, name="c_proj", **kw)(y), layer_cache


class _MLP(nn.Module):
  config: GPT2Config
  dtype: Any

  @nn.compact
  def __call__(self, x):
    c, kw = self.config, dtypes(self.dtype)
    inner = c.n_inner or 4 * c.n_embd
    x = activation(c.activation_function)(nn.Dense(inner, name="c_fc", **kw)(x))
    return nn.Dense(c.n_embd, name="c_proj", **kw)(x)


class GPT2Model(nn.Module):
  """The GPT-2 trunk (`transformer`): embeddings, blocks `h_i`, final `ln_f`."""

  config: GPT2Config
  dtype: Any = jnp.float32

  def setup(self):
    c, kw = self.config, dtypes(self.dtype)
    init = nn.initializers.normal(0.02)
    self.wte = nn.Embed(c.vocab_size, c.n_embd, embedding_init=init, **kw)
    self.wpe = nn.Embed(c.n_positions, c.n_embd, embedding_init=init, **kw)
    self.h = [GPT2Block(c, self.dtype, name=f"h_{i}") for i in range(c.n_layer)]
    self.ln_f = nn.LayerNorm(epsilon=c.layer_norm_epsilon, **kw)

  def __call__(self, input_ids, attention_mask=None, positions=None, cache=None):
    b, t = input_ids.shape
    mask, slots, cache = make_mask(attention_mask, b, t, cache=cache)
    if positions is None:
      positions = jnp.broadcast_to(slots, (b, t))
    h = self.wte(input_ids) + self.wpe(positions)
    kv = None if cache is None else (cache.keys, cache.values)
    h, kv = run_layers(self.h, h, kv, (mask, None if cache is None else cache.index))
    return self.ln_f(h), None if cache is None else cache.advance(kv, t)


class GPT2LMHeadModel(CausalLM):
  """GPT-2 with its tied language-model head.

  Attributes:
    config: the architecture.
    dtype: dtype of parameters and computation (attention softmax is float32).

  Call:
    `model.apply({'params': params}, input_ids, attention_mask=None, positions=None,
    cache=None)` with input_ids (B, T) int, attention_mask (B, T) 0/1, positions (B, T)
    (default: slot index). Returns logits (B, T, V), or `(logits, cache)` when a
    :class:`KVCache` is passed.

  Raises:
    ValueError: outside `jit`, for token ids outside `0..vocab_size-1` or positions outside
      `0..n_positions-1`; a sequence longer than `n_positions` also inside `jit`.
  """

  config: GPT2Config
  param_axes: ClassVar[AxisTable] = {  # logical axis names (models._partitioning); c_attn's fused q|k|v: heads
    "wte/embedding": ("vocab", "embed"),
    "wpe/embedding": (None, "embed"),
    "attn/c_attn/kernel": ("embed", "heads"),
    "attn/c_attn/bias": ("heads",),
    "attn/c_proj/kernel": ("heads", "embed"),
    "attn/c_proj/bias": ("embed",),
    "mlp/c_fc/kernel": ("embed", "mlp"),
    "mlp/c_fc/bias": ("mlp",),
    "mlp/c_proj/kernel": ("mlp", "embed"),
    "mlp/c_proj/bias": ("embed",),
    "ln_1/scale": ("norm",),
    "ln_1/bias": ("norm",),
    "ln_2/scale": ("norm",),
    "ln_2/bias": ("norm",),
    "ln_f/scale": ("norm",),
    "ln_f/bias": ("norm",),
  }

  @nn.compact
  def __call__(
    self,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    positions: jax.Array | None = None,
    cache: KVCache | None = None,
  ):
    self.check_inputs(input_ids=input_ids, positions=positions)
    if positions is None and cache is None:
      self.check_length("input_ids", input_ids.shape[1])
    elif positions is None and is_concrete(cache.index):
      self.check_length("input_ids", int(cache.index) + input_ids.shape[1])
    trunk = GPT2Model(self.config, self.dtype, name="transformer")
    h, new_cache = trunk(input_ids, attention_mask, positions, cache)
    logits = trunk.wte.attend(h)
    return logits if cache is None else (logits, new_cache)

  def cache_dims(self) -> tuple[int, int, int]:
    """`(n_layer, n_head, n_embd // n_head)`."""
    c = self.config
    return c.n_layer, c.n_head, c.n_embd // c.n_head

  def input_limits(self) -> dict[str, Limit]:
    """`input_ids` below `vocab_size`, `positions` below `n_positions` (learned position table)."""
    return {**super().input_limits(), "positions": Limit(self.config.n_positions, "n_positions")}

  def hf_spec(self) -> HFSpec:
    """The Hugging Face layout of `GPT2LMHeadModel`."""
    return HFSpec(
      base_prefix="transformer.",
      list_names=("h",),
      no_transpose=("c_attn", "c_proj", "c_fc"),
      ignore=(r"h\.\d+\.attn\.(masked_)?bias", r"lm_head\.weight"),
    )


def build(config: GPT2Config, *, dtype: Any = jnp.float32) -> GPT2LMHeadModel:
  """Builds the model for `config` (GPT-2 takes no extra options)."""
  return GPT2LMHeadModel(config, dtype)


ARCHITECTURE = Architecture(config=GPT2Config, build=build)
