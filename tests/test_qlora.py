"""QLoRA: LoRA over a quantized frozen base (`jlora.quantize`), dequantized where each layer reads its kernel."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from jlora.quant.array import QuantizedArray
from tests.models.helpers import CONFIGS, random_model, tokens


@functools.cache
def _llama(scan: bool):
  model, base = random_model(CONFIGS["llama"], scan_layers=scan)
  return model, base, jnp.asarray(tokens((2, 6)))


@pytest.mark.parametrize("method, scan", [("nf4", False), ("nf4", True), ("int4", True), ("int8", True)])
def test_lora_over_a_quantized_base_equals_lora_over_its_dequantized_copy(method, scan):
  model, base, x = _llama(scan)
  q = jlora.quantize(base, method, block_size=16, stack=lambda path, leaf: int(scan and "layers" in path))
  kernel = q["lm_head"]["kernel"]
  assert isinstance(kernel, QuantizedArray) and kernel.shape == base["lm_head"]["kernel"].shape
  assert not isinstance(q["model"]["embed_tokens"]["embedding"], QuantizedArray)  # embeddings stay
  cfg = jlora.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False)
  trainable, _ = jlora.split(jlora.init(jax.random.key(1), model, q, cfg, x), cfg)
  deq = jlora.dequantize(q)
  step = jax.jit(lambda t, f: jlora.apply(model, jlora.combine(t, f), cfg, x))
  out = step(trainable, q)
  np.testing.assert_allclose(out, jlora.apply(model, jlora.combine(trainable, deq), cfg, x), atol=1e-5, rtol=1e-5)
  err = float(jnp.linalg.norm(jnp.asarray(kernel) - base["lm_head"]["kernel"]) / jnp.linalg.norm(base["lm_head"]["kernel"]))
  assert err < (0.02 if method == "int8" else 0.14)
  merged = jlora.merge(jlora.combine(trainable, q), cfg)  # adapted kernels: dequantized + s·A·B, full precision
  boxes = [v for v in jax.tree.leaves(merged, is_leaf=lambda v: isinstance(v, QuantizedArray))
           if isinstance(v, QuantizedArray)]
  assert boxes == [merged["lm_head"]["kernel"]]  # the output head is not adapted by all-linear: still quantized
  np.testing.assert_allclose(model.apply({"params": merged}, x), out, atol=1e-4, rtol=1e-5)


def test_training_moves_only_adapters_and_the_codes_stay():
  model, base, x = _llama(True)
  q = jlora.quantize(base, "nf4", block_size=16)
  cfg = jlora.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], use_dora=True)
  trainable, frozen = jlora.split(jlora.init(jax.random.key(1), model, q, cfg, x), cfg)
  tx = optax.adam(1e-2)
  state = tx.init(trainable)

  @jax.jit
  def step(t, s, f):
    loss = lambda t: jnp.mean(jlora.apply(model, jlora.combine(t, f), cfg, x) ** 2)  # noqa: E731
    value, grads = jax.value_and_grad(loss)(t)
    updates, s = tx.update(grads, s, t)
    return optax.apply_updates(t, updates), s, value

  losses = []
  for _ in range(4):
    trainable, state, loss = step(trainable, state, frozen)
    losses.append(float(loss))
  assert losses[-1] < losses[0]
  assert jax.tree.structure(trainable) == jax.tree.structure(jlora.split(jlora.init(
      jax.random.key(1), model, q, cfg, x), cfg)[0])  # only A, B and magnitudes: no code array trains


def test_quantize_errors_and_selection():
  params = {"dense": {"kernel": jnp.ones((4, 8)), "bias": jnp.zeros(8)}, "gate": {"w": jnp.ones((8, 8))}}
  q = jlora.quantize(params, "int8", select=lambda path, leaf: path[-1] in ("kernel", "w"))
  assert isinstance(q["gate"]["w"], QuantizedArray) and q["dense"]["bias"] is params["dense"]["bias"]
  with pytest.raises(ValueError, match=r"`method`"):
    jlora.quantize(params, "nf3")
  with pytest.raises(ValueError, match=r"At 'dense/kernel'.*NaN or inf"):
    jlora.quantize({"dense": {"kernel": jnp.ones((4, 8)).at[0, 0].set(jnp.nan)}})


def test_jlora_train_quantizes_the_base_and_exports_what_it_trained(tmp_path):
  """`model.quantize: nf4`: the run trains over the NF4 base; `merged/` and `jlora merge` agree with that model."""
  import safetensors.numpy

  from jlora import cli

  out = tmp_path / "run"
  assert cli.main(["train", "configs/causal_lm_tiny.yaml", "model.quantize=nf4", "train.steps=3",
                   "checkpointing.every=3", f"outputs.dir={out}", "outputs.merged=true", "--quiet"]) == 0
  summary = __import__("json").loads((out / "summary.json").read_text())
  assert summary["merge_diff"] < 1e-5 and summary["after"]["loss"] < summary["before"]["loss"]
  assert cli.main(["merge", str(out), "--out", str(tmp_path / "again")]) == 0
  a = safetensors.numpy.load_file(out / "merged" / "model.safetensors")
  b = safetensors.numpy.load_file(tmp_path / "again" / "model.safetensors")
  assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method,stack", [("nf4", 0), ("int8", 1)])
def test_requantize_after_merge_reports_what_rounding_drops(method, stack):
  rng = np.random.default_rng(0)
  base = {"layers": {"up": {"kernel": jnp.asarray(rng.standard_normal((2, 64, 128)) * 0.05, jnp.float32),
                            "bias": jnp.zeros((2, 128))}}}
  q = jlora.quantize(base, method, stack=stack)
  config = jlora.LoraConfig(r=4, lora_alpha=4, target_modules=["up"])
  for size, drowned in ((1e-4, True), (0.3, False)):
    adapters = {"layers": {"up": {"lora_a": jnp.asarray(rng.standard_normal((2, 64, 4)), jnp.float32) * 0.1,
                                  "lora_b": jnp.asarray(rng.standard_normal((2, 4, 128)), jnp.float32) * size}}}
    merged = jlora.merge(jlora.combine(adapters, q), config)
    out, report = jlora.requantize(merged, q)
    kernel = out["layers"]["up"]["kernel"]
    assert isinstance(kernel, QuantizedArray) and kernel.method == method and kernel.meta == q["layers"]["up"]["kernel"].meta
    assert out["layers"]["up"]["bias"] is merged["layers"]["up"]["bias"]
    w = np.asarray(merged["layers"]["up"]["kernel"])
    err = np.linalg.norm(np.asarray(jlora.dequantize(kernel)) - w)
    update = np.linalg.norm(w - np.asarray(jlora.dequantize(q)["layers"]["up"]["kernel"]))
    got = report["layers/up/kernel"]
    np.testing.assert_allclose(got["relative_error"], err / np.linalg.norm(w), rtol=1e-4)
    np.testing.assert_allclose(got["error_to_update"], err / update, rtol=1e-4)
    assert (got["error_to_update"] > 1) == drowned, got
  with pytest.raises(ValueError, match=r"`merged` at 'layers/up/kernel' has shape \(2, 64, 64\).*has \(2, 64, 128\)"):
    jlora.requantize({"layers": {"up": {"kernel": jnp.zeros((2, 64, 64)), "bias": jnp.zeros((2, 128))}}}, q)
  with pytest.raises(ValueError, match=r"`merged` has no leaf at 'layers/up/kernel'"):
    jlora.requantize({"layers": {}}, q)


def test_requantize_keeps_kernels_the_merge_left_quantized():
  rng = np.random.default_rng(1)
  base = {name: {"kernel": jnp.asarray(rng.standard_normal((32, 96)), jnp.float32)} for name in ("a", "b")}
  q = jlora.quantize(base)
  config = jlora.LoraConfig(r=4, target_modules=["a"], init_lora_weights=False)
  merged = jlora.merge(jlora.init_tree(jax.random.key(2), q, config), config)
  assert isinstance(merged["b"]["kernel"], QuantizedArray)  # not adapted: merge keeps it packed
  out, report = jlora.requantize(merged, q)
  assert out["b"]["kernel"] is merged["b"]["kernel"] and set(report) == {"a/kernel"}
  assert isinstance(out["a"]["kernel"], QuantizedArray) and out["a"]["kernel"].meta == q["a"]["kernel"].meta
