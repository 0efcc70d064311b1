"""`jlora.init` checks what a registered layer really computes (`jlora.frontends.layer_check`) before adapting it."""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.frontends import layer_check
from tests import gemma_layout
from tests.test_layers import MaxTextDenseGeneral

pytestmark = pytest.mark.usefixtures("restore_layer_registry")


@pytest.fixture
def probes(monkeypatch):
  """The sites actually probed, in order."""
  seen = []
  real = layer_check.probe

  def counting(p, *args, **kwargs):
    seen.append(p.site.path)
    return real(p, *args, **kwargs)

  monkeypatch.setattr(layer_check, "probe", counting)
  return seen


class Linear(nn.Module):
  """A user layer `x·W (+ b)`, `W (d_in, d_out)`; `variant` makes it compute something else."""

  features: int
  variant: str = "exact"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    w = self.param("w", nn.initializers.lecun_normal(), (x.shape[-1], self.features), self.dtype)
    b = self.param("b", nn.initializers.normal(1.0), (self.features,), self.dtype)
    x = x.astype(self.dtype)
    if self.variant == "scaled":
      return 2 * (x @ w) + b
    if self.variant == "normalised":  # an RMS norm of the input, inside the layer
      return (x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + 1e-6)) @ w + b
    if self.variant == "twice":  # the weight read twice (a square weight)
      return x @ w @ w + b
    if self.variant == "out_in":  # a square weight stored (out, in), as PyTorch does
      return x @ w.T + b
    return x @ w + b


class Net(nn.Module):
  variant: str = "exact"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = jax.nn.gelu(Linear(8, self.variant, self.dtype, name="proj")(x))
    return nn.Dense(3, name="head")(h)


def _setup(variant, dtype=jnp.float32, target=("proj", "head")):
  jlora.register_layer(Linear, jlora.Layer(weight="w", input="x"))
  model, x = Net(variant, dtype), jax.random.normal(jax.random.key(2), (4, 5, 8))
  base = model.init(jax.random.key(0), x)["params"]
  return model, x, base, jlora.LoraConfig(r=2, target_modules=list(target), init_lora_weights=False)


def _rel(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.mark.parametrize(("variant", "says"), [
    ("scaled", r"the layer scales its output by 2\b"),
    ("normalised", r"rescales each input row by its own factor \(it normalises its input\?\)"),
    ("twice", r"not a multiple of x·ΔW .*reads it twice"),
    ("out_in", r"not a multiple of x·ΔW .*stored \(out, in\)"),
])
def test_a_layer_that_is_not_x_w_in_its_declared_layout_is_refused(variant, says, probes):
  model, x, base, config = _setup(variant)
  with pytest.raises(ValueError, match=says) as e:
    jlora.init(jax.random.key(1), model, base, config, x)
  msg = str(e.value)
  assert "Linear at 'proj' does not compute x·W in the layout its jlora.Layer declares (dense: input axes (-1,)" in msg
  assert "the output changes by" in msg and "where x·ΔW predicts" in msg and "weight 'w' (8, 8)" in msg
  assert "equation='...i,oi->...o'" in msg and "unsupported=" in msg and "exclude_modules" in msg
  assert probes == [("proj",)]
  # Left out of the adapted modules, the layer is not probed and init goes through.
  probes.clear()
  params = jlora.init(jax.random.key(1), model, base, dataclasses.replace(config, target_modules=["head"]), x)
  assert "lora_a" in params["head"] and "lora_a" not in params["proj"] and probes == []


def test_an_out_in_weight_declared_with_its_equation_passes_and_merges_exactly():
  model, x, base, config = _setup("out_in")
  jlora.register_layer(Linear, jlora.Layer(weight="w", input="x", equation="...i,oi->...o"))
  params = jlora.init(jax.random.key(1), model, base, config, x)
  y = jax.jit(lambda p: jlora.apply(model, p, config, x))(params)
  y_merged = model.apply({"params": jlora.merge(params, config)}, x)
  assert _rel(y, model.apply({"params": base}, x)) > 1e-3
  np.testing.assert_allclose(y, y_merged, rtol=1e-5, atol=1e-5 * max(1.0, float(jnp.abs(y_merged).max())))


@pytest.mark.parametrize("jit", [False, True])
def test_a_correct_registered_layer_passes_and_init_is_unchanged(jit, probes, monkeypatch):
  model, x, base, config = _setup("exact")
  params = jlora.init(jax.random.key(1), model, base, config, x)
  assert probes == [("proj",)]
  with monkeypatch.context() as m:  # the same init without the check: bit-identical leaves, the same base arrays
    m.setattr(layer_check, "check", lambda *a, **k: None)
    unchecked = jlora.init(jax.random.key(1), model, base, config, x)
  assert jax.tree.structure(params) == jax.tree.structure(unchecked)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(unchecked)):
    np.testing.assert_array_equal(a, b)
  assert params["proj"]["w"] is base["proj"]["w"] and params["head"]["kernel"] is base["head"]["kernel"]
  # One training step on the adapters, then the factored forward still equals the merged model.
  trainable, frozen = jlora.split(params, config)
  grads = jax.grad(lambda t: jnp.sum(jlora.apply(model, jlora.combine(t, frozen), config, x) ** 2))(trainable)
  params = jlora.combine(jax.tree.map(lambda t, g: t - 0.1 * g, trainable, grads), frozen)
  fwd = jax.jit(lambda p: jlora.apply(model, p, config, x)) if jit else (lambda p: jlora.apply(model, p, config, x))
  y, y_merged = fwd(params), model.apply({"params": jlora.merge(params, config)}, x)
  assert _rel(y, model.apply({"params": base}, x)) > 1e-3
  np.testing.assert_allclose(y, y_merged, rtol=1e-5, atol=1e-5 * max(1.0, float(jnp.abs(y_merged).max())))


