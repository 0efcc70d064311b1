"""T5 encoder-decoder (`SEQ_2_SEQ_LM`) in Flax linen, Hugging Face module names.

Parameter paths mirror `T5ForConditionalGeneration`: `shared`,
`encoder/block_0/layer_0/SelfAttention/{q,k,v,o}`,
`encoder/block_0/layer_0/SelfAttention/relative_attention_bias` (first block only),
`encoder/block_0/layer_0/layer_norm`, `encoder/block_0/layer_1/DenseReluDense/{wi,wo}`
(`wi_0`/`wi_1` when gated), `encoder/final_layer_norm`; the decoder adds
`layer_1/EncDecAttention` and moves the feed-forward to `layer_2`; `lm_head` when untied.
So `target_modules=["q", "v"]` works literally.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from jlora.models._arch import Architecture, AxisTable, HFModel, config_fields
from jlora.models._checkpoint import HFSpec
from jlora.models._checks import Limit
from jlora.models._layers import RESIDUAL, activation, attention, constrain, dtypes

__all__ = ["ARCHITECTURE", "T5Config", "T5ForConditionalGeneration", "shift_right"]


@dataclasses.dataclass(frozen=True)
class T5Config:
  """The subset of Hugging Face's `T5Config` that the model uses.

  `feed_forward_proj` is `relu` (t5) or `gated-gelu` (t5 v1.1 / flan-t5), or any
  `[gated-]{activation}`.
  """

  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 2048
  num_layers: int = 6
  num_decoder_layers: int | None = None
  num_heads: int = 8
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "relu"
  tie_word_embeddings: bool = True
  pad_token_id: int = 0
  eos_token_id: int = 1
  decoder_start_token_id: int = 0

  @property
  def is_gated(self) -> bool:
    return self.feed_forward_proj.startswith("gated-")

  @property
  def act(self) -> str:
    name = self.feed_forward_proj.removeprefix("gated-")
    return "gelu_new" if name == "gelu" and self.is_gated else name

  @classmethod
  def from_hf(cls, config: dict[str, Any]) -> T5Config:
    """Reads a Hugging Face `config.json` dict.

    Raises:
      ValueError: for an unsupported `feed_forward_proj`.
    """
    out = cls(**config_fields(cls, config))
    activation(out.act)
    return out

  def to_hf(self) -> dict[str, Any]:
    """A Hugging Face `config.json` dict for this config."""
    return {
      "model_type": "t5",
      "architectures": ["T5ForConditionalGeneration"],
      **dataclasses.asdict(self),
      "num_decoder_layers": self.num_decoder_layers or self.num_layers,
    }


def relative_position_bucket(
  relative_position: jax.Array, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> jax.Array:
  """T5's bucketing of `key_pos - query_pos`: exact for small distances, log-spaced beyond."""
  buckets = jnp.zeros_like(relative_position)
  if bidirectional:
    num_buckets //= 2
    buckets = buckets + (relative_position > 0).astype(jnp.int32) * num_buckets
    relative_position = jnp.abs(relative_position)
  else:
    relative_position = -jnp.minimum(relative_position, 0)
  max_exact = num_buckets // 2
  is_small = relative_position < max_exact
  large = max_exact + (
    jnp.log(jnp.maximum(relative_position, 1).astype(jnp.float32) / max_exact)
    / math.log(max_distance / max_exact)
    * (num_buckets - max_exact)
  ).astype(jnp.int32)
  large = jnp.minimum(large, num_buckets - 1)
  return buckets + jnp.where(is_small, relative_position, large)


