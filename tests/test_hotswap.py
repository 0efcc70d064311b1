"""`jlora.pad_rank`: adapters of different ranks and alphas padded to one rank and scale 1 (compiled hotswap)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora

pytestmark = pytest.mark.usefixtures("float32_matmuls")
TARGETS = ["up", "heads", "down"]


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(12, name="up")(x)
    h = nn.Einsum((3, 12, 4), "btd,hdk->bthk", name="heads")(jnp.tanh(h))  # the broadcast layout
    return nn.Dense(5, name="down")(h.reshape(h.shape[:2] + (-1,)))


@pytest.fixture(scope="module")
def setup():
  model, x = Net(), jax.random.normal(jax.random.key(0), (2, 3, 8))
  base = model.init(jax.random.key(1), x)["params"]
  configs = {  # other ranks, alphas, patterns and rsLoRA over the same targets, and DoRA
      "a": jlora.LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, rank_pattern={"up": 3}, init_lora_weights=False),
      "b": jlora.LoraConfig(r=4, lora_alpha=16, use_rslora=True, alpha_pattern={"down": 5}, target_modules=TARGETS,
                            init_lora_weights=False),
      "dora": jlora.LoraConfig(r=1, lora_alpha=3, use_dora=True, target_modules=TARGETS, init_lora_weights=False),
  }
  trained = {n: jlora.split(jlora.init(jax.random.key(2 + i), model, base, c, x), c)[0]
             for i, (n, c) in enumerate(configs.items())}
  return model, x, base, configs, trained


def _close(got, want):
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("jit", [False, True])
def test_padded_adapters_compute_the_same_and_merge_the_same(setup, jit):
  model, x, base, configs, trained = setup
  run = lambda t, c: jlora.apply(model, jlora.combine(t, base), c, x)  # noqa: E731
  run = jax.jit(run, static_argnums=1) if jit else run
  for name, config in configs.items():
    tree, padded = jlora.pad_rank(trained[name], config, 8, kernels=base)
    assert padded == dataclasses.replace(config, r=8, lora_alpha=8, use_rslora=False, rank_pattern={}, alpha_pattern={})
    assert tree["up"]["lora_a"].shape == (8, 8) and tree["up"]["lora_b"].shape == (8, 12)
    assert tree["heads"]["lora_a"].shape == (1, 12, 1, 8) and tree["heads"]["lora_b"].shape == (3, 1, 4, 8)
    want = jlora.apply(model, jlora.combine(trained[name], base), config, x)
    _close(run(tree, padded), want)
    _close(model.apply({"params": jlora.merge(jlora.combine(tree, base), padded)}, x), want)
    if config.use_dora:
      np.testing.assert_array_equal(tree["up"]["lora_magnitude"], trained[name]["up"]["lora_magnitude"])


def test_adapters_of_other_ranks_and_alphas_share_one_compile(setup):
  model, x, base, configs, trained = setup
  (ta, ca), (tb, cb) = (jlora.pad_rank(trained[n], configs[n], 8, kernels=base) for n in ("a", "b"))
  assert ca == cb
  step = jax.jit(lambda t: jlora.apply(model, jlora.combine(t, base), ca, x))
  for name, tree in [("a", ta), ("b", tb), ("a", ta)]:
    _close(step(tree), jlora.apply(model, jlora.combine(trained[name], base), configs[name], x))
  assert step._cache_size() == 1


def test_padded_rows_and_columns_get_no_gradient_and_the_rest_the_original_one(setup):
  model, x, base, configs, trained = setup
  config = configs["a"]
  tree, padded = jlora.pad_rank(trained["a"], config, 8, kernels=base)
  loss = lambda t, c: jnp.sum(jlora.apply(model, jlora.combine(t, base), c, x) ** 2)  # noqa: E731
  g_pad, g = jax.grad(loss)(tree, padded), jax.grad(loss)(trained["a"], config)
  r = 3  # `up` has rank 3 by rank_pattern; scale 4 / 3
  assert not np.any(g_pad["up"]["lora_a"][:, r:]) and not np.any(g_pad["up"]["lora_b"][r:])
  scale = config.lora_alpha / r
  np.testing.assert_allclose(g_pad["up"]["lora_a"][:, :r], g["up"]["lora_a"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(g_pad["up"]["lora_b"][:r] * scale, g["up"]["lora_b"], rtol=1e-5, atol=1e-6)


def test_bad_target_ranks_are_refused(setup):
  _, _, base, configs, trained = setup
  with pytest.raises(ValueError, match=r"pad_rank: the adapter at 'up' has rank 3, above `target_rank`=2; pass "
                                       r"target_rank >= 3"):
    jlora.pad_rank(trained["a"], configs["a"], 2, kernels=base)
  for bad in (0, 2.0, True, "8"):
    with pytest.raises(TypeError, match=r"`target_rank` must be a positive int"):
      jlora.pad_rank(trained["a"], configs["a"], bad, kernels=base)
  with pytest.raises(TypeError, match=r"`config` must be a jlora.LoraConfig"):
    jlora.pad_rank(trained["a"], dict(r=2), 8)