def test_bfloat16_layers_get_bfloat16_tolerance(probes):
  model, x, base, config = _setup("exact", jnp.bfloat16)
  jlora.init(jax.random.key(1), model, base, config, x)  # bf16 rounding is not mistaken for another layout
  model, x, base, config = _setup("scaled", jnp.bfloat16)
  with pytest.raises(ValueError, match=r"scales its output by ([\d.]+)") as e:
    jlora.init(jax.random.key(1), model, base, config, x)
  assert abs(float(re.search(r"scales its output by ([\d.]+)", str(e.value)).group(1)) - 2) < 0.05
  assert probes == [("proj",), ("proj",)]


def test_stock_classes_are_not_probed(probes):
  class Stock(nn.Module):
    @nn.compact
    def __call__(self, ids):
      h = nn.Embed(16, 8, name="embed")(ids)
      h = nn.Conv(8, (3,), name="conv")(h)
      h = nn.DenseGeneral((2, 4), name="dg")(h)
      h = nn.Einsum((2, 4, 8), "btnh,nhd->btd", name="ein")(h)
      return nn.Dense(5, name="dense")(h)

  model, ids = Stock(), jnp.arange(10).reshape(2, 5) % 16
  base = model.init(jax.random.key(0), ids)["params"]
  params = jlora.init(jax.random.key(1), model, base, jlora.LoraConfig(r=2, target_modules=".*"), ids)
  assert {k for k in params if "lora_a" in params[k]} == {"embed", "conv", "dg", "ein", "dense"}
  assert probes == []


def test_a_subclass_of_a_stock_class_is_probed(probes):
  class Loud(nn.Dense):
    def __call__(self, x):
      return 3 * super().__call__(x)

  model, x = Loud(4), jnp.ones((2, 6))
  base = model.init(jax.random.key(0), x)["params"]
  with pytest.raises(ValueError, match=r"Loud \(the model itself\) does not compute x·W.* scales its output by 3\b"):
    jlora.init(jax.random.key(1), model, base, jlora.LoraConfig(r=2, target_modules=".*"), x)
  assert probes == [()]


@pytest.mark.parametrize("jit", [False, True])
def test_gemma_layout_each_distinct_einsum_probed_once(jit, probes):
  model, x = gemma_layout.Transformer(), jnp.arange(12).reshape(2, 6) % 32
  base = model.init(jax.random.key(0), x)["params"]
  config = jlora.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", init_lora_weights=False)
  params = jlora.init(jax.random.key(1), model, base, config, x)
  # 10 adapted einsums in 2 layers; layer_1's are the same calls of the same classes as layer_0's.
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  assert sum(str(path[-1].key).endswith("lora_a") for path, _ in leaves) == 10
  assert probes == [("layer_0", "attn", "q_einsum"), ("layer_0", "attn", "kv_einsum"),
                    ("layer_0", "attn", "attn_vec_einsum"), ("layer_0", "mlp", "gating_einsum"),
                    ("layer_0", "mlp", "linear")]
  fwd = jax.jit(lambda p: jlora.apply(model, p, config, x)) if jit else (lambda p: jlora.apply(model, p, config, x))
  y, y_merged = fwd(params), model.apply({"params": jlora.merge(params, config)}, x)
  np.testing.assert_allclose(y, y_merged, rtol=1e-5, atol=1e-5 * max(1.0, float(jnp.abs(y_merged).max())))


