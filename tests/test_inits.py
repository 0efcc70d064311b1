"""Initialisations as values: orthogonal, OLoRA, PiSSA (exact and fast), each against PEFT; PiSSA/OLoRA to plain
LoRA (`jlora.convert_to_lora`) and back through PEFT's files."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.core.tree import flatten, get_path
from jlora.core.variants import init_for
from jlora.quant.array import QuantizedArray, dequantize, quantize
from tests import zoo

CASES = {c.name: c for c in zoo.cases()}
REWRITING = ["pissa", "pissa_niter_2", "olora"]


pytestmark = pytest.mark.usefixtures("float32_matmuls")  # tests/conftest.py


def _weight(rng, out, inp, spectrum=None):
  """A PyTorch `(out, in)` weight; with `spectrum`, `U diag(spectrum) Vᵀ` for random orthonormal U, V."""
  if spectrum is None:
    return rng.normal(size=(out, inp)).astype(np.float32)
  u = np.linalg.qr(rng.normal(size=(out, len(spectrum))))[0]
  v = np.linalg.qr(rng.normal(size=(inp, len(spectrum))))[0]
  return (u * np.asarray(spectrum)) @ v.T


def _peft_init(weight, init, r=4, alpha=8):
  """PEFT's `(lora_A (r, in), lora_B (out, r), base weight (out, in))` after `get_peft_model` with `init`."""
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  net = torch.nn.Module()
  net.fc = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
  with torch.no_grad():
    net.fc.weight.copy_(torch.tensor(weight))
  model = peft.get_peft_model(net, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["fc"],
                                                   init_lora_weights=init))
  fc = model.base_model.model.fc
  return (fc.lora_A["default"].weight.detach().numpy(), fc.lora_B["default"].weight.detach().numpy(),
          fc.base_layer.weight.detach().numpy())


