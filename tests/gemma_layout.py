"""A faithful copy of the parameter layout of Google DeepMind's `gemma` (4.0.1, Flax linen).

The layer classes below reproduce `gemma.gm.nn._layers.Einsum` (weight `w` or
`weight_name`, called as `(eqn, x)`), `gemma.gm.nn._modules.FeedForward` (two
`Einsum`s sharing the FFN's scope, so `mlp/gating_einsum` and `mlp/linear` sit
in one dict) and the attention's `q_einsum` / `kv_einsum` / `attn_vec_einsum`.
`Einsum.__module__` is set to gemma's, so jlora finds it by qualified name as it
does the real class (gemma needs Python >= 3.12 and heavy dependencies, so the
tests use this copy; the README gives the recipe run against the real package).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp


class Einsum(nn.Module):
  shape: tuple[int, ...]
  weight_name: str = "w"
  initializer: nn.initializers.Initializer = nn.initializers.normal()
  dtype: jnp.dtype | None = None
  w_scale: float | None = None

  @nn.compact
  def __call__(self, eqn: str, x: jax.Array) -> jax.Array:
    w = self.param(self.weight_name, self.initializer, self.shape, self.dtype)
    if self.w_scale is not None:
      w *= self.w_scale
    return jnp.einsum(eqn, x, w)


Einsum.__module__ = "gemma.gm.nn._layers"


class RMSNorm(nn.Module):
  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.zeros_init(), (x.shape[-1]))
    var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(var + 1e-06) * (1 + scale)


class FeedForward(nn.Module):
  features: int
  hidden_dim: int

  @nn.compact
  def __call__(self, x):
    gating = Einsum(shape=(2, self.hidden_dim, self.features), weight_name="gating_einsum")
    nn.share_scope(self, gating)
    gate = gating("...F,NHF->...NH", x)
    activations = nn.gelu(gate[..., 0, :]) * gate[..., 1, :]
    linear = Einsum(shape=(self.hidden_dim, self.features), weight_name="linear")
    nn.share_scope(self, linear)
    return linear("...H,HF->...F", activations)


class Attention(nn.Module):
  num_heads: int
  num_kv_heads: int
  features: int
  head_dim: int

  def setup(self):
    self.q_einsum = Einsum(shape=(self.num_heads, self.features, self.head_dim))
    self.kv_einsum = Einsum(shape=(2, self.num_kv_heads, self.features, self.head_dim))
    self.attn_vec_einsum = Einsum(shape=(self.num_heads, self.head_dim, self.features))

  def __call__(self, x):
    q = self.q_einsum("BTD,NDH->BTNH", x)
    k, v = self.kv_einsum("BSD,CKDH->CBSKH", x)
    logits = jnp.einsum("BTNH,BSNH->BTNS", q * self.head_dim**-0.5, k)
    t = x.shape[1]
    logits = jnp.where(jnp.tril(jnp.ones((t, t), bool))[None, :, None, :], logits, -1e9)
    encoded = jnp.einsum("BTNS,BSNH->BTNH", jax.nn.softmax(logits, axis=-1), v)
    return self.attn_vec_einsum("BTNH,NHD->BTD", encoded)


class Block(nn.Module):
  num_heads: int = 2
  features: int = 16
  head_dim: int = 8
  hidden_dim: int = 24

  @nn.compact
  def __call__(self, x):
    x = x + Attention(self.num_heads, self.num_heads, self.features, self.head_dim, name="attn")(
        RMSNorm(name="pre_attention_norm")(x))
    return x + FeedForward(self.features, self.hidden_dim, name="mlp")(RMSNorm(name="pre_ffw_norm")(x))


class Transformer(nn.Module):
  """Token ids (B, T) -> logits (B, T, vocab); the embedding table is tied to the output (gemma's `decode`).

  As in gemma, `__call__` is wrapped in `nn.jit`, whose trace cache jlora must not be fooled by.
  """

  vocab: int = 32
  features: int = 16
  num_layers: int = 2

  @functools.partial(nn.jit, static_argnames=("self",))
  @nn.compact
  def __call__(self, tokens):
    table = self.param("input_embedding", nn.initializers.normal(), (self.vocab, self.features))
    x = table[tokens] * jnp.sqrt(self.features)
    for i in range(self.num_layers):
      x = Block(features=self.features, name=f"layer_{i}")(x)
    return RMSNorm(name="final_norm")(x) @ table.T
