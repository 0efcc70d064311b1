"""NNX layer classes jlora does not ship: described with `jlora.register_layer` (one table with linen's), MaxText's
NNX `DenseGeneral` (a faithful copy, `tests/maxtext_nnx.py`), the probe of what a described layer computes, and
what `jlora.nnx` says about a class it does not know."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jlora
from jlora import nnx as lnnx
from tests.maxtext_nnx import DenseGeneral

pytestmark = pytest.mark.usefixtures("restore_layer_registry")


def _close(a, b, rtol=1e-5):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=rtol * float(jnp.max(jnp.abs(b))))


class Decoder(nnx.Module):
  """A MaxText-shaped block: multi-axis attention projections, an MLP, and the `logits_dense` head."""

  def __init__(self, rngs: nnx.Rngs):
    self.query = DenseGeneral(8, (2, 4), rngs=rngs)
    self.out = DenseGeneral((2, 4), 8, axis=(-2, -1), use_bias=True, rngs=rngs)
    self.mlp = nnx.Linear(8, 8, rngs=rngs)
    self.logits_dense = DenseGeneral(8, 32, rngs=rngs)

  def __call__(self, x):
    h = x + self.out(jnp.tanh(self.query(x)))
    return self.logits_dense(h + self.mlp(h)).astype(jnp.float32)


@pytest.mark.parametrize("jit", [False, True])
def test_maxtext_nnx_dense_general_ships_registered_factored_equals_merged(jit):
  model, x = Decoder(nnx.Rngs(0)), jax.random.normal(jax.random.key(1), (2, 5, 8))
  at_init = lnnx.init(jax.random.key(1), model, jlora.LoraConfig(r=2, target_modules="all-linear"), x)
  np.testing.assert_array_equal(at_init(x), model(x))  # B = 0: the model's own output
  config = jlora.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False)
  lora = lnnx.init(jax.random.key(1), model, config, x)
  params = lnnx.to_params(lora)
  assert params["query"]["lora_a"].shape == (8, 2) and params["query"]["lora_b"].shape == (2, 2, 4)
  assert params["out"]["lora_a"].shape == (2, 4, 2) and "lora_a" in params["mlp"]
  assert "lora_a" not in params["logits_dense"]  # the head, by what the model returns (and by name)
  y = (nnx.jit(lambda m, x: m(x)) if jit else (lambda m, x: m(x)))(lora, x)
  assert float(jnp.max(jnp.abs(y - model(x)))) > 1e-3
  merged = lnnx.merge(lora)
  assert type(merged.query) is DenseGeneral
  _close(y, merged(x))
  # The same tree through the linen twin's math: jlora.merge of to_params gives the same kernels.
  _close(jlora.merge(params, config)["out"]["kernel"], lnnx.to_params(merged)["out"]["kernel"])


class MyNnxDense(nnx.Module):
  """A user's NNX layer: weight `w (d_in, d_out)`, input `x` passed second."""

  def __init__(self, d_in, d_out, rngs: nnx.Rngs, transposed: bool = False):
    shape = (d_out, d_in) if transposed else (d_in, d_out)
    self.w = nnx.Param(jax.random.normal(rngs.params(), shape) / np.sqrt(d_in))
    self.transposed = transposed

  def __call__(self, scale, x):
    return scale * (x @ (self.w[...].T if self.transposed else self.w[...]))


class Net(nnx.Module):
  def __init__(self, rngs: nnx.Rngs, transposed: bool = False):
    self.inner = MyNnxDense(6, 6, rngs, transposed)
    self.head = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(jax.nn.gelu(self.inner(1.0, x)))


def test_registered_nnx_class_is_adapted_factored_and_listed():
  jlora.register_layer(MyNnxDense, jlora.Layer(weight="w", input="x"))
  assert (MyNnxDense, "__call__") in jlora.registered_layers()
  model, x = Net(nnx.Rngs(0)), jax.random.normal(jax.random.key(2), (3, 6))
  config = jlora.LoraConfig(r=2, target_modules=["inner"], init_lora_weights=False)
  lora = lnnx.init(jax.random.key(1), model, config, x)
  assert type(lora.inner).__name__ == "LoraMyNnxDense" and lora.inner.lora_a.shape == (6, 2)
  y = lora(x)
  assert float(jnp.max(jnp.abs(y - model(x)))) > 1e-3
  _close(y, lnnx.merge(lora)(x))


def test_a_misdescribed_nnx_layer_is_refused_by_the_probe():
  jlora.register_layer(MyNnxDense, jlora.Layer(weight="w", input="x"))  # but the weight is stored (out, in)
  model, x = Net(nnx.Rngs(0), transposed=True), jax.random.normal(jax.random.key(2), (3, 6))
  with pytest.raises(ValueError, match=r"(?s)MyNnxDense at 'inner'.*does not compute x·W.*equation='\.\.\.i,oi->"):
    lnnx.init(jax.random.key(1), model, jlora.LoraConfig(r=2, target_modules=["inner"]), x)
  jlora.register_layer(MyNnxDense, jlora.Layer(weight="w", input="x", equation="...i,oi->...o"))
  lora = lnnx.init(jax.random.key(1), model, jlora.LoraConfig(r=2, target_modules=["inner"],
                                                              init_lora_weights=False), x)
  _close(lora(x), lnnx.merge(lora)(x))


def test_unregistered_nnx_class_is_reported_under_all_linear_and_refused_when_named():
  model, x = Net(nnx.Rngs(0)), jnp.ones((3, 6))
  with pytest.warns(UserWarning, match=r"(?s)inner/w \(6, 6\): MyNnxDense is not a layer class jlora knows.*"
                                       r"jlora\.register_layer\(MyNnxDense, jlora\.Layer\(weight='w'"):
    with pytest.raises(ValueError, match="matched no module"):  # the only other layer is the head
      lnnx.init(jax.random.key(1), model, jlora.LoraConfig(r=2, target_modules="all-linear"), x)
  with pytest.raises(ValueError, match=r"(?s)names 1 module.*inner/w.*register_layer\(MyNnxDense"):
    lnnx.init(jax.random.key(1), model, jlora.LoraConfig(r=2, target_modules=["inner", "head"]), x)
