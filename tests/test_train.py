"""Split / combine / masks / labels / optimizer: only trainable leaves change, the base stays bit-identical."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from tests import zoo

CASE = zoo.cases()[5]  # scan stack


def _setup(**kw):
  kw.setdefault("target_modules", ["query", "value"])
  cfg = jlora.LoraConfig(r=4, lora_alpha=8, **kw)
  base = zoo.build(CASE)
  return cfg, base, jlora.init(jax.random.key(1), CASE.model, base, cfg, CASE.inputs)


def _loss(params, cfg):
  logits = jlora.apply(CASE.model, params, cfg, CASE.inputs)
  return optax.softmax_cross_entropy_with_integer_labels(logits, (CASE.inputs + 1) % 30).mean()


def _flat(tree):
  return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_labels_and_mask():
  cfg, _, params = _setup(bias="lora_only", modules_to_save=["lm_head"])
  labels = _flat(jlora.labels(params, cfg))
  mask = _flat(jlora.trainable_mask(params, cfg))
  assert labels["['layers']['attn']['query']['lora_a']"] == "lora_a"
  assert labels["['layers']['attn']['query']['lora_b']"] == "lora_b"
  assert labels["['layers']['attn']['query']['bias']"] == "bias"
  assert labels["['layers']['attn']['key']['bias']"] == "frozen"
  assert labels["['lm_head']['kernel']"] == "saved"
  assert labels["['layers']['attn']['query']['kernel']"] == "frozen"
  assert all(mask[k] == (v != "frozen") for k, v in labels.items())
  cfg_all = jlora.LoraConfig(r=4, target_modules=["query"], bias="all")
  assert _flat(jlora.labels(params, cfg_all))["['layers']['ln']['bias']"] == "bias"


def test_split_combine_round_trip():
  cfg, _base, params = _setup(bias="all")
  trainable, frozen = jlora.split(params, cfg)
  assert "kernel" not in trainable["layers"]["attn"]["query"]
  assert set(trainable["layers"]["attn"]["query"]) == {"lora_a", "lora_b", "bias"}
  assert "lora_a" not in frozen["layers"]["attn"]["query"]
  back = jlora.combine(trainable, frozen)
  chex.assert_trees_all_equal(back, params)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  with pytest.raises(ValueError, match="both trees hold a leaf at 'layers/attn/"):
    jlora.combine(trainable, trainable)


@pytest.mark.parametrize("jit", [False, True])
def test_training_changes_only_trainable_leaves_split(jit):
  """The recommended loop: differentiate the trainable tree only."""
  cfg, _base, params = _setup(bias="lora_only")
  trainable, frozen = jlora.split(params, cfg)
  tx = optax.adam(1e-2)
  state = tx.init(trainable)

  def step(t, s):
    loss, grads = jax.value_and_grad(lambda t: _loss(jlora.combine(t, frozen), cfg))(t)
    updates, s = tx.update(grads, s, t)
    return optax.apply_updates(t, updates), s, loss

  step = jax.jit(step) if jit else step
  losses = []
  for _ in range(3):
    trainable, state, loss = step(trainable, state)
    losses.append(float(loss))
  assert losses[-1] < losses[0]
  out = jlora.combine(trainable, frozen)
  for k, v in _flat(frozen).items():
    assert _flat(out)[k] is v
  before, after = _flat(params), _flat(out)
  for key in after:
    changed = not np.array_equal(before[key], after[key])
    assert changed == key.endswith(("['lora_a']", "['lora_b']", "['query']['bias']", "['value']['bias']")), key


def test_optimizer_on_full_tree_keeps_base_bit_identical():
  cfg, _base, params = _setup()
  # A negative zero in the base must survive (optax.set_to_zero would flip it to +0).
  params["lm_head"]["bias"] = params["lm_head"]["bias"].at[0].set(-0.0)
  tx = jlora.optimizer(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2)), cfg)
  state = tx.init(params)
  state_leaves = jax.tree.leaves(state)
  n_trainable = sum(x.size for x in jax.tree.leaves(jlora.split(params, cfg)[0]))
  assert sum(x.size for x in state_leaves if x.ndim) == 2 * n_trainable, "adam state for trainable leaves only"

  @jax.jit
  def step(p, s):
    grads = jax.grad(_loss)(p, cfg)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s

  new = params
  for _ in range(3):
    new, state = step(new, state)
  before, after = _flat(params), _flat(new)
  for key, value in before.items():
    if "lora_" in key:
      assert not np.array_equal(value, after[key]), key
    else:
      assert np.array_equal(np.signbit(value), np.signbit(after[key])) and np.array_equal(value, after[key]), key
  assert np.signbit(after["['lm_head']['bias']"][0])


def test_lora_plus_ratio_scales_b_updates():
  cfg, _, params = _setup()
  trainable, _frozen = jlora.split(params, cfg)
  grads = jax.tree.map(jnp.ones_like, trainable)
  plain = jlora.optimizer(optax.sgd(0.1), cfg)
  plus = jlora.optimizer(optax.sgd(0.1), cfg, lora_plus_ratio=16.0)
  u1, _ = plain.update(grads, plain.init(trainable), trainable)
  u2, _ = plus.update(grads, plus.init(trainable), trainable)
  q1, q2 = u1["layers"]["attn"]["query"], u2["layers"]["attn"]["query"]
  np.testing.assert_allclose(q2["lora_a"], q1["lora_a"])
  np.testing.assert_allclose(q2["lora_b"], 16.0 * q1["lora_b"])
  with pytest.raises(ValueError, match="`lora_plus_ratio` must be a positive number"):
    jlora.optimizer(optax.sgd(0.1), cfg, lora_plus_ratio=0)


def test_base_gradients_absent_in_split_step():
  cfg, _, params = _setup()
  trainable, frozen = jlora.split(params, cfg)
  grads = jax.grad(lambda t: _loss(jlora.combine(t, frozen), cfg))(trainable)
  assert jax.tree.structure(grads) == jax.tree.structure(trainable)
  assert not any("kernel" in k for k in _flat(grads))


def test_modules_to_save_trains_fully():
  cfg, _, params = _setup(modules_to_save=["lm_head"])
  trainable, frozen = jlora.split(params, cfg)
  assert set(trainable["lm_head"]) == {"kernel", "bias"} and "lm_head" not in frozen
  grads = jax.grad(lambda t: _loss(jlora.combine(t, frozen), cfg))(trainable)
  assert float(jnp.abs(grads["lm_head"]["kernel"]).max()) > 0


def test_optimizer_labels_follow_the_tree_it_is_given():
  """`optimizer(tx, config)` has no params argument: the same transformation serves the whole tree and the split half."""
  cfg, _, params = _setup(bias="lora_only")
  tx = jlora.optimizer(optax.sgd(1.0), cfg)
  trainable, _ = jlora.split(params, cfg)
  for tree in (params, trainable):
    grads = jax.tree.map(jnp.ones_like, tree)
    updates, _ = tx.update(grads, tx.init(tree), tree)
    for key, u in _flat(updates).items():
      trains = key.endswith(("['lora_a']", "['lora_b']", "['query']['bias']", "['value']['bias']"))
      assert np.all(np.asarray(u) == (-1.0 if trains else 0.0)), key
  with pytest.raises(TypeError, match=r"`jlora\.optimizer\(tx, config\)` takes a jlora\.LoraConfig second, got dict\. "
                                      r".*no params argument is needed"):
    jlora.optimizer(optax.sgd(1.0), params)
