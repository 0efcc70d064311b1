"""scan_layers / remat give the same logits and gradients from the same checkpoint."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
