"""KV-cached generation equals repeated full forwards; sampling is a function of the key."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora import models
from tests.models.helpers import CONFIGS, random_model, tokens

NEW = 6


def _model(name, **options):
  return random_model(CONFIGS[name], **options)


def _greedy_reference(model, params, ids, n):
  """Full forward over the whole sequence per new token (no cache). Causal attention lets the
  buffer have a fixed length (later slots hold zeros), so one jitted forward serves every step."""
  t = ids.shape[1]
  forward = jax.jit(lambda p, x: model.apply({"params": p}, x))
  buf = jnp.zeros((ids.shape[0], t + n), ids.dtype).at[:, :t].set(ids)
  for i in range(t, t + n):
    buf = buf.at[:, i].set(jnp.argmax(forward(params, buf)[:, i - 1], -1).astype(ids.dtype))
  return np.asarray(buf[:, t:])


@pytest.mark.parametrize(
  "name, options", [("gpt2", {}), ("llama", {}), ("llama", {"scan_layers": True}), ("mistral", {}), ("qwen2", {})]
)
def test_greedy_matches_full_forwards(name, options):
  model, params = _model(name, **options)
  ids = jnp.asarray(tokens((2, 5)))
  out = models.generate(model, params, ids, max_new_tokens=NEW)
  assert out.shape == (2, NEW) and out.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(out), _greedy_reference(model, params, ids, NEW))


def test_left_padded_batch_matches_unpadded_rows():
  model, params = _model("llama")
  long, short = tokens((1, 6)), tokens((1, 3), seed=3)
  ids = np.concatenate([long, np.concatenate([np.zeros((1, 3), np.int32), short], 1)])
  mask = np.array([[1] * 6, [0, 0, 0, 1, 1, 1]], np.int32)
  batched = models.generate(model, params, ids, mask, max_new_tokens=NEW)
  for row, prompt in enumerate((long, short)):
    alone = models.generate(model, params, prompt, max_new_tokens=NEW)
    np.testing.assert_array_equal(np.asarray(batched[row]), np.asarray(alone[0]))


def test_sampling_is_deterministic_per_key():
  model, params = _model("gpt2")
  ids = tokens((2, 4))
  kw = {"max_new_tokens": NEW, "temperature": 1.5, "top_k": 5}
  a = models.generate(model, params, ids, key=jax.random.key(7), **kw)
  b = models.generate(model, params, ids, key=jax.random.key(7), **kw)
  c = models.generate(model, params, ids, key=jax.random.key(8), **kw)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(np.asarray(a), np.asarray(c))
  top1 = models.generate(model, params, ids, key=jax.random.key(9), max_new_tokens=NEW, temperature=1.0, top_k=1)
  np.testing.assert_array_equal(np.asarray(top1), np.asarray(models.generate(model, params, ids, max_new_tokens=NEW)))


def test_eos_pads_the_rest():
  model, params = _model("gpt2")
  ids = tokens((1, 4))
  out = np.asarray(models.generate(model, params, ids, max_new_tokens=NEW))
  eos = int(out[0, 1])
  stopped = np.asarray(models.generate(model, params, ids, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=-1))
  first = list(out[0]).index(eos)
  np.testing.assert_array_equal(stopped[0, : first + 1], out[0, : first + 1])
  assert (stopped[0, first + 1 :] == -1).all()


def test_apply_fn_takes_model_apply_slot_and_extra_leaves_are_ignored():
  """Extra `lora_*` leaves are ignored by the plain model; `apply_fn(variables, ...)` replaces the forward."""
  model, params = _model("gpt2")
  ids = tokens((1, 4))
  extra = jax.tree_util.tree_map(lambda x: x, params)
  extra["transformer"]["h_0"]["attn"]["c_attn"]["lora_a"] = jnp.ones((16, 2))
  base = models.generate(model, params, ids, max_new_tokens=3)
  np.testing.assert_array_equal(np.asarray(models.generate(model, extra, ids, max_new_tokens=3)), np.asarray(base))
  np.testing.assert_array_equal(
    np.asarray(models.generate(model, params, ids, max_new_tokens=3, apply_fn=model.apply)), np.asarray(base)
  )
  seen = []

  def favour_token_5(variables, *args, **kwargs):
    seen.append(sorted(variables))
    logits, cache = model.apply(variables, *args, **kwargs)
    return logits.at[..., 5].add(1e3), cache

  hooked = models.generate(model, params, ids, max_new_tokens=3, apply_fn=favour_token_5)
  np.testing.assert_array_equal(np.asarray(hooked), [[5, 5, 5]])
  assert seen and all(keys == ["params"] for keys in seen)  # a variables dict, as model.apply takes


def test_generate_checks_prompt_ids_and_gpt2_positions():
  model, params = _model("gpt2")  # vocab_size 37, n_positions 32
  with pytest.raises(ValueError, match=r"`input_ids` holds 37 at index \[0, 1\].*`vocab_size=37`.*tokenizer"):
    models.generate(model, params, np.array([[3, 37]], np.int32), max_new_tokens=2)
  prompt = tokens((1, 20))
  with pytest.raises(ValueError, match=r"`max_new_tokens=14` after a prompt of 20 tokens needs positions up to 32.*"
                     r"`n_positions=32`.*at most 13"):
    models.generate(model, params, prompt, max_new_tokens=14)
  assert models.generate(model, params, prompt, max_new_tokens=13).shape == (1, 13)  # the last position, 31, fits
  left_padded = np.concatenate([np.zeros((1, 5), np.int32), prompt[:, :15]], 1)
  mask = np.array([[0] * 5 + [1] * 15], np.int32)  # padding takes no position
  assert models.generate(model, params, left_padded, mask, max_new_tokens=18).shape == (1, 18)


def test_generate_errors():
  model, params = _model("gpt2")
  with pytest.raises(ValueError, match="needs an explicit `key="):
    models.generate(model, params, tokens((1, 2)), max_new_tokens=2, temperature=0.7)
  with pytest.raises(ValueError, match="`max_new_tokens` must be >= 1"):
    models.generate(model, params, tokens((1, 2)), max_new_tokens=0)


def test_list_valued_config_fields_stay_hashable():
  """Llama 3 configs list several `eos_token_id`s; the model must stay a valid static jit argument."""
  model, params = models.from_config({**CONFIGS["llama"], "eos_token_id": [2, 3]}, key=jax.random.key(0))
  assert model.config.eos_token_id == (2, 3) and hash(model) == hash(model.clone())
  single, _ = models.from_config(CONFIGS["llama"], key=jax.random.key(0))
  ids = tokens((1, 3))
  np.testing.assert_array_equal(  # the field only describes the checkpoint: the same weights generate the same
    np.asarray(models.generate(model, params, ids, max_new_tokens=2)),
    np.asarray(models.generate(single, params, ids, max_new_tokens=2)),
  )


def test_generate_needs_a_decoder():
  model, params = models.from_config(CONFIGS["bert"], key=jax.random.key(0))
  with pytest.raises(ValueError, match="needs a decoder with a KV cache"):
    models.generate(model, params, tokens((1, 2)), max_new_tokens=2)
