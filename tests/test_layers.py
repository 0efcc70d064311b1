"""Described layer classes (`jlora.register_layer`, gemma / MaxText entries) and the never-silently-wrong check."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from tests import gemma_layout

pytestmark = pytest.mark.usefixtures("restore_layer_registry")


def _rel_err(a, b):
  return float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-12))


class MyDense(nn.Module):
  """A layer class of a user's own codebase: weight `w (d_in, d_out)`, input named `x`."""

  features: int

  @nn.compact
  def __call__(self, scale, x):
    w = self.param("w", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
    return scale * 0 + x @ w + self.param("b", nn.initializers.normal(), (self.features,))


class TwoLayer(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(8, name="out")(jax.nn.gelu(MyDense(16, name="inner")(1.0, x)))


def _check_factored_equals_merged(model, base, config, x, jit):
  params = jlora.init(jax.random.key(1), model, base, config, x)
  fwd = (jax.jit if jit else (lambda f: f))(lambda p, x: jlora.apply(model, p, config, x))
  y = fwd(params, x)
  y_merged = model.apply({"params": jlora.merge(params, config)}, x)
  y_base = model.apply({"params": base}, x)
  assert _rel_err(y, y_base) > 1e-3, "a non-zero adapter must change the output"
  assert _rel_err(y, y_merged) <= 1e-5
  return params


@pytest.mark.parametrize("targets", [["inner"], ["inner", "out"]])
def test_unknown_class_named_in_targets_is_refused_and_the_error_says_how_to_register(targets):
  model, x = TwoLayer(), jnp.ones((2, 12))
  base = model.init(jax.random.key(0), x)["params"]
  with pytest.raises(ValueError, match=r"inner/w \(12, 16\): MyDense is not a layer class jlora knows") as e:
    jlora.init(jax.random.key(1), model, base, jlora.LoraConfig(r=2, target_modules=targets), x)
  assert "jlora.register_layer(MyDense, jlora.Layer(weight='w', input=...))" in str(e.value)


def test_all_linear_reports_the_unknown_class_it_skips_and_summary_lists_it():
  class ThreeLayer(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(8, name="out")(nn.Dense(16, name="mid")(MyDense(16, name="inner")(1.0, x)))

  model, x = ThreeLayer(), jnp.ones((2, 12))
  base = model.init(jax.random.key(0), x)["params"]
  config = jlora.LoraConfig(r=2, target_modules="all-linear")
  with pytest.warns(UserWarning, match=r"(?s)leaves 1 matmul-like weight.*inner/w \(12, 16\): MyDense.*register_layer"):
    params = jlora.init(jax.random.key(1), model, base, config, x)
  assert "lora_a" in params["mid"] and "lora_a" not in params["inner"] and "lora_a" not in params["out"]  # out: head
  left = str(jlora.summary(params, config)).split("without an adapter")[-1]
  assert "inner/w (12, 16)" in left and "out/kernel (16, 8)" in left and "mid/kernel" not in left


@pytest.mark.parametrize("jit", [False, True])
def test_registered_class_is_adapted_factored(jit):
  jlora.register_layer(MyDense, jlora.Layer(weight="w", input="x"))
  model, x = TwoLayer(), jax.random.normal(jax.random.key(2), (3, 12))
  base = model.init(jax.random.key(0), x)["params"]
  config = jlora.LoraConfig(r=2, target_modules=["inner", "out"], init_lora_weights=False)
  params = _check_factored_equals_merged(model, base, config, x, jit)
  assert params["inner"]["lora_a"].shape == (12, 2) and params["inner"]["lora_b"].shape == (2, 16)
  # Gradients equal those of the materialized W0 + s·A·B.
  trainable, frozen = jlora.split(params, config)
  g1 = jax.grad(lambda t: jnp.sum(jlora.apply(model, jlora.combine(t, frozen), config, x) ** 2))(trainable)
  g2 = jax.grad(lambda t: jnp.sum(jlora.apply_merged(lambda p, x: model.apply({"params": p}, x),
                                                     jlora.combine(t, frozen), config, x) ** 2))(trainable)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_registration_by_qualified_name_and_by_base_class():
  class Sub(MyDense):
    pass

  class M(nn.Module):
    @nn.compact
    def __call__(self, x):
      return Sub(4, name="sub")(1.0, x)

  jlora.register_layer(f"{MyDense.__module__}.{MyDense.__qualname__}", jlora.Layer(weight="w", input=1))
  model, x = M(), jnp.ones((2, 6))
  params = jlora.init(jax.random.key(1), model, model.init(jax.random.key(0), x)["params"],
                      jlora.LoraConfig(r=2, target_modules=".*"), x)
  assert params["sub"]["lora_a"].shape == (6, 2)


@pytest.mark.parametrize("jit", [False, True])
def test_gemma_layout_every_einsum_is_adapted(jit):
  model, x = gemma_layout.Transformer(), jnp.arange(12).reshape(2, 6) % 32
  base = model.init(jax.random.key(0), x)["params"]
  config = jlora.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", init_lora_weights=False)
  params = _check_factored_equals_merged(model, base, config, x, jit)
  mlp, attn = params["layer_0"]["mlp"], params["layer_0"]["attn"]
  # Two weights in one dict, one adapter each; einsum kernels take the broadcast layout.
  assert set(mlp) == {"gating_einsum", "gating_einsum_lora_a", "gating_einsum_lora_b",
                      "linear", "linear_lora_a", "linear_lora_b"}
  assert mlp["gating_einsum_lora_a"].shape == (1, 1, 16, 2)  # (N, H, F): only the input axis F kept
  assert mlp["gating_einsum_lora_b"].shape == (2, 24, 1, 2)
  assert set(attn["q_einsum"]) == {"w", "lora_a", "lora_b"}
  assert {"kv_einsum", "attn_vec_einsum"} <= set(attn)
  # The two weights of the FFN dict are targeted by their own paths.
  only = jlora.LoraConfig(r=2, target_modules=["mlp/linear"], rank_pattern={"linear": 3})
  p = jlora.init(jax.random.key(1), model, base, only, x)
  assert set(p["layer_1"]["mlp"]) == {"gating_einsum", "linear", "linear_lora_a", "linear_lora_b"}
  assert p["layer_1"]["mlp"]["linear_lora_a"].shape[-1] == 3
  assert jlora.summary(p, only).trainable == 2 * (24 * 3 + 3 * 16)
  # Splitting and labels see the suffixed leaves as adapters.
  trainable, frozen = jlora.split(params, config)
  assert "gating_einsum_lora_a" in trainable["layer_0"]["mlp"] and "gating_einsum" in frozen["layer_0"]["mlp"]
  assert jlora.labels(params, config)["layer_0"]["mlp"]["linear_lora_b"] == "lora_b"


def test_nn_jit_trace_cache_does_not_replay_a_trace_without_lora():
  """gemma's Transformer.__call__ is nn.jit-ed: its cache must not hand back a trace made without jlora."""
  model, x = gemma_layout.Transformer(), jnp.arange(12).reshape(2, 6) % 32
  base = model.init(jax.random.key(0), x)["params"]
  model.apply({"params": base}, x)  # fills nn.jit's cache for these shapes
  config = jlora.LoraConfig(r=2, target_modules=["q_einsum", "linear"], init_lora_weights=False)
  first = jlora.init(jax.random.key(1), model, base, config, x)
  again = jlora.init(jax.random.key(1), model, base, config, x)  # a second discovery of the same shapes
  assert jax.tree.structure(first) == jax.tree.structure(again)
  y_eager = jlora.apply(model, first, config, x)
  y_jit = jax.jit(lambda p: jlora.apply(model, p, config, x))(first)
  np.testing.assert_allclose(y_eager, model.apply({"params": jlora.merge(first, config)}, x), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(y_jit, y_eager, atol=1e-5, rtol=1e-5)
  # Same shapes, another scale: not the cached trace of the first config.
  louder = jlora.LoraConfig(r=2, lora_alpha=40, target_modules=["q_einsum", "linear"])
  y_loud = jlora.apply(model, first, louder, x)
  np.testing.assert_allclose(y_loud, model.apply({"params": jlora.merge(first, louder)}, x), atol=1e-4, rtol=1e-5)
  assert _rel_err(y_loud, y_eager) > 1e-2


def test_gemma_layout_unmerge_and_checkpoint_roundtrip(tmp_path):
  model, x = gemma_layout.Transformer(), jnp.arange(12).reshape(2, 6) % 32
  base = model.init(jax.random.key(0), x)["params"]
  config = jlora.LoraConfig(r=2, target_modules=["gating_einsum", "linear", "q_einsum"], init_lora_weights=False)
  params = jlora.init(jax.random.key(1), model, base, config, x)
  trainable, frozen = jlora.split(params, config)
  back = jlora.unmerge(jlora.merge(params, config), trainable, config)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  jlora.save_adapter(tmp_path / "ad", params, config)
  loaded, cfg2 = jlora.load_adapter(tmp_path / "ad", frozen)
  np.testing.assert_allclose(jlora.apply(model, loaded, cfg2, x), jlora.apply(model, params, config, x), atol=1e-6, rtol=1e-5)


def test_gemma_scaled_weight_is_refused_not_merged_wrongly():
  class M(nn.Module):
    @nn.compact
    def __call__(self, x):
      return gemma_layout.Einsum(shape=(8, 4), w_scale=0.5, name="proj")("...D,DF->...F", x)

  model, x = M(), jnp.ones((2, 8))
  with pytest.raises(ValueError, match=r"w_scale=0\.5"):
    jlora.init(jax.random.key(1), model, model.init(jax.random.key(0), x)["params"],
               jlora.LoraConfig(r=2, target_modules=["proj"]), x)


class MaxTextDenseGeneral(nn.Module):
  """MaxText's linen `DenseGeneral` (`MaxText/layers/linears.py`): kernel `in_shape + features`, `axis` any."""

  features: int | tuple[int, ...]
  axis: int | tuple[int, ...] = -1
  use_bias: bool = False

  @nn.compact
  def __call__(self, inputs):
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    axis = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
    axis = tuple(a % inputs.ndim for a in axis)
    kernel = self.param("kernel", nn.initializers.lecun_normal(), tuple(inputs.shape[a] for a in axis) + features)
    out = jax.lax.dot_general(inputs, kernel, ((axis, tuple(range(len(axis)))), ((), ())))
    return out + self.param("bias", nn.initializers.normal(), features) if self.use_bias else out


MaxTextDenseGeneral.__module__, MaxTextDenseGeneral.__qualname__ = "MaxText.layers.linears", "DenseGeneral"


@pytest.mark.parametrize("jit", [False, True])
def test_maxtext_dense_general_multi_axis(jit):
  class Attn(nn.Module):
    @nn.compact
    def __call__(self, x):
      q = MaxTextDenseGeneral((2, 4), name="query")(x)  # (B, T, heads, head_dim)
      return MaxTextDenseGeneral(6, axis=(-2, -1), use_bias=True, name="out")(q)

  model, x = Attn(), jax.random.normal(jax.random.key(3), (2, 5, 6))
  base = model.init(jax.random.key(0), x)["params"]
  config = jlora.LoraConfig(r=2, target_modules=["query", "out"], init_lora_weights=False)
  params = _check_factored_equals_merged(model, base, config, x, jit)
  assert params["query"]["lora_b"].shape == (2, 2, 4) and params["out"]["lora_a"].shape == (2, 4, 2)


# --------------------------------------------------------- never silently wrong
def _mlp_with_custom_inner():
  model, x = TwoLayer(), jax.random.normal(jax.random.key(2), (3, 12))
  return model, x, model.init(jax.random.key(0), x)["params"]


def test_init_tree_adapters_on_a_linen_model_are_not_ignored():
  model, x, base = _mlp_with_custom_inner()
  config = jlora.LoraConfig(r=2, target_modules=["inner", "out"], init_lora_weights=False)
  params = jlora.init_tree(jax.random.key(1), base, config, kernel_names=("kernel", "w"))
  with pytest.raises(ValueError, match=r"1 adapter\(s\) .* not used by this forward: 'inner'") as e:
    jlora.apply(model, params, config, x)
  assert "register_layer" in str(e.value) and "allow_unused=True" in str(e.value)


def test_wrong_method_raises_and_allow_unused_lets_it_pass():
  class EncDec(nn.Module):
    def setup(self):
      self.enc, self.dec = nn.Dense(8), nn.Dense(4)

    def encode(self, x):
      return self.enc(x)

    def __call__(self, x):
      return self.dec(self.encode(x))

  model, x = EncDec(), jnp.ones((2, 6))
  base = model.init(jax.random.key(0), x)["params"]
  config = jlora.LoraConfig(r=2, target_modules=["enc", "dec"], init_lora_weights=False)
  params = jlora.init(jax.random.key(1), model, base, config, x)
  with pytest.raises(ValueError, match="'dec'"):
    jlora.apply(model, params, config, x, method="encode")
  y = jlora.apply(model, params, config, x, method="encode", allow_unused=True)
  np.testing.assert_allclose(y, model.apply({"params": jlora.merge(params, config)}, x, method="encode"), atol=1e-6, rtol=1e-5)
  fn = jlora.apply_fn(model, config, allow_unused=True)
  np.testing.assert_allclose(fn({"params": params}, x, method="encode"), y)
  with pytest.raises(ValueError, match="'dec'"):
    jax.jit(lambda p: jlora.apply_fn(model, config)({"params": p}, x, method="encode"))(params)


def test_module_called_under_another_name_raises():
  model, x = nn.Dense(4), jnp.ones((2, 6))
  base = model.init(jax.random.key(0), x)["params"]
  config = jlora.LoraConfig(r=2, target_modules=".*")
  adapted = jlora.init(jax.random.key(1), model, base, config, x)

  class Renamed(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(4, name="new_name")(x)

  params = {"new_name": base, "old_name": adapted}  # the adapters stayed under the module's old name
  with pytest.raises(ValueError, match="'old_name'"):
    jlora.apply(Renamed(), params, config, x)


def test_unregistered_subclass_of_nothing_with_a_kernel_raises():
  class Custom(nn.Module):  # has a `kernel` like nn.Dense, but jlora does not know the class
    @nn.compact
    def __call__(self, x):
      return x @ self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], 4))

  class M(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3, name="head_in")(Custom(name="custom")(x))

  model, x = M(), jnp.ones((2, 6))
  base = model.init(jax.random.key(0), x)["params"]
  config = jlora.LoraConfig(r=2, target_modules=["custom", "head_in"], init_lora_weights=False)
  params = jlora.init_tree(jax.random.key(1), base, config)
  with pytest.raises(ValueError, match="'custom'"):
    jlora.apply(model, params, config, x)


# ------------------------------------------------------------ bad descriptions
def test_bad_registrations_say_what_is_wrong():
  with pytest.raises(TypeError, match=r"jlora\.Layer"):
    jlora.register_layer(MyDense, {"weight": "w"})
  with pytest.raises(TypeError, match="qualified"):
    jlora.register_layer("MyDense", jlora.Layer())
  with pytest.raises(TypeError, match=r"flax\.linen or flax\.nnx Module class.*jlora\.equinox"):
    jlora.register_layer(int, jlora.Layer())
  with pytest.raises(ValueError, match="kind"):
    jlora.Layer(kind="lstm")
  with pytest.raises(ValueError, match="distinct, explicit labels"):
    jlora.Layer(equation="x,...->y")


def test_wrong_weight_name_is_a_clear_error():
  jlora.register_layer(MyDense, jlora.Layer(weight="kernel", input="x"))
  model, x, base = _mlp_with_custom_inner()
  with pytest.raises(ValueError, match=r"names the weight 'kernel'.*holds params \['b', 'w'\]"):
    jlora.init(jax.random.key(1), model, base, jlora.LoraConfig(r=2, target_modules=".*"), x)


def test_wrong_input_name_is_a_clear_error():
  jlora.register_layer(MyDense, jlora.Layer(weight="w", input="inputs"))
  model, x, base = _mlp_with_custom_inner()
  config = jlora.LoraConfig(r=2, target_modules=["inner"])
  with pytest.raises(TypeError, match="no argument 'inputs'"):  # caught while init traces the model
    jlora.init(jax.random.key(1), model, base, config, x)


# ---------------------------------------------------------------- review fixes
@pytest.mark.parametrize("axis", [(-1, -2), (-2, -1)])
def test_dense_general_axes_in_any_order_match_the_merge(axis):
  model, x = nn.DenseGeneral(4, axis=axis), jax.random.normal(jax.random.key(3), (2, 3, 5))
  base = model.init(jax.random.key(0), x)["params"]
  _check_factored_equals_merged(model, base, jlora.LoraConfig(r=2, target_modules=".*", init_lora_weights=False), x,
                                jit=False)


def test_nnx_linear_general_axes_in_reverse_order_match_the_merge():
  from flax import nnx

  from jlora import nnx as lnnx

  model = nnx.LinearGeneral(in_features=(3, 5), out_features=4, axis=(-1, -2), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(3), (2, 3, 5))  # flax sorts the axes: in_features (3, 5) are axes (-2, -1)
  lora = lnnx.init(jax.random.key(1), model, jlora.LoraConfig(r=2, target_modules=".*", init_lora_weights=False), x)
  assert _rel_err(lora(x), model(x)) > 1e-3
  np.testing.assert_allclose(lora(x), lnnx.merge(lora)(x), atol=1e-5, rtol=1e-5)


class TorchStyleDense(nn.Module):
  """A weight stored `(out, in)`, as PyTorch does."""

  features: int

  @nn.compact
  def __call__(self, x):
    return x @ self.param("weight", nn.initializers.lecun_normal(), (self.features, x.shape[-1])).T


def test_out_in_weight_with_the_dense_layout_is_refused_and_an_equation_fixes_it():
  model, x = TorchStyleDense(4), jnp.ones((2, 6))
  base = model.init(jax.random.key(0), x)["params"]
  config = jlora.LoraConfig(r=2, target_modules=".*", init_lora_weights=False)
  jlora.register_layer(TorchStyleDense, jlora.Layer(weight="weight", input="x"))
  with pytest.raises(ValueError, match=r"equation='\.\.\.i,oi->\.\.\.o'"):
    jlora.init(jax.random.key(1), model, base, config, x)
  jlora.register_layer(TorchStyleDense, jlora.Layer(weight="weight", input="x", equation="...i,oi->...o"))
  _check_factored_equals_merged(model, base, config, jax.random.normal(jax.random.key(2), (2, 6)), jit=False)


def test_positional_input_found_when_the_layer_is_called_by_keyword():
  class ByKeyword(nn.Module):
    @nn.compact
    def __call__(self, x):
      return MyDense(4, name="inner")(scale=1.0, x=x)

  jlora.register_layer(MyDense, jlora.Layer(weight="w", input=1))
  model, x = ByKeyword(), jax.random.normal(jax.random.key(2), (2, 6))
  base = model.init(jax.random.key(0), x)["params"]
  _check_factored_equals_merged(model, base, jlora.LoraConfig(r=2, target_modules=".*", init_lora_weights=False), x,
                                jit=False)


def test_einsum_called_with_another_equation_than_at_init_is_a_clear_error():
  class E(nn.Module):
    eq: str

    @nn.compact
    def __call__(self, x):
      return nn.Einsum((4, 4), self.eq, name="e")(x)

  x = jnp.ones((2, 4))
  base = E("bi,io->bo").init(jax.random.key(0), x)["params"]
  config = jlora.LoraConfig(r=2, target_modules=".*")
  params = jlora.init(jax.random.key(1), E("bi,io->bo"), base, config, x)
  with pytest.raises(ValueError, match="equation it had"):
    jlora.apply(E("bo,io->bi"), params, config, x)


def test_nested_call_of_the_same_layer_adds_the_term_once():
  class Logged(nn.Dense):
    def __call__(self, x):
      return super().__call__(x)

  class M(nn.Module):
    @nn.compact
    def __call__(self, x):
      y = Logged(8, name="logged")(x)
      return nn.remat(nn.Dense)(4, name="rematted")(y)

  model, x = M(), jax.random.normal(jax.random.key(2), (2, 6))
  base = model.init(jax.random.key(0), x)["params"]
  _check_factored_equals_merged(model, base, jlora.LoraConfig(r=2, target_modules=["logged", "rematted"],
                                                               init_lora_weights=False), x, jit=True)


def test_weighted_keeps_integer_keys_and_save_peft_refuses_a_second_weight(tmp_path):
  from jlora.adapters.weighted import add_weighted_adapter

  base = {"layers": {0: {"w": jnp.ones((6, 4))}, 1: {"w": jnp.ones((4, 4))}}}
  config = jlora.LoraConfig(r=2, target_modules=".*", init_lora_weights=False)
  trainable, frozen = jlora.split(jlora.init_tree(jax.random.key(1), base, config), config)
  tree, out = add_weighted_adapter([(trainable, config)], [0.5], "cat")
  assert set(tree["layers"]) == {0, 1}
  combined = jlora.combine(tree, frozen)
  np.testing.assert_allclose(jlora.merge(combined, out)["layers"][0]["w"],
                             1 + 0.5 * (jlora.merge(jlora.combine(trainable, frozen), config)["layers"][0]["w"] - 1),
                             atol=1e-6, rtol=1e-5)
  model, x = gemma_layout.Transformer(), jnp.arange(12).reshape(2, 6) % 32
  p = jlora.init(jax.random.key(1), model, model.init(jax.random.key(0), x)["params"],
                 jlora.LoraConfig(r=2, target_modules=["linear"]), x)
  with pytest.raises(ValueError, match="one of several weights"):
    jlora.save_peft(tmp_path / "peft", model, p, jlora.LoraConfig(r=2, target_modules=["linear"]), name_map="flax")
