"""Small linen models covering every layer kind jlora adapts, for the tests."""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class MLP(nn.Module):
  features: tuple[int, ...] = (32, 32, 8)
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i, f in enumerate(self.features[:-1]):
      x = nn.gelu(nn.Dense(f, dtype=self.dtype, param_dtype=self.dtype, name=f"fc_{i}")(x))
    return nn.Dense(self.features[-1], dtype=self.dtype, param_dtype=self.dtype, name="head")(x)


class Attention(nn.Module):
  """Self-attention with DenseGeneral heads, as in flax's MultiHeadDotProductAttention."""

  heads: int = 2
  head_dim: int = 8

  @nn.compact
  def __call__(self, x):
    proj = lambda name: nn.DenseGeneral((self.heads, self.head_dim), name=name)  # noqa: E731
    q, k, v = proj("query")(x), proj("key")(x), proj("value")(x)
    w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / self.head_dim**0.5, axis=-1)
    o = jnp.einsum("bhqk,bkhd->bqhd", w, v)
    return nn.DenseGeneral(x.shape[-1], axis=(-2, -1), name="out")(o)


class EinsumNet(nn.Module):
  """Gemma-style einsums: a fused qkv kernel with interleaved axes, and a per-head (batch-axis) kernel."""

  @nn.compact
  def __call__(self, x):
    qkv = nn.Einsum((3, 2, 4, 16), "btd,snhd->sbtnh", use_bias=False, name="qkv")(x)  # d in, s,n,h out
    h = qkv.sum(0)
    h = nn.Einsum((2, 4, 5), "btnh,nhf->btnf", name="per_head")(h)  # n shared, h in, f out
    return nn.Einsum((2, 5, 16), "btnf,nfd->btd", name="out")(h)


class ConvNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3), strides=2, padding="SAME", name="conv1")(x))
    x = nn.Conv(6, (3, 3), padding="VALID", kernel_dilation=2, name="conv2")(x)
    return nn.Dense(3, name="head")(x.mean((1, 2)))


class EmbedLM(nn.Module):
  """Embedding + tied output head (`attend`)."""

  @nn.compact
  def __call__(self, ids):
    emb = nn.Embed(40, 16, name="embed")
    h = nn.tanh(nn.Dense(16, name="mix")(emb(ids)))
    return emb.attend(h)


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    h = nn.LayerNorm(name="ln")(x)
    h = Attention(name="attn")(h)
    x = x + h
    h = nn.Dense(32, name="up")(nn.LayerNorm(name="ln2")(x))
    return x + nn.Dense(x.shape[-1], name="down")(nn.gelu(h)), None


class ScanStack(nn.Module):
  """Transformer-ish stack: nn.scan over remat'd blocks (params stacked on axis 0)."""

  layers: int = 3

  @nn.compact
  def __call__(self, ids):
    x = nn.Embed(30, 16, name="embed")(ids)
    stack = nn.scan(nn.remat(Block), variable_axes={"params": 0}, split_rngs={"params": True, "lora_dropout": True},
                    length=self.layers)
    x, _ = stack(name="layers")(x, None)
    return nn.Dense(30, name="lm_head")(x)


class LoopStack(nn.Module):
  """The same stack as a Python list of layers (layers_0, layers_1, ...)."""

  layers: int = 3

  @nn.compact
  def __call__(self, ids):
    x = nn.Embed(30, 16, name="embed")(ids)
    for i in range(self.layers):
      x, _ = Block(name=f"layers_{i}")(x, None)
    return nn.Dense(30, name="lm_head")(x)


class Case(NamedTuple):
  name: str
  model: nn.Module
  inputs: jax.Array
  targets: tuple[str, ...] | str


def _floats(*shape):
  return jax.random.normal(jax.random.key(42), shape)


def cases() -> list[Case]:
  ids = jax.random.randint(jax.random.key(7), (2, 6), 0, 30)
  return [
      Case("mlp", MLP(), _floats(4, 16), ("fc_0", "fc_1", "head")),
      Case("attention", Attention(), _floats(2, 5, 16), ("query", "value", "out")),
      Case("einsum", EinsumNet(), _floats(2, 5, 16), ("qkv", "per_head", "out")),
      Case("conv", ConvNet(), _floats(2, 12, 12, 3), ("conv1", "conv2")),
      Case("embed", EmbedLM(), ids, ("embed", "mix")),
      Case("scan", ScanStack(), ids, "all-linear"),
      Case("loop", LoopStack(), ids, ("query", "value", "up", "down")),
  ]


def build(case: Case, key=0):
  return case.model.init(jax.random.key(key), case.inputs)["params"]


def torch_mlp(base):
  """`MLP` in PyTorch with the weights of `base` (its params): `fc_0`, `fc_1`, `head` Linear layers (PEFT's module
  names are the Flax paths, `name_map="flax"`) with tanh-GELU between. Needs torch."""
  import torch

  net = torch.nn.Module()
  for m in ("fc_0", "fc_1", "head"):
    kernel, bias = np.asarray(base[m]["kernel"]), np.asarray(base[m]["bias"])
    layer = torch.nn.Linear(*kernel.shape)
    with torch.no_grad():
      layer.weight.copy_(torch.tensor(kernel.T))
      layer.bias.copy_(torch.tensor(bias))
    setattr(net, m, layer)
  gelu = lambda x: torch.nn.functional.gelu(x, approximate="tanh")  # noqa: E731
  net.forward = lambda x: net.head(gelu(net.fc_1(gelu(net.fc_0(x)))))
  return net
