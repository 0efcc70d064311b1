"""Target matching: exact, suffix, regex, all-linear without the head, exclude, layers_to_transform; errors."""

import types
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import jlora
from jlora.core.targets import layer_index, matches
from tests import zoo

LOOP = zoo.Case("loop", zoo.LoopStack(), jax.numpy.zeros((1, 4), jax.numpy.int32), ())
BASE = zoo.build(LOOP)


def adapted(**kw):
  kw.setdefault("r", 2)
  cfg = jlora.LoraConfig(**kw)
  params = jlora.init(jax.random.key(0), LOOP.model, BASE, cfg, LOOP.inputs)
  return sorted("/".join(p[:-1]) for p, _ in _leaves(params) if p[-1] == "lora_a")


def _leaves(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _leaves(v, (*prefix, k))
    else:
      yield (*prefix, k), v


def test_exact_name():
  assert adapted(target_modules=["query"]) == [f"layers_{i}/attn/query" for i in range(3)]


def test_suffix_with_dots_or_slashes():
  expected = ["layers_1/attn/value"]
  assert adapted(target_modules=["layers_1.attn.value"]) == expected
  assert adapted(target_modules=["layers_1/attn/value"]) == expected
  assert not matches(("ttn.value",), ("layers_1", "attn", "value")), "suffixes are whole names"


def test_regex_full_match():
  assert adapted(target_modules=r"layers_[02]\.attn\.(query|value)") == [
      "layers_0/attn/query", "layers_0/attn/value", "layers_2/attn/query", "layers_2/attn/value"]
  assert adapted(target_modules=r"layers_0/up") == ["layers_0/up"]


def test_all_linear_skips_head_and_embeddings():
  got = adapted(target_modules="all-linear")
  assert "lm_head" not in got and "embed" not in got
  assert len(got) == 3 * 6 and "layers_0/attn/out" in got and "layers_2/down" in got


def test_head_found_by_output_identity():
  class Net(zoo.nn.Module):
    @zoo.nn.compact
    def __call__(self, x):
      return zoo.nn.Dense(3, name="proj_out")(zoo.nn.Dense(8, name="hidden")(x))

  model, x = Net(), jax.numpy.ones((1, 4))
  cfg = jlora.LoraConfig(target_modules="all-linear", r=2)
  params = jlora.init(jax.random.key(0), model, model.init(jax.random.key(1), x)["params"], cfg, x)
  assert "lora_a" in params["hidden"] and "lora_a" not in params["proj_out"]


def test_exclude_wins():
  assert adapted(target_modules="all-linear", exclude_modules=["query", "key", "value", "attn.out", "down"]) == [
      f"layers_{i}/up" for i in range(3)]
  assert adapted(target_modules=["query"], exclude_modules=r".*layers_1.*") == [
      "layers_0/attn/query", "layers_2/attn/query"]


def test_layers_to_transform():
  assert adapted(target_modules=["query"], layers_to_transform=[0, 2]) == ["layers_0/attn/query",
                                                                          "layers_2/attn/query"]
  assert adapted(target_modules=["up"], layers_to_transform=1, layers_pattern="layers") == ["layers_1/up"]


def test_layer_index_rules():
  assert layer_index(("model", "layers_3", "attn", "q")) == 3
  assert layer_index(("model", "layers", "3", "q"), ("layers",)) == 3
  assert layer_index(("h7", "attn"), ("h",)) == 7
  assert layer_index(("blocks_2", "attn"), ("layers",)) is None
  assert layer_index(("Dense_0",)) is None


def test_matches_cases():
  assert matches(("q",), ("enc", "q"))
  assert not matches(("q",), ("enc", "qq"))
  assert matches(".*q", ("enc", "q"))
  assert not matches("q", ("enc", "q")), "a regex must match the whole path"


def test_no_match_lists_modules():
  with pytest.raises(ValueError, match=r"matched no module(.|\n)*layers_0/attn/query  \(dense_general\)"):
    adapted(target_modules=["q_proj"])


def test_missing_target_modules_lists_modules():
  with pytest.raises(ValueError, match=r"`target_modules` is not set(.|\n)*lm_head  \(dense, head\)"):
    adapted()


def test_rank_too_large_names_module():
  with pytest.raises(ValueError, match=r"`r`=17 is larger than the dimensions of 'layers_0/attn/query'"):
    adapted(target_modules=["query"], r=17)


def test_layers_without_index():
  with pytest.raises(ValueError, match=r"layers_to_transform`=\[5\] selected no module"):
    adapted(target_modules=["query"], layers_to_transform=[5])
  with pytest.raises(ValueError, match="Set `layers_pattern`"):
    adapted(target_modules=["query"], layers_to_transform=[0], layers_pattern="blocks")


def test_layers_to_transform_beyond_a_scanned_stack_is_refused():
  """Layers inside an nn.scan stack are picked by its layer axis (tests/test_scan_layers.py); an index >= L names
  the stack, its length and the indices given."""
  case = zoo.cases()[5]
  cfg = jlora.LoraConfig(r=2, target_modules=["query"], layers_to_transform=[1, 3])
  with pytest.raises(ValueError, match=r"`layers_to_transform`=\[1, 3\] asks for layer\(s\) \[3\], beyond the length L "
                                       r"of the scanned stack\(s\) 'layers/attn/query' \(L=3\).*Give indices below 3"):
    jlora.init(jax.random.key(0), case.model, zoo.build(case), cfg, case.inputs)


def test_adapted_and_saved_conflict():
  with pytest.raises(ValueError, match="both in `target_modules` and in `modules_to_save`"):
    adapted(target_modules=["up"], modules_to_save=["layers_0"])


def test_already_adapted_and_bad_arguments():
  cfg = jlora.LoraConfig(r=2, target_modules=["up"])
  params = jlora.init(jax.random.key(0), LOOP.model, BASE, cfg, LOOP.inputs)
  with pytest.raises(ValueError, match="already holds LoRA adapters"):
    jlora.init(jax.random.key(0), LOOP.model, params, cfg, LOOP.inputs)
  with pytest.raises(TypeError, match=r"`config` must be a jlora\.LoraConfig"):
    jlora.init(jax.random.key(0), LOOP.model, BASE, {"r": 2}, LOOP.inputs)
  with pytest.raises(ValueError, match="looks like a whole variables dict"):
    jlora.init(jax.random.key(0), LOOP.model, {"params": BASE}, cfg, LOOP.inputs)
  with pytest.raises(TypeError, match="`params` must be a nested dict"):
    jlora.init(jax.random.key(0), LOOP.model, [1], cfg, LOOP.inputs)


def test_layers_to_transform_with_a_missing_layer_is_refused():
  with pytest.raises(ValueError, match=r"asks for layer\(s\) \[99\], which no targeted module has \(layer indices found: "
                                       r"\[0, 1, 2\]\)"):
    adapted(target_modules=["query"], layers_to_transform=[1, 99])


def test_apply_checks_the_whole_selection_rule():
  """`apply` uses the rule `init` used: a config whose layers_to_transform excludes an adapter is a stale config."""
  cfg = jlora.LoraConfig(r=2, target_modules=["query"], layers_to_transform=[0, 1])
  params = jlora.init(jax.random.key(0), LOOP.model, BASE, cfg, LOOP.inputs)
  jlora.apply(LOOP.model, params, cfg, LOOP.inputs)
  narrower = jlora.LoraConfig(r=2, target_modules=["query"], layers_to_transform=[0])
  with pytest.raises(ValueError, match=r"holds an adapter at 'layers_1/attn/query', which the config .*"
                                       r"layers_to_transform=\(0,\)\) does not select"):
    jlora.apply(LOOP.model, params, narrower, LOOP.inputs)


def test_default_target_modules_are_peft_s_and_a_hugging_face_module_s_missing_targets_name_them():
  """PEFT fills `target_modules` by `model_type` at `get_peft_model`; jlora names them (`default_target_modules`),
  and `jlora.init` of a module with a `config.model_type` (Hugging Face's Flax modules) says which they are."""
  mapping = pytest.importorskip("peft.utils.constants").TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
  from jlora.core.fields import DEFAULT_TARGET_MODULES

  assert len(DEFAULT_TARGET_MODULES) >= 25
  for model_type, targets in DEFAULT_TARGET_MODULES.items():
    assert jlora.default_target_modules(model_type) == targets == tuple(mapping[model_type]), model_type
  with pytest.raises(ValueError, match=r"`model_type`='mamba' has no default target modules .*'llama'.*all-linear"):
    jlora.default_target_modules("mamba")

  class Llama(nn.Module):  # a stand-in for Hugging Face's FlaxLlamaModule: a `config` with a `model_type`
    config: Any

    @nn.compact
    def __call__(self, x):
      return nn.Dense(4, name="q_proj")(x) + nn.Dense(4, name="v_proj")(x)

  model, x = Llama(types.SimpleNamespace(model_type="llama")), jnp.ones((2, 3))
  params = model.init(jax.random.key(0), x)["params"]
  with pytest.raises(ValueError, match=r"`target_modules` is not set\. PEFT's default for this model's model_type "
                                       r"'llama' is \['q_proj', 'v_proj'\]: pass LoraConfig\(target_modules=jlora\."
                                       r"default_target_modules\('llama'\)"):
    jlora.init(jax.random.key(1), model, params, jlora.LoraConfig(r=2), x)
  config = jlora.LoraConfig(r=2, target_modules=jlora.default_target_modules("llama"))
  assert set(jlora.init(jax.random.key(1), model, params, config, x)["q_proj"]) == {"kernel", "bias", "lora_a",
                                                                                    "lora_b"}


def test_target_parameters_alone_need_no_target_modules_even_with_a_model_type():
  """A module with a `config.model_type` and only `target_parameters`: the parameters are adapted, nothing else."""

  class Net(nn.Module):
    config: Any

    @nn.compact
    def __call__(self, x):
      return nn.Dense(4, name="q_proj")(x) @ self.param("mix", nn.initializers.lecun_normal(), (4, 4))

  model, x = Net(types.SimpleNamespace(model_type="llama")), jnp.ones((2, 3))
  params = model.init(jax.random.key(0), x)["params"]
  got = jlora.init(jax.random.key(1), model, params, jlora.LoraConfig(r=2, target_parameters=["mix"]), x)
  assert set(got["q_proj"]) == {"kernel", "bias"} and {"mix_lora_a", "mix_lora_b"} <= set(got)
