"""Full fine-tuning (`train.method: full`) and `jlora compare`: the variants side by side, resumable, refused cleanly."""

import json
import os
import pathlib

import jax
import numpy as np
import pytest

from jlora import cli, models, train
from jlora.train import _compare, _setup, _tasks

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = os.fspath(ROOT / "configs" / "causal_lm_tiny.yaml")
FAST = ["train.quiet=true", "train.log_every=1", "data.max_train=64", "data.max_eval=16", "train.eval_batch_size=16",
        "train.steps=2", "checkpointing.every=1"]
PNG = b"\x89PNG\r\n\x1a\n"


def _tiny(*overrides):
  return train.load(TINY, [*FAST, *overrides])


def _tree(path):
  """Every file under `path` with its size and modification time: what a refused call must leave as it was."""
  return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in pathlib.Path(path).rglob("*") if p.is_file()}


def test_full_fine_tuning_trains_every_weight_and_saves_the_model(tmp_path, capsys):
  run = tmp_path / "full"
  result = train.run(_tiny("train.method=full", f"outputs.dir={run}"), log=lambda s: None)
  assert result["method"] == "full" and result["merge_diff"] is None
  assert result["trainable"] == result["total"] and result["percent"] == 100.0
  assert result["step_bytes"] > 0 and result["step_s"] > 0
  assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["checkpoints", "model"]  # no adapter/, peft/
  assert result["model_bytes"] == (run / "model" / "model.safetensors").stat().st_size
  config = train.load(run / "config.yaml")
  assert config.train.method == "full"
  base = _setup.base_model(config, _tasks.get(config.lora.task_type))  # the same random init (train.seed)
  _, trained = models.from_pretrained(run / "model")
  old, new = jax.tree.leaves(base.params), jax.tree.leaves(trained)
  assert len(old) == len(new) and jax.tree.structure(base.params) == jax.tree.structure(trained)
  assert all(not np.array_equal(a, b) for a, b in zip(old, new)), "every weight trains"
  assert result["trainable"] == sum(x.size for x in new)
  assert result["after"]["loss"] < result["before"]["loss"]
  # Resumed like a LoRA run: 2 more steps from the saved state.
  again = train.run(_tiny("train.method=full", "train.steps=4", f"outputs.dir={run}"), log=lambda s: None)
  assert again["resumed_from"] == 2 and again["steps"] == 4
  # No adapter to merge or export.
  assert cli.main(["merge", os.fspath(run)]) == 2
  assert "is a full fine-tuning run (`train.method: full`): it has no adapter" in capsys.readouterr().err


def test_a_lora_run_over_a_full_run_replaces_its_model(tmp_path):
  run = tmp_path / "run"
  train.run(_tiny("train.method=full", f"outputs.dir={run}"), log=lambda s: None)
  train.run(_tiny(f"outputs.dir={run}", "checkpointing.resume=false"), log=lambda s: None)
  assert (run / "adapter").is_dir() and (run / "peft").is_dir() and not (run / "model").exists()
  train.run(_tiny("train.method=full", f"outputs.dir={run}", "checkpointing.resume=false"), log=lambda s: None)
  assert (run / "model").is_dir() and not (run / "adapter").exists() and not (run / "peft").exists()


