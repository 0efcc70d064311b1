"""Llama-family decoder (llama, mistral, qwen2) in Flax linen, Hugging Face module names.

Parameter paths mirror `LlamaForCausalLM`: `model/embed_tokens`,
`model/layers_0/self_attn/{q,k,v,o}_proj`, `model/layers_0/mlp/{gate,up,down}_proj`,
`model/layers_0/{input,post_attention}_layernorm`, `model/norm`, `lm_head` (absent
when the embeddings are tied). With `scan_layers=True` the blocks are one `nn.scan`
named `model/layers` whose params have a leading layer axis `L`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from jlora.models._arch import Architecture, AxisTable, CausalLM, config_fields
from jlora.models._checkpoint import HFSpec
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

__all__ = ["ARCHITECTURE", "LlamaConfig", "LlamaForCausalLM"]

_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """The subset of Hugging Face's Llama / Mistral / Qwen2 configs that the model uses.

  `attention_bias` adds biases to q, k, v and o (llama); `qkv_bias` only to q, k, v
  (qwen2). `rope_type` is `default`, `linear` or `llama3`.
  """

  model_type: str = "llama"
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int | None = None
  head_dim: int | None = None
  hidden_act: str = "silu"
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  qkv_bias: bool = False
  mlp_bias: bool = False
  sliding_window: int | None = None
  rope_theta: float = 10000.0
  rope_type: str = "default"
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_position: int = 8192
  max_position_embeddings: int = 2048
  bos_token_id: int | None = 1
  eos_token_id: int | tuple[int, ...] | None = 2

  @property
  def kv_heads(self) -> int:
    return self.num_key_value_heads or self.num_attention_heads

  @property
  def dim_head(self) -> int:
    return self.head_dim or self.hidden_size // self.num_attention_heads

  @classmethod
  def from_hf(cls, config: dict[str, Any]) -> LlamaConfig:
    """Reads a Hugging Face llama / mistral / qwen2 `config.json` dict (transformers 4 or 5).

    Raises:
      ValueError: for unsupported RoPE scaling, activations or sliding-window layouts.
    """
    mt = config.get("model_type", "llama")
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0 if mt != "qwen2" else 1e6))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
      raise ValueError(f"Unsupported RoPE scaling `{rope_type}`; supported: {list(_ROPE_TYPES)}.")
    if mt == "qwen2" and config.get("use_sliding_window"):
      raise ValueError("qwen2 `use_sliding_window=True` is not supported; set it to false.")
    activation(config.get("hidden_act", "silu"))
    kw = config_fields(cls, config)
    if mt == "qwen2":
      kw["qkv_bias"], kw["sliding_window"] = True, None
    kw.update(  # RoPE settings come from `rope_parameters` / `rope_scaling`, never from same-named keys
      rope_theta=float(theta),
      rope_type=rope_type,
      rope_factor=float(rope.get("factor", 1.0)),
      rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
      rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
      rope_original_max_position=int(rope.get("original_max_position_embeddings", 8192)),
    )
    return cls(**kw)

  def to_hf(self) -> dict[str, Any]:
    """A Hugging Face `config.json` dict for this config (transformers 5 style rope)."""
    out = {k: v for k, v in dataclasses.asdict(self).items() if not k.startswith("rope") and k != "qkv_bias"}
    rope: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
    if self.rope_type != "default":
      rope["factor"] = self.rope_factor
    if self.rope_type == "llama3":
      rope.update(
        low_freq_factor=self.rope_low_freq_factor,
        high_freq_factor=self.rope_high_freq_factor,
        original_max_position_embeddings=self.rope_original_max_position,
      )
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "mixtral": "MixtralForCausalLM"}[self.model_type]
    return {
      **out,
      "architectures": [arch],
      "rope_parameters": rope,
      "rope_theta": self.rope_theta,
      "num_key_value_heads": self.kv_heads,
      "head_dim": self.dim_head,
    }


def rope_frequencies(c: LlamaConfig) -> jax.Array:
  """Inverse frequencies (D/2,) of rotary embeddings, with linear / llama3 scaling."""
  d = c.dim_head
  inv = 1.0 / (c.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  if c.rope_type == "linear":
    inv = inv / c.rope_factor
  elif c.rope_type == "llama3":
    low_wavelen = c.rope_original_max_position / c.rope_low_freq_factor
    high_wavelen = c.rope_original_max_position / c.rope_high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > low_wavelen, inv / c.rope_factor, inv)
    smooth = (c.rope_original_max_position / wavelen - c.rope_low_freq_factor) / (
      c.rope_high_freq_factor - c.rope_low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / c.rope_factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    inv = jnp.where(medium, smoothed, scaled)
  return inv


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotates x (B, T, H, D) by positions (B, T), Hugging Face's half-split convention."""
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # (B, T, D/2)
  cos = jnp.cos(jnp.concatenate([angles, angles], -1))[:, :, None]
  sin = jnp.sin(jnp.concatenate([angles, angles], -1))[:, :, None]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x * cos + rotated * sin).astype(x.dtype)


