"""add_weighted_adapter: values (not just ranks) for cat / svd / linear, layouts, the output config, errors, PEFT."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.adapters.weighted import _output_config, add_weighted_adapter
from jlora.core import tree as _tree
from tests import zoo

CASES = {c.name: c for c in zoo.cases()}
MLP_PATHS = ("fc_0", "fc_1", "head")


pytestmark = pytest.mark.usefixtures("float32_matmuls")  # tests/conftest.py


@functools.cache
def _base(name):
  """A zoo model's random base and where its adapters sit: `[(path, module, a_key, b_key, A, B shapes, B's rank
  axis)]`, read from `jlora.init` under `jax.eval_shape` (no compilation)."""
  case, rng = CASES[name], np.random.default_rng(0)
  shapes = jax.eval_shape(lambda: case.model.init(jax.random.key(0), case.inputs))["params"]
  base = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.2, x.dtype), shapes)
  cfg = jlora.LoraConfig(r=1, target_modules=case.targets)
  params = jax.eval_shape(lambda: jlora.init(jax.random.key(0), case.model, base, cfg, case.inputs))
  sites = [(ad.slot.where, ad.slot.module, ad.slot.a_key, ad.slot.b_key, ad.a.shape, ad.b.shape,
            ad.stack if ad.layout == "concat" else ad.b.ndim - 1) for ad in _tree.adapters(params, cfg)]
  return base, sites


def _adapter(name, seed, dtype=np.float32, modules=None, **kw):
  """`(trainable, frozen, config)`: random non-zero adapters in jlora's layouts, at the config's rank per module."""
  frozen, sites = _base(name)
  cfg = jlora.LoraConfig(target_modules=list(modules) if modules else CASES[name].targets, **kw)
  rng, flat = np.random.default_rng(seed), {}
  for where, module, a_key, b_key, a_shape, b_shape, axis in sites:
    if modules and where not in modules:
      continue
    r = cfg.rank_for(where)
    b_shape = b_shape[:axis] + (r,) + b_shape[axis + 1:]
    flat[(*module, a_key)] = jnp.asarray(rng.normal(size=a_shape[:-1] + (r,)) * 0.5, dtype)
    flat[(*module, b_key)] = jnp.asarray(rng.normal(size=b_shape) * 0.5, dtype)
  return _tree.unflatten(flat), frozen, cfg


def _deltas(tree, cfg, frozen):
  """`{path: s·A·B}` in the kernels' layout, in float64 with numpy."""
  out = {}
  for ad in _tree.adapters(jlora.combine(tree, frozen), cfg):
    a, b, s, r = np.asarray(ad.a, np.float64), np.asarray(ad.b, np.float64), ad.stack, ad.a.shape[-1]
    if ad.layout == "broadcast":
      d = np.einsum("...r,...r->...", a, b)
    else:
      d = (a.reshape(a.shape[:s] + (-1, r)) @ b.reshape(b.shape[:s] + (r, -1))).reshape(ad.kernel.shape)
    out[ad.slot.where] = ad.scale * d
  return out


def _close(got, want, atol=1e-5):
  assert sorted(got) == sorted(want)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], atol=atol, rtol=1e-5, err_msg=k)


def _sum(weights, deltas):
  keys = {k for d in deltas for k in d}
  return {k: sum(w * d[k] for w, d in zip(weights, deltas) if k in d) for k in keys}


def _best(m, k):
  """numpy's best rank-k approximation of the trailing matrix."""
  u, s, vh = np.linalg.svd(m, full_matrices=False)
  return (u[..., :k] * s[..., None, :k]) @ vh[..., :k, :]


@pytest.fixture(scope="module")
def mlp():
  """`jlora.init` on a linen MLP: r=2 α=4 on fc_0, fc_1 (s=2); rsLoRA r=4 α=8 on fc_1, head (s=8/√4=4); split."""
  case, out = CASES["mlp"], []
  base = zoo.build(case)
  for key, kw in [(1, {"r": 2, "lora_alpha": 4, "target_modules": ["fc_0", "fc_1"]}),
                  (2, {"r": 4, "lora_alpha": 8, "use_rslora": True, "target_modules": ["fc_1", "head"]})]:
    cfg = jlora.LoraConfig(init_lora_weights=False, **kw)
    trainable, frozen = jlora.split(jlora.init(jax.random.key(key), case.model, base, cfg, case.inputs), cfg)
    out += [trainable, cfg]
  return (*out, frozen)


def test_scales_applied_once_mixed_ranks_and_rslora_cat_is_exact(mlp):
  t1, c1, t2, c2, frozen = mlp
  tree, cfg = add_weighted_adapter([(t1, c1), (t2, c2)], [0.5, -2.0], "cat")
  # The expected deltas from A·B by hand: s₁ = 4/2, s₂ = 8/√4 (rsLoRA); fc_0 has only adapter 1, head only adapter 2.
  ab = lambda t, m: np.asarray(t[m]["lora_a"], np.float64) @ np.asarray(t[m]["lora_b"], np.float64)  # noqa: E731
  want = {"fc_0": 0.5 * 2 * ab(t1, "fc_0"), "fc_1": 0.5 * 2 * ab(t1, "fc_1") - 2.0 * 4 * ab(t2, "fc_1"),
          "head": -2.0 * 4 * ab(t2, "head")}
  _close(_deltas(tree, cfg, frozen), want)
  ranks = {m: tree[m]["lora_a"].shape[-1] for m in MLP_PATHS}
  assert ranks == {"fc_0": 2, "fc_1": 6, "head": 4}  # ranks add per module (exact, no zero padding)
  assert all(cfg.rank_for(m) == ranks[m] and cfg.scale_for(m) == 1.0 for m in MLP_PATHS)
  assert cfg.use_rslora is False and cfg.target_modules == ("fc_0", "fc_1", "head")


@pytest.mark.parametrize("kind", ["cat", "svd", "linear"])
def test_one_adapter_times_w_and_plus_minus_is_zero(mlp, kind):
  t1, c1, t2, c2, frozen = mlp
  tree, cfg = add_weighted_adapter([(t2, c2)], [-0.7], kind)
  _close(_deltas(tree, cfg, frozen), _sum([-0.7], [_deltas(t2, c2, frozen)]))
  assert tree["head"]["lora_a"].shape == (32, 4)
  tree, cfg = add_weighted_adapter([(t1, c1), (t1, c1)], [1.0, -1.0], kind)
  assert all(np.abs(d).max() < 1e-6 for d in _deltas(tree, cfg, frozen).values())


def test_svd_full_rank_is_the_sum_and_truncated_is_the_best_rank_k(mlp):
  t1, c1, t2, c2, frozen = mlp
  want = _sum([0.5, -2.0], [_deltas(t1, c1, frozen), _deltas(t2, c2, frozen)])
  tree, cfg = add_weighted_adapter([(t1, c1), (t2, c2)], [0.5, -2.0], "svd", svd_rank=6)
  _close(_deltas(tree, cfg, frozen), want)
  tree, cfg = add_weighted_adapter([(t1, c1), (t2, c2)], [0.5, -2.0], "svd")  # default: the largest rank, 4
  assert {tree[m]["lora_a"].shape[-1] for m in MLP_PATHS} == {4} and cfg.r == cfg.lora_alpha == 4
  assert not cfg.rank_pattern and not cfg.alpha_pattern
  got = _deltas(tree, cfg, frozen)
  _close(got, {k: _best(v, 4) for k, v in want.items()})
  assert np.linalg.matrix_rank(got["fc_1"], tol=1e-4) == 4
  a = np.asarray(tree["fc_1"]["lora_a"])  # A holds orthonormal singular vectors, B the singular values
  np.testing.assert_allclose(a.T @ a, np.eye(4), atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="`svd_rank` must be a positive int"):
    add_weighted_adapter([(t1, c1)], [1.0], "svd", svd_rank=0)
  with pytest.raises(ValueError, match=r"`svd_rank`=40 is larger than the dimensions of every adapted layer \(the "
                                       r"widest, 'fc_1', allows min\(fan_in, fan_out\) = 32\).*svd_rank <= 32"):
    add_weighted_adapter([(t1, c1)], [1.0], "svd", svd_rank=40)  # before: (16, 40) and (32, 40) factors, zeros
  tree, cfg = add_weighted_adapter([(t1, c1)], [1.0], "svd", svd_rank=20)  # above fc_0's min(fan_in, fan_out)=16
  assert tree["fc_0"]["lora_a"].shape == (16, 16) and tree["fc_1"]["lora_a"].shape == (32, 20)
  assert cfg.r == 20 and cfg.rank_for("fc_0") == 16  # each layer's rank capped at its own, as jlora.init requires
  _close(_deltas(tree, cfg, frozen), _deltas(t1, c1, frozen))


def test_linear_cross_terms_and_equal_ranks(mlp):
  t1, c1, _, _, frozen = mlp
  t3, _, c3 = _adapter("mlp", 3, r=2, lora_alpha=2, modules=["fc_0", "fc_1"])  # s=1
  tree, cfg = add_weighted_adapter([(t1, c1), (t3, c3)], [0.5, 4.0], "linear")
  assert cfg.r == cfg.lora_alpha == 2
  # cᵢ = wᵢsᵢ = 1 and 4: A = 1·A₁ + 2·A₃, B = 1·B₁ + 2·B₃, so A·B = A₁B₁ + 4A₃B₃ + 2(A₁B₃ + A₃B₁).
  a1, b1, a3, b3 = (np.asarray(t["fc_1"][k], np.float64) for t in (t1, t3) for k in ("lora_a", "lora_b"))
  exact = a1 @ b1 + 4 * a3 @ b3
  cross = 2 * (a1 @ b3 + a3 @ b1)
  got = _deltas(tree, cfg, frozen)["fc_1"]
  np.testing.assert_allclose(got, exact + cross, atol=1e-5, rtol=1e-5)
  assert np.abs(cross).max() > 0.1  # linear is not Σ wᵢΔᵢ for two different adapters
  tree, _ = add_weighted_adapter([(t1, c1), (t3, c3)], [-0.5, 4.0], "linear")  # a negative weight signs A only
  np.testing.assert_allclose(np.asarray(tree["fc_1"]["lora_b"]), b1 + 2 * b3, atol=1e-6, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(tree["fc_1"]["lora_a"]), -a1 + 2 * a3, atol=1e-6, rtol=1e-5)
  t4, _, c4 = _adapter("mlp", 4, r=4, modules=["fc_1"])
  with pytest.raises(ValueError, match=r"combination_type='linear' needs equal ranks per module, but at 'fc_1' "
                                       r"adapters\[0\]: r=2, adapters\[1\]: r=4 \(it merges the A and B factors apart\); use 'cat' .* or 'svd'"):
    add_weighted_adapter([(t1, c1), (t4, c4)], [1.0, 1.0], "linear")


def test_patterns_on_input_and_exact_output_patterns():
  t1, frozen, c1 = _adapter("mlp", 1, r=2, lora_alpha=2, rank_pattern={"fc_1": 4}, alpha_pattern={"head": 6})
  t2, _, c2 = _adapter("mlp", 2, r=3, lora_alpha=3, modules=["head"])
  tree, cfg = add_weighted_adapter([(t1, c1), (t2, c2)], [1.0, 1.0], "cat")
  assert {m: tree[m]["lora_a"].shape[-1] for m in MLP_PATHS} == {"fc_0": 2, "fc_1": 4, "head": 5}
  _close(_deltas(tree, cfg, frozen), _sum([1.0, 1.0], [_deltas(t1, c1, frozen), _deltas(t2, c2, frozen)]))
  # A rank_pattern key that is also the suffix of a longer path: every path gets its own key, longest first.
  ranks = {("dense",): 4, ("block", "dense"): 2, ("block", "x"): 2}
  cfg = _output_config([jlora.LoraConfig(target_modules=["dense", "x"])], ranks)
  assert {p: cfg.rank_for("/".join(p)) for p in ranks} == ranks
  assert all(cfg.scale_for("/".join(p)) == 1.0 for p in ranks)


def test_target_unions():
  ranks = {("a", "q"): 2, ("b", "v"): 2}
  union = lambda *specs: _output_config([jlora.LoraConfig(target_modules=s) for s in specs], ranks).target_modules  # noqa: E731
  assert union(["q"], ["v", "q"]) == ("q", "v")
  assert union(".*q", ".*v") == "(.*q)|(.*v)"
  assert union(".*q", ["v"]) == ("a/q", "b/v")  # a regex and a list: the adapted paths
  assert union(["q"], ["q"]) == ("a/q", "b/v")  # the union would miss b/v: the adapted paths
  cfg = _output_config([jlora.LoraConfig(target_modules=["q", "v"], exclude_modules=["b/v"])], ranks)
  assert cfg.target_modules == ("a/q", "b/v") and cfg.exclude_modules is None


@pytest.mark.parametrize("name", ["scan", "einsum", "conv", "attention"])
def test_layouts_cat_and_svd_exact(name):
  t1, frozen, c1 = _adapter(name, 1, r=2, lora_alpha=4)
  t2, _, c2 = _adapter(name, 2, r=4, lora_alpha=4, use_rslora=True)
  want = _sum([1.5, -0.5], [_deltas(t1, c1, frozen), _deltas(t2, c2, frozen)])
  for kind, rank in [("cat", None), ("svd", 6)]:  # exact: rank 2 + 4, capped at the einsum's per-head (4, 5) full rank
    tree, cfg = add_weighted_adapter([(t1, c1), (t2, c2)], [1.5, -0.5], kind, svd_rank=rank)
    _close(_deltas(tree, cfg, frozen), want, atol=2e-5)
  case = CASES[name]
  y = jlora.apply(case.model, jlora.combine(tree, frozen), cfg, case.inputs)
  np.testing.assert_allclose(y, case.model.apply({"params": jlora.merge(jlora.combine(tree, frozen), cfg)},
                                                 case.inputs), rtol=1e-4, atol=1e-4)


def test_svd_is_per_layer_for_stacks_and_per_head_for_einsums():
  t1, frozen, c1 = _adapter("scan", 1, r=2, lora_alpha=4)
  t2, _, c2 = _adapter("scan", 2, r=4, lora_alpha=4)
  tree, cfg = add_weighted_adapter([(t1, c1), (t2, c2)], [1.0, 1.0], "svd", svd_rank=3)
  want = _sum([1.0, 1.0], [_deltas(t1, c1, frozen), _deltas(t2, c2, frozen)])["layers/up"]  # (layers=3, 16, 32)
  assert tree["layers"]["up"]["lora_a"].shape == (3, 16, 3)
  np.testing.assert_allclose(_deltas(tree, cfg, frozen)["layers/up"], _best(want, 3), atol=1e-5, rtol=1e-5)
  e1, frozen, c1 = _adapter("einsum", 1, r=2)
  e2, _, c2 = _adapter("einsum", 2, r=3)
  tree, cfg = add_weighted_adapter([(e1, c1), (e2, c2)], [1.0, 1.0], "svd", svd_rank=2)
  want = _sum([1.0, 1.0], [_deltas(e1, c1, frozen), _deltas(e2, c2, frozen)])["per_head"]  # n, h in, f out
  assert tree["per_head"]["lora_a"].shape == (2, 4, 1, 2) and tree["per_head"]["lora_b"].shape == (2, 1, 5, 2)
  np.testing.assert_allclose(_deltas(tree, cfg, frozen)["per_head"], _best(want, 2), atol=1e-5, rtol=1e-5)


def test_bf16_inputs_computed_in_float32():
  t1, frozen, c1 = _adapter("mlp", 1, jnp.bfloat16, r=2, lora_alpha=4)
  t2, _, c2 = _adapter("mlp", 2, jnp.bfloat16, r=4, lora_alpha=4)
  want = _sum([0.3, 0.7], [_deltas(t1, c1, frozen), _deltas(t2, c2, frozen)])  # from the bf16 values, in float64
  f32 = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t)  # noqa: E731  (the same values, exactly)
  for kind in ("cat", "svd"):
    rank = 6 if kind == "svd" else None
    tree, cfg = add_weighted_adapter([(t1, c1), (t2, c2)], [0.3, 0.7], kind, svd_rank=rank)
    assert {x.dtype for x in jax.tree.leaves(tree)} == {jnp.dtype(jnp.bfloat16)}
    # Bit for bit the float32 computation rounded once at the end: nothing ran in bf16.
    full, _ = add_weighted_adapter([(f32(t1), c1), (f32(t2), c2)], [0.3, 0.7], kind, svd_rank=rank)
    jax.tree.map(np.testing.assert_array_equal, tree, jax.tree.map(lambda x: x.astype(jnp.bfloat16), full))
    for k, v in _deltas(tree, cfg, frozen).items():  # only that final rounding of A, B (2⁻⁸ relative)
      np.testing.assert_allclose(v, want[k], atol=2e-2 * np.abs(want[k]).max())


def test_svd_clamp_clips_both_factors_at_a_quantile_of_magnitudes(mlp):
  t1, c1, t2, c2, _ = mlp
  full, _ = add_weighted_adapter([(t1, c1), (t2, c2)], [1.0, 1.0], "svd")
  tree, _ = add_weighted_adapter([(t1, c1), (t2, c2)], [1.0, 1.0], "svd", svd_clamp=0.8)
  a, b = np.asarray(full["fc_1"]["lora_a"]), np.asarray(full["fc_1"]["lora_b"])
  hi = np.quantile(np.abs(np.concatenate([a.ravel(), b.ravel()])), 0.8)  # of |entries|: independent of SVD signs
  assert np.mean(np.abs(np.concatenate([a.ravel(), b.ravel()])) > hi) == pytest.approx(0.2, abs=0.01)
  np.testing.assert_allclose(tree["fc_1"]["lora_a"], np.clip(a, -hi, hi), atol=1e-6, rtol=1e-5)
  np.testing.assert_allclose(tree["fc_1"]["lora_b"], np.clip(b, -hi, hi), atol=1e-6, rtol=1e-5)
  same, _ = add_weighted_adapter([(t1, c1), (t2, c2)], [1.0, 1.0], "svd", svd_clamp=1.0)
  jax.tree.map(np.testing.assert_array_equal, same, full)


def test_ambiguous_shapes_need_the_kernels():
  t1, frozen, c1 = _adapter("scan", 1, r=3, lora_alpha=3)  # 3 layers and r=3: B (3, 3, 32) reads two ways
  with pytest.raises(ValueError, match=r"The adapter shapes at 'layers/.*' .* fit more than one layout .* pass the "
                                       r"base as `kernels=`"):
    add_weighted_adapter([(t1, c1)], [2.0], "cat")
  tree, cfg = add_weighted_adapter([(t1, c1)], [2.0], "svd", kernels=frozen)
  _close(_deltas(tree, cfg, frozen), _sum([2.0], [_deltas(t1, c1, frozen)]))


def test_saved_and_loaded_with_save_adapter_and_save_peft(mlp, tmp_path):
  t1, c1, t2, c2, frozen = mlp
  tree, cfg = add_weighted_adapter([(t1, c1), (t2, c2)], [1.0, 1.0], "cat")
  params = jlora.combine(tree, frozen)
  jlora.save_adapter(tmp_path / "ckpt", params, cfg)
  loaded, cfg2 = jlora.load_adapter(tmp_path / "ckpt", frozen)
  assert cfg2 == cfg
  jlora.save_peft(tmp_path / "peft", None, params, cfg, name_map="flax")
  again, cfg3 = jlora.load_peft(tmp_path / "peft", None, frozen, name_map="flax")
  for p in (loaded, again):
    jax.tree.map(np.testing.assert_array_equal, p, params)
  _close(_deltas(jlora.split(again, cfg3)[0], cfg3, frozen), _deltas(tree, cfg, frozen))


def test_errors_name_the_argument(mlp):
  t1, c1, t2, c2, _ = mlp
  with pytest.raises(ValueError, match=r"`adapters` is empty"):
    add_weighted_adapter([], [])
  with pytest.raises(TypeError, match=r"`adapters` must be a list of \(adapter_tree, LoraConfig\) pairs, got tuple "
                                      r"\(a single pair: wrap it in a list\)"):
    add_weighted_adapter((t1, c1), [1.0])
  with pytest.raises(TypeError, match=r"`adapters\[1\]` must be an \(adapter_tree, LoraConfig\) pair, got dict"):
    add_weighted_adapter([(t1, c1), t2], [1.0, 1.0])
  with pytest.raises(ValueError, match=r"`weights` has 1 entries but `adapters` has 2; .* weights=\[1.0, 1.0\]"):
    add_weighted_adapter([(t1, c1), (t2, c2)], [1.0])
  with pytest.raises(ValueError, match=r"`weights\[1\]` is nan; weights must be finite"):
    add_weighted_adapter([(t1, c1), (t2, c2)], [1.0, float("nan")])
  with pytest.raises(TypeError, match=r"`weights\[0\]` must be a real number, got True"):
    add_weighted_adapter([(t1, c1)], [True])
  with pytest.raises(ValueError, match=r"`combination_type`='sum' is not one of 'svd', 'linear', 'cat'"):
    add_weighted_adapter([(t1, c1)], [1.0], "sum")
  with pytest.raises(ValueError, match=r"`svd_rank` applies to the SVD forms \('svd', 'ties_svd'.*\) only, got "
                                       r"svd_rank=2 with combination_type='cat'"):
    add_weighted_adapter([(t1, c1)], [1.0], "cat", svd_rank=2)
  with pytest.raises(ValueError, match=r"`svd_clamp` must be a quantile in \[0, 1\]"):
    add_weighted_adapter([(t1, c1)], [1.0], svd_clamp=5)
  with pytest.raises(ValueError, match=r"`adapters\[0\]`: the adapter at 'fc_0' has rank 2 .* gives r=4 there"):
    add_weighted_adapter([(t1, c2)], [1.0])
  with pytest.raises(ValueError, match=r"`adapters\[0\]\[0\]` holds leaves that are not adapters: fc_0/kernel.*"
                                       r"modules_to_save=None\)\)\[0\]"):
    add_weighted_adapter([(jlora.combine(t1, {"fc_0": {"kernel": jnp.zeros((16, 32))}}), c1)], [1.0])
  with pytest.raises(ValueError, match=r"`adapters\[0\]\[0\]` holds no adapter"):
    add_weighted_adapter([({}, c1)], [1.0])
  with pytest.raises(ValueError, match=r"`adapters\[0\]` is a 'pissa' adapter \(its init rewrote the kernels"):
    add_weighted_adapter([(t1, dataclasses.replace(c1, init_lora_weights="pissa"))], [1.0])


def test_adapters_of_different_bases_are_refused(mlp):
  t1, c1, _, _, _ = mlp
  wide = {"fc_1": {"lora_a": jnp.ones((24, 2)), "lora_b": jnp.ones((2, 32))}}  # made for a 24-wide fc_0
  with pytest.raises(ValueError, match=r"The adapters at 'fc_1' do not fit one kernel \(adapters\[0\]: lora_a "
                                       r"\(32, 2\).*adapters\[1\]: lora_a \(24, 2\).*same base model"):
    add_weighted_adapter([(t1, c1), (wide, c1)], [1.0, 1.0], "cat")


# ------------------------------------------------------------------ against PyTorch PEFT
@pytest.fixture(scope="module")
def peft_model(mlp, tmp_path_factory):
  """PEFT holding the MLP adapters (plus a rank-4 non-rsLoRA one and an rsLoRA-first copy) under names a1..a4."""
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  t1, c1, t2, c2, frozen = mlp
  t3, _, c3 = _adapter("mlp", 3, r=4, lora_alpha=2, modules=["fc_1", "head"])
  net = torch.nn.Module()
  for m in MLP_PATHS:
    k = frozen[m]["kernel"]
    setattr(net, m, torch.nn.Linear(k.shape[0], k.shape[1]))
  model, names = None, {"a1": (t1, c1), "a2": (t2, c2), "a3": (t3, c3)}
  for name, (t, c) in names.items():
    d = tmp_path_factory.mktemp(name)
    jlora.save_peft(d, None, jlora.combine(t, frozen), c, name_map="flax")
    if model is None:
      model = peft.PeftModel.from_pretrained(net, d, adapter_name=name)
    else:
      model.load_adapter(d, adapter_name=name)
  return torch, model, names, frozen


def _peft_deltas(torch, model, name):
  with torch.no_grad():
    return {m: getattr(model.base_model.model, m).get_delta_weight(name).double().numpy().T
            for m in MLP_PATHS if name in getattr(model.base_model.model, m).lora_A}


@pytest.mark.parametrize("kind,names,weights,options", [
    ("cat", ["a1", "a2"], [0.5, -2.0], {}),
    ("svd", ["a1", "a2"], [0.5, -2.0], {}),
    ("svd", ["a1", "a2"], [0.5, -2.0], {"svd_rank": 3}),
    ("linear", ["a3", "a2"], [0.5, -2.0], {}),
])
def test_equals_peft(peft_model, kind, names, weights, options):
  torch, model, adapters, frozen = peft_model
  out = f"{kind}_{len(options)}"
  model.add_weighted_adapter(names, weights, out, combination_type=kind, **options)
  tree, cfg = add_weighted_adapter([adapters[n] for n in names], weights, kind, **options)
  _close(_deltas(tree, cfg, frozen), _peft_deltas(torch, model, out))


def test_peft_rslora_first_is_sqrt_r_too_large_before_0_22(peft_model):
  """PEFT up to 0.21 gives the new adapter the first config's `use_rslora` with `lora_alpha = r`: s = √r, not 1.
  PEFT 0.22 fixed it (s = 1, as jlora has always done): both give jlora's deltas then."""
  import peft

  torch, model, adapters, frozen = peft_model
  model.add_weighted_adapter(["a2", "a1"], [1.0, 1.0], "rs_first", combination_type="cat")
  tree, cfg = add_weighted_adapter([adapters["a2"], adapters["a1"]], [1.0, 1.0], "cat")
  ours, theirs = _deltas(tree, cfg, frozen), _peft_deltas(torch, model, "rs_first")
  fixed = tuple(int(v) for v in peft.__version__.split(".")[:2]) >= (0, 22)
  factor = 1.0 if fixed else math.sqrt(6)  # PEFT's cat rank: 4 + 2 everywhere
  _close({m: factor * v for m, v in ours.items()}, theirs)
  want = _sum([1.0, 1.0], [_deltas(*adapters["a2"], frozen), _deltas(*adapters["a1"], frozen)])
  _close(ours, want)


# ------------------------------------------------------------------ TIES, DARE, magnitude pruning
from jlora.adapters import merge_methods  # noqa: E402
from jlora.adapters.weighted import _dare_seeds  # noqa: E402

PRUNING = ["ties", "ties_svd", "dare_linear", "dare_linear_svd", "dare_ties", "dare_ties_svd", "magnitude_prune",
           "magnitude_prune_svd"]


def _queue(torch, monkeypatch, masks):
  """Makes `torch.bernoulli` (PEFT's DARE draw) return `masks` in order, each checked against the draw's shape."""
  masks = list(masks)

  def bernoulli(probs, *args, **kwargs):
    mask = masks.pop(0)
    assert tuple(probs.shape) == mask.shape, (tuple(probs.shape), mask.shape)
    return torch.tensor(mask, dtype=probs.dtype)

  monkeypatch.setattr(torch, "bernoulli", bernoulli)
  return masks


@pytest.mark.parametrize("method", ["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"])
@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_merge_methods_equal_peft_merge_utils_row_by_row(method, sign, monkeypatch):
  """Each row of `(n, rows, size)` is one module's tensors; PEFT's merge_utils on that row gives the same merge
  (DARE: with jlora's masks fed to torch.bernoulli)."""
  torch = pytest.importorskip("torch")
  merge_utils = pytest.importorskip("peft.utils.merge_utils")
  if sign == "frequency" and method not in merge_methods.ELECTS_SIGN:
    pytest.skip("majority_sign_method is TIES' only")
  rng = np.random.default_rng(0)
  t = rng.normal(size=(3, 2, 50)).astype(np.float32)
  w, density = np.array([0.7, -1.2, 0.4], np.float32), 0.3
  masks = merge_methods.dare_masks([[i] for i in range(3)], (2, 50), density)
  ours = np.asarray(merge_methods.merge(jnp.asarray(t), jnp.asarray(w), method=method, density=density,
                                        majority_sign_method=sign, masks=masks))
  left = _queue(torch, monkeypatch, [masks[i, row].astype(np.float32) for row in range(2) for i in range(3)])
  for row in range(2):
    rows, weights = [torch.tensor(t[i, row]) for i in range(3)], torch.tensor(w)
    args = () if method == "linear" else (density,)
    kw = {"majority_sign_method": sign} if method in merge_methods.ELECTS_SIGN else {}
    want = getattr(merge_utils, "task_arithmetic" if method == "linear" else method)(rows, weights, *args, **kw)
    np.testing.assert_allclose(ours[row], want.numpy(), rtol=1e-6, atol=1e-6)
  assert not left or method not in merge_methods.RANDOM
  if method != "linear":  # density 1 prunes nothing
    full = merge_methods.merge(jnp.asarray(t), jnp.asarray(w), method=method, density=1.0, masks=masks)
    np.testing.assert_array_equal(full, merge_methods.merge(jnp.asarray(t), jnp.asarray(w), method=method.replace(
        "dare_", "") if "ties" in method else "linear", density=1.0))
  if method == "magnitude_prune":  # each tensor kept int(0.3·50) = 15 entries per row
    kept = merge_methods.prune_magnitude(jnp.asarray(t), density)
    assert (np.count_nonzero(np.asarray(kept), axis=-1) == 15).all()


def test_dare_agrees_with_peft_in_distribution():
  """Without shared masks: the kept fraction is `density` (binomial bounds) and kept entries are `t / density`,
  for jlora's draw and PyTorch's."""
  torch = pytest.importorskip("torch")
  merge_utils = pytest.importorskip("peft.utils.merge_utils")
  t, density, n = np.linspace(1.0, 2.0, 20_000, dtype=np.float32), 0.3, 20_000
  torch.manual_seed(0)
  mask = merge_methods.dare_masks([[0]], (n,), density)[0]
  for pruned in (np.asarray(merge_methods.prune_random(mask, jnp.asarray(t), density)),
                 merge_utils.random_pruning(torch.tensor(t), density, rescale=True).numpy()):
    kept = pruned != 0
    assert abs(kept.mean() - density) < 4 * math.sqrt(density * (1 - density) / n)
    np.testing.assert_allclose(pruned[kept], t[kept] / density, rtol=1e-6)


@pytest.mark.parametrize("kind", PRUNING)
def test_pruning_methods_equal_peft(peft_model, kind, monkeypatch):
  """PEFT's add_weighted_adapter with every TIES / DARE / magnitude-pruning form; DARE gets jlora's masks."""
  torch, model, adapters, frozen = peft_model
  svd = kind.endswith("svd")
  names, weights = (["a1", "a2"], [0.8, -1.5]) if svd else (["a3", "a2"], [0.8, -1.5])  # equal ranks without SVD
  options = {"density": 0.4, **({"majority_sign_method": "frequency"} if "ties" in kind else {})}
  key = jax.random.key(7) if "dare" in kind else None
  tree, cfg = add_weighted_adapter([adapters[n] for n in names], weights, kind, key=key, **options)
  if key is not None:  # PEFT draws module by module (its order), A's then B's (or the deltas), adapter by adapter
    masks = []
    for m in MLP_PATHS:
      present = [i for i, n in enumerate(names) if m in adapters[n][0]]
      for factor in ("delta",) if svd else ("lora_a", "lora_b"):
        for i, seed in zip(present, _dare_seeds(key, (m,), factor, tuple(present))):
          a, b = (np.asarray(adapters[names[i]][0][m][x]) for x in ("lora_a", "lora_b"))
          shape = {"lora_a": a.shape, "lora_b": b.shape, "delta": (a.shape[0], b.shape[1])}[factor]
          mask = merge_methods.dare_masks([seed], (math.prod(shape),), 0.4)[0]
          masks.append(mask.reshape(shape).T.astype(np.float32))  # jlora's (in, out) layout -> PyTorch's (out, in)
    left = _queue(torch, monkeypatch, masks)
  model.add_weighted_adapter(names, weights, kind, combination_type=kind, **options)
  want = _peft_deltas(torch, model, kind)
  # an SVD form truncates a pruned (full-rank) sum: float32 rounding of the deltas moves it by ~1e-5 of its size
  _close(_deltas(tree, cfg, frozen), want, atol=5e-5 * max(np.abs(v).max() for v in want.values()) if svd else 1e-5)
  assert key is None or not left, "PEFT drew fewer masks than jlora"


def test_pruning_is_per_layer_and_per_head_and_dare_is_deterministic():
  t1, _, c1 = _adapter("scan", 1, r=2, lora_alpha=4)
  tree, _ = add_weighted_adapter([(t1, c1)], [1.0], "magnitude_prune", density=0.25)
  a = np.asarray(tree["layers"]["up"]["lora_a"])  # (3 layers, 16, 2): each layer keeps int(0.25·32) = 8 entries
  assert a.shape == (3, 16, 2) and [np.count_nonzero(x) for x in a] == [8, 8, 8]
  e1, frozen_e, ce = _adapter("einsum", 1, r=2)
  tree_e, _ = add_weighted_adapter([(e1, ce)], [1.0], "magnitude_prune", density=0.5, kernels=frozen_e)
  a = np.asarray(tree_e["per_head"]["lora_a"])  # (2 heads, 4, 1, 2): each head keeps int(0.5·8) = 4 entries
  assert [np.count_nonzero(x) for x in a] == [4, 4]
  t2, _, c2 = _adapter("scan", 2, r=2, lora_alpha=4)
  runs = [add_weighted_adapter([(t1, c1), (t2, c2)], [1.0, 0.5], "dare_ties", density=0.5, key=jax.random.key(k))[0]
          for k in (0, 0, 1)]
  jax.tree.map(np.testing.assert_array_equal, runs[0], runs[1])  # the same key, the same adapter
  assert not np.array_equal(runs[0]["layers"]["up"]["lora_a"], runs[2]["layers"]["up"]["lora_a"])


def test_pruning_options_are_checked(mlp):
  t1, c1, t2, c2, _ = mlp
  pair = [(t1, c1)]
  key = jax.random.key(0)
  for kwargs, match in [
      ({}, r"combination_type='ties' needs `density`, the fraction .* in \(0, 1\]"),
      ({"density": 0.0}, r"`density` must be a number in \(0, 1\] .* got 0\.0"),
      ({"density": 1.5}, r"`density` must be a number in \(0, 1\]"),
      ({"density": True}, r"`density` must be a number in \(0, 1\]"),
      ({"density": 0.5, "majority_sign_method": "sum"}, r"`majority_sign_method` must be one of 'total', "
                                                         r"'frequency', got 'sum'"),
      ({"density": 0.5, "key": key}, r"`key` applies to the DARE forms \(.*\) only, got key=<.*> with combination_type='ties'"),
  ]:
    with pytest.raises(ValueError, match=match):
      add_weighted_adapter(pair, [1.0], "ties", **kwargs)
  with pytest.raises(ValueError, match=r"`density` applies to TIES, DARE and magnitude pruning only, got "
                                       r"density=0\.5 with combination_type='svd'"):
    add_weighted_adapter(pair, [1.0], "svd", density=0.5)
  with pytest.raises(ValueError, match=r"`majority_sign_method` applies to TIES .* only, got majority_sign_method='total' with "
                                       r"combination_type='dare_linear'; drop it"):
    add_weighted_adapter(pair, [1.0], "dare_linear", density=0.5, majority_sign_method="total", key=key)
  with pytest.raises(ValueError, match=r"combination_type='dare_ties_svd' needs `key`, a PRNG key for DARE's "
                                       r"random masks; e\.g\. key=jax\.random\.key\(0\)"):
    add_weighted_adapter(pair, [1.0], "dare_ties_svd", density=0.5)
  with pytest.raises(TypeError, match=r"`key` must be a PRNG key .* got int"):
    add_weighted_adapter(pair, [1.0], "dare_linear", density=0.5, key=0)
  with pytest.raises(ValueError, match=r"combination_type='ties' needs equal ranks per module, but at 'fc_1' .*; "
                                       r"use 'cat' .* or 'ties_svd'"):
    add_weighted_adapter([(t1, c1), (t2, c2)], [1.0, 1.0], "ties", density=0.5)
  with pytest.raises(ValueError, match=r"adapters\[0\] has use_dora=True"):
    add_weighted_adapter([(t1, dataclasses.replace(c1, use_dora=True))], [1.0], "ties", density=0.5)
