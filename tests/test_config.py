"""LoraConfig: PEFT names, validation, hashability, JSON / YAML round trips."""

import dataclasses
import json

import jax
import pytest

import jlora
from jlora import LoraConfig, TaskType


def test_seed_example():
  cfg = LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, r=8, lora_alpha=16, lora_dropout=0.1, bias="none",
                   target_modules=["q", "v"])
  assert cfg.target_modules == ("q", "v")
  assert cfg.scale_for("encoder/block_0/q") == 2.0
  assert hash(cfg) == hash(LoraConfig(task_type="SEQ_2_SEQ_LM", r=8, lora_alpha=16, lora_dropout=0.1,
                                      target_modules=("q", "v")))


def test_hashable_static_jit_argument():
  cfg = LoraConfig(r=4, target_modules=["q"], rank_pattern={"q": 2}, alpha_pattern={"q": 3})
  f = jax.jit(lambda x, c: x * c.scale_for("a/q"), static_argnums=1)
  assert float(f(1.0, cfg)) == 1.5
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.r = 3


@pytest.mark.parametrize("spelling,expected", [
    ("SEQ_CLS", TaskType.SEQ_CLS), ("SEQUENCE_CLASSIFICATION", TaskType.SEQ_CLS),
    ("TOKEN_CLASSIFICATION", TaskType.TOKEN_CLS), ("causal_lm", TaskType.CAUSAL_LM),
    ("QUESTION_ANS", TaskType.QUESTION_ANS), ("FEATURE_EXTRACTION", TaskType.FEATURE_EXTRACTION),
])
def test_task_type_spellings(spelling, expected):
  assert LoraConfig(task_type=spelling).task_type is expected
  assert TaskType(spelling) is expected
  assert TaskType.SEQ_2_SEQ_LM == "SEQ_2_SEQ_LM"


def test_scaling_default_rslora_patterns():
  cfg = LoraConfig(r=16, lora_alpha=32, rank_pattern={"v": 4, "layers_1.q": 8}, alpha_pattern={"v": 2})
  assert cfg.scale_for("layers_0/q") == 32 / 16
  assert cfg.rank_for("layers_1/q") == 8 and cfg.scale_for("layers_1/q") == 32 / 8
  assert cfg.rank_for("layers_0/v") == 4 and cfg.scale_for("layers_0/v") == 2 / 4
  assert cfg.rank_for("layers_0/vv") == 16, "a key matches a whole trailing name, not a substring"
  rs = LoraConfig(r=16, lora_alpha=32, use_rslora=True, rank_pattern={"v": 4})
  assert rs.scale_for("a/q") == 32 / 4.0
  assert rs.scale_for("a/v") == 32 / 2.0
  regex = LoraConfig(r=8, rank_pattern={r"layers_\d+\.up": 2})
  assert regex.rank_for("stack/layers_3/up") == 2


@pytest.mark.parametrize("kwargs,match", [
    ({"r": 0}, "`r` must be a positive integer"),
    ({"r": -2}, "`r` must be a positive integer"),
    ({"r": 2.5}, "`r` must be a positive integer"),
    ({"lora_alpha": 0}, "`lora_alpha` must be a positive, finite number"),
    ({"lora_alpha": -1.0}, "`lora_alpha` must be a positive, finite number"),
    ({"lora_dropout": 1.0}, r"`lora_dropout` must be in \[0, 1\)"),
    ({"lora_dropout": -0.1}, r"`lora_dropout` must be in \[0, 1\)"),
    ({"bias": "some"}, "`bias` must be one of"),
    ({"task_type": "TRANSLATE"}, "`task_type` 'TRANSLATE' is unknown"),
    ({"init_lora_weights": "kaiming_normal"}, "`init_lora_weights` must be one of"),
    ({"layers_to_transform": [-1]}, "`layers_to_transform` must be"),
    ({"layers_pattern": "layers"}, "`layers_pattern` was given without `layers_to_transform`"),
    ({"target_modules": ".*q", "layers_to_transform": [0]}, "cannot be combined with a regex"),
    ({"rank_pattern": {"q": 0}}, r"`rank_pattern\[.q.\]` must be a positive, finite number"),
    ({"rank_pattern": {"q": 2.5}}, "must be an integer rank"),
])
def test_invalid_values(kwargs, match):
  with pytest.raises(ValueError, match=match):
    LoraConfig(**kwargs)


def test_invalid_types():
  with pytest.raises(TypeError, match="`target_modules` must be a list of module names"):
    LoraConfig(target_modules=[1, 2])
  with pytest.raises(TypeError, match="`use_rslora` must be True or False"):
    LoraConfig(use_rslora="yes")


def test_json_round_trip_is_peft_compatible(tmp_path):
  cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], rank_pattern={"v": 2}, bias="lora_only",
                   task_type="SEQ_CLS", modules_to_save=["classifier"], layers_to_transform=[0, 1],
                   layers_pattern="layers", init_lora_weights="gaussian")
  path = tmp_path / "adapter_config.json"
  cfg.to_json(path)
  data = json.loads(path.read_text())
  assert data["peft_type"] == "LORA" and data["task_type"] == "SEQ_CLS"
  assert data["target_modules"] == ["q", "v"] and data["rank_pattern"] == {"v": 2}
  assert data["layers_pattern"] == "layers"
  assert LoraConfig.from_json(path) == cfg
  assert LoraConfig.from_json(cfg.to_json()) == cfg
  assert LoraConfig.from_dict(cfg.to_dict()) == cfg