class T5Attention(nn.Module):
  """Attention with projections `q`, `k`, `v`, `o` and optional relative bias.

  `__call__(x, kv, mask, bias)`: x (B, T, d), kv (B, S, d), mask (B, 1, T, S);
  `bias` (1, H, T, S) from an earlier layer or None. Returns (output, bias).
  """

  config: T5Config
  dtype: Any
  has_relative_bias: bool = False
  causal: bool = False

  @nn.compact
  def __call__(self, x, kv, mask, bias):
    c, kw = self.config, dtypes(self.dtype, use_bias=False)
    b, t, _ = x.shape
    s = kv.shape[1]
    inner = c.num_heads * c.d_kv
    q = nn.Dense(inner, name="q", **kw)(x).reshape(b, t, c.num_heads, c.d_kv)
    k = nn.Dense(inner, name="k", **kw)(kv).reshape(b, s, c.num_heads, c.d_kv)
    v = nn.Dense(inner, name="v", **kw)(kv).reshape(b, s, c.num_heads, c.d_kv)
    if bias is None:
      if self.has_relative_bias:
        rel = jnp.arange(s)[None, :] - jnp.arange(t)[:, None]
        buckets = relative_position_bucket(
          rel,
          bidirectional=not self.causal,
          num_buckets=c.relative_attention_num_buckets,
          max_distance=c.relative_attention_max_distance,
        )
        table = nn.Embed(
          c.relative_attention_num_buckets, c.num_heads, name="relative_attention_bias", **dtypes(self.dtype)
        )
        bias = table(buckets).transpose(2, 0, 1)[None]
      else:
        bias = jnp.zeros((1, c.num_heads, t, s), self.dtype)
    y = attention(q, k, v, mask, bias=bias).reshape(b, t, inner)
    return nn.Dense(c.d_model, name="o", **kw)(y), bias


class T5FeedForward(nn.Module):
  """`DenseReluDense`: `wo(act(wi(x)))` or gated `wo(act(wi_0(x)) * wi_1(x))`."""

  config: T5Config
  dtype: Any

  @nn.compact
  def __call__(self, x):
    c, kw = self.config, dtypes(self.dtype, use_bias=False)
    act = activation(c.act)
    if c.is_gated:
      h = act(nn.Dense(c.d_ff, name="wi_0", **kw)(x)) * nn.Dense(c.d_ff, name="wi_1", **kw)(x)
    else:
      h = act(nn.Dense(c.d_ff, name="wi", **kw)(x))
    return nn.Dense(c.d_model, name="wo", **kw)(h)


class _Sublayer(nn.Module):
  """`layer_i`: pre-RMSNorm residual around attention or feed-forward."""

  config: T5Config
  dtype: Any
  kind: str  # "SelfAttention", "EncDecAttention" or "DenseReluDense"
  has_relative_bias: bool = False
  causal: bool = False

  @nn.compact
  def __call__(self, h, memory=None, mask=None, bias=None):
    c = self.config
    h = constrain(h, *RESIDUAL)
    x = nn.RMSNorm(epsilon=c.layer_norm_epsilon, name="layer_norm", **dtypes(self.dtype))(h)
    if self.kind == "DenseReluDense":
      return constrain(h + T5FeedForward(c, self.dtype, name=self.kind)(x), *RESIDUAL), bias
    kv = x if memory is None else memory
    y, bias = T5Attention(c, self.dtype, self.has_relative_bias, self.causal, name=self.kind)(x, kv, mask, bias)
    return constrain(h + y, *RESIDUAL), bias


class T5Stack(nn.Module):
  """Encoder or decoder stack: blocks `block_i` then `final_layer_norm`."""

  config: T5Config
  dtype: Any
  decoder: bool = False

  @nn.compact
  def __call__(self, h, mask, memory=None, memory_mask=None):
    c = self.config
    n = (c.num_decoder_layers or c.num_layers) if self.decoder else c.num_layers
    bias = cross_bias = None
    for i in range(n):
      block = _Block(c, self.dtype, self.decoder, i == 0, name=f"block_{i}")
      h, bias, cross_bias = block(h, mask, bias, memory, memory_mask, cross_bias)
    return nn.RMSNorm(epsilon=c.layer_norm_epsilon, name="final_layer_norm", **dtypes(self.dtype))(h)


class _Block(nn.Module):
  config: T5Config
  dtype: Any
  decoder: bool
  first: bool

  @nn.compact
  def __call__(self, h, mask, bias, memory, memory_mask, cross_bias):
    c, d = self.config, self.dtype
    h, bias = _Sublayer(c, d, "SelfAttention", self.first, self.decoder, name="layer_0")(h, None, mask, bias)
    if self.decoder:
      h, cross_bias = _Sublayer(c, d, "EncDecAttention", name="layer_1")(h, memory, memory_mask, cross_bias)
    h, _ = _Sublayer(c, d, "DenseReluDense", name=f"layer_{2 if self.decoder else 1}")(h)
    return h, bias, cross_bias