def _jlora_init(weight, init, r=4, alpha=8, key=0):
  """jlora's `(A (in, r), B (r, out), kernel (in, out))` for the same `(out, in)` weight, as a plain tree."""
  cfg = jlora.LoraConfig(r=r, lora_alpha=alpha, target_modules=["fc"], init_lora_weights=init)
  p = jlora.init_tree(jax.random.key(key), {"fc": {"kernel": jnp.asarray(weight.T)}}, cfg)["fc"]
  return np.asarray(p["lora_a"]), np.asarray(p["lora_b"]), np.asarray(p["kernel"])


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_deterministic_inits_equal_peft_up_to_signs(init):
  """A = PEFT's lora_Aᵀ and B = lora_Bᵀ up to one sign per rank component (the SVD's / QR's conventions); the
  residual kernels are equal, and W_res + s·A·B = W0."""
  w = _weight(np.random.default_rng(0), 8, 16)
  pa, pb, pw = _peft_init(w, init)
  a, b, kernel = _jlora_init(w, init)
  signs = np.sign(np.sum(a * pa.T, axis=0))  # +1 or -1 per component
  np.testing.assert_allclose(a, pa.T * signs, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(b, pb.T * signs[:, None], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(kernel, pw.T, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(kernel + 2.0 * a @ b, w.T, rtol=1e-5, atol=1e-5)


def test_fast_pissa_equals_peft_on_a_separated_spectrum():
  """`pissa_niter_[n]` is random in both (torch.svd_lowrank, jlora's draw): on a weight whose top r singular
  values stand apart, both find the same principal part s·A·B (and so the same residual)."""
  w = _weight(np.random.default_rng(1), 12, 20, spectrum=[9.0, 7.0, 5.0, 4.0, 0.02, 0.01])
  pa, pb, pw = _peft_init(w, "pissa_niter_4")
  a, b, kernel = _jlora_init(w, "pissa_niter_4")
  np.testing.assert_allclose(2.0 * a @ b, 2.0 * (pb @ pa).T, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(kernel, pw.T, rtol=1e-4, atol=1e-4)
  exact = _jlora_init(w, "pissa")
  np.testing.assert_allclose(a @ b, exact[0] @ exact[1], rtol=1e-4, atol=1e-4)
  # On a generic weight the few iterations only approximate it, but W_res + s·A·B = W0 holds exactly.
  g = _weight(np.random.default_rng(2), 12, 20)
  a, b, kernel = _jlora_init(g, "pissa_niter_1")
  np.testing.assert_allclose(kernel + 2.0 * a @ b, g.T, rtol=1e-5, atol=1e-5)
  assert not np.array_equal(a, _jlora_init(g, "pissa_niter_1", key=1)[0])  # a draw per key


def test_orthogonal_is_peft_in_distribution():
  """Random in both: A·B = 0 (the adapter is a no-op at init), A and B of rank r/2, and the entries' mean square
  is 1/200 (`‖Q[0::2]‖² / r / 10²`), for PEFT's draw and jlora's.

  The mean square of A (in, r) is a χ² with in·r/2 degrees of freedom over in·r·100: with in = 256, out = 384 and
  r = 32 its relative spread is √(2/4096) ≈ 2.2% for A and 1.8% for B, so 12% is more than five of them (PEFT's
  draw is seeded besides: the test is deterministic)."""
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  w = _weight(np.random.default_rng(3), 384, 256)
  pa, pb, _ = _peft_init(w, "orthogonal", r=32)
  a, b, kernel = _jlora_init(w, "orthogonal", r=32)
  np.testing.assert_array_equal(kernel, w.T)  # the base is left alone
  for x, y in ((a, b), (pa.T, pb.T)):
    assert np.abs(x @ y).max() < 1e-6 * np.abs(x).max() * np.abs(y).max() * 32
    assert np.linalg.matrix_rank(x) == np.linalg.matrix_rank(y) == 16
    assert np.mean(x**2) == pytest.approx(1 / 200, rel=0.12) and np.mean(y**2) == pytest.approx(1 / 200, rel=0.12)
  with pytest.raises(ValueError, match=r"'orthogonal' needs an even rank .* 'fc' has r=3"):
    _jlora_init(w, "orthogonal", r=3)


@pytest.mark.parametrize("name", ["mlp", "einsum"])
def test_orthogonal_leaves_the_model_and_the_base_unchanged(name):
  case = CASES[name]
  cfg = jlora.LoraConfig(r=2, target_modules=("qkv", "out") if name == "einsum" else case.targets,
                         init_lora_weights="orthogonal")
  base = zoo.build(case)
  params = jlora.init(jax.random.key(1), case.model, base, cfg, case.inputs)
  y0 = case.model.apply({"params": base}, case.inputs)
  np.testing.assert_allclose(jlora.apply(case.model, params, cfg, case.inputs), y0, rtol=1e-5, atol=1e-5)
  jax.tree.map(np.testing.assert_array_equal, jlora.split(params, cfg)[1], base)
  assert all(np.abs(x).max() > 0 for x in jax.tree.leaves(jlora.split(params, cfg)[0]))  # A and B both non-zero


def test_refusals():
  case = CASES["einsum"]
  for init in ("olora", "orthogonal", "pissa_niter_3"):
    cfg = jlora.LoraConfig(r=2, target_modules=["per_head"], init_lora_weights=init)
    with pytest.raises(ValueError, match=rf"init_lora_weights='{init}' is not supported for the einsum at 'per_head'"):
      jlora.init(jax.random.key(1), case.model, zoo.build(case), cfg, case.inputs)
  mlp = CASES["mlp"]
  quantized = jlora.quantize(zoo.build(mlp), "nf4")
  with pytest.raises(ValueError, match=r"init_lora_weights='olora' rewrites the kernel at 'fc_0', which is quantized"):
    jlora.init(jax.random.key(1), mlp.model, quantized, jlora.LoraConfig(r=2, target_modules=["fc_0"],
                                                                          init_lora_weights="olora"), mlp.inputs)
  with pytest.raises(ValueError, match=r"`init_lora_weights`='corda' is an initialisation of PEFT's that jlora\.init "
                                       r"does not implement .* 'pissa_niter_\[n\]'"):
    init_for("corda")
  with pytest.raises(ValueError, match=r"init_lora_weights='eva' is data-driven.*jlora\.init_eva\("):
    init_for("eva")
  with pytest.raises(ValueError, match=r"`init_lora_weights` must be one of .*'loftq' or 'pissa_niter_\[n\]'.*got "
                                       r"'pissa_niter_x'"):
    jlora.LoraConfig(init_lora_weights="pissa_niter_x")
  assert jlora.LoraConfig(init_lora_weights="PiSSA_niter_16").init_lora_weights == "pissa_niter_16"


# ------------------------------------------------------------------ PiSSA / OLoRA to plain LoRA
def _trained(case, cfg, key=1):
  """`(initial params, trained params)`: jlora.init, then every trainable leaf moved as training would."""
  params0 = jlora.init(jax.random.key(key), case.model, zoo.build(case), cfg, case.inputs)
  trainable, frozen = jlora.split(params0, cfg)
  moved = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(5), x.shape, x.dtype), trainable)
  return params0, jlora.combine(moved, frozen)


@pytest.mark.parametrize("name", ["mlp", "scan", "einsum", "conv"])
def test_converted_adapter_on_the_original_base_is_the_trained_model(name):
  case = CASES[name]
  targets = ("qkv", "out") if name == "einsum" else case.targets
  init = {"mlp": "pissa", "scan": "olora", "einsum": "pissa_niter_2", "conv": "olora"}[name]
  cfg = jlora.LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=init, use_rslora=name == "conv",
                         rank_pattern={"fc_1": 4} if name == "mlp" else None)
  base = zoo.build(case)
  params0, trained = _trained(case, cfg)
  # at init: the model is unchanged, the kernels hold W0 − s·A₀·B₀, and merging gives W0 back
  y0 = case.model.apply({"params": base}, case.inputs)
  np.testing.assert_allclose(jlora.apply(case.model, params0, cfg, case.inputs), y0, rtol=1e-4, atol=1e-4)
  adapted = [p[:-1] + ("kernel",) for p in flatten(params0) if p[-1] == "lora_a"]
  assert adapted and not any(np.array_equal(get_path(params0, p), get_path(base, p)) for p in adapted)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5), jlora.merge(params0, cfg), base)
  tree, plain = jlora.convert_to_lora(trained, jlora.split(params0, cfg)[0], cfg)
  want = jlora.apply(case.model, trained, cfg, case.inputs)  # over the residual base
  assert np.abs(want - y0).max() > 1e-2
  got = jlora.apply(case.model, jlora.combine(tree, base), plain, case.inputs)  # over the original base
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  assert plain.init_lora_weights is True and plain.r == 4
  for p in ("fc_0", "fc_1", "layers/up", "qkv", "conv1"):
    assert plain.scale_for(p) == pytest.approx(cfg.scale_for(p), rel=1e-12)


