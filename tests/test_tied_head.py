"""The tied-head idiom: a layer re-applied with a weight given at call time (`self.lm_head.apply({"params":
{"kernel": embedding.T}}, h)`), as Hugging Face's Flax GPT-2 and T5 compute their logits. A faithful reproduction
in pure flax: an `nn.Embed`, a body of `nn.Dense`, and an `nn.Dense` head applied that way."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora


class Block(nn.Module):
  @nn.compact
  def __call__(self, h, _):
    return h + nn.Dense(16, name="mlp")(h), None


class TiedLM(nn.Module):
  """`wte` -> body -> logits through `lm_head` applied with `wte`'s table, transposed (HF's FlaxGPT2LMHeadModule)."""

  stack: str = "plain"  # "plain": a Dense body; "scan": nn.scan(nn.remat(Block)) over two layers
  softcap: bool = False

  def setup(self):
    self.wte = nn.Embed(50, 16)
    self.lm_head = nn.Dense(50, use_bias=False)
    if self.stack == "scan":
      self.body = nn.scan(nn.remat(Block), variable_axes={"params": 0}, split_rngs={"params": True}, length=2)()
    else:
      self.body = nn.Dense(16)

  def __call__(self, ids):
    h = self.wte(ids)
    h = self.body(h, None)[0] if self.stack == "scan" else self.body(h)
    logits = self.lm_head.apply({"params": {"kernel": self.wte.variables["params"]["embedding"].T}}, h)
    return 30.0 * jnp.tanh(logits.astype(jnp.float32) / 30.0) if self.softcap else logits


def _setup(stack="plain", softcap=False):
  model, ids = TiedLM(stack, softcap), jnp.arange(10).reshape(2, 5) % 50
  return model, ids, model.init(jax.random.key(0), ids)["params"]


def _close(a, b, rtol=1e-5):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=rtol * float(jnp.max(jnp.abs(b))))


@pytest.mark.parametrize("stack, jit", [("plain", False), ("plain", True), ("scan", True)])
def test_body_adapted_head_left_alone_forward_merge_and_apply_merged_agree(stack, jit):
  model, ids, base = _setup(stack)
  assert "lm_head" not in base  # the head's weight is the embedding's: not in the tree
  at_init = jlora.LoraConfig(r=2, target_modules="all-linear")
  params = jlora.init(jax.random.key(1), model, base, at_init, ids)
  fwd = (jax.jit if jit else (lambda f: f))(lambda p, x: jlora.apply(model, p, at_init, x))
  np.testing.assert_array_equal(fwd(params, ids), model.apply({"params": base}, ids)) if not jit else \
      _close(fwd(params, ids), model.apply({"params": base}, ids))  # B = 0: the base model's own output

  config = jlora.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False)
  params = jlora.init(jax.random.key(1), model, base, config, ids)
  body = params["body"]["mlp"] if stack == "scan" else params["body"]
  assert body["lora_a"].shape == ((2, 16, 2) if stack == "scan" else (16, 2)) and "lora_a" not in params["wte"]
  y = fwd(params, ids)
  base_y = model.apply({"params": base}, ids)
  assert float(jnp.max(jnp.abs(y - base_y))) > 1e-2 * float(jnp.max(jnp.abs(base_y)))
  _close(y, model.apply({"params": jlora.merge(params, config)}, ids))
  _close(y, jlora.apply_merged(lambda p, x: model.apply({"params": p}, x), params, config, ids))


def test_head_found_by_what_the_model_returns_through_a_cast_and_a_softcap():
  model, ids, base = _setup(softcap=True)

  class Untied(nn.Module):  # the same, but the head holds its own kernel, under a name that says nothing
    @nn.compact
    def __call__(self, ids):
      h = nn.Dense(16, name="body")(nn.Embed(50, 16, name="wte")(ids))
      return 30.0 * jnp.tanh(nn.Dense(50, name="logits_proj")(h).astype(jnp.float32) / 30.0)

  m2 = Untied()
  p2 = m2.init(jax.random.key(0), ids)["params"]
  params = jlora.init(jax.random.key(1), m2, p2, jlora.LoraConfig(r=2, target_modules="all-linear"), ids)
  assert "lora_a" in params["body"] and "lora_a" not in params["logits_proj"]
  params = jlora.init(jax.random.key(1), model, base, jlora.LoraConfig(r=2, target_modules="all-linear"), ids)
  assert "lora_a" in params["body"]


def test_naming_the_tied_head_is_refused_with_the_reason():
  model, ids, base = _setup()
  for targets in (["lm_head"], ".*"):
    with pytest.raises(ValueError, match=r"(?s)lm_head.*weight given at call time.*tie_word_embeddings=False"):
      jlora.init(jax.random.key(1), model, base, jlora.LoraConfig(r=2, target_modules=targets), ids)


@pytest.mark.parametrize("stack", ["plain", "scan"])
def test_adapting_the_tied_embedding_is_refused_since_merge_would_change_the_head(stack):
  model, ids, base = _setup(stack)
  with pytest.raises(ValueError, match=r"(?s)'lm_head'.*computed from 'wte/embedding'.*exclude_modules=\['wte'\]"):
    jlora.init(jax.random.key(1), model, base, jlora.LoraConfig(r=2, target_modules=["wte", "body"]), ids)
  params = jlora.init(jax.random.key(1), model, base,  # the embedding alone, untied from nothing: fine elsewhere
                      jlora.LoraConfig(r=2, target_modules=["body", "mlp"], exclude_modules=["wte"]), ids)
  assert "lora_a" not in params["wte"]


class FlaxConv1D(nn.Module):
  """Hugging Face transformers 4.57's `FlaxConv1D` (`models/gpt2/modeling_flax_gpt2.py`): kernel `(features, in)`,
  `y = x·kernelᵀ + bias`, inputs and kernel cast to `dtype`. jlora ships it described by this qualified name."""

  features: int
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs):
    inputs = jnp.asarray(inputs, self.dtype)
    kernel = self.param("kernel", jax.nn.initializers.normal(stddev=0.02), (self.features, inputs.shape[-1]))
    kernel = jnp.asarray(kernel.transpose(), self.dtype)
    y = jax.lax.dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())))
    return y + jnp.asarray(self.param("bias", jax.nn.initializers.normal(0.1), (self.features,)), self.dtype) \
        if self.use_bias else y


FlaxConv1D.__module__ = "transformers.models.gpt2.modeling_flax_gpt2"


class TiedGPT2(nn.Module):
  """HF's GPT-2 layout in miniature: FlaxConv1D projections and the tied head."""

  def setup(self):
    self.wte = nn.Embed(50, 16)
    self.c_attn, self.c_proj = FlaxConv1D(48), FlaxConv1D(16)
    self.lm_head = nn.Dense(50, use_bias=False)

  def __call__(self, ids):
    h = self.wte(ids)
    q, k, v = jnp.split(self.c_attn(h), 3, axis=-1)
    h = h + self.c_proj(jax.nn.softmax(q @ k.swapaxes(-1, -2)) @ v)
    return self.lm_head.apply({"params": {"kernel": self.wte.variables["params"]["embedding"].T}}, h)


def test_hf_gpt2_conv1d_ships_described_and_the_tied_model_merges_exactly():
  model, ids = TiedGPT2(), jnp.arange(10).reshape(2, 5) % 50
  base = model.init(jax.random.key(0), ids)["params"]
  config = jlora.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False)
  params = jlora.init(jax.random.key(1), model, base, config, ids)
  assert params["c_attn"]["lora_a"].shape == (1, 16, 2) and params["c_attn"]["lora_b"].shape == (48, 1, 2)  # (out, in)
  y = jax.jit(lambda p, x: jlora.apply(model, p, config, x))(params, ids)
  assert float(jnp.max(jnp.abs(y - model.apply({"params": base}, ids)))) > 1e-3
  _close(y, model.apply({"params": jlora.merge(params, config)}, ids))
