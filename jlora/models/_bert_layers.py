"""The layers of the BERT encoder (embeddings, attention, feed-forward), with `transformers` module names.

Shared by every BERT task model in :mod:`jlora.models.bert`; `encode` runs them in the
scope of the calling model, so that their params sit at `embeddings/…` and `encoder/…`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jlora.models._arch import HFModel
from jlora.models._layers import RESIDUAL, activation, attention, constrain, dtypes

if TYPE_CHECKING:
  from jlora.models.bert import BertConfig

__all__ = ["BertDense", "BertEmbeddings", "BertLayer", "encode"]


class BertEmbeddings(nn.Module):
  """Word + position + token-type embeddings, then LayerNorm (`embeddings`)."""

  config: BertConfig
  dtype: Any

  @nn.compact
  def __call__(self, input_ids, token_type_ids):
    c, init = self.config, nn.initializers.normal(0.02)
    embed = lambda n, name: nn.Embed(n, c.hidden_size, embedding_init=init, name=name, **dtypes(self.dtype))  # noqa: E731
    positions = jnp.arange(input_ids.shape[1])[None]
    h = (
      embed(c.vocab_size, "word_embeddings")(input_ids)
      + embed(c.max_position_embeddings, "position_embeddings")(positions)
      + embed(c.type_vocab_size, "token_type_embeddings")(token_type_ids)
    )
    return nn.LayerNorm(epsilon=c.layer_norm_eps, name="LayerNorm", **dtypes(self.dtype))(h)


class BertDense(nn.Module):
  """A module holding one `dense` layer: BERT's `intermediate` (with `act`), `pooler`, and the `output` blocks.

  `__call__(x, residual=None)`: `dense(x)`, then `act` if set; with a `residual`,
  `LayerNorm(dense(x) + residual)` (an `output` block).
  """

  config: BertConfig
  dtype: Any
  features: int
  act: str | None = None

  @nn.compact
  def __call__(self, x, residual=None):
    x = nn.Dense(self.features, name="dense", **dtypes(self.dtype))(x)
    if residual is not None:
      return nn.LayerNorm(epsilon=self.config.layer_norm_eps, name="LayerNorm", **dtypes(self.dtype))(x + residual)
    return x if self.act is None else activation(self.act)(x)


class _SelfAttention(nn.Module):
  config: BertConfig
  dtype: Any

  @nn.compact
  def __call__(self, h, mask):
    b, t, d = h.shape
    heads = self.config.num_attention_heads
    q, k, v = (
      nn.Dense(d, name=n, **dtypes(self.dtype))(h).reshape(b, t, heads, d // heads) for n in ("query", "key", "value")
    )
    return attention(q, k, v, mask, scale=(d // heads) ** -0.5).reshape(b, t, d)


class _AttentionBlock(nn.Module):
  config: BertConfig
  dtype: Any

  @nn.compact
  def __call__(self, h, mask):
    y = _SelfAttention(self.config, self.dtype, name="self")(h, mask)
    return BertDense(self.config, self.dtype, self.config.hidden_size, name="output")(y, h)


class BertLayer(nn.Module):
  """One post-LayerNorm encoder layer (`encoder/layer_i`)."""

  config: BertConfig
  dtype: Any

  @nn.compact
  def __call__(self, h, mask):
    c = self.config
    a = constrain(_AttentionBlock(c, self.dtype, name="attention")(constrain(h, *RESIDUAL), mask), *RESIDUAL)
    inter = BertDense(c, self.dtype, c.intermediate_size, c.hidden_act, name="intermediate")(a)
    return constrain(BertDense(c, self.dtype, c.hidden_size, name="output")(inter, a), *RESIDUAL)


class _Encoder(nn.Module):
  config: BertConfig
  dtype: Any

  @nn.compact
  def __call__(self, h, mask):
    for i in range(self.config.num_hidden_layers):
      h = BertLayer(self.config, self.dtype, name=f"layer_{i}")(h, mask)
    return h


def encode(module: HFModel, input_ids, attention_mask, token_type_ids) -> jax.Array:
  """Checked inputs through embeddings + encoder, created in the scope of `module` (compact): (B, T, d)."""
  if token_type_ids is None:
    token_type_ids = jnp.zeros_like(input_ids)
  module.check_inputs(input_ids=input_ids, token_type_ids=token_type_ids)
  module.check_length("input_ids", input_ids.shape[1])
  h = BertEmbeddings(module.config, module.dtype, name="embeddings")(input_ids, token_type_ids)
  mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
  return _Encoder(module.config, module.dtype, name="encoder")(h, mask)
