"""The run directory: it always describes its adapter, jlora touches only what it wrote, one run at a time."""

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import safetensors.numpy

import jlora
from jlora import cli, models, train
from jlora.train._rundir import LOCK, MARKER

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = os.fspath(ROOT / "configs" / "causal_lm_tiny.yaml")
FAST = ["-q", "train.steps=2", "train.log_every=1", "checkpointing.every=1", "train.eval_batch_size=16"]


def _data(d):
  for name, n in (("train", 32), ("eval", 16)):
    (d / f"{name}.jsonl").write_text("".join(json.dumps({"text": f"{name} {i} " + "xy" * i}) + "\n" for i in range(n)))
  return ["data.source=jsonl", f"data.train_file={d / 'train.jsonl'}", f"data.eval_file={d / 'eval.jsonl'}"]


def _snapshot(run):
  """`{relative path: sha256}` of every file under `run` except the lock file."""
  return {os.path.relpath(os.path.join(d, f), run): hashlib.sha256(pathlib.Path(d, f).read_bytes()).hexdigest()
          for d, _, files in os.walk(run) for f in files if f != LOCK}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished tiny run (2 steps, checkpoints 1 and 2) and its train arguments."""
  d = tmp_path_factory.mktemp("finished")
  args = ["train", TINY, *FAST, *_data(d)]
  assert cli.main([*args, f"outputs.dir={d / 'run'}"]) == 0
  return d / "run", args


@pytest.fixture
def run_copy(finished, tmp_path):
  run, args = finished
  shutil.copytree(run, tmp_path / "run")
  return tmp_path / "run", [*args, f"outputs.dir={tmp_path / 'run'}"]


def test_marker_records_what_jlora_wrote(run_copy):
  run, _ = run_copy
  marker = json.loads((run / MARKER).read_text())
  assert marker["written_by"] == "jlora train" and marker["outputs"]["step"] == 2
  assert marker["outputs"]["fingerprint"] == marker["fingerprint"]
  assert sorted(marker["checkpoints"]) == sorted(int(s) for s in os.listdir(run / "checkpoints")) == [1, 2]
  for name in ("config.yaml", "summary.json", "curves.png"):
    assert marker["files"][name] == [hashlib.sha256((run / name).read_bytes()).hexdigest()]
  assert "metrics.jsonl" in marker["files"]


def _tiny_checkpoint(path, seed):
  config = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 48,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 259, "max_position_embeddings": 64}
  model, params = models.from_config(config, key=jax.random.key(seed))
  models.save_pretrained(path, model, params)
  return os.fspath(path)


def test_refused_resume_changes_nothing_and_merge_uses_the_run_base(tmp_path, capsys):
  """Issue 15.2: a refused second run rewrote config.yaml, so `jlora merge` used the other base."""
  a, b = _tiny_checkpoint(tmp_path / "a", 0), _tiny_checkpoint(tmp_path / "b", 1)
  run = tmp_path / "run"
  args = ["train", os.fspath(ROOT / "configs" / "causal_lm.yaml"), *FAST, "train.steps=1", "model.tokenizer=bytes",
          "train.batch_size=4", "train.seq_len=32", *_data(tmp_path), f"outputs.dir={run}",
          "lora.layers_to_transform=[1]"]  # layer 1 of the scanned stack only (a layer mask, docs/concepts.md)
  assert cli.main([*args, f"model.path={a}"]) == 0
  before = _snapshot(run)
  capsys.readouterr()
  assert cli.main([*args, f"model.path={b}"]) == 2
  assert "holds a different run (changed: ['model'])" in capsys.readouterr().err
  assert _snapshot(run) == before  # not one byte changed, config.yaml included

  assert cli.main(["merge", os.fspath(run), "--out", os.fspath(tmp_path / "merged")]) == 0
  model_a, base_a = models.from_pretrained(a, scan_layers=True)  # as configs/causal_lm.yaml builds it
  params, lora = jlora.load_adapter(run / "adapter", base_a)
  expected = models.to_hf_state_dict(model_a, jlora.merge(params, lora))
  got = safetensors.numpy.load_file(tmp_path / "merged" / "model.safetensors")
  assert got.keys() == expected.keys() and all(np.array_equal(got[k], expected[k]) for k in got)
  hf_base = models.to_hf_state_dict(model_a, base_a)
  for proj in ("q_proj", "v_proj"):  # layer 0 is left out: no adapter there, and merged it is the base bit for bit
    node = params["model"]["layers"]["self_attn"][proj]
    assert node["lora_layers"].tolist() == [0.0, 1.0] and not np.any(node["lora_a"][0]) and np.any(node["lora_a"][1])
    np.testing.assert_array_equal(got[f"model.layers.0.self_attn.{proj}.weight"],
                                  hf_base[f"model.layers.0.self_attn.{proj}.weight"])

  with pytest.raises(ValueError, match="not the base this adapter was saved with"):  # checked by contents too
    jlora.load_adapter(run / "adapter", models.from_pretrained(b, scan_layers=True)[1])


def test_foreign_directory_is_refused_untouched(tmp_path, capsys):
  """Issue 15.1: an `outputs.dir` holding the user's own files (here their config.yaml) is not a run directory."""
  out = tmp_path / "mine"
  out.mkdir()
  (out / "config.yaml").write_text("my: own config\n")
  (out / "notes.txt").write_text("keep me\n")
  assert cli.main(["train", TINY, *FAST, *_data(tmp_path), f"outputs.dir={out}"]) == 2
  err = capsys.readouterr().err
  assert "holds files that are not a `jlora train` run's (config.yaml, notes.txt; no .jlora-run.json)" in err
  assert sorted(os.listdir(out)) == ["config.yaml", "notes.txt"]
  assert (out / "config.yaml").read_text() == "my: own config\n"


