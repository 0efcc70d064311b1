"""The generic path for models that are not linen modules: `init_tree` + `apply_merged` on real Haiku and NNX trees,
declared N-D layouts, `(out, in)` weights, integer and `/` keys through save/load and PEFT, and the type errors."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import jlora
from jlora.core import keys as _keys
from tests.test_structure import _dot_shapes

hk = pytest.importorskip("haiku", reason="dm-haiku (the dev extra) is needed for the Haiku tests")


pytestmark = pytest.mark.usefixtures("float32_matmuls")  # tests/conftest.py


@pytest.fixture(scope="module")
def haiku_model():
  """A Haiku transformer block (attention, MLP, head), randomly initialised: `(transformed, params, x)`."""
  init = hk.initializers.RandomNormal(0.3)  # cheaper to compile than the default truncated normal

  def forward(x):
    h = x + hk.MultiHeadAttention(num_heads=2, key_size=4, w_init=init, name="attn")(x, x, x)
    h = jax.nn.gelu(hk.nets.MLP([16, 8], w_init=init, name="mlp")(h))
    return hk.Linear(3, w_init=init, name="head")(h)

  f = hk.transform(forward)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 8)), jnp.float32)
  return f, jax.jit(f.init)(jax.random.key(1), x), x


def _normal(*shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _trained(params, seed=1):
  """Every `lora_b` (zeros at init) filled with N(0, 0.5²) values, as if trained (numpy: nothing to compile)."""
  rng = np.random.default_rng(seed)

  def fill(tree):
    return {k: fill(v) if isinstance(v, dict) else
            (jnp.asarray(0.5 * rng.standard_normal(v.shape), v.dtype) if k == "lora_b" else v)
            for k, v in tree.items()}

  return fill(params)


def _adapted(params):
  return sorted("/".join(p) for p, _ in jlora.core.tree.adapted_modules(params))


def _by_hand(params, cfg):
  """`W0 + s·A·B` with numpy, per module, for `(in, out)` weights (the expected merge)."""
  out = {}
  for k, node in params.items():
    node = dict(node)
    if "lora_a" in node:
      s = cfg.scale_for(k)
      w = np.asarray(node["w"], np.float64) + s * np.asarray(node.pop("lora_a"), np.float64) @ np.asarray(
          node.pop("lora_b"), np.float64)
      node["w"] = jnp.asarray(w, jnp.float32)
    out[k] = node
  return out


# ------------------------------------------------------------------ Haiku
def test_haiku_targets_by_name_and_all_linear_skips_the_head(haiku_model):
  _, params, _ = haiku_model
  assert "mlp/~/linear_0" in params and "attn/query" in params  # Haiku's flat "/"-joined module keys
  key = jax.random.key(2)
  by_name = jlora.init_tree(key, params, jlora.LoraConfig(r=2, target_modules=["query", "value", "linear_0"]))
  assert _adapted(by_name) == ["attn/query", "attn/value", "mlp/~/linear_0"]
  dotted = jlora.init_tree(key, params, jlora.LoraConfig(r=2, target_modules=["attn.query", "mlp/~/linear_1"]))
  assert _adapted(dotted) == ["attn/query", "mlp/~/linear_1"]
  regex = jlora.init_tree(key, params, jlora.LoraConfig(r=2, target_modules=r"attn/(key|linear)"))
  assert _adapted(regex) == ["attn/key", "attn/linear"]
  every = jlora.init_tree(key, params, jlora.LoraConfig(r=2, target_modules="all-linear"))
  assert _adapted(every) == sorted(k for k in params if k != "head")
  assert by_name["attn/query"]["lora_a"].shape == (8, 2) and by_name["attn/query"]["lora_b"].shape == (2, 8)
  np.testing.assert_array_equal(by_name["attn/query"]["lora_b"], 0)  # B = 0: the adapted model is the base
  with pytest.raises(ValueError, match=r"(?s)matched no module.*mlp/~/linear_0"):
    jlora.init_tree(key, params, jlora.LoraConfig(r=2, target_modules=["nope"]))


def test_haiku_apply_merged_is_the_lora_math_and_trains_only_adapters(haiku_model):
  f, params, x = haiku_model
  cfg = jlora.LoraConfig(r=2, lora_alpha=6, target_modules=["query", "value", "linear_0"])
  lp = _trained(jlora.init_tree(jax.random.key(2), params, cfg))
  y = jax.jit(lambda p, x: jlora.apply_merged(f.apply, p, cfg, None, x))(lp, x)
  plain = jax.jit(f.apply)
  np.testing.assert_allclose(y, plain(_by_hand(lp, cfg), None, x), atol=2e-5, rtol=0)
  assert np.abs(y - plain(params, None, x)).max() > 1e-2  # not a no-op
  # One adapted layer alone: x·W + b + s·(x·A)·B, factored by hand.
  q = lp["attn/query"]
  lin = hk.transform(lambda v: hk.Linear(8, name="query")(v))
  yq = jlora.apply_merged(lin.apply, {"query": q}, cfg, None, x)
  expected = x @ q["w"] + q["b"] + cfg.scale_for("attn/query") * (x @ q["lora_a"]) @ q["lora_b"]
  np.testing.assert_allclose(yq, expected, atol=2e-5, rtol=0)
  trainable, frozen = jlora.split(lp, cfg)
  grads = jax.jit(jax.grad(lambda t, fr: jnp.sum(jlora.apply_merged(f.apply, jlora.combine(t, fr), cfg, None, x))))(
      trainable, frozen)
  assert jax.tree.structure(grads) == jax.tree.structure(trainable)
  assert sorted(grads) == ["attn/query", "attn/value", "mlp/~/linear_0"]
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


def test_haiku_factored_apply_equals_the_merge_and_forms_no_weight_gradient(haiku_model):
  import jlora.haiku

  f, params, x = haiku_model
  cfg = jlora.LoraConfig(r=2, lora_alpha=6, target_modules="all-linear")
  lp = _trained(jlora.init_tree(jax.random.key(2), params, cfg))
  factored = jax.jit(lambda p, x: jlora.haiku.apply(f.apply, p, cfg, None, x))
  np.testing.assert_allclose(factored(lp, x), jlora.apply_merged(jax.jit(f.apply), lp, cfg, None, x), atol=2e-5, rtol=1e-5)
  trainable, frozen = jlora.split(lp, cfg)
  jaxpr = jax.make_jaxpr(jax.grad(lambda t: jnp.sum(jlora.haiku.apply(f.apply, jlora.combine(t, frozen), cfg, None,
                                                                      x))))(trainable).jaxpr
  assert not {(8, 8), (8, 16), (16, 8)} & set(_dot_shapes(jaxpr))  # no d_in x d_out weight gradient
  unused = {**lp, "elsewhere": {"w": jnp.ones((8, 8)), "lora_a": jnp.ones((8, 2)), "lora_b": jnp.ones((2, 8))}}
  with pytest.raises(ValueError, match=r"\['elsewhere'\] were not used.*apply_merged"):
    jlora.haiku.apply(f.apply, unused, cfg, None, x)
  with pytest.raises(TypeError, match=r"transformed\.apply"):
    jlora.haiku.apply(f, lp, cfg, None, x)


def test_haiku_adapters_save_and_load_with_slashes_in_keys(haiku_model, tmp_path):
  f, params, x = haiku_model
  cfg = jlora.LoraConfig(r=2, target_modules=["query", "linear_0"])
  lp = _trained(jlora.init_tree(jax.random.key(2), params, cfg))
  lp["odd%2F/name"] = {"w": jnp.ones((8, 8)), "lora_a": jnp.full((8, 2), 0.5), "lora_b": jnp.full((2, 8), 0.25)}
  jlora.save_adapter(tmp_path / "ckpt", lp, cfg)
  base = {k: {n: v for n, v in node.items() if not n.startswith("lora_")} for k, node in lp.items()}
  loaded, cfg2 = jlora.load_adapter(tmp_path / "ckpt", base)
  assert cfg2 == cfg and jax.tree.structure(loaded) == jax.tree.structure(lp)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(lp)):
    np.testing.assert_array_equal(a, b)
  del loaded["odd%2F/name"]
  np.testing.assert_array_equal(jlora.apply_merged(f.apply, loaded, cfg, None, x),
                                jlora.apply_merged(f.apply, {k: v for k, v in lp.items() if k != "odd%2F/name"}, cfg,
                                                   None, x))


def test_checkpoint_keys_of_ordinary_trees_are_unchanged(tmp_path):
  """Escaping touches only keys holding `/` or `%`: the metadata of an ordinary tree reads as before."""
  params = {"enc": {"q": {"kernel": jnp.ones((4, 4))}}}
  cfg = jlora.LoraConfig(r=2, target_modules=["q"])
  jlora.save_adapter(tmp_path / "c", jlora.init_tree(jax.random.key(0), params, cfg), cfg)
  meta = json.loads((tmp_path / "c" / "1" / "meta" / "metadata").read_text())
  assert sorted(meta["trainable"]) == ["enc/q/lora_a", "enc/q/lora_b"] and list(meta["base"]) == ["enc/q/kernel"]
  assert [_keys.escape(k) for k in ("a/b", "50%", "%2F")] == ["a%2Fb", "50%25", "%252F"]
  assert all(_keys.unescape(_keys.escape(k)) == k for k in ("a/b", "50%", "%2F", "%25/", "plain"))


def test_non_linen_models_get_type_errors_that_say_what_to_use(haiku_model):
  f, params, x = haiku_model
  cfg = jlora.LoraConfig(r=2, target_modules=["query"])
  for model in (f, f.apply):
    with pytest.raises(TypeError, match=r"flax.linen Module.*jlora.init_tree"):
      jlora.apply(model, params, cfg, x)
    with pytest.raises(TypeError, match=r"flax.linen Module.*jlora.init_tree"):
      jlora.init(jax.random.key(0), model, params, cfg, x)
  lp = jlora.init_tree(jax.random.key(0), params, cfg)
  with pytest.raises(TypeError, match=r"pass its `apply`"):
    jlora.apply_merged(f, lp, cfg, None, x)
  with pytest.raises(TypeError, match="out of order"):
    jlora.apply_merged(lp, f.apply, cfg, None, x)
  with pytest.raises(TypeError, match=r"Flax module.*jlora.apply"):
    jlora.apply_merged(nn.Dense(3), lp, cfg, x)
  with pytest.raises(TypeError, match="LoraConfig"):
    jlora.init_tree(jax.random.key(0), params, {"r": 2})


# ------------------------------------------------------------------ NNX pure dicts: integer keys, N-D kernels
def _nnx():
  from flax import nnx

  init = nnx.initializers.normal(0.3)  # cheaper to compile than the default truncated normal

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=8, qkv_features=8, decode=False, kernel_init=init,
                                         rngs=rngs)
      self.layers = nnx.List([nnx.Linear(8, 8, kernel_init=init, rngs=rngs) for _ in range(2)])
      self.head = nnx.Linear(8, 3, kernel_init=init, rngs=rngs)

    def __call__(self, x):
      h = x + self.attn(x)
      for layer in self.layers:
        h = jax.nn.relu(layer(h))
      return self.head(h)

  model = Model(nnx.Rngs(0))
  graphdef, state = nnx.split(model)

  def run(pure, x):
    st = jax.tree.map(lambda v: v, state)
    nnx.replace_by_pure_dict(st, pure)
    return nnx.merge(graphdef, st)(x)

  return jax.jit(run), nnx.to_pure_dict(state), _normal(2, 5, 8, seed=3)


def test_nnx_pure_dict_integer_keys_and_declared_nd_layouts():
  run, pure, x = _nnx()
  assert 0 in pure["layers"]  # integer keys
  layout = {"attn/out/kernel": ((0, 1), (2,)), "query/kernel": ((0,), (1, 2)), "value/kernel": ((0,), (-2, -1))}
  cfg = jlora.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value", "out", "layers.1"])
  lp = _trained(jlora.init_tree(jax.random.key(4), pure, cfg, layout=layout))
  assert 1 in lp["layers"] and "lora_a" in lp["layers"][1] and "lora_a" not in lp["layers"][0]
  q, o = lp["attn"]["query"], lp["attn"]["out"]
  assert q["lora_a"].shape == (8, 2) and q["lora_b"].shape == (2, 2, 4)  # A on the inputs, B on (heads, head_dim)
  assert o["lora_a"].shape == (2, 4, 2) and o["lora_b"].shape == (2, 8)
  merged = jlora.merge(_keys.stringify(lp), cfg)
  s = cfg.scale_for("attn/query")
  np.testing.assert_allclose(merged["attn"]["query"]["kernel"],
                             q["kernel"] + s * np.einsum("ir,rhk->ihk", q["lora_a"], q["lora_b"]), atol=1e-6, rtol=1e-5)
  np.testing.assert_allclose(merged["attn"]["out"]["kernel"],
                             o["kernel"] + s * np.einsum("hkr,ro->hko", o["lora_a"], o["lora_b"]), atol=1e-6, rtol=1e-5)
  y = jlora.apply_merged(run, lp, cfg, x)
  by_hand = jax.tree.map(lambda v: v, pure)
  for where in (("attn", "query"), ("attn", "value"), ("attn", "out"), ("layers", 1)):
    node = lp[where[0]][where[1]]
    delta = np.tensordot(np.asarray(node["lora_a"]), np.asarray(node["lora_b"]), axes=1)
    by_hand[where[0]][where[1]]["kernel"] = node["kernel"] + s * delta.reshape(node["kernel"].shape)
  np.testing.assert_allclose(y, run(by_hand, x), atol=2e-5, rtol=0)
  assert np.abs(y - run(pure, x)).max() > 1e-2
  with pytest.raises(ValueError, match=r"(?s)attn/key.*no declared layout.*layout="):
    jlora.init_tree(jax.random.key(4), pure, jlora.LoraConfig(r=2, target_modules=["key"]))


def test_declared_layouts_stacks_shared_axes_and_errors():
  key = jax.random.key(0)
  w = _normal(3, 8, 2, 4)  # 3 stacked layers of (d, heads, head_dim)
  heads = _normal(8, 2, 4, seed=1)  # (d_in, heads, d_out): per-head weights, heads shared
  params = {"qkv": {"w": w}, "per_head": {"w": heads}, "torch": {"weight": _normal(5, 8, seed=2)}}
  layout = lambda path, leaf: {"qkv": ((-3,), (-2, -1)), "per_head": ((0,), (2,))}.get(path[0])  # noqa: E731
  cfg = jlora.LoraConfig(r=2, target_modules="all-linear")
  lp = _trained(jlora.init_tree(key, params, cfg, layout=layout))
  assert lp["qkv"]["lora_a"].shape == (3, 8, 2) and lp["qkv"]["lora_b"].shape == (3, 2, 2, 4)  # stacked, concat
  assert lp["per_head"]["lora_a"].shape == (8, 2, 1, 2) and lp["per_head"]["lora_b"].shape == (1, 2, 4, 2)
  assert lp["torch"]["lora_a"].shape == (1, 8, 2) and lp["torch"]["lora_b"].shape == (5, 1, 2)  # (out, in)
  merged, s = jlora.merge(lp, cfg), cfg.scale_for("qkv")
  np.testing.assert_allclose(merged["qkv"]["w"], w + s * np.einsum("lir,lrhk->lihk", lp["qkv"]["lora_a"],
                                                                   lp["qkv"]["lora_b"]), atol=1e-5, rtol=1e-5)
  ph = lp["per_head"]
  np.testing.assert_allclose(merged["per_head"]["w"],
                             heads + s * np.einsum("ihr,hor->iho", ph["lora_a"][:, :, 0], ph["lora_b"][0]), atol=1e-5, rtol=1e-5)
  t = lp["torch"]
  np.testing.assert_allclose(merged["torch"]["weight"],  # delta = s·(A·B)ᵀ in the (out, in) layout
                             t["weight"] + s * (t["lora_a"][0] @ t["lora_b"][:, 0].T).T, atol=1e-5, rtol=1e-5)
  with pytest.raises(TypeError, match=r"pair \(input axes, output axes\)"):
    jlora.init_tree(key, params, cfg, layout={"qkv": "ij"})
  with pytest.raises(ValueError, match="names an axis twice"):
    jlora.init_tree(key, params, cfg, layout={"qkv": ((1,), (1, 2))})
  with pytest.raises(ValueError, match="at least one input and one output axis"):
    jlora.init_tree(key, params, cfg, layout={"qkv": ((1,), (9,))})


# ------------------------------------------------------------------ PEFT: (out, in) weights
def test_peft_round_trip_of_out_in_weights_keeps_the_roles(tmp_path):
  """Square `(out, in)` weights: only the layout tells A from B; the files hold PEFT's (r, in) / (out, r)."""
  params = {"layers": {0: {"weight": _normal(6, 6), "bias": jnp.zeros(6)}, 1: {"weight": _normal(4, 6, seed=1)}}}
  cfg = jlora.LoraConfig(r=2, target_modules="all-linear")
  lp = _trained(jlora.init_tree(jax.random.key(1), params, cfg))
  jlora.save_peft(tmp_path / "a", None, lp, cfg, name_map="flax")
  w = safetensors.numpy.load_file(os.path.join(tmp_path / "a", "adapter_model.safetensors"))
  a, b = w["base_model.model.layers.1.lora_A.weight"], w["base_model.model.layers.1.lora_B.weight"]
  assert a.shape == (2, 6) and b.shape == (4, 2)
  np.testing.assert_array_equal(a, np.asarray(lp["layers"][1]["lora_a"])[0].T)
  np.testing.assert_array_equal(b, np.asarray(lp["layers"][1]["lora_b"])[:, 0])
  s = cfg.scale_for("layers/1")
  np.testing.assert_allclose(jlora.merge(_keys.stringify(lp), cfg)["layers"]["1"]["weight"],
                             params["layers"][1]["weight"] + s * b @ a, atol=1e-5, rtol=1e-5)  # PEFT's W + s·B·A
  loaded, _ = jlora.load_peft(tmp_path / "a", None, params, name_map="flax")
  assert jax.tree.structure(loaded) == jax.tree.structure(lp)
  for x, y in zip(jax.tree.leaves(loaded), jax.tree.leaves(lp)):
    np.testing.assert_array_equal(x, y)
  # A square `w` declared (out, in): without the layout it would be read as (in, out).
  mine = {"fc": {"w": params["layers"][0]["weight"]}}
  declared = _trained(jlora.init_tree(jax.random.key(1), mine, cfg, layout={"w": ((1,), (0,))}))
  jlora.save_peft(tmp_path / "b", None, declared, cfg, name_map="flax")
  back, _ = jlora.load_peft(tmp_path / "b", None, mine, name_map="flax", layout={"w": ((1,), (0,))})
  np.testing.assert_array_equal(back["fc"]["lora_a"], declared["fc"]["lora_a"])
  assert back["fc"]["lora_a"].shape == (1, 6, 2)