def test_compare_writes_the_table_json_and_plot_and_resumes_per_variant(tmp_path, monkeypatch):
  out, lines = tmp_path / "cmp", []
  report = train.compare(_tiny(), methods="full,lora", ranks=[2, 4], out=out,
                         full_overrides=["optimizer.learning_rate=1e-3"], log=lines.append)
  rows = {r["variant"]: r for r in report["variants"]}
  assert list(rows) == ["full", "lora-r2", "lora-r4"]
  assert {f.name for f in out.iterdir()} >= {"compare.md", "compare.json", "compare.png", ".jlora-compare.json",
                                             "full", "lora-r2", "lora-r4"}
  assert (out / "compare.png").read_bytes()[:8] == PNG
  saved = json.loads((out / "compare.json").read_text())
  assert saved == json.loads(json.dumps(report))
  assert set(saved) >= {"task", "model", "headline", "before", "variants", "wall_s"}
  assert all(set(r) == {*_compare.VARIANT_KEYS, "resumed_from"} for r in saved["variants"])
  assert all(r["status"] == "trained" and r["steps"] == 2 for r in rows.values())
  # The full variant trains every weight at its own learning rate; the ranks keep the scale alpha / r.
  assert rows["full"]["trainable"] == rows["full"]["total"] and rows["full"]["percent"] == 100.0
  assert rows["lora-r4"]["trainable"] == 2 * rows["lora-r2"]["trainable"]  # r x (d_in + d_out) per adapted kernel
  assert rows["lora-r2"]["percent"] < rows["lora-r4"]["percent"] < 100
  assert train.load(out / "full" / "config.yaml").optimizer.learning_rate == 1e-3
  r2 = train.load(out / "lora-r2" / "config.yaml").lora
  assert (r2.r, r2.lora_alpha) == (2, 4)  # the config's r 4, alpha 8
  assert rows["full"]["saved_bytes"] == (out / "full" / "model" / "model.safetensors").stat().st_size
  assert rows["full"]["saved_bytes"] > rows["lora-r4"]["saved_bytes"] > 0
  assert all(isinstance(r["step_bytes"], int) and r["step_bytes"] > 0 for r in rows.values())
  assert all(r["step_s"] > 0 and r["tokens_per_s"] > 0 and r["wall_s"] > 0 for r in rows.values())
  assert all(r["after"] != report["before"] for r in rows.values())
  table = (out / "compare.md").read_text()
  assert all(f"| {name} | " in table for name in rows) and "| base model (before training) |" in table
  assert _compare.markdown(report) in "\n".join(lines)  # printed too

  # Again: every variant is finished, so nothing trains.
  monkeypatch.setattr(_compare, "run", lambda *a, **k: pytest.fail("a finished variant trained again"))
  again = train.compare(_tiny(), methods="full,lora", ranks=[2, 4], out=out,
                        full_overrides=["optimizer.learning_rate=1e-3"], log=lambda s: None)
  assert [r["status"] for r in again["variants"]] == ["read back"] * 3
  assert [r["after"] for r in again["variants"]] == [r["after"] for r in rows.values()]
  monkeypatch.undo()
  # More steps: each variant resumes from its own last checkpoint; a new rank starts.
  more = train.compare(_tiny("train.steps=3"), methods="lora", ranks="4,8", out=out, log=lambda s: None)
  assert [(r["variant"], r["status"]) for r in more["variants"]] == [("lora-r4", "resumed at step 2"),
                                                                     ("lora-r8", "trained")]


@pytest.mark.parametrize(("kwargs", "error", "match"), [
  ({"methods": "full,lorra"}, ValueError, r"`methods`: unknown method\(s\) \['lorra'\]; choose from \['full', "),
  ({"methods": ""}, ValueError, r"`methods` must list at least one value"),
  ({"methods": "lora", "ranks": "4,0"}, ValueError, r"`ranks`: every rank must be an integer >= 1 .*got '0'"),
  ({"methods": "lora", "ranks": [-8]}, ValueError, r"`ranks`: every rank must be an integer >= 1 .*got -8"),
  ({"methods": "lora", "ranks": "4,x"}, ValueError, r"`ranks`: every rank must be an integer >= 1 .*got 'x'"),
  ({"methods": "lora", "ranks": "2.5"}, ValueError, r"got '2.5'"),
  ({"methods": "lora", "ranks": "4,4"}, ValueError, r"`ranks` lists \['4'\] more than once"),
  ({"methods": "lora", "full_overrides": ["optimizer.learning_rate=1e-4"]}, ValueError,
   r"`full_overrides` .* change the `full` variant, which `methods` \['lora'\] leaves out"),
  ({"full_overrides": ["optimizer.lerning_rate=1"]}, ValueError, r"variant `full`: unknown key\(s\) "
   r"\['optimizer.lerning_rate'\]"),
  ({"full_overrides": ["model.quantize=nf4"]}, ValueError, r"variant `full`: `train.method: full` trains every "
   r"weight .* `model.quantize` is 'nf4'"),
])
def test_bad_methods_ranks_and_overrides_are_refused_before_anything_is_written(tmp_path, kwargs, error, match):
  with pytest.raises(error, match=match):
    train.compare(_tiny(), out=tmp_path / "cmp", **kwargs)
  assert not (tmp_path / "cmp").exists()