class LlamaAttention(nn.Module):
  """Grouped-query self-attention with RoPE (`self_attn`)."""

  config: LlamaConfig
  dtype: Any

  @nn.compact
  def __call__(self, x, mask, positions, layer_cache, index):
    c, kw = self.config, dtypes(self.dtype)
    b, t, _ = x.shape
    qkv_bias = c.attention_bias or c.qkv_bias
    q = nn.Dense(c.num_attention_heads * c.dim_head, use_bias=qkv_bias, name="q_proj", **kw)(x)
    k = nn.Dense(c.kv_heads * c.dim_head, use_bias=qkv_bias, name="k_proj", **kw)(x)
    v = nn.Dense(c.kv_heads * c.dim_head, use_bias=qkv_bias, name="v_proj", **kw)(x)
    q = q.reshape(b, t, c.num_attention_heads, c.dim_head)
    k, v = (a.reshape(b, t, c.kv_heads, c.dim_head) for a in (k, v))
    inv_freq = rope_frequencies(c)
    q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
    if layer_cache is not None:
      k, v = layer_cache = update_layer_cache(layer_cache, k, v, index)
    y = attention(q, k, v, mask, scale=c.dim_head**-0.5)
    y = y.reshape(b, t, c.num_attention_heads * c.dim_head)
    return nn.Dense(c.hidden_size, use_bias=c.attention_bias, name="o_proj", **kw)(y), layer_cache


class LlamaMLP(nn.Module):
  """SwiGLU feed-forward: `down_proj(act(gate_proj(x)) * up_proj(x))`."""

  config: LlamaConfig
  dtype: Any

  @nn.compact
  def __call__(self, x):
    c, kw = self.config, dtypes(self.dtype, use_bias=self.config.mlp_bias)
    gate = nn.Dense(c.intermediate_size, name="gate_proj", **kw)(x)
    up = nn.Dense(c.intermediate_size, name="up_proj", **kw)(x)
    hidden = constrain(activation(c.hidden_act)(gate) * up, "batch", "length", "act_mlp")
    return nn.Dense(c.hidden_size, name="down_proj", **kw)(hidden)


class LlamaBlock(nn.Module):
  """One decoder layer; `(h, layer_cache) -> (h, layer_cache)` so that it can be scanned.

  `feed_forward` is the `mlp` module class, `(config, dtype)` -> `x (B, T, d) -> (B, T, d)`
  (:class:`LlamaMLP`, or Mixtral's mixture of experts).
  """

  config: LlamaConfig
  dtype: Any
  feed_forward: Any = LlamaMLP

  @nn.compact
  def __call__(self, h, layer_cache, ctx):
    mask, positions, index = ctx
    c, kw = self.config, dtypes(self.dtype)
    h = constrain(h, *RESIDUAL)
    x = nn.RMSNorm(epsilon=c.rms_norm_eps, name="input_layernorm", **kw)(h)
    y, layer_cache = LlamaAttention(c, self.dtype, name="self_attn")(x, mask, positions, layer_cache, index)
    h = constrain(h + y, *RESIDUAL)
    x = nn.RMSNorm(epsilon=c.rms_norm_eps, name="post_attention_layernorm", **kw)(h)
    return constrain(h + self.feed_forward(c, self.dtype, name="mlp")(x), *RESIDUAL), layer_cache


class LlamaModel(nn.Module):
  """The decoder trunk (`model`): `embed_tokens`, layers, final `norm`."""

  config: LlamaConfig
  dtype: Any = jnp.float32
  scan_layers: bool = False
  remat: bool = False
  feed_forward: Any = LlamaMLP

  @nn.compact
  def __call__(self, input_ids, attention_mask, positions, cache):
    c, kw = self.config, dtypes(self.dtype)
    b, t = input_ids.shape
    mask, slots, cache = make_mask(attention_mask, b, t, cache=cache, sliding_window=c.sliding_window)
    if positions is None:
      positions = jnp.broadcast_to(slots, (b, t))
    embed = nn.Embed(
      c.vocab_size, c.hidden_size, name="embed_tokens", embedding_init=nn.initializers.normal(0.02), **kw
    )
    h = embed(input_ids)
    ctx = (mask, positions, None if cache is None else cache.index)
    kv = None if cache is None else (cache.keys, cache.values)
    block = nn.remat(LlamaBlock, prevent_cse=not self.scan_layers) if self.remat else LlamaBlock
    if self.scan_layers:
      stack = nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(0, nn.broadcast),
        length=c.num_hidden_layers,
      )
      h, kv = stack(c, self.dtype, self.feed_forward, name="layers")(h, kv, ctx)
    else:
      blocks = [block(c, self.dtype, self.feed_forward, name=f"layers_{i}") for i in range(c.num_hidden_layers)]
      h, kv = run_layers(blocks, h, kv, ctx)
    cache = None if cache is None else cache.advance(kv, t)
    return nn.RMSNorm(epsilon=c.rms_norm_eps, name="norm", **kw)(h), cache, embed


