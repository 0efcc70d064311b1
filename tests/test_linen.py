"""jlora.init / jlora.apply on every layer kind: identity at init, factored == merged, gradients."""

import functools
import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from tests import zoo

CASES = {c.name: c for c in zoo.cases()}


def _cfg(case, **kw):
  kw.setdefault("r", 4)
  kw.setdefault("lora_alpha", 8)
  return jlora.LoraConfig(target_modules=case.targets, **kw)


def _maybe_jit(fn, jit):
  return jax.jit(fn) if jit else fn


def _rel_err(a, b):
  return float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-12))


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("name", list(CASES))
def test_identity_at_init(name, jit):
  case = CASES[name]
  base = zoo.build(case)
  cfg = _cfg(case)
  params = jlora.init(jax.random.key(1), case.model, base, cfg, case.inputs)
  y_lora = _maybe_jit(lambda p, x: jlora.apply(case.model, p, cfg, x), jit)(params, case.inputs)
  y_base = case.model.apply({"params": base}, case.inputs)
  np.testing.assert_allclose(y_lora, y_base, rtol=1e-5, atol=1e-5)
  # Base leaves are the very same arrays.
  _, frozen = jlora.split(params, cfg)
  for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(frozen), jax.tree_util.tree_leaves_with_path(base)):
    assert a is b, path


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("name", list(CASES))
def test_factored_equals_merged(name, jit):
  case = CASES[name]
  base = zoo.build(case)
  cfg = _cfg(case, init_lora_weights=False)
  params = jlora.init(jax.random.key(1), case.model, base, cfg, case.inputs)
  y_lora = _maybe_jit(lambda p, x: jlora.apply(case.model, p, cfg, x), jit)(params, case.inputs)
  merged = _maybe_jit(lambda p: jlora.merge(p, cfg), jit)(params)
  y_merged = case.model.apply({"params": merged}, case.inputs)
  y_base = case.model.apply({"params": base}, case.inputs)
  assert _rel_err(y_lora, y_base) > 1e-3, "a non-zero adapter must change the output"
  assert _rel_err(y_lora, y_merged) <= 1e-5
  # Merged tree: the base's structure, shapes and dtypes.
  chex.assert_trees_all_equal_shapes_and_dtypes(merged, base)
  assert jax.tree.structure(merged) == jax.tree.structure(base)


@pytest.mark.parametrize("name", ["mlp", "attention", "einsum", "conv", "embed", "scan"])
def test_gradients_match_materialized(name):
  case = CASES[name]
  cfg = _cfg(case, init_lora_weights=False)
  params = jlora.init(jax.random.key(1), case.model, zoo.build(case), cfg, case.inputs)
  trainable, frozen = jlora.split(params, cfg)

  def loss_factored(t):
    return jnp.mean(jnp.square(jlora.apply(case.model, jlora.combine(t, frozen), cfg, case.inputs)))

  def loss_materialized(t):
    return jnp.mean(jnp.square(
        jlora.apply_merged(lambda p, x: case.model.apply({"params": p}, x), jlora.combine(t, frozen), cfg,
                           case.inputs)))

  g1 = jax.jit(jax.grad(loss_factored))(trainable)
  g2 = jax.jit(jax.grad(loss_materialized))(trainable)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    assert _rel_err(a, b) <= 1e-4
  assert jax.tree.structure(g1) == jax.tree.structure(trainable)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(g1))


def test_scan_adapters_are_stacked_and_differ_per_layer():
  case = CASES["scan"]
  cfg = _cfg(case)
  params = jlora.init(jax.random.key(1), case.model, zoo.build(case), cfg, case.inputs)
  q = params["layers"]["attn"]["query"]
  chex.assert_shape(q["lora_a"], (3, 16, 4))
  chex.assert_shape(q["lora_b"], (3, 4, 2, 8))
  assert not np.allclose(q["lora_a"][0], q["lora_a"][1])
  up = params["layers"]["up"]
  chex.assert_shape(up["lora_a"], (3, 16, 4))
  assert "lora_a" not in params["lm_head"], "all-linear leaves the output head alone"
  assert "lora_a" not in params["embed"], "all-linear adapts linear layers only"


