"""jlora's one YAML loader and JSON reader (`jlora.core.safe_load`): bounded, strict about duplicate keys, and
reading floats as users write them, in every place that reads a config."""

import doctest
import json
import os
import time

import pytest

from jlora import LoraConfig, train
from jlora.core import safe_load
from jlora.core.safe_load import MAX_BYTES, MAX_DEPTH, MAX_VALUES, dump_yaml, load_json, load_yaml
from jlora.formats.peft import files as peft_files


def _bomb(levels=9, width=10, indent="    "):
  """`levels` anchors, each a list of `width` aliases of the one before: width**levels values from ~400 bytes."""
  lines = [f"{indent}j1: &a [" + ", ".join(["lol"] * width) + "]"]
  for i in range(2, levels + 1):
    prev, this = chr(ord("a") + i - 2), chr(ord("a") + i - 1)
    lines.append(f"{indent}j{i}: &{this} [" + ", ".join([f"*{prev}"] * width) + "]")
  return "\n".join(lines) + "\n"


def test_docstring_examples_run():
  result = doctest.testmod(safe_load, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0


def test_alias_bomb_is_refused_at_once_naming_the_key(tmp_path):
  path = tmp_path / "bomb.yaml"
  path.write_text("model:\n  source: random\n  config:\n" + _bomb() + "train:\n  steps: 1\n")
  for read in (lambda: train.load(path), lambda: load_yaml(path.read_text(), where="bomb.yaml")):
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"bomb\.yaml:8: `model\.config\.j5` expands to 111,111 values \(YAML "
                       r"aliases such as `\*name` repeat"):
      read()
    assert time.perf_counter() - start < 1.0
  with pytest.raises(ValueError, match=r"the config text:7: `target_modules\[0\]\.j5` expands to 111,111 values"):
    LoraConfig.from_yaml("target_modules:\n  - \n" + _bomb(indent="    "))


def test_aliases_within_the_bound_and_merge_keys_still_work():
  text = "base: &b {r: 4, lora_alpha: 8}\nmine:\n  <<: *b\n  lora_alpha: 16\nlist: &l [1, 2]\nagain: *l\n"
  assert load_yaml(text, where="x") == {"base": {"r": 4, "lora_alpha": 8}, "mine": {"r": 4, "lora_alpha": 16},
                                         "list": [1, 2], "again": [1, 2]}
  fits = _bomb(levels=4, width=10, indent="")  # 1,111 values: fine
  assert len(load_yaml(fits, where="x")["j4"]) == 10


@pytest.mark.parametrize(("text", "match"), [
  ("a: &x [*x]\n", r"x:1: `a\[0\]` contains itself \(a recursive YAML alias\)"),
  ("a: &x {b: *x}\n", r"x:1: `a\.b` contains itself"),
  ("".join("  " * i + f"k{i}:\n" for i in range(MAX_DEPTH + 2)) + "  " * (MAX_DEPTH + 2) + "v\n",
   rf"x:{MAX_DEPTH + 1}: `k0\.k1\..*` is nested more than {MAX_DEPTH} levels deep"),
  ("[" * 2000 + "]" * 2000, r"x:1:\d+: not valid YAML \("),
  ("a: [" + ",".join("0" for _ in range(MAX_VALUES)) + "]\n", r"x:1: `a` expands to 100,001 values"),
])
def test_bounds(text, match):
  with pytest.raises(ValueError, match=match):
    load_yaml(text, where="x")


