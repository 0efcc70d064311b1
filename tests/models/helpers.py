"""Tiny Hugging Face style checkpoints shared by the model tests."""

from __future__ import annotations

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jlora
from jlora import models
from jlora.models import _load

GPT2 = {
  "model_type": "gpt2",
  "architectures": ["GPT2LMHeadModel"],
  "n_layer": 2,
  "n_embd": 16,
  "n_head": 2,
  "vocab_size": 37,
  "n_positions": 32,
  "activation_function": "gelu_new",
  "layer_norm_epsilon": 1e-5,
  "bos_token_id": 0,
  "eos_token_id": 0,
}
LLAMA = {
  "model_type": "llama",
  "architectures": ["LlamaForCausalLM"],
  "num_hidden_layers": 2,
  "hidden_size": 32,
  "intermediate_size": 48,
  "num_attention_heads": 4,
  "num_key_value_heads": 2,
  "vocab_size": 37,
  "rope_theta": 500000.0,
  "max_position_embeddings": 64,
  "rms_norm_eps": 1e-5,
  "tie_word_embeddings": False,
  "hidden_act": "silu",
  "bos_token_id": 1,
  "eos_token_id": 2,
}
LLAMA3_TIED_BIAS = {
  **LLAMA,
  "tie_word_embeddings": True,
  "attention_bias": True,
  "mlp_bias": True,
  "rope_scaling": {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
  },
}
MISTRAL = {
  **LLAMA,
  "model_type": "mistral",
  "architectures": ["MistralForCausalLM"],
  "num_key_value_heads": 1,
  "sliding_window": 4,
  "rope_theta": 10000.0,
  "head_dim": 8,
}
QWEN2 = {
  **LLAMA,
  "model_type": "qwen2",
  "architectures": ["Qwen2ForCausalLM"],
  "tie_word_embeddings": True,
  "use_sliding_window": False,
  "rope_theta": 1000000.0,
}
BERT = {
  "model_type": "bert",
  "architectures": ["BertModel"],
  "num_hidden_layers": 2,
  "hidden_size": 16,
  "intermediate_size": 24,
  "num_attention_heads": 4,
  "vocab_size": 37,
  "max_position_embeddings": 32,
  "type_vocab_size": 2,
  "hidden_act": "gelu",
  "layer_norm_eps": 1e-12,
  "pad_token_id": 0,
}
BERT_SEQ_CLS = {
  **BERT,
  "architectures": ["BertForSequenceClassification"],
  "id2label": {"0": "a", "1": "b", "2": "c"},
  "label2id": {"a": 0, "b": 1, "c": 2},
}
BERT_TOKEN_CLS = {**BERT_SEQ_CLS, "architectures": ["BertForTokenClassification"]}
T5 = {
  "model_type": "t5",
  "architectures": ["T5ForConditionalGeneration"],
  "num_layers": 2,
  "num_decoder_layers": 2,
  "d_model": 16,
  "d_kv": 4,
  "d_ff": 24,
  "num_heads": 4,
  "vocab_size": 37,
  "relative_attention_num_buckets": 8,
  "relative_attention_max_distance": 16,
  "feed_forward_proj": "relu",
  "tie_word_embeddings": True,
  "layer_norm_epsilon": 1e-6,
  "decoder_start_token_id": 0,
  "pad_token_id": 0,
  "eos_token_id": 1,
}
T5_GATED = {**T5, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False, "num_decoder_layers": 3}

CONFIGS = {
  "gpt2": GPT2,
  "llama": LLAMA,
  "llama3_tied_bias": LLAMA3_TIED_BIAS,
  "mistral": MISTRAL,
  "qwen2": QWEN2,
  "bert": BERT,
  "bert_seq_cls": BERT_SEQ_CLS,
  "bert_token_cls": BERT_TOKEN_CLS,
  "t5": T5,
  "t5_gated": T5_GATED,
}


def randomize(params, key):
  """Every leaf random (norm scales around 1) so that no parameter goes untested."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(key, len(leaves))
  out = []
  for (path, leaf), k in zip(leaves, keys):
    noise = jax.random.normal(k, leaf.shape, leaf.dtype)
    name = path[-1].key
    out.append(1.0 + 0.1 * noise if name == "scale" else (0.3 if name != "bias" else 0.1) * noise)
  return jax.tree_util.tree_unflatten(treedef, out)


_MODELS: dict = {}


def random_model(config, *, seed=0, **options):
  """`(model, params)` of `config` with every leaf random (`randomize`), built once per process.

  Building and randomizing compiles per model and per leaf shape; the tests share the (immutable) arrays and get
  fresh dicts, so that a test may edit its tree.
  """
  cache_key = (json.dumps(config, sort_keys=True), seed, tuple(sorted(options.items())))
  if cache_key not in _MODELS:
    model, params = models.from_config(config, key=jax.random.key(seed), **options)
    _MODELS[cache_key] = model, randomize(params, jax.random.key(seed + 1))
  model, params = _MODELS[cache_key]
  return model, jax.tree.map(lambda x: x, params)


def zero_model(config, **options):
  """`(model, params)` with every leaf zero: the model's tree from `jax.eval_shape`, no init compiled (fast)."""
  model = _load._architecture(config).model(config, dtype=None, options=options)
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), *model.example_inputs())["params"])
  return model, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def write_checkpoint(path, config, *, seed=0):
  """Writes a random checkpoint (config.json + model.safetensors) with HF tensor names."""
  model, params = random_model(config, seed=seed)
  models.save_pretrained(path, model, params, config=config)
  return model, params


@functools.cache
def _tokens(shape, vocab, seed):
  return np.asarray(jax.random.randint(jax.random.key(seed), shape, 1, vocab), np.int32)


def tokens(shape, vocab=37, seed=0):
  """Random int32 token ids (never 0, so that pad-sensitive code paths stay honest)."""
  return _tokens(tuple(shape), vocab, seed).copy()


def forward(model, params, *inputs):
  """The plain model's output, jitted: one compile instead of an eager dispatch per primitive."""
  return jax.jit(lambda p, *x: model.apply({"params": p}, *x))(params, *inputs)


def lora_forward(model, params, cfg, *inputs):
  """`jlora.apply`, jitted likewise."""
  return jax.jit(lambda p, *x: jlora.apply(model, p, cfg, *x))(params, *inputs)
