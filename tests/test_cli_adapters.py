"""`jlora train` into and from adapter sets (`outputs.adapter_set`, `lora.init_from`), and `jlora generate`."""

import json
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest
import yaml

import jlora
from jlora import cli, models, train

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = os.fspath(ROOT / "configs" / "causal_lm_tiny.yaml")
FAST = ["-q", "train.steps=4", "train.log_every=2", "checkpointing.every=0", "train.eval_batch_size=16",
        "outputs.plot=false", "outputs.peft=false", "optimizer.learning_rate=5e-2"]
PROMPTS = ["def split(", "Return the number"]  # different lengths: the batch is left-padded


def _data(d):
  for name, n in (("train", 32), ("eval", 16)):
    (d / f"{name}.jsonl").write_text("".join(json.dumps({"text": f"{name} {i} " + "xy" * i}) + "\n" for i in range(n)))
  return ["data.source=jsonl", f"data.train_file={d / 'train.jsonl'}", f"data.eval_file={d / 'eval.jsonl'}"]


def _train(d, run, *extra):
  return cli.main(["train", TINY, *FAST, *_data(d), f"outputs.dir={run}", *extra])


def _leaves(path, base):
  params, config = jlora.load_adapter(path, base)
  return jax.tree.leaves(jlora.split(params, config)[0]), config


def _same(a, b):
  return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """Runs `a` and `b` (b on half the training examples), both also saved into the adapter set `set/`."""
  d = tmp_path_factory.mktemp("adapters")
  for name, n in (("a", 32), ("b", 16)):
    assert _train(d, d / "runs" / name, f"outputs.adapter_set={d / 'set'}", f"data.max_train={n}") == 0
  base, _, _ = cli._load_run(os.fspath(d / "runs" / "a"), None)
  return d, base


def _copy_set(trained, tmp_path):
  d, _ = trained
  shutil.copytree(d / "set", tmp_path / "set")
  return tmp_path / "set"


def test_two_runs_go_into_one_adapter_set(trained, capsys):
  d, base = trained
  adapters = jlora.load_adapter_set(d / "set", base.params)
  assert adapters.names == ("a", "b")
  for name in ("a", "b"):
    ours, config = _leaves(d / "set" / name, base.params)
    theirs, _ = _leaves(d / "runs" / name / "adapter", base.params)
    assert _same(ours, theirs) and config == train.load(d / "runs" / name / "config.yaml").lora
  assert not _same(_leaves(d / "set" / "a", base.params)[0], _leaves(d / "set" / "b", base.params)[0])
  summary = json.loads((d / "runs" / "a" / "summary.json").read_text())
  assert summary["adapter_set_entry"] == os.fspath(d / "set" / "a")


def test_init_from_starts_at_the_saved_adapter_and_replaces_only_with_the_flag(trained, tmp_path, capsys):
  d, base = trained
  sets = _copy_set(trained, tmp_path)
  args = [f"lora.init_from={sets / 'b'}", f"outputs.adapter_set={sets}", "outputs.adapter_name=a"]
  args += ["train.steps=0", "data.max_train=16"]
  assert _train(tmp_path, tmp_path / "r0", *args) == 2  # `a` is taken
  err = capsys.readouterr().err
  assert "already holds an adapter checkpoint; set `outputs.replace_adapter=true`" in err
  assert not (tmp_path / "r0").exists()  # refused before anything was written
  assert _train(tmp_path, tmp_path / "r0", *args, "outputs.replace_adapter=true") == 0
  b, _ = _leaves(d / "set" / "b", base.params)
  assert _same(_leaves(tmp_path / "r0" / "adapter", base.params)[0], b)  # step 0 is the loaded adapter
  assert _same(_leaves(sets / "a", base.params)[0], b)  # `a` replaced (a new version of its checkpoint)
  before = json.loads((tmp_path / "r0" / "summary.json").read_text())["before"]
  after_b = json.loads((d / "runs" / "b" / "summary.json").read_text())["after"]
  assert before["loss"] == pytest.approx(after_b["loss"], rel=1e-5)
  assert yaml.safe_load((tmp_path / "r0" / "config.yaml").read_text())["lora"]["init_from"] == os.fspath(sets / "b")