class LlamaForCausalLM(CausalLM):
  """Llama / Mistral / Qwen2 causal LM.

  Attributes:
    config: the architecture.
    dtype: dtype of parameters and computation (softmax and RoPE run in float32).
    scan_layers: one `nn.scan` over the blocks (params stacked on axis 0 of `model/layers`).
    remat: rematerialize each block in the backward pass (`nn.remat`).

  Call:
    `model.apply({'params': params}, input_ids, attention_mask=None, positions=None,
    cache=None)`: input_ids (B, T) int, attention_mask (B, T) 0/1, positions (B, T)
    (default: slot index). Returns logits (B, T, V), or `(logits, cache)` with a cache.

  Raises:
    ValueError: outside `jit`, for token ids outside `0..vocab_size-1` (RoPE has no position limit).
  """

  config: LlamaConfig
  scan_layers: bool = False
  remat: bool = False
  feed_forward: ClassVar[Any] = LlamaMLP  # the `mlp` module class of every block (see `LlamaBlock`)
  param_axes: ClassVar[AxisTable] = {  # logical axis names (models._partitioning); scan_layers adds "layers" first
    "embed_tokens/embedding": ("vocab", "embed"),
    "lm_head/kernel": ("embed", "vocab"),
    "self_attn/q_proj/kernel": ("embed", "heads"),
    "self_attn/q_proj/bias": ("heads",),
    "self_attn/k_proj/kernel": ("embed", "kv"),
    "self_attn/k_proj/bias": ("kv",),
    "self_attn/v_proj/kernel": ("embed", "kv"),
    "self_attn/v_proj/bias": ("kv",),
    "self_attn/o_proj/kernel": ("heads", "embed"),
    "self_attn/o_proj/bias": ("embed",),
    "mlp/gate_proj/kernel": ("embed", "mlp"),
    "mlp/gate_proj/bias": ("mlp",),
    "mlp/up_proj/kernel": ("embed", "mlp"),
    "mlp/up_proj/bias": ("mlp",),
    "mlp/down_proj/kernel": ("mlp", "embed"),
    "mlp/down_proj/bias": ("embed",),
    "input_layernorm/scale": ("norm",),
    "post_attention_layernorm/scale": ("norm",),
    "norm/scale": ("norm",),
  }

  @nn.compact
  def __call__(
    self,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    positions: jax.Array | None = None,
    cache: KVCache | None = None,
  ):
    self.check_inputs(input_ids=input_ids)
    trunk = LlamaModel(self.config, self.dtype, self.scan_layers, self.remat, self.feed_forward, name="model")
    h, new_cache, embed = trunk(input_ids, attention_mask, positions, cache)
    if self.config.tie_word_embeddings:
      logits = embed.attend(h)
    else:
      logits = nn.Dense(self.config.vocab_size, use_bias=False, name="lm_head", **dtypes(self.dtype))(h)
    return logits if cache is None else (logits, new_cache)

  def cache_dims(self) -> tuple[int, int, int]:
    """`(num_hidden_layers, num_key_value_heads, head_dim)`."""
    c = self.config
    return c.num_hidden_layers, c.kv_heads, c.dim_head

  def hf_spec(self) -> HFSpec:
    """The Hugging Face layout of `*ForCausalLM` (`model.` prefix optional when loading)."""
    ignore = (r".*rotary_emb\.inv_freq",) + ((r"lm_head\.weight",) if self.config.tie_word_embeddings else ())
    return HFSpec(
      base_prefix="model.", list_names=("layers",), scan_name="layers" if self.scan_layers else None, ignore=ignore
    )


def build(
  config: LlamaConfig, *, dtype: Any = jnp.float32, scan_layers: bool = False, remat: bool = False
) -> LlamaForCausalLM:
  """Builds the model; `scan_layers` / `remat` as in :class:`LlamaForCausalLM`."""
  return LlamaForCausalLM(config, dtype, scan_layers, remat)


ARCHITECTURE = Architecture(config=LlamaConfig, build=build, options=("scan_layers", "remat"))
