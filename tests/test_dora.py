"""DoRA: magnitude init, the factored forward against the merged weight, gradients, dropout, merge/unmerge, errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.core import ops as _ops
from tests.models.helpers import CONFIGS, random_model, tokens


class Net(nn.Module):
  """Every kind DoRA covers: Embed (and its tied attend head), Conv, DenseGeneral, Einsum with and without bias."""

  @nn.compact
  def __call__(self, ids):
    emb = nn.Embed(11, 12, name="embed")
    h = emb(ids)
    h = nn.Conv(12, (3,), name="conv")(h)
    h = nn.DenseGeneral((2, 6), name="heads")(h).reshape(h.shape[:-1] + (12,))
    h = nn.Einsum((12, 16), "btd,df->btf", name="mix")(h)
    h = nn.Einsum((2, 8, 6), "btgk,gkd->btgd", use_bias=False, name="grouped")(h.reshape(h.shape[:-1] + (2, 8)))
    h = nn.Dense(12, name="down")(jax.nn.gelu(h.reshape(h.shape[:-2] + (12,))))
    return emb.attend(h)


KINDS = ["embed", "conv", "heads", "mix", "grouped", "down"]


@pytest.fixture(scope="module")
def net():
  model, ids = Net(), jnp.asarray(tokens((3, 5)) % 11)
  return model, ids, model.init(jax.random.key(0), ids)["params"]


def _moved(model, base, cfg, ids, key=2):
  """A DoRA adapter as if trained: A, B and the magnitude all moved away from their init."""
  trainable, frozen = jlora.split(jlora.init(jax.random.key(key), model, base, cfg, ids), cfg)
  noise = jax.tree.map(lambda x: 0.3 * jax.random.normal(jax.random.key(7), x.shape) * jnp.std(x), trainable)
  return jlora.combine(jax.tree.map(jnp.add, trainable, noise), frozen)


def test_magnitude_starts_at_the_column_norms_so_the_model_is_unchanged(net):
  model, ids, base = net
  cfg = jlora.LoraConfig(r=2, target_modules=".*", use_dora=True)
  params = jlora.init(jax.random.key(1), model, base, cfg, ids)
  assert params["heads"]["lora_magnitude"].shape == (1, 2, 6)  # the kernel's shape, input axes 1
  assert params["grouped"]["lora_magnitude"].shape == (2, 1, 6)  # an einsum's shared axis kept
  np.testing.assert_allclose(params["down"]["lora_magnitude"][0], jnp.linalg.norm(base["down"]["kernel"], axis=0),
                             rtol=1e-6)
  np.testing.assert_array_equal(jlora.apply(model, params, cfg, ids), model.apply({"params": base}, ids))
  assert jlora.labels(params, cfg)["down"]["lora_magnitude"] == "lora_magnitude"


@pytest.mark.parametrize("target, jit", [(k, True) for k in KINDS] + [("grouped", False), ("embed", False)])
def test_factored_forward_equals_the_merged_weight(net, target, jit):
  model, ids, base = net
  cfg = jlora.LoraConfig(r=2, lora_alpha=3, target_modules=[target], use_dora=True, init_lora_weights=False)
  params = _moved(model, base, cfg, ids)
  fn = lambda p, x: jlora.apply(model, p, cfg, x)  # noqa: E731
  out = (jax.jit(fn) if jit else fn)(params, ids)
  merged = model.apply({"params": jlora.merge(params, cfg)}, ids)
  np.testing.assert_allclose(out, merged, atol=2e-5 * float(jnp.abs(merged).max()))
  assert not np.allclose(out, model.apply({"params": base}, ids), atol=1e-3)


def test_gradients_treat_the_norm_as_a_constant(net):
  """The factored gradients equal those of the merged weight with the norm detached (paper §4.3, PEFT)."""
  model, ids, base = net
  cfg = jlora.LoraConfig(r=2, target_modules=".*", use_dora=True, init_lora_weights=False)
  trainable, frozen = jlora.split(_moved(model, base, cfg, ids), cfg)

  probe = jax.random.normal(jax.random.key(9), model.apply({"params": frozen}, ids).shape)

  def loss(fn, t):
    return jnp.sum(fn(jlora.combine(t, frozen)) * probe)

  factored = jax.grad(lambda t: loss(lambda p: jlora.apply(model, p, cfg, ids), t))(trainable)
  merged = jax.grad(lambda t: loss(lambda p: jlora.apply_merged(
      lambda q, x: model.apply({"params": q}, x), p, cfg, ids), t))(trainable)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4 * float(jnp.abs(b).max())), factored, merged)


def test_with_dropout_the_base_product_uses_the_dropped_input(net, monkeypatch):
  """y = base(x) + (g − 1)·(x_d·W0) + g·s·(x_d·A)·B, with x_d the LoRA input after dropout (as PEFT in training)."""
  model = nn.Dense(6)
  x = jax.random.normal(jax.random.key(0), (4, 8))
  base = model.init(jax.random.key(1), x)["params"]
  cfg = jlora.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.5, target_modules=".*", use_dora=True,
                         init_lora_weights=False)
  p = _moved(model, base, cfg, x)
  seen = []
  real = _ops.dropout
  monkeypatch.setattr(_ops, "dropout", lambda key, x, rate: seen.append(real(key, x, rate)) or seen[-1])
  out = jlora.apply(model, p, cfg, x, rngs={"lora_dropout": jax.random.key(3)})
  (xd,) = seen
  assert not np.allclose(xd, x)
  w0, a, b, m = p["kernel"], p["lora_a"], p["lora_b"], p["lora_magnitude"][0]
  g = m / jnp.linalg.norm(w0 + 2.0 * a @ b, axis=0)
  want = x @ w0 + p["bias"] + (g - 1) * (xd @ w0) + g * (2.0 * (xd @ a) @ b)
  np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)


def test_the_norm_gets_no_gradient():
  """Paper §4.3 and PEFT: `‖W0 + s·A·B‖` is a constant in the backward pass; the gradients say which it was."""
  model = nn.Dense(6)
  x = jax.random.normal(jax.random.key(0), (4, 8))
  base = model.init(jax.random.key(1), x)["params"]
  cfg = jlora.LoraConfig(r=2, lora_alpha=4, target_modules=".*", use_dora=True, init_lora_weights=False)
  p = _moved(model, base, cfg, x)
  w0, m = p["kernel"], p["lora_magnitude"][0]

  def manual(a, b, detach):
    v = w0 + 2.0 * a @ b
    norm = jnp.linalg.norm(v, axis=0)
    norm = jax.lax.stop_gradient(norm) if detach else norm
    return jnp.sum(jnp.sin(x @ (v * (m / norm)) + p["bias"]))

  ours = jax.grad(lambda a, b: jnp.sum(jnp.sin(jlora.apply(model, {**p, "lora_a": a, "lora_b": b}, cfg, x))),
                  argnums=(0, 1))(p["lora_a"], p["lora_b"])
  detached = jax.grad(lambda a, b: manual(a, b, True), argnums=(0, 1))(p["lora_a"], p["lora_b"])
  attached = jax.grad(lambda a, b: manual(a, b, False), argnums=(0, 1))(p["lora_a"], p["lora_b"])
  for mine, want, other in zip(ours, detached, attached):
    np.testing.assert_allclose(mine, want, atol=1e-4, rtol=1e-5)
    assert not np.allclose(mine, other, atol=1e-3)


def test_merge_unmerge_round_trip_and_two_adapters_in_turn(net):
  model, ids, base = net
  cfg = jlora.LoraConfig(r=2, target_modules=["heads", "down", "embed"], use_dora=True, init_lora_weights=False)
  first = _moved(model, base, cfg, ids)
  norms = jlora.dora_norms(first, cfg)
  merged = jlora.merge(first, cfg)
  back = jlora.unmerge(merged, jlora.split(first, cfg)[0], cfg, norms=norms)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, atol=1e-5, rtol=1e-5), back, first)
  with pytest.raises(ValueError, match=r"DoRA adapter.*dora_norms\(params, config\) before jlora.merge"):
    jlora.unmerge(merged, jlora.split(first, cfg)[0], cfg)
  # a second DoRA adapter over the merged first one: its norm is taken on that base, in merge as in the forward
  second = _moved(model, merged, cfg, ids, key=5)
  twice = jlora.merge(second, cfg)
  np.testing.assert_allclose(model.apply({"params": twice}, ids), jlora.apply(model, second, cfg, ids), rtol=1e-5,
                             atol=1e-5)
  once = jlora.split(jlora.unmerge(twice, jlora.split(second, cfg)[0], cfg, norms=jlora.dora_norms(second, cfg)),
                     cfg)[1]  # the first merge, recovered
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-5), once, merged)
  restored = jlora.unmerge(once, jlora.split(first, cfg)[0], cfg, norms=norms)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-5), restored, first)


def test_scanned_stack_and_checkpoint_round_trip(tmp_path):
  model, base = random_model(CONFIGS["llama"], scan_layers=True)
  x = jnp.asarray(tokens((2, 6)))
  cfg = jlora.LoraConfig(r=2, target_modules=["q_proj", "down_proj"], use_dora=True, init_lora_weights=False)
  params = _moved(model, base, cfg, x)
  mag = params["model"]["layers"]["mlp"]["down_proj"]["lora_magnitude"]
  assert mag.shape[0] == CONFIGS["llama"]["num_hidden_layers"] and mag.shape[1] == 1
  out = jlora.apply(model, params, cfg, x)
  np.testing.assert_allclose(out, model.apply({"params": jlora.merge(params, cfg)}, x), atol=1e-4, rtol=1e-5)
  jlora.save_adapter(tmp_path / "dora", params, cfg)
  loaded, cfg2 = jlora.load_adapter(tmp_path / "dora", base)
  assert cfg2.use_dora
  np.testing.assert_array_equal(jlora.apply(model, loaded, cfg2, x), out)


def test_generic_path_runs_dora_materialized():
  params = {"proj": {"w": jax.random.normal(jax.random.key(0), (6, 4))}}
  cfg = jlora.LoraConfig(r=2, target_modules=["proj"], use_dora=True, init_lora_weights=False)
  p = jlora.init_tree(jax.random.key(1), params, cfg)
  x = jnp.ones((3, 6))
  w0, a, b = p["proj"]["w"], p["proj"]["lora_a"], p["proj"]["lora_b"]
  v = w0 + 4.0 * a @ b  # s = 8 / 2
  np.testing.assert_allclose(p["proj"]["lora_magnitude"][0], jnp.linalg.norm(v, axis=0), rtol=1e-6)
  y = jlora.apply_merged(lambda q, x: x @ q["proj"]["w"], p, cfg, x)
  np.testing.assert_allclose(y, x @ v, rtol=1e-5)  # m = ‖V‖: the direction times its own norm


def test_mismatches_and_paths_without_dora_raise(net):
  model, ids, base = net
  cfg = jlora.LoraConfig(r=2, target_modules=["down"], use_dora=True)
  plain = jlora.LoraConfig(r=2, target_modules=["down"])
  params = jlora.init(jax.random.key(1), model, base, cfg, ids)
  with pytest.raises(ValueError, match=r"is a DoRA adapter .* but the config has use_dora=False"):
    jlora.apply(model, params, plain, ids)
  with pytest.raises(ValueError, match=r"use_dora=True but the adapter at 'down' has no DoRA magnitude"):
    jlora.apply(model, jlora.init(jax.random.key(1), model, base, plain, ids), cfg, ids)
  bad = jax.tree.map(lambda x: x, params)
  bad["down"]["lora_magnitude"] = bad["down"]["lora_magnitude"][0]
  with pytest.raises(ValueError, match=r"magnitude at 'down' has shape \(12,\); its kernel needs \(1, 12\)"):
    jlora.merge(bad, cfg)
  trainable = jlora.split(params, cfg)[0]
  with pytest.raises(ValueError, match=r"add_weighted_adapter: adapters\[0\] has use_dora=True"):
    jlora.add_weighted_adapter([(trainable, cfg)], [1.0], "cat")


def test_registered_layer_with_its_own_bias_and_kernel_summed_einsum():
  """DoRA scales x·W0 only: a registered layer's own bias (not named `bias`) stays unscaled; an einsum that sums a
  kernel-only axis has no per-column output and is refused."""

  class MyDense(nn.Module):
    @nn.compact
    def __call__(self, x):
      w = self.param("w", nn.initializers.normal(1.0), (x.shape[-1], 5))
      return x @ w + self.param("b", nn.initializers.normal(1.0), (5,))

  jlora.register_layer(MyDense, jlora.Layer(weight="w", input="x"))
  x = jax.random.normal(jax.random.key(0), (3, 4))
  model = MyDense()
  base = model.init(jax.random.key(1), x)["params"]
  cfg = jlora.LoraConfig(r=2, target_modules=".*", use_dora=True, init_lora_weights=False)
  p = _moved(model, base, cfg, x)
  np.testing.assert_allclose(jlora.apply(model, p, cfg, x), model.apply({"params": jlora.merge(p, cfg)}, x), atol=1e-5, rtol=1e-5)
  summed = nn.Einsum((4, 5, 2), "btd,dfk->btf")
  xs = jnp.ones((2, 3, 4))
  sp = jlora.init(jax.random.key(2), summed, summed.init(jax.random.key(3), xs)["params"], cfg, xs)
  with pytest.raises(ValueError, match=r"sums the kernel's own axis \['k'\] away"):
    jlora.apply(summed, sp, cfg, xs)


@pytest.mark.parametrize("jit", [False, True])
def test_cached_norms_give_the_same_forward(net, jit):
  """`apply(..., dora_norms=dora_norms(params))` equals the uncached forward, for every kind and inside nn.scan."""
  model, ids, base = net
  cfg = jlora.LoraConfig(r=2, lora_alpha=3, target_modules=".*", use_dora=True, init_lora_weights=False)
  params = _moved(model, base, cfg, ids)
  norms = jlora.dora_norms(params, cfg)
  fn = lambda p, n, x: jlora.apply(model, p, cfg, x, dora_norms=n)  # noqa: E731
  out = (jax.jit(fn) if jit else fn)(params, norms, ids)
  np.testing.assert_allclose(out, jlora.apply(model, params, cfg, ids), rtol=1e-6, atol=1e-6 * float(jnp.abs(out).max()))
  stale = jax.tree.map(lambda n: 2 * n, norms)  # the cached norms are what the forward uses
  assert not np.allclose(fn(params, stale, ids), out, atol=1e-3)
  llama, lbase = random_model(CONFIGS["llama"], scan_layers=True)
  x = jnp.asarray(tokens((2, 6)))
  lcfg = jlora.LoraConfig(r=2, target_modules=["q_proj", "down_proj"], use_dora=True, init_lora_weights=False)
  lparams = _moved(llama, lbase, lcfg, x)
  np.testing.assert_allclose(jlora.apply(llama, lparams, lcfg, x, dora_norms=jlora.dora_norms(lparams, lcfg)),
                             jlora.apply(llama, lparams, lcfg, x), rtol=1e-5, atol=1e-5)


def test_cached_norms_that_do_not_fit_raise(net):
  model, ids, base = net
  cfg = jlora.LoraConfig(r=2, target_modules=["down", "mix"], use_dora=True)
  params = jlora.init(jax.random.key(1), model, base, cfg, ids)
  norms = jlora.dora_norms(params, cfg)
  with pytest.raises(ValueError, match=r"`dora_norms` has no norm for the DoRA magnitudes at \['mix/lora_magnitude'\]; "
                                       r"pass jlora.dora_norms\(params, config\)"):
    jlora.apply(model, params, cfg, ids, dora_norms={"down": norms["down"]})
  with pytest.raises(ValueError, match=r"`dora_norms` at 'down/lora_magnitude' has shape \(3,\), but `params` holds a "
                                       r"magnitude of shape \(1, 12\)"):
    jlora.apply(model, params, cfg, ids, dora_norms={**norms, "down": {"lora_magnitude": jnp.ones(3)}})
  with pytest.raises(ValueError, match=r"`dora_norms` at 'conv/lora_magnitude' .* holds no DoRA magnitude there"):
    jlora.apply(model, params, cfg, ids, dora_norms={**norms, "conv": {"lora_magnitude": jnp.ones(3)}})
  with pytest.raises(TypeError, match="`dora_norms` must be a nested dict"):
    jlora.apply(model, params, cfg, ids, dora_norms=[norms])
