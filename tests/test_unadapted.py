"""What "all-linear" cannot adapt is reported, never skipped in silence; refusals name the path that works."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jlora


def _attention_tree():
  """A generic tree shaped like MaxText's (or penzai's) decoder: 3-D attention weights, 2-D MLP, a `logits_dense`."""
  ks = iter(jax.random.split(jax.random.key(0), 8))
  w = lambda *shape: jax.random.normal(next(ks), shape) / np.sqrt(shape[0])  # noqa: E731
  return {"layer_0": {"attn": {"query": {"kernel": w(8, 2, 4)}, "out": {"kernel": w(2, 4, 8)}},
                      "mlp": {"wi": {"kernel": w(8, 16)}, "wo": {"kernel": w(16, 8)}}},
          "norm": {"scale": jnp.ones((8,))}, "logits_dense": {"kernel": w(8, 32)}}


def _forward(p, x):
  layer = p["layer_0"]
  q = jnp.einsum("td,dhk->thk", x, layer["attn"]["query"]["kernel"])
  h = x + jnp.einsum("thk,hkd->td", jnp.tanh(q), layer["attn"]["out"]["kernel"])
  h = h + jax.nn.gelu(h @ layer["mlp"]["wi"]["kernel"]) @ layer["mlp"]["wo"]["kernel"]
  return (h * p["norm"]["scale"]) @ p["logits_dense"]["kernel"]


def test_generic_all_linear_warns_about_3d_weights_and_the_head_is_left_alone():
  tree, config = _attention_tree(), jlora.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False)
  with pytest.warns(UserWarning, match=r"(?s)leaves 2 matmul-like.*attn/query/kernel \(8, 2, 4\).*layout=.*"
                                       r"attn/out/kernel \(2, 4, 8\)") as record:
    params = jlora.init_tree(jax.random.key(1), tree, config)
  assert "logits_dense" not in str(record[0].message)  # the head is not "skipped", it is the head
  layer = params["layer_0"]
  assert "lora_a" in layer["mlp"]["wi"] and "lora_a" not in layer["attn"]["query"]
  assert "lora_a" not in params["logits_dense"]  # a head by name
  left = jlora.summary(params, config).not_adapted
  assert dict(left) == {"layer_0/attn/query/kernel": (8, 2, 4), "layer_0/attn/out/kernel": (2, 4, 8),
                        "logits_dense/kernel": (8, 32)}


def test_generic_with_layouts_adapts_every_projection_and_merge_is_exact():
  tree = _attention_tree()
  config = jlora.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False)
  layout = {"attn/query": ((0,), (1, 2)), "attn/out": ((0, 1), (2,))}
  params = jlora.init_tree(jax.random.key(1), tree, config, layout=layout)
  assert params["layer_0"]["attn"]["query"]["lora_b"].shape == (2, 2, 4)
  assert params["layer_0"]["attn"]["out"]["lora_a"].shape == (2, 4, 2)
  x = jax.random.normal(jax.random.key(2), (3, 8))
  y = jlora.apply_merged(_forward, params, config, x)
  base = _forward(tree, x)
  assert float(jnp.max(jnp.abs(y - base))) > 1e-3
  # The merged query kernel is W0 + s·A·B in the declared layout.
  q = params["layer_0"]["attn"]["query"]
  want = q["kernel"] + config.scale_for("layer_0/attn/query") * jnp.einsum("dr,rhk->dhk", q["lora_a"], q["lora_b"])
  got = jlora.merge(params, config)["layer_0"]["attn"]["query"]["kernel"]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_generic_naming_a_3d_weight_without_layout_is_refused_with_the_layout_to_give():
  with pytest.raises(ValueError, match=r"(?s)attn/query/kernel \(8, 2, 4\).*layout=\{'layer_0/attn/query/kernel'"):
    jlora.init_tree(jax.random.key(1), _attention_tree(), jlora.LoraConfig(r=2, target_modules=["query", "wi"]))


class NnxMlp(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.up, self.down = nnx.Linear(6, 8, rngs=rngs), nnx.Linear(8, 6, rngs=rngs)

  def __call__(self, x):
    return self.down(jax.nn.relu(self.up(x)))


class Bridged(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(6, name="head")(nnx.bridge.to_linen(NnxMlp, name="mlp")(x))


@pytest.mark.parametrize("targets", [["up"], "all-linear"])
def test_an_nnx_model_inside_to_linen_is_pointed_to_jlora_nnx(targets):
  model, x = Bridged(), jnp.ones((2, 6))
  params = model.init(jax.random.key(0), x)["params"]
  with pytest.raises(ValueError, match=r"(?s)mlp/up/kernel \(6, 8\).*nnx\.bridge\.ToLinen at 'mlp'.*jlora\.nnx\.init"):
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", UserWarning)  # all-linear: the same list, warned before the refusal
      jlora.init(jax.random.key(1), model, params, jlora.LoraConfig(r=2, target_modules=targets), x)


def test_registered_layers_is_public_and_lists_linen_and_nnx_entries():
  table = jlora.registered_layers()
  assert table[(nn.Dense, "__call__")] == jlora.Layer()
  names = {k if isinstance(k, str) else f"{k.__module__}.{k.__qualname__}" for k, _ in table}
  assert {"flax.nnx.nn.linear.Linear", "maxtext.layers.linears.DenseGeneral", "gemma.gm.nn._layers.Einsum"} <= names
  table.clear()  # a copy
  assert jlora.registered_layers()
