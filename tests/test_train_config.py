"""The `jlora train` config schema: sections, types, choices, overrides and help."""

import pathlib

import pytest
import yaml

import jlora
from jlora import train
from jlora.train._default import DEFAULT_YAML

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.name != "quickstart.yaml"], ids=lambda p: p.name)
def test_every_config_validates(path):
  config = train.load(path)
  assert isinstance(config.lora, jlora.LoraConfig) and config.lora.task_type is not None
  again = train.Config.from_dict(yaml.safe_load(yaml.safe_dump(config.to_dict())))
  assert again == config  # to_dict round-trips through YAML


def test_embedded_default_is_configs_default():
  assert DEFAULT_YAML == (ROOT / "configs" / "default.yaml").read_text()
  assert train.load(None, text=DEFAULT_YAML) == train.load(ROOT / "configs" / "default.yaml")


def test_overrides_parse_yaml_values():
  config = train.load(ROOT / "configs" / "default.yaml",
                      ["train.steps=50", "lora.r=16", "lora.target_modules=[query, value]", "optimizer.clip_norm=null",
                       "optimizer.learning_rate=1e-3", "train.quiet=true"])
  assert config.train.steps == 50 and config.lora.r == 16 and config.train.quiet is True
  assert set(config.lora.target_modules) == {"query", "value"}
  assert config.optimizer.clip_norm is None and config.optimizer.learning_rate == 1e-3


@pytest.mark.parametrize(
  ("overrides", "error", "match"),
  [
    (["train.stepz=3"], ValueError, r"unknown key\(s\) \['train.stepz'\]; allowed `train` keys: \['steps'"),
    (["train.steps=abc"], TypeError, r"`train.steps` must be an integer, got 'abc'"),
    (["train.steps=1.5"], TypeError, r"`train.steps` must be an integer"),
    (["train.quiet=1"], TypeError, r"`train.quiet` must be true/false"),
    (["model.source=hub"], ValueError, r"`model.source` must be one of \['minilm', 'pretrained', 'random'\]"),
    (["optimizer.schedule=step"], ValueError, r"`optimizer.schedule` must be one of \['constant', 'cosine'"),
    (["trian.steps=3"], ValueError, r"unknown section `trian`; allowed sections: \['model', 'lora'"),
    (["steps=3"], ValueError, r"must look like `section.key=value`"),
    (["train.steps"], ValueError, r"must look like `section.key=value`"),
    (["lora.rank=4"], ValueError, r"unknown key\(s\) \['lora.rank'\]; allowed `lora` keys .*'r', 'lora_alpha'"),
    (["lora.r=0"], ValueError, r"section `lora`: `r` must be a positive integer"),
  ],
)
def test_bad_values_name_the_key(overrides, error, match):
  with pytest.raises(error, match=match):
    train.load(ROOT / "configs" / "default.yaml", overrides)


def test_bad_file(tmp_path):
  bad = tmp_path / "bad.yaml"
  bad.write_text("model: {source: minilm}\noptimiser: {learning_rate: 1}\n")
  with pytest.raises(ValueError, match=r"bad.yaml: unknown section\(s\) \['optimiser'\]"):
    train.load(bad)
  bad.write_text("- a list\n")
  with pytest.raises(TypeError, match="must be a mapping of sections"):
    train.load(bad)
  bad.write_text("train: 3\n")
  with pytest.raises(TypeError, match="section `train` must be a mapping"):
    train.load(bad)


def test_describe_lists_every_section_and_key():
  text = train.describe()
  for section in ("model:", "lora:", "data:", "optimizer:", "train:", "checkpointing:", "outputs:"):
    assert section in text
  for key in ("lora_plus_ratio", "warmup_steps", "eval_every", "keep", "max_eval", "tokenizer"):
    assert key in text
