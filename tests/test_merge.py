"""merge / unmerge: equivalence, idempotence, safety, errors; PiSSA; apply-time validation."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from tests import zoo

CASES = {c.name: c for c in zoo.cases()}


def _adapted(name="attention", **kw):
  case = CASES[name]
  kw.setdefault("init_lora_weights", False)
  cfg = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=case.targets, **kw)
  base = zoo.build(case)
  return case, cfg, base, jlora.init(jax.random.key(1), case.model, base, cfg, case.inputs)


@pytest.mark.parametrize("name", ["attention", "einsum", "conv", "embed", "scan"])
def test_unmerge_restores_base(name):
  case, cfg, _base, params = _adapted(name)
  merged = jlora.merge(params, cfg)
  restored = jlora.unmerge(merged, params, cfg)
  assert jax.tree.structure(restored) == jax.tree.structure(params)
  chex.assert_trees_all_close(restored, params, rtol=1e-5, atol=1e-5)
  trainable, _ = jlora.split(params, cfg)
  chex.assert_trees_all_close(jlora.unmerge(merged, trainable, cfg), params, rtol=1e-5, atol=1e-5)
  y_unmerged = jlora.apply(case.model, restored, cfg, case.inputs)
  np.testing.assert_allclose(y_unmerged, case.model.apply({"params": merged}, case.inputs), rtol=1e-4, atol=1e-5)


def test_merged_differs_from_base_and_double_merge_refused():
  case, cfg, base, params = _adapted()
  merged = jlora.merge(params, cfg)
  assert not np.allclose(merged["query"]["kernel"], base["query"]["kernel"])
  with pytest.raises(ValueError, match="holds no LoRA adapter"):
    jlora.merge(merged, cfg)
  with pytest.raises(ValueError, match="holds no LoRA adapter"):
    jlora.apply(case.model, merged, cfg, case.inputs)


def test_safe_merge_raises_on_nan():
  _, cfg, _, params = _adapted()
  params["value"]["lora_b"] = params["value"]["lora_b"].at[0, 0, 0].set(jnp.nan)
  with pytest.raises(ValueError, match=r"merged kernel at 'value/kernel' has NaN or inf"):
    jlora.merge(params, cfg, safe=True)
  with pytest.raises(ValueError, match=r"cannot run under jax\.jit"):
    jax.jit(lambda p: jlora.merge(p, cfg, safe=True))(params)


def test_rank_mismatch_names_path():
  case, _cfg, _, params = _adapted()
  wrong = jlora.LoraConfig(r=2, lora_alpha=8, target_modules=case.targets)
  with pytest.raises(ValueError, match="Adapter at 'query' has rank 4 but the config gives r=2"):
    jlora.merge(params, wrong)
  with pytest.raises(ValueError, match="Adapter at 'query' has rank 4 but the config gives r=2"):
    jlora.apply(case.model, params, wrong, case.inputs)


def test_shape_mismatch_names_path():
  case, cfg, _, params = _adapted()
  params["query"]["lora_a"] = jnp.zeros((7, 4))
  with pytest.raises(ValueError, match=r"Adapter at 'query' does not fit its kernel \(16, 2, 8\)"):
    jlora.merge(params, cfg)
  with pytest.raises(ValueError, match=r"Adapter at 'query' does not fit its kernel"):
    jlora.apply(case.model, params, cfg, case.inputs)


def test_stale_config_detected_at_apply():
  case, _cfg, _, params = _adapted()
  other = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=["query"])
  with pytest.raises(ValueError, match="holds an adapter at 'value', which the config"):
    jlora.apply(case.model, params, other, case.inputs)


def test_incomplete_adapter():
  _, cfg, _, params = _adapted()
  del params["query"]["lora_b"]
  with pytest.raises(ValueError, match="has only one of lora_a / lora_b"):
    jlora.merge(params, cfg)


def test_merge_split_tree_explains():
  _, cfg, _, params = _adapted()
  trainable, _ = jlora.split(params, cfg)
  with pytest.raises(ValueError, match="no single weight"):
    jlora.merge(trainable, cfg)


@pytest.mark.parametrize("name", ["mlp", "attention", "einsum", "conv", "embed", "scan"])
def test_init_statistics_and_zero_b(name):
  case, cfg, _, params = _adapted(name, init_lora_weights=True)
  y = jlora.apply(case.model, params, cfg, case.inputs)
  np.testing.assert_allclose(y, case.model.apply({"params": zoo.build(case)}, case.inputs), rtol=1e-5, atol=1e-5)


def test_init_distributions():
  model, x = zoo.MLP(features=(256, 8)), jnp.ones((1, 512))
  base = model.init(jax.random.key(0), x)["params"]
  for method, check in [(True, "uniform"), ("gaussian", "normal")]:
    cfg = jlora.LoraConfig(r=16, target_modules=["fc_0"], init_lora_weights=method)
    p = jlora.init(jax.random.key(1), model, base, cfg, x)["fc_0"]
    a = np.asarray(p["lora_a"])
    assert np.all(p["lora_b"] == 0)
    if check == "uniform":
      bound = 1 / np.sqrt(512)
      assert a.max() <= bound and a.min() >= -bound and a.std() == pytest.approx(bound / np.sqrt(3), rel=0.05)
    else:
      assert a.std() == pytest.approx(1 / 16, rel=0.05)
  emb = zoo.EmbedLM()
  ids = jnp.zeros((1, 3), jnp.int32)
  cfg = jlora.LoraConfig(r=4, target_modules=["embed"])
  p = jlora.init(jax.random.key(1), emb, emb.init(jax.random.key(0), ids)["params"], cfg, ids)["embed"]
  assert np.all(p["lora_a"] == 0) and p["lora_b"].std() == pytest.approx(1.0, rel=0.3)


@pytest.mark.parametrize("name", ["mlp", "einsum", "conv", "scan"])
def test_pissa(name):
  case = CASES[name]
  targets = ("qkv", "out") if name == "einsum" else case.targets
  cfg = jlora.LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights="pissa")
  base = zoo.build(case)
  params = jlora.init(jax.random.key(1), case.model, base, cfg, case.inputs)
  y0 = case.model.apply({"params": base}, case.inputs)
  np.testing.assert_allclose(jlora.apply(case.model, params, cfg, case.inputs), y0, rtol=1e-4, atol=1e-4)
  chex.assert_trees_all_close(jlora.merge(params, cfg), base, rtol=1e-4, atol=1e-5)
  # The adapter holds the principal subspace: its delta is W0's best rank-r approximation.
  path = {"mlp": ("fc_0",), "einsum": ("out",), "conv": ("conv1",), "scan": ("layers", "up")}[name]
  node, w0 = params, base
  for k in path:
    node, w0 = node[k], w0[k]
  residual = np.asarray(node["kernel"], np.float64)
  w = np.asarray(w0["kernel"], np.float64)
  if name == "scan":
    residual, w = residual[0], w[0]
  sv = np.linalg.svd(w.reshape(-1, w.shape[-1]), compute_uv=False)
  np.testing.assert_allclose(np.linalg.norm(residual), np.sqrt((sv[2:] ** 2).sum()), rtol=1e-3)


def test_pissa_refuses_shared_axis_einsum():
  case = CASES["einsum"]
  cfg = jlora.LoraConfig(r=2, target_modules=["per_head"], init_lora_weights="pissa")
  with pytest.raises(ValueError, match="'pissa' is not supported for the einsum at 'per_head'"):
    jlora.init(jax.random.key(1), case.model, zoo.build(case), cfg, case.inputs)


def test_unmerge_refuses_a_tree_that_still_holds_adapters():
  """Subtracting s·A·B from W0 (not W0 + s·A·B) would silently corrupt the kernels."""
  _, cfg, _, params = _adapted()
  with pytest.raises(ValueError, match=r"unmerge: `merged` still holds LoRA adapters \(at \['query', 'value', 'out'\]\)"):
    jlora.unmerge(params, params, cfg)
  merged = jlora.merge(params, cfg)
  with pytest.raises(ValueError, match=r"unmerge: `adapters` holds no lora_a/lora_b leaves"):
    jlora.unmerge(merged, merged, cfg)