def test_conversion_errors():
  case = CASES["mlp"]
  cfg = jlora.LoraConfig(r=2, target_modules=["fc_0"], init_lora_weights="pissa")
  params0, trained = _trained(case, cfg)
  with pytest.raises(ValueError, match=r"init_lora_weights='gaussian' left the kernels alone"):
    jlora.convert_to_lora(trained, params0, dataclasses.replace(cfg, init_lora_weights="gaussian"))
  with pytest.raises(ValueError, match=r"neither `trained` nor `initial` holds the kernels"):
    jlora.convert_to_lora(jlora.split(trained, cfg)[0], jlora.split(params0, cfg)[0], cfg)
  with pytest.raises(ValueError, match=r"`initial` has no adapter at 'fc_0'"):
    jlora.convert_to_lora(trained, {}, cfg)
  with pytest.raises(ValueError, match=r"PiSSA and OLoRA.*jlora\.convert_to_lora"):
    jlora.add_weighted_adapter([(jlora.split(trained, cfg)[0], cfg)], [1.0], "cat")
  with pytest.raises(ValueError, match=r"save_peft: an adapter made with init_lora_weights='pissa' .* "
                                       r"path_initial_model_for_weight_conversion.*jlora\.convert_to_lora"):
    jlora.save_peft("unused", None, trained, cfg, name_map="flax")


