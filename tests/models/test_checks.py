"""Indices outside an embedding table raise outside jit, cost nothing inside it, and leave jlora.init alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.models._arch import HFModel
from tests.models.helpers import CONFIGS, forward, tokens, zero_model


def _call(name, model, params, ids, **kwargs):
  if name == "t5":
    kwargs.setdefault("decoder_input_ids", tokens((1, 3)))
  return model.apply({"params": params}, ids, **kwargs)


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert", "bert_seq_cls", "t5"])
@pytest.mark.parametrize("bad", [37, -1])
def test_token_ids_outside_the_vocabulary(name, bad):
  model, params = zero_model(CONFIGS[name])
  ids = np.array([[3, 4, bad]], np.int32)
  with pytest.raises(ValueError, match=rf"`input_ids` holds {bad} at index \[0, 2\].*0\.\.36 \(`vocab_size=37`.*tokenizer"):
    _call(name, model, params, ids)
  out = forward(model, params, *((ids, None, tokens((1, 3))) if name == "t5" else (ids,)))  # inside jit: unchecked,
  assert np.isnan(np.asarray(out)).any() == (bad == 37)  # and the garbage the check stops: NaN, or a wrapped row


def test_t5_decoder_ids_name_shift_right():
  model, params = zero_model(CONFIGS["t5"])
  with pytest.raises(ValueError, match=r"`decoder_input_ids` holds -100 .*`jlora\.models\.t5\.shift_right"):
    _call("t5", model, params, tokens((1, 3)), decoder_input_ids=np.array([[0, 5, -100]], np.int32))


def test_gpt2_positions():
  model, params = zero_model(CONFIGS["gpt2"])  # n_positions 32
  with pytest.raises(ValueError, match=r"`positions` holds 32 at index \[0, 1\].*`n_positions=32`.*max_new_tokens"):
    _call("gpt2", model, params, tokens((1, 2)), positions=np.array([[31, 32]], np.int32))
  with pytest.raises(ValueError, match=r"`input_ids` needs positions 0\.\.32, but GPT2LMHeadModel has learned "
                     r"positions 0\.\.31 only \(`n_positions=32`.*max_length=32"):
    forward(model, params, tokens((1, 33)))  # a length is a static shape: refused inside jit too
  cache = model.init_cache(1, 40)._replace(index=jnp.asarray(30, jnp.int32))  # 30 tokens decoded
  with pytest.raises(ValueError, match=r"needs positions 0\.\.32"):
    _call("gpt2", model, params, tokens((1, 3)), cache=cache)
  assert forward(model, params, tokens((1, 32))).shape == (1, 32, 37)


def test_bert_token_types_and_length():
  model, params = zero_model(CONFIGS["bert_seq_cls"])  # type_vocab_size 2, max_position_embeddings 32
  with pytest.raises(ValueError, match=r"`token_type_ids` holds 2 at index \[0, 1\].*`type_vocab_size=2`"):
    _call("bert", model, params, tokens((1, 3)), token_type_ids=np.array([[0, 2, 1]], np.int32))
  with pytest.raises(ValueError, match=r"`input_ids` needs positions 0\.\.32.*`max_position_embeddings=32`"):
    forward(model, params, tokens((1, 33)))


def test_rope_and_relative_positions_have_no_length_limit():
  llama, llama_params = zero_model(CONFIGS["llama"])  # max_position_embeddings=64 names no table
  assert forward(llama, llama_params, tokens((1, 70))).shape == (1, 70, 37)
  t5, t5_params = zero_model(CONFIGS["t5"])
  assert forward(t5, t5_params, tokens((1, 70)), None, tokens((1, 70))).shape == (1, 70, 37)


@pytest.mark.parametrize("name", ["gpt2", "bert_seq_cls", "t5"])
def test_checks_add_nothing_to_the_traced_program(name, monkeypatch):
  model, params = zero_model(CONFIGS[name])
  inputs = (tokens((1, 4)), None, tokens((1, 4))) if name == "t5" else (tokens((1, 4)),)

  def trace():
    return str(jax.make_jaxpr(lambda p, *x: model.apply({"params": p}, *x))(params, *inputs))

  checked = trace()
  monkeypatch.setattr(HFModel, "check_inputs", lambda self, **inputs: None)
  monkeypatch.setattr(HFModel, "check_length", lambda self, arg, length: None)
  assert trace() == checked


def test_abstract_traces_are_not_checked():
  """`jax.eval_shape` (as `jlora.init` uses) sees no values, so it neither checks nor fails."""
  model, params = zero_model(CONFIGS["gpt2"])
  ids = np.array([[3, 99]], np.int32)
  out = jax.eval_shape(lambda p, x: model.apply({"params": p}, x), params, ids)
  assert out.shape == (1, 2, 37)
  cfg = jlora.LoraConfig(r=2, target_modules=["c_attn"])
  adapted = jlora.init(jax.random.key(0), model, params, cfg, jnp.asarray(tokens((1, 4))))
  assert adapted["transformer"]["h_0"]["attn"]["c_attn"]["lora_a"].shape == (16, 2)