def test_peft_refuses_broadcast_adapters_of_more_than_two_axes(tmp_path):
  params = {"per_head": {"w": jnp.ones((8, 2, 4))}}
  cfg = jlora.LoraConfig(r=2, target_modules=["per_head"])
  lp = jlora.init_tree(jax.random.key(0), params, cfg, layout={"w": ((0,), (2,))})
  with pytest.raises(ValueError, match=r"not an \(out, in\) weight per layer"):
    jlora.save_peft(tmp_path, None, lp, cfg, name_map="flax")


@pytest.mark.parametrize("name", ["jlora.core.init", "jlora.core.merge", "jlora.haiku"])
def test_docstring_examples_run(name):
  import doctest
  import importlib

  result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0


def test_haiku_lora_dropout_uses_the_rng_and_layers_are_picked_through_slash_keys(haiku_model):
  import jlora.haiku

  f, params, x = haiku_model
  cfg = jlora.LoraConfig(r=2, target_modules=["linear_0", "linear_1"], layers_to_transform=[1],
                         layers_pattern="linear")
  assert _adapted(jlora.init_tree(jax.random.key(2), params, cfg)) == ["mlp/~/linear_1"]
  drop = jlora.LoraConfig(r=2, target_modules=["linear_0"], lora_dropout=0.5)
  lp = _trained(jlora.init_tree(jax.random.key(2), params, drop))
  plain = jlora.haiku.apply(f.apply, lp, drop, None, x)  # no rng: no dropout
  np.testing.assert_allclose(plain, jlora.apply_merged(f.apply, lp, drop, None, x), atol=2e-5, rtol=1e-5)
  dropped = jlora.haiku.apply(f.apply, lp, drop, jax.random.key(5), x)
  assert float(jnp.max(jnp.abs(dropped - plain))) > 1e-3
  np.testing.assert_allclose(jlora.haiku.apply(f.apply, lp, drop, jax.random.key(5), x), dropped)  # same key
  with pytest.raises(ValueError, match="does not select"):
    jlora.haiku.apply(f.apply, lp, jlora.LoraConfig(r=2, target_modules=["linear_1"]), None, x)