def test_peft_file_with_unknown_keys_warns():
  peft = {"peft_type": "LORA", "target_modules": ["q_proj", "v_proj"], "r": 16, "lora_alpha": 32,
          "use_dora": False, "loftq_config": {}, "megatron_config": None, "fancy_new_option": 3,
          "runtime_config": {"ephemeral_gpu_offload": False}}
  with pytest.warns(UserWarning, match=r"ignoring unknown keys \['fancy_new_option'\]"):
    cfg = LoraConfig.from_dict(peft)
  assert cfg.r == 16 and cfg.target_modules == ("q_proj", "v_proj")


def test_minimal_peft_config_loads():
  cfg = LoraConfig.from_dict({"peft_type": "LORA", "target_modules": ["q"]})
  assert cfg.r == 8 and cfg.lora_alpha == 8


@pytest.mark.parametrize("data,match", [
    ({"peft_type": "IA3", "target_modules": ["q"]}, "`peft_type` is 'IA3'"),
    ({"lora_bias": True}, "trainable bias on lora_B"),
    ({"layer_replication": [[0, 2]]}, "layer replication"),
])
def test_unsupported_peft_features_raise(data, match):
  with pytest.raises(ValueError, match=match):
    LoraConfig.from_dict(data)


def test_yaml(tmp_path):
  text = "r: 4\nlora_alpha: 8\ntarget_modules: [q, v]\ntask_type: TOKEN_CLASSIFICATION\nrank_pattern:\n  v: 2\n"
  path = tmp_path / "lora.yaml"
  path.write_text(text)
  cfg = LoraConfig.from_yaml(path)
  assert cfg == LoraConfig.from_yaml(text)
  assert cfg.task_type is TaskType.TOKEN_CLS and cfg.rank_for("x/v") == 2
  with pytest.raises(FileNotFoundError, match="no file at"):
    LoraConfig.from_yaml(tmp_path / "missing.yaml")


def test_public_surface():
  """`__all__` lists exactly the public names, each defined in jlora itself; no submodule leaks through."""
  import types

  public = {n for n in dir(jlora) if not n.startswith("_") and not isinstance(getattr(jlora, n), types.ModuleType)}
  assert set(jlora.__all__) == public
  assert all(getattr(jlora, n).__module__.startswith("jlora.") for n in jlora.__all__)
  assert "freeze" not in public, "optax.freeze means something else"


def test_overlapping_pattern_keys_first_match_wins_as_in_peft():
  """PEFT's `get_pattern_key`: the first key in the mapping's order whose `(.*\\.)?key$` matches, not the longest."""
  wide_first = LoraConfig(r=8, rank_pattern={"q": 2, "layers_1.attn.q": 4})
  narrow_first = LoraConfig(r=8, rank_pattern={"layers_1.attn.q": 4, "q": 2})
  assert wide_first.rank_for("layers_1/attn/q") == 2 and narrow_first.rank_for("layers_1/attn/q") == 4
  assert wide_first.rank_for("layers_0/attn/q") == 2 == narrow_first.rank_for("layers_0/attn/q")
  # Order is part of the value: equal items in another order are another config (and another jit cache entry).
  assert wide_first != narrow_first and hash(wide_first) != hash(narrow_first)
  # ...and it survives the JSON round trip (PEFT keeps the order too).
  assert LoraConfig.from_json(narrow_first.to_json()).rank_for("layers_1/attn/q") == 4
  alphas = LoraConfig(alpha_pattern={r"layers_\d\.attn\.q": 3.0, "q": 5.0})
  assert alphas.alpha_for("layers_7/attn/q") == 3.0 and alphas.alpha_for("enc/q") == 5.0


@pytest.mark.parametrize("kwargs,match", [
    ({"lora_alpha": float("inf")}, "`lora_alpha` must be a positive, finite number, got inf"),
    ({"lora_alpha": float("nan")}, "`lora_alpha` must be a positive, finite number, got nan"),
    ({"rank_pattern": {"q": float("inf")}}, r"`rank_pattern\['q'\]` must be a positive, finite number, got inf"),
    ({"alpha_pattern": {"v": float("nan")}}, r"`alpha_pattern\['v'\]` must be a positive, finite number, got nan"),
    ({"target_modules": "layers.(q"}, r"`target_modules`: 'layers.\(q' is not a valid regular expression"),
    ({"exclude_modules": "*"}, r"`exclude_modules`: '\*' is not a valid regular expression"),
    ({"rank_pattern": {"q[": 2}}, r"`rank_pattern\['q\['\]`: 'q\[' is not a valid regular expression"),
])
def test_non_finite_numbers_and_bad_regexes_are_refused_at_construction(kwargs, match):
  with pytest.raises(ValueError, match=match):
    LoraConfig(**kwargs)


def test_from_json_names_the_file_and_never_parses_a_path(tmp_path):
  path = tmp_path / "adapter_config.json"
  path.write_text('{"r": 4,\n "lora_alpha": }\n')
  with pytest.raises(ValueError, match=r"adapter_config\.json' is not valid JSON: Expecting value at line 2, column 16"):
    LoraConfig.from_json(path)
  path.write_text('{"r": 0}')
  with pytest.raises(ValueError, match=r"adapter_config\.json': `r` must be a positive integer"):
    LoraConfig.from_json(path)
  path.write_text("[1, 2]")
  with pytest.raises(ValueError, match=r"must hold a mapping of LoraConfig fields, got list"):
    LoraConfig.from_json(path)
  with pytest.raises(FileNotFoundError, match=r"no file at 'runs/a:b/adapter_config\.json'"):
    LoraConfig.from_json("runs/a:b/adapter_config.json")  # a missing path with a colon is still a path
  assert LoraConfig.from_json(' {"r": 3}').r == 3  # JSON text starts with "{"
