"""Many adapters on one base: `AdapterSet`, `stack_adapters`, `jlora.apply` with a bank (mixed batches), multi-task
training."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from jlora import models
from tests.models.helpers import CONFIGS, random_model, tokens


class Net(nn.Module):
  """Every kind a bank must handle: Dense, DenseGeneral (two output axes), Einsum, Conv, Embed and a tied head."""

  @nn.compact
  def __call__(self, ids):
    emb = nn.Embed(11, 12, name="embed")
    h = emb(ids)  # (B, T, 12)
    h = nn.Conv(12, (3,), name="conv")(h)
    h = nn.DenseGeneral((2, 6), name="heads")(h).reshape(h.shape[:-1] + (12,))
    h = nn.Einsum((12, 16), "btd,df->btf", name="mix")(h)
    h = nn.Dense(12, name="down")(jax.nn.gelu(h))
    return emb.attend(h)


CONFIGS_NET = {
    "a": jlora.LoraConfig(r=2, lora_alpha=4, target_modules=["heads", "mix", "embed"], init_lora_weights=False),
    "b": jlora.LoraConfig(r=4, lora_alpha=3, use_rslora=True, target_modules=["conv", "heads", "mix", "down"],
                          init_lora_weights=False),
    "c": jlora.LoraConfig(r=1, lora_alpha=1, target_modules=["down"], init_lora_weights=False),
}
NAMES = ["a", "__base__", "b", "c", "a", "b"]


@pytest.fixture(scope="module")
def net():
  model, ids = Net(), jnp.asarray(tokens((6, 5)) % 11)
  base = model.init(jax.random.key(0), ids)["params"]
  adapters = jlora.AdapterSet()
  for i, (name, cfg) in enumerate(CONFIGS_NET.items()):
    adapters = adapters.add(name, jlora.init(jax.random.key(10 + i), model, base, cfg, ids), cfg)
  return model, ids, base, adapters, jlora.stack_adapters(adapters, base)


def _alone(model, base, adapters, name, x):
  if name == "__base__":
    return model.apply({"params": base}, x)
  return jlora.apply(model, adapters.params(name, base), adapters.config(name), x)


def test_adapter_set_is_an_immutable_pytree_mapping(net):
  *_, base, adapters, _ = net
  assert adapters.names == ("a", "b", "c") and len(adapters) == 3 and "b" in adapters
  assert adapters.config("b") is CONFIGS_NET["b"] and set(adapters["c"]["down"]) == {"lora_a", "lora_b"}
  fewer = adapters.remove("b")
  assert fewer.names == ("a", "c") and adapters.names == ("a", "b", "c")
  leaves, treedef = jax.tree.flatten(adapters)
  assert len(leaves) == 2 * (3 + 4 + 1) and jax.tree.unflatten(treedef, leaves).names == adapters.names
  doubled = jax.jit(lambda s: jax.tree.map(lambda x: 2 * x, s))(adapters)
  np.testing.assert_array_equal(doubled["c"]["down"]["lora_b"], 2 * adapters["c"]["down"]["lora_b"])
  assert adapters.params("__base__", base) == base
  with pytest.raises(ValueError, match=r"already in the set; pass replace=True"):
    adapters.add("a", adapters.params("a", base), CONFIGS_NET["a"])
  assert adapters.add("a", adapters["c"], CONFIGS_NET["c"], replace=True).config("a") is CONFIGS_NET["c"]
  with pytest.raises(ValueError, match=r"'__base__'.*selects the base"):
    adapters.add("__base__", adapters["a"], CONFIGS_NET["a"])
  with pytest.raises(ValueError, match=r"holds no lora_a/lora_b"):
    adapters.add("x", base, CONFIGS_NET["a"])
  with pytest.raises(TypeError, match=r"must be a jlora.LoraConfig, got dict"):
    adapters.add("x", adapters["a"], {"r": 2})
  with pytest.raises(KeyError, match=r"No adapter named 'z'.*\['a', 'b', 'c'\]"):
    adapters.remove("z")
  with pytest.raises(ValueError, match=r"already holds adapters"):
    adapters.params("a", adapters.params("b", base))
  with pytest.raises(ValueError, match=r"Adapter 'x': the adapter at '(embed|heads|mix)' has rank 2, but its config gives r=4"):
    adapters.add("x", adapters["a"], CONFIGS_NET["b"])
  assert [c for _, c in adapters.pairs(["c", "a"])] == [CONFIGS_NET["c"], CONFIGS_NET["a"]]
  with pytest.raises(TypeError, match=r"an AdapterSet: pass its .pairs\(\)"):
    jlora.add_weighted_adapter(adapters, [1.0, 1.0, 1.0], "cat")


def test_stack_pads_ranks_unions_targets_and_unstacks_exactly(net):
  *_, adapters, bank = net
  assert bank.names == ("a", "b", "c")
  a = bank.tree["mix"]["lora_a"]  # einsum broadcast layout: (d, 1, r) + (n,), padded to r = 4
  assert a.shape == (12, 1, 4, 3)
  np.testing.assert_array_equal(a[..., :2, 0], adapters["a"]["mix"]["lora_a"])
  assert not np.any(a[..., 2:, 0]) and not np.any(bank.tree["conv"]["lora_a"][..., 0])  # padding; 'a' has no conv
  slot = {e.slot.where: e for e in bank.entries}["down"]
  assert slot.ranks == (0, 4, 1) and slot.scales == (0.0, 3 / 2, 1.0)
  back = bank.unstack()
  assert back.names == adapters.names
  chex_equal = jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), dict(back), dict(adapters))
  assert chex_equal is not None
  assert {n: back.config(n) for n in back} == CONFIGS_NET


@pytest.mark.parametrize("jit", [False, True])
def test_mixed_batch_equals_each_example_with_its_own_adapter(net, jit):
  model, ids, base, adapters, bank = net
  fn = lambda b, p, i, x: jlora.apply(model, p, b, x, adapter_ids=i)  # noqa: E731
  out = (jax.jit(fn) if jit else fn)(bank, base, bank.ids(NAMES), ids)
  for i, name in enumerate(NAMES):
    np.testing.assert_allclose(out[i:i + 1], _alone(model, base, adapters, name, ids[i:i + 1]), atol=1e-5, rtol=1e-5)
  plain = model.apply({"params": base}, ids)
  np.testing.assert_array_equal(out[1], plain[1])  # '__base__' is the base model's output, bit for bit
  assert not np.allclose(out[0], plain[0], atol=1e-3)  # and the adapters do act


def test_one_id_selects_an_adapter_for_the_batch_without_recompiling(net):
  model, ids, base, adapters, bank = net
  step = jax.jit(lambda b, p, i, x: jlora.apply(model, p, b, x, adapter_ids=i))
  for name in ["a", "b", "__base__", "c", "a"]:
    np.testing.assert_allclose(step(bank, base, bank.ids(name), ids), _alone(model, base, adapters, name, ids),
                               atol=1e-5, rtol=1e-5)
  assert step._cache_size() == 1
  np.testing.assert_array_equal(step(bank, base, bank.ids(None), ids), model.apply({"params": base}, ids))


def test_bank_errors_are_clear(net):
  model, ids, base, adapters, bank = net
  with pytest.raises(ValueError, match=r"outside -1..2"):
    jlora.apply(model, base, bank, ids, adapter_ids=jnp.array([0, 3, 0, 0, 0, 0]))
  with pytest.raises(ValueError, match=r"No adapter named 'x' in this bank.*\['a', 'b', 'c'\]"):
    bank.ids(["a", "x"])
  with pytest.raises(TypeError, match=r"ints of shape"):
    bank.ids(jnp.zeros((2, 3), jnp.int32))
  with pytest.raises(ValueError, match=r"axis 0 is not the batch of 2 examples"):
    jlora.apply(model, base, bank, ids, adapter_ids=bank.ids(["a", "b"]))
  with pytest.raises(ValueError, match=r"takes the base params and the bank separately"):
    jlora.apply(model, adapters.params("a", base), bank, ids, adapter_ids=0)
  with pytest.raises(TypeError, match=r"must be a jlora.AdapterBank"):
    jlora.apply(model, base, adapters, ids, adapter_ids=0)
  with pytest.raises(TypeError, match=r"must be a jlora.AdapterSet"):
    jlora.stack_adapters(dict(adapters), base)
  biased = jlora.LoraConfig(r=2, target_modules=["down"], bias="lora_only")
  with_bias = adapters.add("x", jlora.init(jax.random.key(3), model, base, biased, ids), biased)
  with pytest.raises(ValueError, match=r"trains leaves other than LoRA's A and B.*down/bias"):
    jlora.stack_adapters(with_bias, base)
  moved = {**{k: v for k, v in bank.tree.items() if k != "down"}, "gone": bank.tree["down"]}  # a renamed module
  with pytest.raises(ValueError, match=r"jlora.apply: 1 adapter.*not used by this forward: 'gone'"):
    jlora.apply(model, base, jlora.AdapterBank(moved, bank.names, bank.configs, bank.entries), ids, adapter_ids=0)


def test_per_adapter_dropout_keeps_base_rows_exact(net):
  model, ids, base, adapters, _ = net
  cfg = jlora.LoraConfig(r=2, lora_dropout=0.5, target_modules=["down"], init_lora_weights=False)
  dropped = adapters.add("d", jlora.init(jax.random.key(9), model, base, cfg, ids), cfg)
  bank = jlora.stack_adapters(dropped, base)
  which = bank.ids(["d", "__base__", "c", "d", "d", "d"])
  plain = jlora.apply(model, base, bank, ids, adapter_ids=which)
  noisy = jlora.apply(model, base, bank, ids, adapter_ids=which, rngs={"lora_dropout": jax.random.key(1)})
  np.testing.assert_array_equal(noisy[1], model.apply({"params": base}, ids)[1])
  np.testing.assert_allclose(noisy[2], plain[2], atol=1e-6, rtol=1e-5)  # 'c' has lora_dropout 0
  assert not np.allclose(noisy[0], plain[0], atol=1e-4)


@pytest.mark.parametrize("name, options", [("llama", {"scan_layers": True})])
def test_mixed_generation_equals_generation_per_adapter(name, options):
  model, base = random_model(CONFIGS[name], **options)
  prompt = jnp.asarray(tokens((4, 5)))
  adapters = jlora.AdapterSet()
  for i, r in enumerate([2, 4]):
    cfg = jlora.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights=False)
    params = jlora.init(jax.random.key(i), model, base, cfg, prompt)
    params = jax.tree.map(lambda x: x * 4, params)  # adapters strong enough to change the greedy tokens
    adapters = adapters.add(f"t{i}", jlora.combine(jlora.split(params, cfg)[0], base), cfg)
  bank = jlora.stack_adapters(adapters, base)
  rows = ["t0", "t1", "__base__", "t1"]
  mixed = np.asarray(models.generate(model, base, prompt, max_new_tokens=5, adapters=bank, adapter_ids=rows))
  alone = {"__base__": np.asarray(models.generate(model, base, prompt, max_new_tokens=5))}
  for row in ("t0", "t1"):  # each adapter alone over the whole batch; compare the rows that chose it
    alone[row] = np.asarray(models.generate(model, adapters.params(row, base), prompt, max_new_tokens=5,
                                            apply_fn=jlora.apply_fn(model, adapters.config(row))))
  for i, row in enumerate(rows):
    np.testing.assert_array_equal(mixed[i], alone[row][i])
  assert not np.array_equal(alone["t0"], alone["__base__"])  # the adapters change what is generated
  with pytest.raises(ValueError, match=r"one id per prompt row \(4,\)"):
    models.generate(model, base, prompt, max_new_tokens=2, adapters=bank, adapter_ids=[0, 1])


def test_multi_task_training_equals_training_each_adapter_alone(net):
  """Adam on the bank from mixed batches = Adam on each adapter from its own examples (3 steps)."""
  model, ids, base, adapters, bank = net
  target = jax.random.normal(jax.random.key(5), (6, 5, 11))
  which = bank.ids(["a", "b", "c", "a", "b", "c"])
  tx = optax.adam(1e-2)

  def per_example(out, tgt):
    return jnp.mean((out - tgt) ** 2, axis=(1, 2))

  @jax.jit
  def mixed_step(bank, state):
    loss = lambda b: bank.task_mean(  # noqa: E731
        per_example(jlora.apply(model, base, b, ids, adapter_ids=which), target), which)
    grads = jax.grad(loss)(bank)
    updates, state = tx.update(grads, state, bank)
    return optax.apply_updates(bank, updates), state

  assert float(bank.task_mean(jnp.arange(6.0), ["a", "b", "c", "a", "b", "c"])) == 1.5 + 2.5 + 3.5
  with pytest.raises(ValueError, match=r"`values` \(5,\) and `ids` \(6,\) must both be \(batch,\)"):
    bank.task_mean(jnp.zeros(5), which)
  state = tx.init(bank)
  for _ in range(3):
    bank, state = mixed_step(bank, state)
  trained = bank.unstack()
  for k, name in enumerate(bank.names):
    rows = np.flatnonzero(np.asarray(which) == k)
    cfg, tree = adapters.config(name), adapters[name]

    def loss(t, cfg=cfg, rows=rows):
      out = jlora.apply(model, jlora.combine(t, base), cfg, ids[rows])
      return jnp.mean(per_example(out, target[rows]))

    alone = tx.init(tree)
    for _ in range(3):
      updates, alone = tx.update(jax.grad(loss)(tree), alone, tree)
      tree = optax.apply_updates(tree, updates)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5), trained[name], tree)
    assert not np.allclose(jax.tree.leaves(tree)[0], jax.tree.leaves(adapters[name])[0])


def test_load_adapter_set_and_weighted_adapters_join_a_set(net, tmp_path):
  model, ids, base, adapters, _ = net
  for name in ["a", "c"]:
    jlora.save_adapter(tmp_path / name, adapters.params(name, base), adapters.config(name))
  (tmp_path / "notes").mkdir()  # not a checkpoint: skipped
  loaded = jlora.load_adapter_set(tmp_path, base)
  assert loaded.names == ("a", "c")
  jax.tree.map(np.testing.assert_array_equal, dict(loaded), {n: adapters[n] for n in ("a", "c")})
  with pytest.raises(ValueError, match=r"\['b'\] are not adapter checkpoints.*\['a', 'c'\]"):
    jlora.load_adapter_set(tmp_path, base, names=["a", "b"])
  both = jlora.add_weighted_adapter([(adapters["a"], adapters.config("a")), (adapters["c"], adapters.config("c"))],
                                    [1.0, 1.0], combination_type="cat")
  grown = adapters.add("a+c", jlora.combine(both[0], base), both[1])
  bank = jlora.stack_adapters(grown, base)
  out = jlora.apply(model, base, bank, ids, adapter_ids=bank.ids("a+c"))
  np.testing.assert_allclose(out, _alone(model, base, grown, "a+c", ids), atol=1e-5, rtol=1e-5)


def test_adapters_from_peft_files_join_a_set(tmp_path):
  """`add` takes what `load_peft` returns: a PEFT adapter and a jlora one served side by side."""
  model, base = random_model(CONFIGS["gpt2"])
  prompt = jnp.asarray(tokens((2, 4)))
  cfg = jlora.LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False)
  params = jlora.init(jax.random.key(1), model, base, cfg, prompt)
  jlora.save_peft(tmp_path / "peft", model, params, cfg)
  adapters = jlora.AdapterSet().add("mine", params, cfg).add("peft", *jlora.load_peft(tmp_path / "peft", model, base))
  bank = jlora.stack_adapters(adapters, base)
  out = jlora.apply(model, base, bank, prompt, adapter_ids=bank.ids(["peft", "mine"]))
  want = jlora.apply(model, params, cfg, prompt)
  np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)


def test_traced_ids_out_of_range_give_nan_rows_never_another_output(net):
  model, ids, base, _, bank = net
  step = jax.jit(lambda i: jlora.apply(model, base, bank, ids, adapter_ids=i))
  out = np.asarray(step(jnp.array([0, 3, -2, -1, 7, 1], jnp.int32)))
  assert np.isnan(out[[1, 2, 4]]).all() and np.isfinite(out[[0, 3, 5]]).all()
