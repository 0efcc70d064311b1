"""jlora on the reference models: HF-named target_modules hit the expected layers, factored == merged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora import models
from tests.models.helpers import CONFIGS, forward, lora_forward, random_model, tokens


def _adapted(params, prefix=()):
  """Paths ('/'-joined) of modules holding `lora_a`, with the lora_a shape."""
  out = {}
  for k, v in params.items():
    if isinstance(v, dict):
      if "lora_a" in v:
        out["/".join((*prefix, k))] = tuple(v["lora_a"].shape)
      out.update(_adapted(v, (*prefix, k)))
  return out


def _inputs(name):
  ids = tokens((2, 6))
  mask = np.ones_like(ids)
  mask[1, -2:] = 0
  if name.startswith("t5"):
    return (ids, mask, tokens((2, 5), seed=1))
  return (ids, mask)


CASES = {
  "gpt2": (["c_attn"], {f"transformer/h_{i}/attn/c_attn": (16, 4) for i in range(2)}),
  "llama": (
    ["q_proj", "v_proj"],
    {f"model/layers_{i}/self_attn/{m}": (32, 4) for i in range(2) for m in ("q_proj", "v_proj")},
  ),
  "qwen2": (
    ["q_proj", "v_proj"],
    {f"model/layers_{i}/self_attn/{m}": (32, 4) for i in range(2) for m in ("q_proj", "v_proj")},
  ),
  "bert_seq_cls": (
    ["query", "value"],
    {f"bert/encoder/layer_{i}/attention/self/{m}": (16, 4) for i in range(2) for m in ("query", "value")},
  ),
  "bert": (
    ["query", "value"],
    {f"encoder/layer_{i}/attention/self/{m}": (16, 4) for i in range(2) for m in ("query", "value")},
  ),
  "t5": (
    ["q", "v"],
    {
      **{f"encoder/block_{i}/layer_0/SelfAttention/{m}": (16, 4) for i in range(2) for m in "qv"},
      **{
        f"decoder/block_{i}/{a}/{m}": (16, 4)
        for i in range(2)
        for m in "qv"
        for a in ("layer_0/SelfAttention", "layer_1/EncDecAttention")
      },
    },
  ),
}






def _setup(name, targets, **options):
  model, params = random_model(CONFIGS[name], **options)
  cfg = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
  inputs = _inputs(name)
  return model, jlora.init(jax.random.key(2), model, params, cfg, *inputs), cfg, inputs, params


@pytest.mark.parametrize("name", sorted(CASES))
def test_hf_target_modules_factored_equals_merged(name):
  targets, expected = CASES[name]
  model, params, cfg, inputs, base = _setup(name, targets)
  assert _adapted(params) == expected
  factored = lora_forward(model, params, cfg, *inputs)
  merged = forward(model, jlora.merge(params, cfg), *inputs)
  plain = forward(model, base, *inputs)
  np.testing.assert_allclose(np.asarray(factored), np.asarray(merged), rtol=1e-5, atol=1e-5)
  assert not np.allclose(np.asarray(factored), np.asarray(plain), atol=1e-3)  # non-zero B: not a no-op
  # Merged params export to HF names like the base.
  assert sorted(models.to_hf_state_dict(model, jlora.merge(params, cfg))) == sorted(
    models.to_hf_state_dict(model, base)
  )


def test_scan_layers_stacked_adapters():
  model, params, cfg, inputs, _ = _setup("llama", ["q_proj", "v_proj"], scan_layers=True, remat=True)
  assert _adapted(params) == {f"model/layers/self_attn/{m}": (2, 32, 4) for m in ("q_proj", "v_proj")}
  assert params["model"]["layers"]["self_attn"]["v_proj"]["lora_b"].shape == (2, 4, 16)
  factored = lora_forward(model, params, cfg, *inputs)
  merged = forward(model, jlora.merge(params, cfg), *inputs)
  np.testing.assert_allclose(np.asarray(factored), np.asarray(merged), rtol=1e-5, atol=1e-5)


def test_scan_and_loop_agree_with_adapters():
  """The same adapters, stacked or per layer, give the same LoRA forward."""
  model, params, cfg, inputs, _ = _setup("llama", ["q_proj", "v_proj"])
  scanned, _ = random_model(CONFIGS["llama"], scan_layers=True)
  layers = [params["model"].pop(f"layers_{i}") for i in range(2)]
  stacked = {
    "model": {**params["model"], "layers": jax.tree.map(lambda *x: jnp.stack(x), *layers)},
    "lm_head": params["lm_head"],
  }
  for i, layer in enumerate(layers):
    params["model"][f"layers_{i}"] = layer
  a = lora_forward(model, params, cfg, *inputs)
  b = lora_forward(scanned, stacked, cfg, *inputs)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_gradients_only_on_adapters_and_equal_to_merged_gradients():
  """Gradients reach only lora_a / lora_b (incl. through GPT-2's tied head) and equal those through `merge`."""
  model, params, cfg, inputs, _ = _setup("gpt2", ["c_attn", "c_fc"])
  trainable, frozen = jlora.split(params, cfg)
  ids = inputs[0]

  def nll(logits):
    return -jnp.mean(jax.nn.log_softmax(logits[:, :-1]) * jax.nn.one_hot(ids[:, 1:], logits.shape[-1]))

  def factored(t):
    return nll(jlora.apply(model, jlora.combine(t, frozen), cfg, *inputs))

  def merged(t):
    return nll(model.apply({"params": jlora.merge(jlora.combine(t, frozen), cfg)}, *inputs))

  grads = jax.jit(jax.grad(factored))(trainable)
  leaves = jax.tree_util.tree_leaves_with_path(grads)
  assert {p[-1].key for p, _ in leaves} == {"lora_a", "lora_b"}
  assert len(leaves) == 2 * 4  # two targets in each of the two blocks
  reference = jax.jit(jax.grad(merged))(trainable)
  for (path, g), r in zip(leaves, jax.tree.leaves(reference)):
    assert float(jnp.abs(g).max()) > 1e-6, path  # every adapter receives a signal
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-6)


def test_generate_with_apply_fn_equals_merged_and_compiles_once():
  """`jlora.apply_fn` sits in `generate`'s `apply_fn` slot; equal ones share one compiled loop."""
  from jlora.models._decoding import _generate

  model, params, cfg, _, _ = _setup("llama", ["q_proj", "v_proj"])
  ids = tokens((2, 4))
  before = _generate._cache_size()
  lora = models.generate(model, params, ids, max_new_tokens=5, apply_fn=jlora.apply_fn(model, cfg))
  again = models.generate(model, params, ids, max_new_tokens=5, apply_fn=jlora.apply_fn(model, cfg))
  assert _generate._cache_size() == before + 1  # the second, equal apply_fn found the first compile
  merged = models.generate(model, jlora.merge(params, cfg), ids, max_new_tokens=5)
  np.testing.assert_array_equal(np.asarray(lora), np.asarray(merged))
  np.testing.assert_array_equal(np.asarray(again), np.asarray(lora))
  plain = models.generate(model, params, ids, max_new_tokens=5)  # the adapters change what is generated
  assert not np.array_equal(np.asarray(plain), np.asarray(lora))
