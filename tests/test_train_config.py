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
    # Ranges (issue 15.7): each names the key, the value and what is allowed.
    (["train.batch_size=-1"], ValueError, r"`train.batch_size` must be an integer >= 1, got -1\."),
    (["train.batch_size=0"], ValueError, r"`train.batch_size` must be an integer >= 1, got 0"),
    (["train.log_every=0"], ValueError, r"`train.log_every` must be an integer >= 1, got 0"),
    (["train.seq_len=0"], ValueError, r"`train.seq_len` must be an integer >= 1, got 0"),
    (["train.target_len=0"], ValueError, r"`train.target_len` must be an integer >= 1"),
    (["train.eval_batch_size=0"], ValueError, r"`train.eval_batch_size` must be an integer >= 1, got 0"),
    (["data.max_train=0"], ValueError, r"`data.max_train` must be an integer >= 1, got 0"),
    (["data.max_eval=0"], ValueError, r"`data.max_eval` must be an integer >= 1, got 0"),
    (["data.num_labels=1"], ValueError, r"`data.num_labels` must be an integer >= 2, got 1"),
    (["train.steps=-1"], ValueError, r"`train.steps` must be an integer >= 0, got -1"),
    (["train.eval_every=-5"], ValueError, r"`train.eval_every` must be an integer >= 0, got -5"),
    (["train.seed=-1"], ValueError, r"`train.seed` must be an integer in \[0, 4294967296\), got -1"),
    (["train.temperature=0"], ValueError, r"`train.temperature` must be a number > 0, got 0"),
    (["checkpointing.every=-1"], ValueError, r"`checkpointing.every` must be an integer >= 0, got -1"),
    (["checkpointing.keep=0"], ValueError, r"`checkpointing.keep` must be an integer >= 1, got 0"),
    (["optimizer.warmup_steps=-1"], ValueError, r"`optimizer.warmup_steps` must be an integer >= 0, got -1"),
    (["optimizer.b2=1"], ValueError, r"`optimizer.b2` must be a number in \[0, 1\), got 1"),
    (["optimizer.b2=1.5"], ValueError, r"`optimizer.b2` must be a number in \[0, 1\), got 1.5"),
    (["optimizer.b1=-0.1"], ValueError, r"`optimizer.b1` must be a number in \[0, 1\), got -0.1"),
    (["optimizer.clip_norm=0"], ValueError, r"`optimizer.clip_norm` must be a number > 0, got 0"),
    (["optimizer.clip_norm=-1"], ValueError, r"`optimizer.clip_norm` must be a number > 0"),
    (["optimizer.eps=0"], ValueError, r"`optimizer.eps` must be a number > 0, got 0"),
    (["optimizer.weight_decay=-0.1"], ValueError, r"`optimizer.weight_decay` must be a number >= 0"),
    (["optimizer.lora_plus_ratio=0"], ValueError, r"`optimizer.lora_plus_ratio` must be a number > 0"),
    (["optimizer.learning_rate=-1e-3"], ValueError, r"`optimizer.learning_rate` must be a number >= 0, got -0.001"),
    (["optimizer.learning_rate=.nan"], TypeError, r"`optimizer.learning_rate` must be a finite number, got nan"),
    (["optimizer.learning_rate=.inf"], TypeError, r"`optimizer.learning_rate` must be a finite number, got inf"),
    (["optimizer.learning_rate=nan"], TypeError, r"`optimizer.learning_rate` must be a finite number, got 'nan'"),
    (["outputs.dir="], TypeError, r"`outputs.dir` must be a string, got None"),
    (["outputs.dir=' '"], ValueError, r"`outputs.dir` must be a directory path"),
    (["train.steps=[1"], ValueError, r"override 'train.steps=\[1':1:3: not valid YAML"),
    # `train.method` (issue 26): full fine-tuning has no adapters, so the settings only adapters have are refused.
    (["train.method=fulll"], ValueError, r"`train.method` must be one of \['lora', 'full'\], got 'fulll'"),
    (["train.method=full", "model.quantize=nf4"], ValueError, r"`train.method: full` trains every weight of the "
     r"model, without adapters, but `model.quantize` is 'nf4', a setting for adapters; remove it "
     r"\(`model.quantize=null`\) or use `train.method: lora`"),
    (["train.method=full", "lora.init_from=runs/a/adapter"], ValueError, r"but `lora.init_from` is 'runs/a/adapter'"),
    (["train.method=full", "optimizer.lora_plus_ratio=16"], ValueError, r"but `optimizer.lora_plus_ratio` is 16.0"),
    (["train.method=full", "outputs.adapter_set=adapters"], ValueError, r"but `outputs.adapter_set` is 'adapters'"),
    # LoftQ fits its adapter to the base `model.quantize` makes: the same method, one round
    (["lora.init_lora_weights=loftq", "lora.loftq_config={loftq_bits: 4}"], ValueError,
     r"`lora.init_lora_weights: loftq` with loftq_bits=4 needs `model.quantize: nf4` \(got None: the base"),
    (["lora.init_lora_weights=loftq", "lora.loftq_config={loftq_bits: 8, loftq_iter: 2}", "model.quantize=int8"],
     ValueError, r"loftq_bits=8 needs `loftq_iter: 1` \(got 2: `jlora train` rebuilds"),
  ],
)
def test_bad_values_name_the_key(overrides, error, match):
  with pytest.raises(error, match=match):
    train.load(ROOT / "configs" / "default.yaml", overrides)