def test_gemma_einsum_declared_with_the_wrong_equation_is_refused():
  class WrongEq(nn.Module):
    @nn.compact
    def __call__(self, x):  # the layer uses its kernel (F, D) transposed to what the call's equation says
      return gemma_layout.Einsum(shape=(8, 8), name="proj")("...F,DF->...D", x)

  jlora.register_layer("gemma.gm.nn._layers.Einsum", jlora.Layer(weight=lambda m: m.weight_name, input="x",
                                                                   equation="...D,DF->...F"))
  model, x = WrongEq(), jnp.ones((2, 8))
  base = model.init(jax.random.key(0), x)["params"]
  with pytest.raises(ValueError, match=r"Einsum at 'proj' .*\(einsum '\.\.\.D,DF->\.\.\.F'\).* not a multiple"):
    jlora.init(jax.random.key(1), model, base, jlora.LoraConfig(r=2, target_modules=".*"), x)


def test_a_declared_equation_that_does_not_fit_the_shapes_is_refused():
  model, x, base, config = _setup("exact")
  jlora.register_layer(Linear, jlora.Layer(weight="w", input="x", equation="...i,ijk->...k"))
  with pytest.raises(ValueError, match=r"Linear at 'proj': the einsum '\.\.\.i,ijk->\.\.\.k' of its jlora.Layer "
                                       r"names 3 weight axes \('ijk'\), but its weight 'w' has shape \(8, 8\)"):
    jlora.init(jax.random.key(1), model, base, config, x)
  jlora.register_layer(Linear, jlora.Layer(weight="w", input="x", equation="...i,oi->...o"))
  x = jnp.ones((4, 5, 6))  # w (6, 8): an (in, out) weight declared (out, in)
  base = model.init(jax.random.key(0), x)["params"]
  with pytest.raises(ValueError, match=r"Linear at 'proj': its declared layout \(einsum '\.\.\.i,oi->\.\.\.o'\) "
                                       r"does not fit its input \(2, 2, 6\) and weight 'w' \(6, 8\)"):
    jlora.init(jax.random.key(1), model, base, config, x)


def test_scanned_registered_layers_are_probed_once_on_the_first_layer(probes):
  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      return MaxTextDenseGeneral(6, name="q")(x), None

  class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
      scan = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
      return scan(name="layers")(x, None)[0]

  model, x = Stack(), jax.random.normal(jax.random.key(3), (2, 5, 6))
  base = model.init(jax.random.key(0), x)["params"]
  config = jlora.LoraConfig(r=2, target_modules=["q"], init_lora_weights=False)
  params = jlora.init(jax.random.key(1), model, base, config, x)
  assert params["layers"]["q"]["lora_a"].shape == (3, 6, 2) and probes == [("layers", "q")]
  y, y_merged = jlora.apply(model, params, config, x), model.apply({"params": jlora.merge(params, config)}, x)
  np.testing.assert_allclose(y, y_merged, rtol=1e-5, atol=1e-5 * max(1.0, float(jnp.abs(y_merged).max())))


def test_init_on_traced_params_skips_the_check(probes):
  """Under `jit` / `eval_shape` there is nothing concrete to run: the check is skipped at no cost (documented)."""
  model, x, base, config = _setup("scaled")
  shapes = jax.eval_shape(lambda p: jlora.init(jax.random.key(1), model, p, config, x), base)
  assert shapes["proj"]["lora_a"].shape == (8, 2)
  jax.jit(lambda p: jlora.init(jax.random.key(1), model, p, config, x))(base)
  assert probes == [("proj",), ("proj",)]  # called, and returned without running the layer
  with pytest.raises(ValueError, match="scales its output by 2"):
    jlora.init(jax.random.key(1), model, base, config, x)


def test_a_layer_that_cannot_run_alone_warns_that_it_is_unchecked():
  class Noisy(nn.Module):
    @nn.compact
    def __call__(self, x):
      w = self.param("w", nn.initializers.lecun_normal(), (x.shape[-1], 4))
      return x @ w + 0 * jax.random.normal(self.make_rng("noise"), (4,))

  jlora.register_layer(Noisy, jlora.Layer(weight="w", input="x"))
  model, x = Noisy(), jnp.ones((2, 6))
  base = model.init({"params": jax.random.key(0), "noise": jax.random.key(1)}, x)["params"]
  with pytest.warns(UserWarning, match=r"could not run Noisy \(the model itself\) alone to check.*adapted unchecked"):
    params = jlora.init(jax.random.key(1), model, base, jlora.LoraConfig(r=2, target_modules=".*"), x,
                        rngs={"noise": jax.random.key(2)})
  assert params["lora_a"].shape == (6, 2)