def test_a_huge_config_file_is_refused_before_it_is_parsed(tmp_path):
  path = tmp_path / "huge.yaml"
  path.write_text("train:\n  steps: 1\n" + "# padding\n" * (MAX_BYTES // 10))
  with pytest.raises(ValueError, match=rf"config '.*huge\.yaml' holds more than {MAX_BYTES:,} bytes"):
    train.load(path)
  with pytest.raises(ValueError, match=rf"x holds {MAX_BYTES + 1:,} bytes; a config may hold at most {MAX_BYTES:,}"):
    load_yaml("a" * (MAX_BYTES + 1), where="x")


@pytest.mark.parametrize(("text", "match"), [
  ("train:\n  steps: 3\nlora:\n  r: 4\ntrain:\n  seed: 1\n", r"key `train` appears twice \(lines 1 and 5\)"),
  ("train:\n  steps: 3\n  seed: 1\n  steps: 5\n", r"key `train\.steps` appears twice \(lines 2 and 4\)"),
  ("model:\n  config: {model_type: gpt2, n_layer: 2,\n    n_layer: 3}\n",
   r"key `model\.config\.n_layer` appears twice \(lines 2 and 3\)"),
  ("lora:\n  target_modules: [q]\n  rank_pattern:\n    - {q: 2, q: 4}\n",
   r"key `lora\.rank_pattern\[0\]\.q` appears twice \(lines 4 and 4\)"),
])
def test_duplicate_yaml_keys_are_refused_with_both_lines(tmp_path, text, match):
  path = tmp_path / "dup.yaml"
  path.write_text(text)
  with pytest.raises(ValueError, match=r"dup\.yaml: " + match):
    train.load(path)


def test_duplicate_keys_in_lora_config_yaml_and_json(tmp_path):
  with pytest.raises(ValueError, match=r"the config text: key `r` appears twice \(lines 1 and 3\)"):
    LoraConfig.from_yaml("r: 8\nlora_alpha: 16\nr: 4\n")
  path = tmp_path / "adapter_config.json"
  path.write_text('{\n  "r": 8,\n  "lora_alpha": 16,\n  "rank_pattern": {"q": 2,\n    "q": 4},\n  "r": 4\n}\n')
  with pytest.raises(ValueError, match=r"adapter_config\.json': key `rank_pattern\.q` appears twice \(lines 4 and 5\)"):
    LoraConfig.from_json(path)
  with pytest.raises(ValueError, match=r"the config text: key `r` appears twice \(lines 1 and 1\)"):
    LoraConfig.from_json('{"r": 8, "r": 4}')


def test_duplicate_keys_in_a_peft_adapter_config_are_refused(tmp_path):
  (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA",\n "r": 8,\n "target_modules": ["q"],\n "r": 16}')
  (tmp_path / "adapter_model.safetensors").write_bytes(b"")
  with pytest.raises(ValueError, match=r"load_peft: '.*adapter_config\.json': key `r` appears twice \(lines 2 and 4\); "
                     r"JSON readers would keep only the last value silently"):
    peft_files.read(tmp_path)


@pytest.mark.parametrize(("text", "match"), [
  ('{"a": 1,}', r"x is not valid JSON: Expecting property name enclosed in double quotes at line 1, column 9\."),
  ('[{"a": [1, {"b": "x\\"}", "b": 2}]}]', r"x: key `\[0\]\.a\[1\]\.b` appears twice \(lines 1 and 1\)"),
  ("[" * 100_000 + "]" * 100_000, r"x: nested too deeply"),
])
def test_json_errors(text, match):
  with pytest.raises(ValueError, match=match):
    load_json(text, where="x")


def test_json_without_duplicates_reads_as_json_loads():
  text = '{"a": [1, 2.5, {"b": null, "c": "\\u00e9"}], "d": {"a": 1}, "e": NaN}'
  got, want = load_json(text, where="x"), json.loads(text)
  assert got.keys() == want.keys() and got["a"] == want["a"] and got["d"] == want["d"] and got["e"] != got["e"]


FLOATS = [("1e3", 1000.0), ("1E3", 1000.0), ("1e-3", 1e-3), ("1E-3", 1e-3), (".5", 0.5), ("5.", 5.0),
          ("-2.5e+4", -25000.0), ("+1e3", 1000.0), ("1.5e3", 1500.0), ("1.0e-5", 1e-5)]


@pytest.mark.parametrize(("text", "value"), FLOATS)
def test_floats_as_users_write_them_in_files_and_overrides(tmp_path, text, value):
  assert load_yaml(f"x: {text}", where="x") == {"x": value}
  path = tmp_path / "c.yaml"
  path.write_text(f"lora:\n  lora_alpha: {text.lstrip('-')}\noptimizer:\n  learning_rate: {text.lstrip('-')}\n")
  for config in (train.load(path), train.load(None, [f"lora.lora_alpha={text.lstrip('-')}",
                                                   f"optimizer.learning_rate={text.lstrip('-')}"])):
    assert config.lora.lora_alpha == abs(value) and config.optimizer.learning_rate == abs(value)
  assert LoraConfig.from_yaml(f"lora_alpha: {text.lstrip('-')}\n").lora_alpha == abs(value)


@pytest.mark.parametrize("text", ["e3", "1e", "1.5.3", "1e3e3", "0x1g", "'1e3'", '"1e3"'])
def test_strings_that_are_not_floats_stay_strings(text):
  assert isinstance(load_yaml(f"x: {text}", where="x")["x"], str)


def test_whole_numbers_written_as_floats_fit_integer_keys():
  config = train.load(None, ["train.steps=1e3", "train.seq_len=6.4e1"])
  assert config.train.steps == 1000 and isinstance(config.train.steps, int) and config.train.seq_len == 64
  with pytest.raises(TypeError, match=r"`train\.steps` must be an integer, got 1500\.5"):
    train.load(None, ["train.steps=1.5005e3"])


def test_dump_yaml_reads_back_the_same():
  data = {"a": "1e3", "b": ".5", "c": 1e-3, "d": 1e3, "e": "5.", "f": "x", "g": [1, "2", 3.5]}
  assert load_yaml(dump_yaml(data, sort_keys=False), where="x") == data


def test_every_yaml_read_in_jlora_goes_through_the_loader():
  root = os.path.join(os.path.dirname(__file__), "..", "jlora")
  offenders = []
  for folder, _, names in os.walk(root):
    for name in names:
      if name.endswith(".py") and name != "safe_load.py":
        text = open(os.path.join(folder, name), encoding="utf-8").read()
        if any(call in text for call in ("yaml.safe_load", "yaml.load(", "yaml.full_load", "yaml.unsafe_load")):
          offenders.append(name)
  assert not offenders