class T5ForConditionalGeneration(HFModel):
  """T5 encoder-decoder LM.

  Call:
    `model.apply({'params': params}, input_ids, attention_mask=None, decoder_input_ids=...,
    decoder_attention_mask=None)`: input_ids (B, S), decoder_input_ids (B, T) (build them
    from labels with :func:`shift_right`). Returns logits (B, T, V).

  Raises:
    ValueError: without `decoder_input_ids`; outside `jit`, for ids outside
      `0..vocab_size-1` (e.g. -100 labels passed as decoder inputs). Relative position
      buckets have no length limit.
  """

  config: T5Config
  param_axes: ClassVar[AxisTable] = {  # logical axis names (models._partitioning); q/k/v/o of both attentions
    "shared/embedding": ("vocab", "embed"),
    "lm_head/kernel": ("embed", "vocab"),
    "q/kernel": ("embed", "heads"),
    "k/kernel": ("embed", "kv"),
    "v/kernel": ("embed", "kv"),
    "o/kernel": ("heads", "embed"),
    "relative_attention_bias/embedding": (None, "heads"),
    "DenseReluDense/wi/kernel": ("embed", "mlp"),
    "DenseReluDense/wi_0/kernel": ("embed", "mlp"),
    "DenseReluDense/wi_1/kernel": ("embed", "mlp"),
    "DenseReluDense/wo/kernel": ("mlp", "embed"),
    "layer_norm/scale": ("norm",),
    "final_layer_norm/scale": ("norm",),
  }

  @nn.compact
  def __call__(
    self,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    decoder_input_ids: jax.Array | None = None,
    decoder_attention_mask: jax.Array | None = None,
  ) -> jax.Array:
    c = self.config
    if decoder_input_ids is None:
      raise ValueError(
        "T5 needs `decoder_input_ids` (B, T); build them from labels with "
        "`jlora.models.t5.shift_right(labels, config)`."
      )
    self.check_inputs(input_ids=input_ids, decoder_input_ids=decoder_input_ids)
    shared = nn.Embed(
      c.vocab_size, c.d_model, name="shared", embedding_init=nn.initializers.normal(1.0), **dtypes(self.dtype)
    )
    enc_valid = (jnp.ones(input_ids.shape, bool) if attention_mask is None else attention_mask.astype(bool))[
      :, None, None, :
    ]
    memory = T5Stack(c, self.dtype, name="encoder")(shared(input_ids), enc_valid)
    t = decoder_input_ids.shape[1]
    dec_mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
    if decoder_attention_mask is not None:
      dec_mask = dec_mask & decoder_attention_mask.astype(bool)[:, None, None, :]
    h = T5Stack(c, self.dtype, decoder=True, name="decoder")(shared(decoder_input_ids), dec_mask, memory, enc_valid)
    if c.tie_word_embeddings:
      return shared.attend(h * c.d_model**-0.5)
    return nn.Dense(c.vocab_size, name="lm_head", **dtypes(self.dtype, use_bias=False))(h)

  def example_inputs(self) -> tuple:
    """Inputs for `model.init`: (input_ids, attention_mask, decoder_input_ids), ids (1, 2) int32."""
    ids = jnp.zeros((1, 2), jnp.int32)
    return (ids, None, ids)

  def input_limits(self) -> dict[str, Limit]:
    """`input_ids` and `decoder_input_ids` below `vocab_size`."""
    vocab = Limit(self.config.vocab_size, "vocab_size")
    return {"input_ids": vocab, "decoder_input_ids": vocab}

  def hf_spec(self) -> HFSpec:
    """The Hugging Face layout of `T5ForConditionalGeneration`."""
    ignore = [
      r"(encoder|decoder)\.embed_tokens\.weight",
      r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight",
    ]
    if self.config.tie_word_embeddings:
      ignore.append(r"lm_head\.weight")
    return HFSpec(list_names=("block", "layer"), ignore=tuple(ignore))


def shift_right(labels: jax.Array, config: T5Config) -> jax.Array:
  """Decoder inputs from labels (B, T): prepend `decoder_start_token_id`, -100 -> pad."""
  start = jnp.full((labels.shape[0], 1), config.decoder_start_token_id, labels.dtype)
  shifted = jnp.concatenate([start, labels[:, :-1]], axis=1)
  return jnp.where(shifted == -100, config.pad_token_id, shifted)


def build(config: T5Config, *, dtype: Any = jnp.float32) -> T5ForConditionalGeneration:
  """Builds the model for `config` (T5 takes no extra options)."""
  return T5ForConditionalGeneration(config, dtype)


ARCHITECTURE = Architecture(config=T5Config, build=build)