@pytest.mark.parametrize("name", ["config.yaml", "summary.json", "metrics.jsonl"])
def test_a_file_changed_since_jlora_wrote_it_is_refused(run_copy, capsys, name):
  run, args = run_copy
  if name == "metrics.jsonl":  # not recorded: as if the user put it there
    marker = json.loads((run / MARKER).read_text())
    del marker["files"]["metrics.jsonl"]
    (run / MARKER).write_text(json.dumps(marker))
  else:
    (run / name).write_text("edited by hand\n")
  before = _snapshot(run)
  assert cli.main(args) == 2
  assert f"{name} was not written by jlora" in capsys.readouterr().err
  assert _snapshot(run) == before


def test_resume_false_deletes_only_jlora_checkpoints(run_copy, capsys):
  """Issue 15.1: `checkpointing.resume=false` deleted everything under checkpoints/."""
  run, args = run_copy
  (run / "checkpoints" / "notes.txt").write_text("mine\n")
  (run / "checkpoints" / "backup").mkdir()
  (run / "checkpoints" / "backup" / "w.npy").write_bytes(b"\x93NUMPY")
  assert (run / "peft").is_dir()
  assert cli.main([*args, "checkpointing.resume=false", "lora.r=2", "train.steps=1", "outputs.peft=false"]) == 0
  assert sorted(os.listdir(run / "checkpoints")) == ["1", "backup", "notes.txt"]
  assert json.loads((run / MARKER).read_text())["checkpoints"] == [1]
  assert (run / "checkpoints" / "notes.txt").read_text() == "mine\n"
  # The directory describes the new adapter only: the old run's PEFT export is gone, not left beside it.
  assert not (run / "peft").exists() and train.load(run / "config.yaml").lora.r == 2
  assert json.loads((run / "summary.json").read_text())["steps"] == 1

  (run / "checkpoints" / "99").mkdir()  # a step-like directory jlora did not write: neither deleted nor read
  (run / "checkpoints" / "99" / "x").write_text("mine\n")
  before = _snapshot(run)
  for extra in ([], ["checkpointing.resume=false"]):
    capsys.readouterr()
    assert cli.main([*args, "lora.r=2", "train.steps=1", *extra]) == 2
    assert "holds step directories jlora did not write ([99])" in capsys.readouterr().err
    assert _snapshot(run) == before


_BLOCKED = """
import os, sys, time
from jlora import cli, train
go = sys.argv[1]
run = train.run
def wait(step, loss):
  while step == 1 and not os.path.exists(go):
    time.sleep(0.05)
train.run = lambda config, **kw: run(config, on_step=wait)
sys.exit(cli.main(sys.argv[2:]))
"""


def test_two_processes_into_one_directory(tmp_path, capsys):
  """Issue 15.9: two concurrent runs both succeeded and mixed their checkpoints."""
  run, go = tmp_path / "run", tmp_path / "go"
  args = ["train", TINY, *FAST, *_data(tmp_path), f"outputs.dir={run}"]
  first = subprocess.Popen([sys.executable, "-c", _BLOCKED, os.fspath(go), *args], cwd=ROOT, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  try:
    deadline = time.time() + 240
    while not (run / "checkpoints" / "1").exists():  # the first run holds the lock and waits after step 1
      assert first.poll() is None and time.time() < deadline, first.communicate()
      time.sleep(0.1)
    before = _snapshot(run)
    assert cli.main(args) == 2  # the same command, started twice
    err = capsys.readouterr().err
    assert f"another `jlora train` (pid {first.pid}) is writing into" in err and err.count("\n") == 1, err
    assert _snapshot(run) == before
  finally:
    go.write_text("")
    _, err = first.communicate(timeout=240)
  assert first.returncode == 0, err[-2000:]
  assert train.load(run / "config.yaml").lora.r == 4 and sorted(os.listdir(run / "checkpoints")) == ["1", "2"]
