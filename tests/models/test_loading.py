"""from_pretrained / from_config / to_hf_state_dict: names, round trips, sharding and errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from jlora import models
from tests.models.helpers import CONFIGS, forward, random_model, tokens, write_checkpoint

GPT2_ONE_LAYER = [
  "transformer.wte.weight",
  "transformer.wpe.weight",
  "transformer.ln_f.weight",
  "transformer.ln_f.bias",
  *(
    f"transformer.h.0.{m}.{p}"
    for m in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")
    for p in ("weight", "bias")
  ),
]


def _inputs(name, model):
  ids = tokens((2, 5))
  return (ids, None, tokens((2, 4), seed=1)) if name.startswith("t5") else (ids,)




def _equal_trees(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_load_run_round_trip(tmp_path, name):
  original, written = write_checkpoint(tmp_path, CONFIGS[name])
  model, params = models.from_pretrained(tmp_path)
  _equal_trees(params, written)
  inputs = _inputs(name, model)  # config.json rebuilt the same model: the same outputs, bit for bit
  np.testing.assert_array_equal(np.asarray(forward(model, params, *inputs)), forward(original, written, *inputs))
  on_disk = safetensors.numpy.load_file(str(tmp_path / "model.safetensors"))
  back = models.to_hf_state_dict(model, params)
  assert sorted(back) == sorted(on_disk)
  for k in back:
    np.testing.assert_array_equal(back[k], on_disk[k])


def test_gpt2_tensor_names_and_layout(tmp_path):
  model, params = models.from_config({**CONFIGS["gpt2"], "n_layer": 1}, key=jax.random.key(0))
  sd = models.to_hf_state_dict(model, params)
  assert sorted(sd) == sorted(GPT2_ONE_LAYER)
  assert sd["transformer.h.0.attn.c_attn.weight"].shape == (16, 48)  # Conv1D: (in, out), no transpose


def test_llama_linear_weights_are_transposed():
  model, params = models.from_config(CONFIGS["llama"], key=jax.random.key(0))
  sd = models.to_hf_state_dict(model, params)
  assert params["model"]["layers_0"]["self_attn"]["k_proj"]["kernel"].shape == (32, 16)
  assert sd["model.layers.0.self_attn.k_proj.weight"].shape == (16, 32)  # torch (out, in)
  np.testing.assert_array_equal(sd["lm_head.weight"], np.asarray(params["lm_head"]["kernel"]).T)


def test_base_model_checkpoint_without_prefix(tmp_path):
  """A `GPT2Model`-style file (no `transformer.` prefix, extra buffers) loads into the LM."""
  model, params = write_checkpoint(tmp_path, CONFIGS["gpt2"])
  sd = {k.removeprefix("transformer."): v for k, v in models.to_hf_state_dict(model, params).items()}
  sd["h.0.attn.bias"] = np.ones((1, 1, 4, 4), np.float32)
  safetensors.numpy.save_file(sd, str(tmp_path / "model.safetensors"))
  _, loaded = models.from_pretrained(tmp_path)
  _equal_trees(loaded, params)


def test_sharded_checkpoint(tmp_path):
  model, params = write_checkpoint(tmp_path, CONFIGS["llama"])
  sd = models.to_hf_state_dict(model, params)
  (tmp_path / "model.safetensors").unlink()
  names = sorted(sd)
  shards = {
    "model-00001-of-00002.safetensors": names[: len(names) // 2],
    "model-00002-of-00002.safetensors": names[len(names) // 2 :],
  }
  for file, keys in shards.items():
    safetensors.numpy.save_file({k: sd[k] for k in keys}, str(tmp_path / file))
  index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
  _, loaded = models.from_pretrained(tmp_path)
  _equal_trees(loaded, params)
  (tmp_path / "model-00002-of-00002.safetensors").unlink()
  with pytest.raises(ValueError, match=r"shard files that do not exist: \['model-00002-of-00002"):
    models.from_pretrained(tmp_path)


def test_dtype_option(tmp_path):
  write_checkpoint(tmp_path, CONFIGS["gpt2"])
  model, params = models.from_pretrained(tmp_path, dtype=jnp.bfloat16)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
  assert forward(model, params, tokens((1, 3))).dtype == jnp.bfloat16


def test_bfloat16_checkpoint_loads_as_float32(tmp_path):
  import ml_dtypes

  model, params = write_checkpoint(tmp_path, CONFIGS["llama"])
  sd = {k: v.astype(ml_dtypes.bfloat16) for k, v in models.to_hf_state_dict(model, params).items()}
  safetensors.numpy.save_file(sd, str(tmp_path / "model.safetensors"))
  _, loaded = models.from_pretrained(tmp_path)
  assert {x.dtype for x in jax.tree.leaves(loaded)} == {jnp.dtype(jnp.float32)}
  want = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params)
  _equal_trees(loaded, want)


def test_new_head_needs_a_key(tmp_path):
  """A base BERT loads as a classifier only when a key initializes the new head."""
  write_checkpoint(tmp_path, CONFIGS["bert"])
  with pytest.raises(ValueError, match=r"missing head parameters: .*classifier/kernel.*pass `key="):
    models.from_pretrained(tmp_path, task="SEQ_CLS")
  _, written = random_model(CONFIGS["bert"])
  for task, num_labels in (("SEQ_CLS", None), ("TOKEN_CLS", 5)):
    options = {"task": task} if num_labels is None else {"task": task, "num_labels": num_labels}
    model, params = models.from_pretrained(tmp_path, key=jax.random.key(1), **options)
    _, fresh = models.from_config(CONFIGS["bert"], key=jax.random.key(1), **options)
    _equal_trees(params["bert"]["encoder"], written["encoder"])  # the encoder is the checkpoint's
    _equal_trees(params["classifier"], fresh["classifier"])  # the new head is the key's initialization
    assert params["classifier"]["kernel"].shape == (16, num_labels or 2)
    assert ("pooler" in params["bert"]) == (task == "SEQ_CLS")
  assert forward(model, params, tokens((2, 5))).shape == (2, 5, 5)


# --- errors --------------------------------------------------------------------------------


def _write(tmp_path, config, tensors):
  (tmp_path / "config.json").write_text(json.dumps(config))
  safetensors.numpy.save_file(tensors, str(tmp_path / "model.safetensors"))


def test_error_missing_model_type(tmp_path):
  _write(tmp_path, {"n_layer": 1}, {"a": np.zeros(1, np.float32)})
  with pytest.raises(ValueError, match=r"no `model_type`.*'gpt2', 'llama'"):
    models.from_pretrained(tmp_path)


def test_error_unsupported_model_type(tmp_path):
  _write(tmp_path, {"model_type": "gemma3"}, {"a": np.zeros(1, np.float32)})
  with pytest.raises(ValueError, match=r"Unsupported model_type `gemma3`.*supported model types: \['gpt2'"):
    models.from_pretrained(tmp_path)
  with pytest.raises(ValueError, match="Unsupported model_type `rwkv`"):
    models.from_config("rwkv", key=jax.random.key(0))


def test_error_missing_files(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    models.from_pretrained(tmp_path / "nowhere")
  with pytest.raises(ValueError, match=r"has no config\.json"):
    models.from_pretrained(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(CONFIGS["gpt2"]))
  with pytest.raises(ValueError, match=r"neither model\.safetensors nor model\.safetensors\.index\.json"):
    models.from_pretrained(tmp_path)


def test_error_missing_unexpected_misshaped_tensors(tmp_path):
  model, params = write_checkpoint(tmp_path, CONFIGS["gpt2"])
  sd = models.to_hf_state_dict(model, params)
  del sd["transformer.h.1.mlp.c_fc.bias"]
  sd["transformer.h.0.attn.q_proj.weight"] = np.zeros((2, 2), np.float32)
  sd["transformer.wpe.weight"] = np.zeros((8, 16), np.float32)
  safetensors.numpy.save_file(sd, str(tmp_path / "model.safetensors"))
  with pytest.raises(ValueError) as err:
    models.from_pretrained(tmp_path)
  msg = str(err.value)
  assert "missing tensors: transformer.h.1.mlp.c_fc.bias" in msg
  assert "unexpected tensors: transformer.h.0.attn.q_proj.weight" in msg
  assert "`transformer.wpe.weight`: expected (32, 16), given (8, 16)" in msg
  assert "Check that config.json belongs to these weights" in msg


def test_error_unknown_option_and_task(tmp_path):
  with pytest.raises(ValueError, match=r"Unknown option\(s\) \['scan_layers'\] for model_type `gpt2`"):
    models.from_config(CONFIGS["gpt2"], key=jax.random.key(0), scan_layers=True)
  with pytest.raises(ValueError, match=r"Unsupported BERT `task='QA'`; supported: \['SEQ_CLS'"):
    models.from_config(CONFIGS["bert"], key=jax.random.key(0), task="QA")


def test_error_unsupported_config_options():
  with pytest.raises(ValueError, match="Unsupported RoPE scaling `yarn`"):
    models.from_config(
      {**CONFIGS["llama"], "rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, key=jax.random.key(0)
    )
  with pytest.raises(ValueError, match="Unsupported activation `swiglu_x`"):
    models.from_config({**CONFIGS["t5"], "feed_forward_proj": "gated-swiglu_x"}, key=jax.random.key(0))
  with pytest.raises(ValueError, match="position_embedding_type='relative_key'"):
    models.from_config({**CONFIGS["bert"], "position_embedding_type": "relative_key"}, key=jax.random.key(0))


def test_to_hf_rejects_foreign_models():
  import flax.linen as nn

  with pytest.raises(ValueError, match=r"must be a jlora\.models model"):
    models.to_hf_state_dict(nn.Dense(3), {})
