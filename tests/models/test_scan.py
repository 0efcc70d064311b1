"""scan_layers / remat give the same logits and gradients from the same checkpoint."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import jlora
from jlora import models
from tests.models.helpers import CONFIGS, forward, tokens, write_checkpoint


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral"])
def test_scan_layers_same_logits(tmp_path, name):
  write_checkpoint(tmp_path, CONFIGS[name])
  ids = tokens((2, 7))
  plain, p_plain = models.from_pretrained(tmp_path)
  scanned, p_scan = models.from_pretrained(tmp_path, scan_layers=True)
  assert p_scan["model"]["layers"]["self_attn"]["q_proj"]["kernel"].shape == (2, 32, 32)
  assert "layers_0" in p_plain["model"] and "layers" not in p_plain["model"]
  a = forward(plain, p_plain, ids)
  b = forward(scanned, p_scan, ids)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
  # Stacked params convert back to the same per-layer HF tensors.
  hf_plain, hf_scan = models.to_hf_state_dict(plain, p_plain), models.to_hf_state_dict(scanned, p_scan)
  assert sorted(hf_plain) == sorted(hf_scan)
  for k in hf_plain:
    np.testing.assert_array_equal(hf_plain[k], hf_scan[k])


@pytest.mark.parametrize("scan_layers", [False, True])
def test_remat_same_loss_and_grads(tmp_path, scan_layers):
  write_checkpoint(tmp_path, CONFIGS["llama"])
  ids = tokens((2, 6))
  base, params = models.from_pretrained(tmp_path, scan_layers=scan_layers)
  remat, _ = models.from_pretrained(tmp_path, scan_layers=scan_layers, remat=True)

  def loss(model, p):
    return jnp.mean(model.apply({"params": p}, ids) ** 2)

  l1, g1 = jax.jit(jax.value_and_grad(lambda p: loss(base, p)))(params)
  l2, g2 = jax.jit(jax.value_and_grad(lambda p: loss(remat, p)))(params)
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)


def test_layers_to_transform_picks_the_same_layers_scanned_or_not(tmp_path):
  """`layers_to_transform` on a scanned Llama (a layer mask, docs/concepts.md) equals the unrolled model: the same
  adapters give the same logits, and `save_peft` writes the same PEFT file (only `model.layers.1...`)."""
  write_checkpoint(tmp_path, CONFIGS["llama"])
  ids = tokens((2, 7))
  plain, p_plain = models.from_pretrained(tmp_path)
  scanned, p_scan = models.from_pretrained(tmp_path, scan_layers=True)
  cfg = jlora.LoraConfig(r=2, target_modules=["q_proj", "down_proj"], layers_to_transform=[1], init_lora_weights=False)
  a = jlora.init(jax.random.key(1), scanned, p_scan, cfg, ids)
  b = jlora.init(jax.random.key(1), plain, p_plain, cfg, ids)
  assert "lora_a" not in b["model"]["layers_0"]["self_attn"]["q_proj"]
  for path in (("self_attn", "q_proj"), ("mlp", "down_proj")):
    stacked, node = a["model"]["layers"], b["model"]["layers_1"]
    for key in path:
      stacked, node = stacked[key], node[key]
    assert stacked["lora_layers"].tolist() == [0.0, 1.0]
    node["lora_a"], node["lora_b"] = stacked["lora_a"][1], stacked["lora_b"][1]
  y = jax.jit(lambda p: jlora.apply(scanned, p, cfg, ids))(a)
  np.testing.assert_allclose(y, jax.jit(lambda p: jlora.apply(plain, p, cfg, ids))(b), atol=1e-5, rtol=1e-5)
  assert not np.allclose(y, forward(scanned, p_scan, ids), atol=1e-4)
  jlora.save_peft(tmp_path / "scan", scanned, a, cfg)
  jlora.save_peft(tmp_path / "plain", plain, b, cfg)
  ts, tp = (safetensors.numpy.load_file(tmp_path / d / "adapter_model.safetensors") for d in ("scan", "plain"))
  assert sorted(ts) == sorted(tp) and all(".layers.1." in k for k in ts)
  for k in ts:
    np.testing.assert_array_equal(ts[k], tp[k])