def test_init_from_refusals(trained, tmp_path, capsys):
  d, _ = trained
  cases = [
    ([f"lora.init_from={d / 'set' / 'a'}", "lora.r=8"], "was saved with r=4 (this run: 8)", "set lora.r=4"),
    ([f"lora.init_from={d / 'set' / 'a'}", "lora.target_modules=[c_attn, c_proj]"], "target_modules=[c_attn]",
     "lora.target_modules=[c_attn]"),
    ([f"lora.init_from={d / 'set' / 'a'}", "train.seed=1"], "is not the base this adapter was saved with",
     "contents"),
    ([f"lora.init_from={d / 'runs' / 'a'}"], "is not a jlora adapter checkpoint", "give its adapter"),
    ([f"lora.init_from={d / 'nope'}"], "does not exist", "RUN_DIR/adapter"),
    (["lora.init_from=3"], "`lora.init_from` must be the path of a jlora adapter checkpoint", "got 3"),
  ]
  for extra, *messages in cases:
    assert _train(tmp_path, tmp_path / "run", *extra) == 2, extra
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(m in err for m in messages), err
    assert not (tmp_path / "run").exists()


def test_adapter_set_refuses_what_jlora_did_not_write(trained, tmp_path, capsys):
  sets = _copy_set(trained, tmp_path)
  (sets / "mine").mkdir()
  (sets / "mine" / "notes.txt").write_text("keep me")
  (tmp_path / "file").write_text("x")
  cases = [
    ([f"outputs.adapter_set={sets}", "outputs.adapter_name=mine"], "exists and is not a jlora adapter checkpoint "
     "(notes.txt); jlora never writes over files it did not write"),
    ([f"outputs.adapter_set={sets}", "outputs.adapter_name=mine", "outputs.replace_adapter=true"], "(notes.txt)"),
    ([f"outputs.adapter_set={tmp_path / 'file'}"], "is not a directory"),
    (["outputs.adapter_name=x"], "`outputs.adapter_name` is set but `outputs.adapter_set` is not"),
    ([f"outputs.adapter_set={sets}", "outputs.adapter_name=__base__"], "`outputs.adapter_name`: Adapter name"),
    ([f"outputs.adapter_set={sets}", f"outputs.dir={tmp_path / '.hidden'}"], "defaults to the basename"),
  ]
  for extra, message in cases:
    assert _train(tmp_path, tmp_path / "run", *extra) == 2, extra
    assert message in capsys.readouterr().err
  assert (sets / "mine" / "notes.txt").read_text() == "keep me" and not (tmp_path / "run").exists()
  assert sorted(os.listdir(sets)) == ["a", "b", "mine"]


def test_resumed_run_continues_from_its_own_checkpoint(trained, tmp_path, capsys):
  sets = _copy_set(trained, tmp_path)
  run, constant = tmp_path / "run", ["optimizer.schedule=constant", "optimizer.warmup_steps=0"]  # one compile
  assert _train(tmp_path, run, f"lora.init_from={sets / 'a'}", "train.steps=2", *constant) == 0
  (sets / "a").rename(tmp_path / "moved")  # a resumed run does not read `init_from` again
  capsys.readouterr()
  assert _train(tmp_path, run, f"lora.init_from={sets / 'a'}", "train.steps=4", *constant) == 0
  assert "Resuming from step 2" in capsys.readouterr().out
  assert _train(tmp_path, run, f"lora.init_from={sets / 'b'}", "train.steps=4", *constant) == 2
  assert "holds a different run (changed: ['lora'])" in capsys.readouterr().err


def _generate(*args):
  return cli.main(["generate", *args])