def test_scan_and_loop_stacks_agree():
  """The same weights as a scanned stack and as a Python loop give the same LoRA outputs."""
  scan, loop = CASES["scan"], CASES["loop"]
  cfg = jlora.LoraConfig(r=4, target_modules=["query", "value", "up", "down"], init_lora_weights=False)
  p_scan = jlora.init(jax.random.key(1), scan.model, zoo.build(scan), cfg, scan.inputs)
  p_loop = {"embed": p_scan["embed"], "lm_head": p_scan["lm_head"]}
  for i in range(3):
    p_loop[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], p_scan["layers"])
  y_scan = jlora.apply(scan.model, p_scan, cfg, scan.inputs)
  y_loop = jlora.apply(loop.model, p_loop, cfg, loop.inputs)
  np.testing.assert_allclose(y_scan, y_loop, rtol=1e-5, atol=1e-5)


def test_shared_module_gets_one_adapter():
  class Shared(nn.Module):
    @nn.compact
    def __call__(self, x):
      layer = nn.Dense(16, name="shared")
      return layer(nn.relu(layer(x)))

  model, x = Shared(), jnp.ones((2, 16))
  cfg = jlora.LoraConfig(r=2, target_modules=["shared"], init_lora_weights=False)
  params = jlora.init(jax.random.key(0), model, model.init(jax.random.key(1), x)["params"], cfg, x)
  np.testing.assert_allclose(jlora.apply(model, params, cfg, x),
                             model.apply({"params": jlora.merge(params, cfg)}, x), rtol=1e-5)


def test_vmap_over_params():
  class Ensemble(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.vmap(nn.Dense, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=None, out_axes=0,
                     axis_size=3)(8, name="members")(x)

  model, x = Ensemble(), jnp.ones((2, 16))
  cfg = jlora.LoraConfig(r=2, target_modules=["members"], init_lora_weights=False)
  params = jlora.init(jax.random.key(0), model, model.init(jax.random.key(1), x)["params"], cfg, x)
  chex.assert_shape(params["members"]["lora_a"], (3, 16, 2))
  np.testing.assert_allclose(jlora.apply(model, params, cfg, x),
                             model.apply({"params": jlora.merge(params, cfg)}, x), rtol=1e-5)


@pytest.mark.parametrize("jit", [False, True])
def test_bf16_base_fp32_adapters(jit):
  model, x = zoo.MLP(dtype=jnp.bfloat16), jnp.ones((4, 16), jnp.bfloat16)
  base = model.init(jax.random.key(0), x)["params"]
  cfg = jlora.LoraConfig(r=4, target_modules=["fc_0", "fc_1"], init_lora_weights=False)
  params = jlora.init(jax.random.key(1), model, base, cfg, x)
  assert params["fc_0"]["lora_a"].dtype == jnp.float32
  assert params["fc_0"]["kernel"].dtype == jnp.bfloat16
  y = _maybe_jit(lambda p: jlora.apply(model, p, cfg, x), jit)(params)
  assert y.dtype == jnp.bfloat16
  merged = jlora.merge(params, cfg)
  assert merged["fc_0"]["kernel"].dtype == jnp.bfloat16
  y_merged = model.apply({"params": merged}, x)
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_merged, np.float32), rtol=5e-2, atol=5e-2)
  bf16 = jlora.init(jax.random.key(1), model, base, cfg, x, dtype=jnp.bfloat16)
  assert bf16["fc_0"]["lora_a"].dtype == jnp.bfloat16


def test_lora_dropout_only_with_its_rng():
  case = CASES["mlp"]
  cfg = _cfg(case, lora_dropout=0.5, init_lora_weights=False)
  params = jlora.init(jax.random.key(1), case.model, zoo.build(case), cfg, case.inputs)
  det1 = jlora.apply(case.model, params, cfg, case.inputs)
  det2 = jlora.apply(case.model, params, cfg, case.inputs, rngs={"dropout": jax.random.key(3)})
  np.testing.assert_array_equal(det1, det2)
  d1 = jlora.apply(case.model, params, cfg, case.inputs, rngs={"lora_dropout": jax.random.key(3)})
  d2 = jlora.apply(case.model, params, cfg, case.inputs, rngs={"lora_dropout": jax.random.key(4)})
  d1b = jlora.apply(case.model, params, cfg, case.inputs, rngs={"lora_dropout": jax.random.key(3)})
  assert not np.allclose(d1, det1) and not np.allclose(d1, d2)
  np.testing.assert_array_equal(d1, d1b)
  # Dropout acts on the LoRA path only: with B = 0 it changes nothing.
  cfg0 = _cfg(case, lora_dropout=0.5)
  p0 = jlora.init(jax.random.key(1), case.model, zoo.build(case), cfg0, case.inputs)
  y0 = jlora.apply(case.model, p0, cfg0, case.inputs, rngs={"lora_dropout": jax.random.key(3)})
  np.testing.assert_allclose(y0, case.model.apply({"params": zoo.build(case)}, case.inputs), rtol=1e-6)