def test_unset_target_modules_take_peft_s_default_for_the_model_type():
  """As PEFT's `get_peft_model` does: `lora.target_modules` left out is filled in by the model's `model_type`."""
  assert train.load(ROOT / "configs" / "causal_lm_tiny.yaml", ["lora.target_modules=null"]).lora.target_modules == (
      "c_attn",)
  assert train.load(ROOT / "configs" / "default.yaml", ["lora.target_modules=null"]).lora.target_modules == (
      "query", "value")  # the packaged MiniLM is a BERT
  given = train.load(ROOT / "configs" / "causal_lm_tiny.yaml", ["lora.target_modules=[c_proj]"])
  assert given.lora.target_modules == ("c_proj",)
  full = train.load(ROOT / "configs" / "causal_lm_tiny.yaml", ["lora.target_modules=null", "train.method=full"])
  assert full.lora.target_modules is None  # nothing to target


def test_train_method_full_keeps_the_rest_of_the_job_and_its_own_fingerprint():
  from jlora.train import _data, _setup

  lora, full = (train.load(ROOT / "configs" / "default.yaml", [f"train.method={m}"]) for m in ("lora", "full"))
  assert (lora.train.method, full.train.method) == ("lora", "full")
  assert train.replace(full, train={"method": "lora"}) == lora  # nothing else changes
  rows = _data.Examples([{"query": "q", "document": "d"}], [])
  assert "method" not in _setup.fingerprint(lora, rows)["train"]  # LoRA runs of earlier versions still resume
  assert _setup.fingerprint(full, rows)["train"]["method"] == "full"  # a LoRA checkpoint never resumes a full run


def test_boundary_values_are_accepted():
  config = train.load(ROOT / "configs" / "default.yaml", [
    "train.steps=0", "optimizer.learning_rate=0", "optimizer.b1=0", "optimizer.b2=0.999999", "train.batch_size=1",
    "checkpointing.every=0", "checkpointing.keep=1", "optimizer.warmup_steps=0", "optimizer.learning_rate=1e12"])
  assert config.train.steps == 0 and config.optimizer.learning_rate == 1e12 and config.checkpointing.keep == 1


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


@pytest.mark.parametrize(
  ("text", "match"),
  [
    ("model:\n  source: [minilm\ntrain: {steps: 3}\n", r"bad.yaml:3:\d+: not valid YAML \(.*expected ',' or ']'"),
    ("train:\n  steps: 3\n\tseed: 1\n", r"bad.yaml:3:1: not valid YAML \(.*found character '\\t'"),
    ("train: !!python/object/apply:os.system [echo hi]\n", r"bad.yaml:1:8: not valid YAML \(.*could not determine "
     r"a constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.system'"),
  ],
  ids=["scanner", "tab", "constructor"],
)
def test_yaml_errors_name_the_file_and_line(tmp_path, text, match):
  bad = tmp_path / "bad.yaml"
  bad.write_text(text)
  with pytest.raises(ValueError, match=match) as e:
    train.load(bad)
  assert "\n" not in str(e.value)


def test_config_path_that_is_a_directory_or_missing(tmp_path):
  with pytest.raises(ValueError, match=r"config '.*' is a directory; give a YAML file"):
    train.load(tmp_path)
  with pytest.raises(FileNotFoundError, match=r"config '.*nope.yaml': No such file"):
    train.load(tmp_path / "nope.yaml")
  (tmp_path / "latin1.yaml").write_bytes(b"train: {steps: 3}  # caf\xe9\n")
  with pytest.raises(ValueError, match=r"latin1.yaml' is not UTF-8 text"):
    train.load(tmp_path / "latin1.yaml")


def test_describe_lists_every_section_and_key():
  text = train.describe()
  for section in ("model:", "lora:", "data:", "optimizer:", "train:", "checkpointing:", "outputs:"):
    assert section in text
  for key in ("lora_plus_ratio", "warmup_steps", "eval_every", "keep", "max_eval", "tokenizer", "num_labels"):
    assert key in text
  assert "batch_size      an integer, default 16: examples per step (pairs for contrastive training) [>= 1]" in text
  assert "b2              a number, default 0.999: Adam beta2 [in [0, 1)]" in text


def test_more_code_search_modules_leave_the_held_out_split_as_it_was():
  """`TRAIN_MORE` adds training pairs only (issue 26): the held-out queries are the same, and none is seen in training."""
  from jlora.train import _stdlib

  train_only, held = _stdlib.code_search_split()
  more, held_more = _stdlib.code_search_split(more=_stdlib.TRAIN_MORE)
  assert held_more == held and more[:len(train_only)] == train_only and len(more) > len(train_only)
  seen = {r.doc.lower() for r in more} | {r.code for r in more}
  assert not any(r.doc.lower() in seen or r.code in seen for r in held)
  assert len({r.doc.lower() for r in more}) == len(more)  # every training query once
  with pytest.raises(ValueError, match=r"`more` and `eval_modules` must be disjoint; both list \['json'\]"):
    _stdlib.code_search_split(more=["json"])
