"""GPT-2 causal language model (Flax linen), Hugging Face module names.

Parameter paths mirror `GPT2LMHeadModel`: `transformer/wte`, `transformer/wpe`,
`transformer/h_0/ln_1`, `h_0/attn/c_attn`, `h_0/attn/c_proj`, `h_0/ln_2`,
`h_0/mlp/c_fc`, `h_0/mlp/c_proj`, `transformer/ln_f`. The LM head is tied
(`wte.attend`). GPT-2's `Conv1D` weights are already `(in, out)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jlora.models._checkpoint import HFSpec, hashable, name_map
from jlora.models._layers import KVCache, activation, attention, update_layer_cache
from jlora.models._layers import attention_mask as make_mask

__all__ = ["GPT2Config", "GPT2LMHeadModel"]


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
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: hashable(v) for k, v in config.items() if k in names})

  def to_hf(self) -> dict[str, Any]:
    """A Hugging Face `config.json` dict for this config."""
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], **dataclasses.asdict(self)}


class GPT2Block(nn.Module):
  """One pre-LayerNorm transformer block (`h_i`)."""

  config: GPT2Config
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h, mask, layer_cache, index):
    c, kw = self.config, {"dtype": self.dtype, "param_dtype": self.dtype}
    x = nn.LayerNorm(epsilon=c.layer_norm_epsilon, name="ln_1", **kw)(h)
    y, layer_cache = _Attention(c, self.dtype, name="attn")(x, mask, layer_cache, index)
    h = h + y
    x = nn.LayerNorm(epsilon=c.layer_norm_epsilon, name="ln_2", **kw)(h)
    return h + _MLP(c, self.dtype, name="mlp")(x), layer_cache


class _Attention(nn.Module):
  config: GPT2Config
  dtype: Any

  @nn.compact
  def __call__(self, x, mask, layer_cache, index):
    c, kw = self.config, {"dtype": self.dtype, "param_dtype": self.dtype}
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
    c, kw = self.config, {"dtype": self.dtype, "param_dtype": self.dtype}
    inner = c.n_inner or 4 * c.n_embd
    x = activation(c.activation_function)(nn.Dense(inner, name="c_fc", **kw)(x))
    return nn.Dense(c.n_embd, name="c_proj", **kw)(x)


class GPT2Model(nn.Module):
  """The GPT-2 trunk (`transformer`): embeddings, blocks `h_i`, final `ln_f`."""

  config: GPT2Config
  dtype: Any = jnp.float32

  def setup(self):
    c, kw = self.config, {"dtype": self.dtype, "param_dtype": self.dtype}
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
    keys, values = [], []
    for i, block in enumerate(self.h):
      layer_cache = None if cache is None else (cache.keys[i], cache.values[i])
      h, layer_cache = block(h, mask, layer_cache, None if cache is None else cache.index)
      if cache is not None:
        keys.append(layer_cache[0])
        values.append(layer_cache[1])
    if cache is not None:
      cache = cache._replace(keys=jnp.stack(keys), values=jnp.stack(values), index=cache.index + t)
    return self.ln_f(h), cache


class GPT2LMHeadModel(nn.Module):
  """GPT-2 with its tied language-model head.

  Attributes:
    config: the architecture.
    dtype: dtype of parameters and computation (attention softmax is float32).

  Call:
    `model.apply({'params': params}, input_ids, attention_mask=None, positions=None,
    cache=None)` with input_ids (B, T) int, attention_mask (B, T) 0/1, positions (B, T)
    (default: slot index). Returns logits (B, T, V), or `(logits, cache)` when a
    :class:`KVCache` is passed.
  """

  config: GPT2Config
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(
    self,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    positions: jax.Array | None = None,
    cache: KVCache | None = None,
  ):
    trunk = GPT2Model(self.config, self.dtype, name="transformer")
    h, new_cache = trunk(input_ids, attention_mask, positions, cache)
    logits = trunk.wte.attend(h)
    return logits if cache is None else (logits, new_cache)

  def init_cache(self, batch: int, length: int) -> KVCache:
    """An empty :class:`KVCache` of `length` slots for `batch` sequences."""
    c = self.config
    return KVCache.create(
      num_layers=c.n_layer,
      batch=batch,
      length=length,
      num_kv_heads=c.n_head,
      head_dim=c.n_embd // c.n_head,
      dtype=self.dtype,
    )

  def peft_name_map(self):
    """PEFT/`transformers` module names of this model (see `jlora._names`)."""
    return name_map(hf_spec(self))


def build(config: GPT2Config, *, dtype: Any = jnp.float32) -> GPT2LMHeadModel:
  """Builds the model for `config` (GPT-2 takes no extra options)."""
  return GPT2LMHeadModel(config, dtype)


def example_inputs(model: GPT2LMHeadModel) -> tuple:
  """Inputs for `model.init`."""
  return (jnp.zeros((1, 2), jnp.int32),)


def hf_spec(model: GPT2LMHeadModel) -> HFSpec:
  """The Hugging Face layout of `GPT2LMHeadModel`."""
  return HFSpec(
    base_prefix="transformer.",
    list_names=("h",),
    no_transpose=("c_attn", "c_proj", "c_fc"),
    ignore=(r"h\.\d+\.attn\.(masked_)?bias", r"lm_head\.weight"),
  )


def default_options(config: dict[str, Any], path: str) -> dict[str, Any]:
  """Options implied by a checkpoint directory (none for GPT-2)."""
  return {}


Config = GPT2Config