def test_lora_dropout_in_scan_differs_per_layer_and_is_differentiable():
  case = CASES["scan"]
  cfg = _cfg(case, lora_dropout=0.3, init_lora_weights=False)
  params = jlora.init(jax.random.key(1), case.model, zoo.build(case), cfg, case.inputs)
  trainable, frozen = jlora.split(params, cfg)

  def loss(t, key):
    y = jlora.apply(case.model, jlora.combine(t, frozen), cfg, case.inputs, rngs={"lora_dropout": key})
    return jnp.mean(y**2)

  value_and_grad = jax.jit(jax.value_and_grad(loss))
  l0, g = value_and_grad(trainable, jax.random.key(0))
  l1, _ = value_and_grad(trainable, jax.random.key(1))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(g))
  assert l0 != l1


def test_init_under_jit_and_abstract():
  case = CASES["attention"]
  base, cfg = zoo.build(case), _cfg(case)
  eager = jlora.init(jax.random.key(1), case.model, base, cfg, case.inputs)
  jitted = jax.jit(lambda k, p: jlora.init(k, case.model, p, cfg, case.inputs))(jax.random.key(1), base)
  chex.assert_trees_all_close(eager, jitted)
  shapes = jax.eval_shape(lambda k, p: jlora.init(k, case.model, p, cfg, case.inputs), jax.random.key(1), base)
  assert shapes["query"]["lora_a"] == jax.ShapeDtypeStruct((16, 4), jnp.float32)
  assert shapes["query"]["lora_b"] == jax.ShapeDtypeStruct((4, 2, 8), jnp.float32)


def test_init_is_deterministic_per_key():
  case = CASES["mlp"]
  base, cfg = zoo.build(case), _cfg(case)
  a = jlora.init(jax.random.key(1), case.model, base, cfg, case.inputs)
  b = jlora.init(jax.random.key(1), case.model, base, cfg, case.inputs)
  c = jlora.init(jax.random.key(2), case.model, base, cfg, case.inputs)
  chex.assert_trees_all_equal(a, b)
  assert not np.array_equal(a["fc_0"]["lora_a"], c["fc_0"]["lora_a"])


def test_init_tree_generic_model():
  """A plain-jnp model (Haiku-style `w` leaves) trained through the materializing path."""
  params = {"linear_0": {"w": jax.random.normal(jax.random.key(0), (8, 16)), "b": jnp.zeros(16)},
            "linear_1": {"w": jax.random.normal(jax.random.key(1), (16, 4)), "b": jnp.zeros(4)}}

  def fn(p, x):
    return jnp.tanh(x @ p["linear_0"]["w"] + p["linear_0"]["b"]) @ p["linear_1"]["w"] + p["linear_1"]["b"]

  cfg = jlora.LoraConfig(r=2, target_modules=["linear_0", "linear_1"], init_lora_weights=False)
  lp = jlora.init_tree(jax.random.key(2), params, cfg)
  chex.assert_shape(lp["linear_0"]["lora_a"], (8, 2))
  x = jnp.ones((3, 8))
  s = cfg.scale_for("linear_0")
  w0 = params["linear_0"]["w"] + s * lp["linear_0"]["lora_a"] @ lp["linear_0"]["lora_b"]
  w1 = params["linear_1"]["w"] + s * lp["linear_1"]["lora_a"] @ lp["linear_1"]["lora_b"]
  expected = jnp.tanh(x @ w0) @ w1
  np.testing.assert_allclose(jlora.apply_merged(fn, lp, cfg, x), expected, rtol=1e-5)
  grads = jax.grad(lambda p: jlora.apply_merged(fn, p, cfg, x).sum())(lp)
  assert float(jnp.abs(grads["linear_0"]["lora_a"]).max()) > 0


