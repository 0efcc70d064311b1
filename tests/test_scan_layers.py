"""`layers_to_transform` inside an `nn.scan` stack equals the same model unrolled with the same config.

`zoo.ScanStack` (one `nn.scan` over 3 blocks, params `(3, ...)` at `layers/...`) and `zoo.LoopStack` (the same
blocks as `layers_0`, `layers_1`, `layers_2`) with the same weights: the scanned adapters of layers 0 and 2 are
copied into the unrolled model's `layers_0` / `layers_2`, and everything must agree: outputs, gradients, merged
kernels, `summary`, PEFT files; layer 1 of the stack must compute, merge and stay exactly the base.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy as stn

import jlora
from tests import zoo

L = 3
IDS = jnp.arange(12).reshape(2, 6) % 30
CFG = jlora.LoraConfig(r=2, target_modules=["query", "up"], layers_to_transform=[0, 2], init_lora_weights=False)
MODULES = (("attn", "query"), ("up",))


def _at(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _unrolled(stacked):
  """The unrolled twin of a scanned params tree: `layers/...` (L, ...) -> `layers_i/...`."""
  out = {k: v for k, v in stacked.items() if k != "layers"}
  return {**out, **{f"layers_{i}": jax.tree.map(lambda a, i=i: a[i], stacked["layers"]) for i in range(L)}}


def _close(a, b, rel=1e-5):
  a, b = np.asarray(a), np.asarray(b)
  np.testing.assert_allclose(a, b, rtol=0, atol=rel * (1.0 + float(np.abs(b).max())))


def _names(path):
  """PEFT names for both layouts: `layers` (stacked) -> `layers.{i}`, `layers_3` -> `layers.3`."""
  return ".".join("layers.{i}" if p == "layers" else p.replace("layers_", "layers.") for p in path)


def _pair(config, modules=MODULES):
  """`(base, scanned params, unrolled params)`: the same base, the scanned adapters copied into the unrolled model."""
  scan, loop = zoo.ScanStack(layers=L), zoo.LoopStack(layers=L)
  base = scan.init(jax.random.key(0), IDS)["params"]
  ps = jlora.init(jax.random.key(1), scan, base, config, IDS)
  pl = jlora.init(jax.random.key(1), loop, _unrolled(base), config, IDS)
  for i in range(L):
    for m in modules:
      node, stacked = _at(pl[f"layers_{i}"], m), _at(ps["layers"], m)
      assert ("lora_a" in node) == (i in config.layers_to_transform), "the unrolled model adapts the same layers"
      for role in ("lora_a", "lora_b", "lora_magnitude"):
        if role in node:
          node[role] = stacked[role][i]
  return base, ps, pl


@pytest.fixture(scope="module")
def pair():
  return _pair(CFG)


def test_init_keeps_the_layer_axis_and_zeros_the_other_layers(pair):
  base, ps, _ = pair
  for m in MODULES:
    node = _at(ps["layers"], m)
    np.testing.assert_array_equal(node["lora_layers"], [1.0, 0.0, 1.0])
    assert node["lora_a"].shape[0] == node["lora_b"].shape[0] == L
    assert not np.any(node["lora_a"][1]) and not np.any(node["lora_b"][1])
    assert np.any(node["lora_b"][0]) and np.any(node["lora_b"][2])
    assert node["kernel"] is _at(base["layers"], m)["kernel"], "the base is not copied"
  assert jlora.labels(ps, CFG)["layers"]["up"]["lora_layers"] == "lora_layers"
  trainable = jlora.split(ps, CFG)[0]
  assert "lora_layers" in trainable["layers"]["up"], "the mask is part of the adapter"
  assert not jlora.trainable_mask(ps, CFG)["layers"]["up"]["lora_layers"]


def test_forward_and_gradients_equal_the_unrolled_model(pair):
  base, ps, pl = pair
  scan, loop = zoo.ScanStack(layers=L), zoo.LoopStack(layers=L)
  y_scan = jax.jit(lambda p: jlora.apply(scan, p, CFG, IDS))(ps)  # eagerly: test_files_equal_the_unrolled_model
  _close(y_scan, jax.jit(lambda p: jlora.apply(loop, p, CFG, IDS))(pl))
  assert not np.allclose(y_scan, scan.apply({"params": base}, IDS), atol=1e-3), "the adapters act"

  def grads(model, params):
    trainable, frozen = jlora.split(params, CFG)
    loss = lambda t: jnp.sum(jlora.apply(model, jlora.combine(t, frozen), CFG, IDS) ** 2)  # noqa: E731
    return jax.jit(jax.grad(loss))(trainable)

  gs, gl = grads(scan, ps), grads(loop, pl)
  for m in MODULES:
    node = _at(gs["layers"], m)
    for role in ("lora_a", "lora_b"):
      for i in (0, 2):
        _close(node[role][i], _at(gl[f"layers_{i}"], m)[role], rel=1e-4)
      assert np.any(node[role][0]) and not np.any(node[role][1]), "no gradient reaches layer 1"
    assert not np.any(node["lora_layers"])


def test_training_never_moves_the_other_layers(pair):
  _, ps, _ = pair
  scan = zoo.ScanStack(layers=L)
  trainable, frozen = jlora.split(ps, CFG)
  grad = jax.jit(jax.grad(lambda t, f: jnp.mean(jlora.apply(scan, jlora.combine(t, f), CFG, IDS) ** 2)))
  for tx in (optax.adamw(1e-2, weight_decay=0.1), jlora.optimizer(optax.adamw(1e-2, weight_decay=0.1), CFG)):
    t, state = trainable, tx.init(trainable)
    for _ in range(2):
      updates, state = tx.update(grad(t, frozen), state, t)
      t = optax.apply_updates(t, updates)
    node = t["layers"]["up"]
    assert not np.any(node["lora_a"][1]) and not np.any(node["lora_b"][1])
    assert not np.array_equal(node["lora_b"][0], trainable["layers"]["up"]["lora_b"][0]), "layers 0, 2 train"
    assert jlora.core.stacks.layers(node["lora_layers"]) == (0, 2)
  np.testing.assert_array_equal(t["layers"]["up"]["lora_layers"], [1.0, 0.0, 1.0])  # jlora.optimizer: bit-identical


def test_merge_unmerge_and_summary_equal_the_unrolled_model(pair):
  base, ps, pl = pair
  ms, ml = jlora.merge(ps, CFG), jlora.merge(pl, CFG)
  for m in MODULES:
    kernel = _at(ms["layers"], m)["kernel"]
    np.testing.assert_array_equal(kernel[1], _at(base["layers"], m)["kernel"][1])
    for i in (0, 2):
      _close(kernel[i], _at(ml[f"layers_{i}"], m)["kernel"])
    assert "lora_layers" not in _at(ms["layers"], m)
  back = jlora.unmerge(ms, jlora.split(ps, CFG)[0], CFG)
  for m in MODULES:
    np.testing.assert_array_equal(_at(back["layers"], m)["kernel"][1], _at(base["layers"], m)["kernel"][1])
    _close(_at(back["layers"], m)["kernel"], _at(base["layers"], m)["kernel"])
    np.testing.assert_array_equal(_at(back["layers"], m)["lora_layers"], [1.0, 0.0, 1.0])
  ss, sl = jlora.summary(ps, CFG), jlora.summary(pl, CFG)
  assert (ss.trainable, ss.total, ss.adapter_params, ss.trainable_bytes) == (
      sl.trainable, sl.total, sl.adapter_params, sl.trainable_bytes)
  assert ss.adapter_params == 2 * (2 * (16 + 16) + 2 * (16 + 32))
  assert sum(r.base_params for r in ss.rows) == sum(r.base_params for r in sl.rows)  # the picked layers' kernels


def test_files_equal_the_unrolled_model(pair, tmp_path):
  base, ps, pl = pair
  scan = zoo.ScanStack(layers=L)
  jlora.save_peft(tmp_path / "scan", None, ps, CFG, name_map=_names)
  jlora.save_peft(tmp_path / "loop", None, pl, CFG, name_map=_names)
  ts, tl = (stn.load_file(tmp_path / d / "adapter_model.safetensors") for d in ("scan", "loop"))
  assert sorted(ts) == sorted(tl) and not any(".layers.1." in k for k in ts)
  for k in ts:
    np.testing.assert_array_equal(ts[k], tl[k])
  configs = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("scan", "loop")]
  assert configs[0] == configs[1]
  y = jlora.apply(scan, ps, CFG, IDS)
  for d in ("scan", "loop"):  # either file onto the scanned model
    loaded, config = jlora.load_peft(tmp_path / d, None, base, name_map=_names)
    np.testing.assert_array_equal(loaded["layers"]["up"]["lora_layers"], [1.0, 0.0, 1.0])
    assert config.layers_to_transform == (0, 2)
    _close(jlora.apply(scan, loaded, config, IDS), y)
  jlora.save_adapter(tmp_path / "ckpt", ps, CFG)
  loaded, config = jlora.load_adapter(tmp_path / "ckpt", base)
  np.testing.assert_array_equal(jlora.apply(scan, loaded, config, IDS), y)
  adapters = jlora.AdapterSet().add("top", jlora.split(ps, CFG)[0], CFG)
  np.testing.assert_array_equal(jlora.apply(scan, adapters.params("top", base), CFG, IDS), y)


def test_dora_equals_the_unrolled_model():
  config = jlora.LoraConfig(r=2, target_modules=["up"], layers_to_transform=[1], use_dora=True,
                            init_lora_weights=False)
  base, ps, pl = _pair(config, (("up",),))
  y = jlora.apply(zoo.ScanStack(layers=L), ps, config, IDS)
  _close(y, jlora.apply(zoo.LoopStack(layers=L), pl, config, IDS))
  merged = jlora.merge(ps, config)["layers"]["up"]["kernel"]
  for i in (0, 2):
    np.testing.assert_array_equal(merged[i], base["layers"]["up"]["kernel"][i])
  _close(merged[1], jlora.merge(pl, config)["layers_1"]["up"]["kernel"])


def test_layers_pattern_names_the_stack_and_stale_configs_are_refused(pair):
  base, ps, _ = pair
  scan = zoo.ScanStack(layers=L)
  with_pattern = jlora.LoraConfig(r=2, target_modules=["up"], layers_to_transform=[2], layers_pattern="layers")
  assert jlora.core.stacks.layers(jlora.init(jax.random.key(0), scan, base, with_pattern, IDS)["layers"]["up"][
      "lora_layers"]) == (2,)
  with pytest.raises(ValueError, match=r"selected no module \(layers_pattern=\('blocks',\)\)"):
    jlora.init(jax.random.key(0), scan, base, jlora.LoraConfig(r=2, target_modules=["up"], layers_to_transform=[2],
                                                               layers_pattern="blocks"), IDS)
  narrower = jlora.LoraConfig(r=2, target_modules=["query", "up"], layers_to_transform=[0], init_lora_weights=False)
  with pytest.raises(ValueError, match=r"adapts layers \[0, 2\] of its stack of 3, but the config's "
                                       r"layers_to_transform=\[0\] picks \[0\]"):
    jlora.apply(scan, ps, narrower, IDS)
  with pytest.raises(ValueError, match=r"holds a layer mask .* picks no layers inside this stack"):
    jlora.merge(ps, jlora.LoraConfig(r=2, target_modules=["query", "up"], init_lora_weights=False))


def test_mixed_batches_hold_zeros_at_the_other_layers_and_weighted_combinations_refuse(pair):
  """A bank (`jlora generate` runs adapters through one) holds a LoRA adapter of some layers with zeros at the
  others: example 0 gets the adapter's output, example 1 (id -1) the base's."""
  base, ps, _ = pair
  scan = zoo.ScanStack(layers=L)
  bank = jlora.stack_adapters(jlora.AdapterSet().add("top", jlora.split(ps, CFG)[0], CFG), base)
  y = jax.jit(lambda b, p: jlora.apply(scan, p, b, IDS, adapter_ids=jnp.array([0, -1])))(bank, base)
  _close(y[0], jax.jit(lambda p: jlora.apply(scan, p, CFG, IDS))(ps)[0])
  _close(y[1], scan.apply({"params": base}, IDS)[1])
  with pytest.raises(ValueError, match=r"adapts some layers of the scanned stack\(s\)"):
    jlora.add_weighted_adapter([(jlora.split(ps, CFG)[0], CFG)], [1.0], kernels=base)


def test_plain_trees_merge_per_layer_and_equinox_refuses():
  """`init_tree` (a stacked weight with a declared layout) gets the mask, and `merge` (so `apply_merged`) honours
  it; Equinox's `filter_vmap` stacks have no per-layer mask and refuse, as `jlora.nnx` does (tests/test_nnx.py)."""
  eqx = pytest.importorskip("equinox")
  from jlora import equinox as leqx
  w = jax.random.normal(jax.random.key(0), (L, 4, 5))
  config = jlora.LoraConfig(r=2, target_modules=["layers"], layers_to_transform=[0, 2], init_lora_weights=False)
  p = jlora.init_tree(jax.random.key(1), {"layers": {"w": w}}, config, layout={"w": ((1,), (2,))})
  node = p["layers"]
  np.testing.assert_array_equal(node["lora_layers"], [1.0, 0.0, 1.0])
  merged = jlora.merge(p, config)["layers"]["w"]
  np.testing.assert_array_equal(merged[1], w[1])
  for i in (0, 2):
    _close(merged[i], w[i] + config.scale_for("layers") * node["lora_a"][i] @ node["lora_b"][i])

  class Stacked(eqx.Module):
    layers: eqx.nn.Linear

  model = Stacked(eqx.filter_vmap(lambda k: eqx.nn.Linear(4, 4, key=k))(jax.random.split(jax.random.key(0), L)))
  with pytest.raises(ValueError, match=r"jlora.equinox.init: `layers_to_transform` cannot pick layers inside the "
                                       r"scanned stack at 'layers' \(its 3 layers"):
    leqx.init(jax.random.key(1), model, config)