def test_a_sweep_over_another_runs_files_is_refused_and_nothing_changes(tmp_path):
  out = tmp_path / "cmp"  # an earlier comparison's directory, whose lora-r4 is a run of another config
  (out / "lora-r4").mkdir(parents=True)
  (out / ".jlora-compare.json").write_text(json.dumps({"written_by": "jlora compare", "version": 1, "files": {}}))
  (out / "lora-r4" / ".jlora-run.json").write_text(json.dumps({"written_by": "jlora train", "version": 1,
                                                               "fingerprint": {"model": "other"}, "outputs": None,
                                                               "files": {}, "checkpoints": []}))
  before = _tree(tmp_path)
  with pytest.raises(ValueError, match=r"variant `lora-r4` .*holds a different run .*Nothing was written; `jlora "
                     r"compare` never starts a run over"):
    train.compare(_tiny(), methods="full,lora", ranks="2,4", out=out, log=lambda s: None)
  assert _tree(tmp_path) == before and sorted(os.listdir(out)) == [".jlora-compare.json", "lora-r4"]
  (out / "lora-r4" / ".jlora-run.json").unlink()
  (out / "lora-r4" / "notes.txt").write_text("mine")  # files that are not jlora's
  with pytest.raises(ValueError, match=r"variant `lora-r4` .*holds files that are not a `jlora train` run's "
                     r"\(notes.txt"):
    train.compare(_tiny(), methods="lora", ranks="4", out=out, log=lambda s: None)
  foreign = tmp_path / "mine"
  foreign.mkdir()
  (foreign / "compare.md").write_text("my table")
  with pytest.raises(ValueError, match=r"`--out`: .*mine' holds files that are not a `jlora compare` run's "
                     r"\(compare.md; no .jlora-compare.json\)"):
    train.compare(_tiny(), methods="lora", out=foreign, log=lambda s: None)
  assert (foreign / "compare.md").read_text() == "my table" and os.listdir(foreign) == ["compare.md"]
  with pytest.raises(ValueError, match=r"`checkpointing.resume: false` would start variants over"):
    train.compare(_tiny("checkpointing.resume=false"), methods="lora", out=tmp_path / "new", log=lambda s: None)
  assert not (tmp_path / "new").exists()


def test_the_compare_command(tmp_path, capsys):
  out = tmp_path / "cmp"
  args = ["compare", TINY, *FAST, "--methods", "lora", "--ranks", "2", "--out", os.fspath(out)]
  assert cli.main(args) == 0
  printed = capsys.readouterr().out
  assert "jlora compare [1/1] lora-r2: training in" in printed and "| lora-r2 | " in printed
  assert json.loads((out / "compare.json").read_text())["variants"][0]["variant"] == "lora-r2"
  assert cli.main(args) == 0
  assert "lora-r2: finished earlier, read back" in capsys.readouterr().out
  for bad, message in ((["--methods", "full,lorra"], "unknown method(s) ['lorra']"),
                       (["--ranks", "0"], "every rank must be an integer >= 1"),
                       (["--out", os.fspath(tmp_path / "cmp" / "lora-r2")], "holds files that are not a `jlora "
                        "compare` run's")):
    assert cli.main([*args, *bad]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jlora compare: ") and err.count("\n") == 1 and message in err, err


def test_full_fine_tuning_is_the_same_step_over_the_whole_tree():
  """`adapt` gives full fine-tuning the whole tree as trainable and `{}` frozen; `make_train_step` takes it as is."""
  from jlora.train import _loop

  config = _tiny("train.method=full")
  task = _tasks.get(config.lora.task_type)
  base = _setup.base_model(config, task)
  setup = _setup.adapt(config, task, base, _setup.run_keys(0), ((), {}))
  assert setup.frozen == {} and setup.trainable is base.params and setup.method == "full"
  ids = np.ones((2, 8), np.int32)
  step = _loop.make_train_step(setup, temperature=1.0, dropout=True)
  zeros = jax.tree.map(np.zeros_like, base.params)
  new, _, loss, finite = step(jax.tree.map(np.array, base.params), setup.tx.init(zeros), {}, {"ids": ids,
                                                                                              "mask": ids}, None)
  assert bool(finite) and np.isfinite(float(loss))
  assert jax.tree.structure(new) == jax.tree.structure(base.params)