def test_closed_over_base_warns_and_argument_does_not(monkeypatch):
  """A base closed over by a jitted function is compiled in as constants: `apply` says so, with the fix."""
  model, x = zoo.MLP(features=(256, 256, 8)), jnp.ones((2, 128))  # 100k base params (0.4 MiB)
  cfg = jlora.LoraConfig(r=2, target_modules=["fc_1"])
  params = jax.jit(lambda k: jlora.init(k, model, model.init(jax.random.key(0), x)["params"], cfg, x))(
      jax.random.key(1))
  trainable, frozen = jlora.split(params, cfg)
  closed = lambda: jax.jit(lambda t, x: jlora.apply(model, jlora.combine(t, frozen), cfg, x))  # noqa: E731
  passed = jax.jit(lambda t, f, x: jlora.apply(model, jlora.combine(t, f), cfg, x))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    closed().lower(trainable, x)  # below the threshold (16 MiB): quiet
  monkeypatch.setattr(jlora.frontends.linen_run, "CLOSED_OVER_WARN_BYTES", 2**18)
  with pytest.warns(UserWarning, match=r"traced with 6 parameter leaves \(0\.4 MiB\).*closed over.*Pass the frozen"):
    hlo_closed = closed().lower(trainable, x).as_text()  # a new function: traced again
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    hlo_passed = passed.lower(trainable, frozen, x).as_text()  # the frozen tree as an argument: no warning
    jax.grad(lambda t: jlora.apply(model, jlora.combine(t, frozen), cfg, x).sum())(trainable)  # eager: no warning
  assert len(hlo_closed) > 20 * len(hlo_passed), "the closed-over base is in the program, the argument is not"


@pytest.mark.parametrize("jit", [False, True])
def test_apply_fn_fills_the_model_apply_slot(jit):
  """`jlora.apply_fn` fills `model.apply`'s slot: flax TrainState, a static jit argument without recompiles."""
  from flax.training import train_state

  case = CASES["mlp"]
  cfg = _cfg(case, init_lora_weights=False)
  params = jlora.init(jax.random.key(1), case.model, zoo.build(case), cfg, case.inputs)
  fn = jlora.apply_fn(case.model, cfg)
  assert fn == jlora.apply_fn(case.model, cfg) and hash(fn) == hash(jlora.apply_fn(case.model, cfg))
  assert fn != jlora.apply_fn(case.model, _cfg(case, r=2))
  y = _maybe_jit(lambda p: fn({"params": p}, case.inputs), jit)(params)
  np.testing.assert_allclose(y, jlora.apply(case.model, params, cfg, case.inputs), rtol=1e-6, atol=1e-6)

  trainable, frozen = jlora.split(params, cfg)
  state = train_state.TrainState.create(apply_fn=fn, params=trainable, tx=jlora.optimizer(optax_adam(), cfg))

  @jax.jit
  def step(state, frozen):
    loss = lambda t: jnp.mean(state.apply_fn({"params": jlora.combine(t, frozen)}, case.inputs) ** 2)  # noqa: E731
    return state.apply_gradients(grads=jax.grad(loss)(state.params))

  new = step(state, frozen)
  assert not np.array_equal(new.params["fc_0"]["lora_b"], trainable["fc_0"]["lora_b"])

  calls = []

  @functools.partial(jax.jit, static_argnums=0)
  def run(apply_fn, p, x):
    calls.append(1)  # runs once per trace
    return apply_fn({"params": p}, x)

  run(fn, params, case.inputs)
  run(jlora.apply_fn(case.model, cfg), params, case.inputs)  # an equal object: the cached compile is reused
  assert len(calls) == 1


def test_apply_fn_and_apply_check_their_arguments():
  case = CASES["mlp"]
  cfg = _cfg(case)
  params = jlora.init(jax.random.key(1), case.model, zoo.build(case), cfg, case.inputs)
  with pytest.raises(TypeError, match=r"`variables` must be a variables dict such as \{'params': params\}"):
    jlora.apply_fn(case.model, cfg)(params, case.inputs)
  with pytest.raises(TypeError, match=r"`config` must be a jlora\.LoraConfig, got dict"):
    jlora.apply(case.model, params, {"r": 4}, case.inputs)
  with pytest.raises(TypeError, match=r"`config` must be a jlora\.LoraConfig"):
    jlora.apply_fn(case.model, None)
  with pytest.raises(TypeError, match=r"`model` must be a flax\.linen Module, got function"):
    jlora.apply(lambda p, x: x, params, cfg, case.inputs)


def optax_adam():
  import optax

  return optax.adam(1e-2)
