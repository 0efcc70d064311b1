"""The model protocol (`jlora.models._arch`) holds for every architecture."""

import inspect

import pytest

from jlora import models
from jlora.core.tree import flatten
from jlora.formats.peft import torch_names as _names
from jlora.models import _load, bert, gpt2, llama, mixtral, t5
from jlora.models._arch import Architecture, CausalLM, HFModel
from tests.models.helpers import CONFIGS, zero_model


@pytest.mark.parametrize("module", [gpt2, llama, bert, t5], ids=lambda m: m.__name__)
def test_architecture_names_exactly_the_options_build_takes(module):
  arch = module.ARCHITECTURE
  assert isinstance(arch, Architecture)
  params = inspect.signature(arch.build).parameters
  assert next(iter(params)) == "config"
  keyword = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
  assert keyword == ["dtype", *arch.options]
  assert callable(arch.config.from_hf) and callable(arch.config.to_hf)


def test_every_model_type_has_an_architecture():
  assert set(_load.SUPPORTED_MODEL_TYPES) == {"gpt2", "llama", "mistral", "qwen2", "mixtral", "bert", "t5"}
  assert _load._architecture({"model_type": "qwen2"}) is llama.ARCHITECTURE
  assert _load._architecture({"model_type": "mixtral"}) is mixtral.ARCHITECTURE


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_models_follow_the_protocol(name):
  model, params = zero_model(CONFIGS[name])
  assert isinstance(model, HFModel)
  assert isinstance(model, CausalLM) == (name in ("gpt2", "llama", "llama3_tied_bias", "mistral", "qwen2"))
  names = _names.of_model(model)  # PEFT module names are the Hugging Face tensor names without `.weight`
  hf = models.to_hf_state_dict(model, params)
  for path in flatten(params):
    if path[-1] == "kernel":
      assert names.module_name(path[:-1]) + ".weight" in hf, path
  assert set(model.input_limits()) >= {"input_ids"}
  assert model.config.to_hf()["model_type"] == CONFIGS[name]["model_type"]


def test_kv_cache_has_the_models_dims():
  for name, dims in (("gpt2", (2, 2, 8)), ("mistral", (2, 1, 8)), ("llama", (2, 2, 8))):
    model, _ = zero_model(CONFIGS[name])
    cache = model.init_cache(3, 5)
    assert cache.keys.shape == (dims[0], 3, 5, dims[1], dims[2]) == cache.values.shape
    assert cache.valid.shape == (3, 5) and int(cache.index) == 0


@pytest.mark.parametrize("module, key, value, expected", [
  (gpt2, "n_embd", "abc", "an integer"),
  (gpt2, "n_layer", 2.0, "an integer"),
  (gpt2, "layer_norm_epsilon", float("nan"), "a number"),
  (llama, "tie_word_embeddings", "yes", "true/false"),
  (bert, "layer_norm_eps", "small", "a number"),
  (t5, "num_heads", True, "an integer"),
])
def test_config_values_of_the_wrong_type_name_the_key(module, key, value, expected):
  """A config value the model cannot use is a clear error before any array is built (not a JAX traceback)."""
  with pytest.raises(ValueError, match=rf"config `{key}` must be {expected}, got {value!r}"):
    module.ARCHITECTURE.config.from_hf({key: value})


def test_config_values_of_union_types_are_accepted():
  config = llama.ARCHITECTURE.config.from_hf({"eos_token_id": [2, 3], "head_dim": None, "rope_theta": 10000})
  assert config.eos_token_id == (2, 3) and config.head_dim is None and config.rope_theta == 10000.0