def test_generate_mixes_adapters_in_one_batch_exactly(trained, capsys):
  d, base = trained
  runs = [os.fspath(d / "runs" / n) for n in ("a", "b")]
  assert _generate(*runs, "--base", *(x for p in PROMPTS for x in ("--prompt", p)), "-n", "8", "--json") == 0
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [(r["prompt"], r["adapter"]) for r in rows] == [(p, n) for p in PROMPTS for n in ("__base__", "a", "b")]
  tok, model = base.tokenizer, base.model
  loaded = {n: cli._load_run(os.fspath(d / "runs" / n), None)[1:] for n in ("a", "b")}
  for r in rows:
    prompt = jax.numpy.asarray([[1, *(3 + c for c in r["prompt"].encode())]], jax.numpy.int32)  # BOS + bytes
    kw = {"max_new_tokens": 8, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    if r["adapter"] == "__base__":
      alone = models.generate(model, base.params, prompt, **kw)
    else:
      params, config = loaded[r["adapter"]]
      alone = models.generate(model, params, prompt, apply_fn=jlora.apply_fn(model, config), **kw)
    alone = np.asarray(alone[0]).tolist()
    alone = alone[: alone.index(tok.eos_token_id)] if tok.eos_token_id in alone else alone
    assert r["tokens"] == alone and r["completion"] == tok.decode([alone])[0], r
  per_adapter = {n: [r["tokens"] for r in rows if r["adapter"] == n] for n in ("__base__", "a", "b")}
  assert per_adapter["a"] != per_adapter["__base__"] and per_adapter["b"] != per_adapter["__base__"]


def test_generate_from_an_adapter_set_prints_a_table(trained, tmp_path, capsys):
  d, _ = trained
  (tmp_path / "prompts.txt").write_text(f"{PROMPTS[0]}\n\n{PROMPTS[1]}\n")  # the shapes above: no new compile
  args = [os.fspath(d / "set"), "--base-run", os.fspath(d / "runs" / "a"), "--prompts-file",
          os.fspath(tmp_path / "prompts.txt"), "-n", "8", "--base"]
  assert _generate(*args) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].split() == ["adapter", "prompt", "completion"] and set(lines[1]) == {"-", " "} and len(lines) == 8
  assert [line.split()[0] for line in lines[2:]] == ["__base__", "a", "b"] * 2
  assert _generate(f"sql={d / 'set' / 'a'}", f"{d / 'runs' / 'b'}", "--base", "--prompts-file",
                   os.fspath(tmp_path / "prompts.txt"), "-n", "8", "--json") == 0
  rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
  assert [r["adapter"] for r in rows] == ["__base__", "sql", "b"] * 2 and rows[2]["prompt"] == PROMPTS[0]


def test_generate_errors(trained, tmp_path, capsys):
  d, _ = trained
  run_a = d / "runs" / "a"
  config = yaml.safe_load((run_a / "config.yaml").read_text())
  for name, change in (("seeded", {"train": {**config["train"], "seed": 1}}),
                       ("cls", {"lora": {**config["lora"], "task_type": "SEQ_CLS"}})):
    (tmp_path / name).mkdir()
    (tmp_path / name / "config.yaml").write_text(yaml.safe_dump({**config, **change}))
  cases = [
    ([run_a], "No prompts; give --prompt TEXT"),
    ([tmp_path / "cls", "-p", "x"], "is a SEQ_CLS run (`lora.task_type`); only CAUSAL_LM runs generate text"),
    ([run_a, tmp_path / "seeded", "-p", "x"], "have different base models (train.seed differ)"),
    ([d / "set", "--base-run", tmp_path / "seeded", "-p", "x"], "is not the base this adapter was saved with"),
    ([d / "set", "-p", "x"], "No run directory among the sources gives the base model; add --base-run"),
    ([run_a, d / "set", "-p", "x"], "Two adapters are named 'a'"),
    ([tmp_path, "-p", "x"], "is not a `jlora train` run directory (config.yaml + adapter/), an adapter checkpoint"),
    ([f".x={run_a}", "-p", "x"], "Adapter name '.x'"),
    (["--base", "-p", "x"], "No run directory among the sources"),
    ([run_a, "-p", "x", "-n", "0"], "--max-new-tokens must be >= 1"),
    ([run_a, "-p", "x", "--temperature", "-1"], "--temperature must be a finite number >= 0"),
  ]
  for args, message in cases:
    assert _generate(*map(os.fspath, args)) == 2, args
    err = capsys.readouterr().err
    assert err.startswith("jlora generate: ") and err.count("\n") == 1 and message in err, err