def test_peft_loads_the_converted_adapter_over_the_original_base(tmp_path):
  """jlora's PiSSA, trained, converted and saved: PEFT over the original PyTorch weights computes the trained model."""
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  case = CASES["mlp"]
  base = zoo.build(case)
  cfg = jlora.LoraConfig(r=2, lora_alpha=4, target_modules=["fc_0", "head"], init_lora_weights="pissa_niter_2")
  params0, trained = _trained(case, cfg)
  tree, plain = jlora.convert_to_lora(trained, params0, cfg)
  jlora.save_peft(tmp_path, None, jlora.combine(tree, base), plain, name_map="flax")
  model = peft.PeftModel.from_pretrained(zoo.torch_mlp(base), tmp_path).eval()
  with torch.no_grad():
    theirs = model(torch.tensor(np.asarray(case.inputs))).numpy()
  want = np.asarray(jlora.apply(case.model, trained, cfg, case.inputs))
  np.testing.assert_allclose(theirs, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


# ------------------------------------------------------------------ LoftQ
def _loftq(case, bits, iters, r=4):
  cfg = jlora.LoraConfig(r=r, lora_alpha=8, target_modules=case.targets, init_lora_weights="loftq",
                         loftq_config={"loftq_bits": bits, "loftq_iter": iters})
  return cfg, jlora.init(jax.random.key(1), case.model, zoo.build(case), cfg, case.inputs)


def _kernels(params):
  """`{module path: (kernel, A, B)}` of the adapted Dense kernels (inputs × outputs, leading scan axes)."""
  return {p[:-1]: (get_path(params, p[:-1] + ("kernel",)), get_path(params, p), get_path(params, p[:-1] + ("lora_b",)))
          for p in flatten(params) if p[-1] == "lora_a"}


@pytest.mark.parametrize("name, bits", [("mlp", 4), ("scan", 4), ("scan", 8)])
def test_loftq_quantizes_the_base_and_fits_the_adapter_to_what_rounding_lost(name, bits):
  """One round (PEFT's `loftq_iter=1`): the kernel is the quantization of W0, and s·A·B the best rank-r
  approximation of W0 − deq(Q) (the top-r SVD, per layer of a scanned stack; DenseGeneral kernels as matrices)."""
  case = CASES[name]
  base = zoo.build(case)
  cfg, params = _loftq(case, bits, 1)
  found = _kernels(params)
  assert len(found) >= 3
  for module, (q, a, b) in found.items():
    w = np.asarray(get_path(base, module + ("kernel",)), np.float32)
    stack = 1 if module[0] == "layers" else 0  # the scanned stack's layer axis
    assert isinstance(q, QuantizedArray) and q.method == {4: "nf4", 8: "int8"}[bits] and q.shape == w.shape
    jax.tree.map(np.testing.assert_array_equal, q, quantize(w, q.method, stack=stack if q.method == "int8" else 0))
    lost = w - np.asarray(dequantize(q, jnp.float32))
    lost = lost.reshape(w.shape[:stack] + (int(np.prod(a.shape[stack:-1])), -1))  # S + (fan_in, fan_out)
    u, s, vh = np.linalg.svd(lost, full_matrices=False)
    best = (u[..., :4] * s[..., None, :4]) @ vh[..., :4, :]
    low = (np.asarray(a).reshape(lost.shape[:-1] + (4,)) @ np.asarray(b).reshape(lost.shape[:-2] + (4, -1)))
    np.testing.assert_allclose(cfg.scale_for("/".join(module)) * low, best, rtol=1e-4, atol=1e-5 * np.abs(best).max())


def test_loftq_rounds_shrink_the_error_below_plain_quantization():
  """LoftQ's objective: ‖W0 − deq(Q) − s·A·B‖ is below plain NF4's ‖W0 − deq(q(W0))‖ and does not grow with more
  rounds; the factored model at init is the merged one (deq(Q) + s·A·B, in full precision)."""
  case = CASES["mlp"]
  base = zoo.build(case)

  def error(iters):
    cfg, params = _loftq(case, 4, iters)
    merged = jlora.merge(params, cfg)  # adapted kernels: deq(Q) + s·A·B
    np.testing.assert_allclose(jlora.apply(case.model, params, cfg, case.inputs),
                               case.model.apply({"params": merged}, case.inputs), rtol=1e-5, atol=1e-6)
    return sum(float(np.linalg.norm(np.asarray(base[m]["kernel"]) - np.asarray(merged[m]["kernel"])))
               for m in case.targets)

  plain = sum(float(np.linalg.norm(np.asarray(base[m]["kernel"]) - np.asarray(
      dequantize(quantize(base[m]["kernel"], "nf4"), jnp.float32)))) for m in case.targets)
  one, three = error(1), error(3)
  assert three <= one * (1 + 1e-6) and one < 0.9 * plain, (one, three, plain)


def test_loftq_refusals_and_config():
  case = CASES["mlp"]
  base = zoo.build(case)
  with pytest.raises(ValueError, match=r"init_lora_weights='loftq' needs `loftq_config`.*'loftq_bits': 4"):
    jlora.init(jax.random.key(1), case.model, base, jlora.LoraConfig(r=2, target_modules=["fc_0"],
                                                                     init_lora_weights="loftq"), case.inputs)
  with pytest.raises(ValueError, match=r"`loftq_config\['loftq_bits'\]` must be 4 \(an NF4 base\) or 8 \(int8\), "
                                       r"got 2"):
    jlora.LoraConfig(loftq_config={"loftq_bits": 2})
  with pytest.raises(ValueError, match=r"`loftq_config\['loftq_iter'\]` must be an int >= 1.*got 0"):
    jlora.LoraConfig(loftq_config={"loftq_bits": 4, "loftq_iter": 0})
  with pytest.raises(ValueError, match=r"`loftq_config` must be a mapping with keys 'loftq_bits' and 'loftq_iter'"):
    jlora.LoraConfig(loftq_config={"bits": 4})
  cfg = jlora.LoraConfig(r=2, target_modules=["per_head"], init_lora_weights="loftq", loftq_config={"loftq_bits": 4})
  einsum = CASES["einsum"]
  with pytest.raises(ValueError, match=r"init_lora_weights='loftq' is not supported for the einsum at 'per_head'"):
    jlora.init(jax.random.key(1), einsum.model, zoo.build(einsum), cfg, einsum.inputs)
  cfg = dataclasses.replace(cfg, target_modules=("fc_0",))
  with pytest.raises(ValueError, match=r"init_lora_weights='loftq' rewrites the kernel at 'fc_0', which is quantized"):
    jlora.init(jax.random.key(1), case.model, jlora.quantize(base, "nf4"), cfg, case.inputs)
  assert cfg.loftq_config == {"loftq_bits": 4, "loftq_iter": 1}  # PEFT's LoftQConfig defaults fill the rest
  assert jlora.LoraConfig.from_dict(cfg.to_dict()) == cfg and jlora.LoraConfig().to_dict()["loftq_config"] == {}
