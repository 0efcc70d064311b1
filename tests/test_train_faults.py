"""Faults in training: non-finite steps, damaged checkpoints, and SIGKILL at random points of checkpoint saves."""

import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import jlora
from jlora import cli, train
from jlora.train import _data, _outputs, _setup, _state, _tasks
from tests.test_trainloop import adapter

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = os.fspath(ROOT / "configs" / "causal_lm_tiny.yaml")


def _args(d, *extra):
  for name, n in (("train", 32), ("eval", 16)):
    (d / f"{name}.jsonl").write_text("".join(json.dumps({"text": f"{name} {i} " + "xy" * i}) + "\n" for i in range(n)))
  return ["train", TINY, "-q", "train.log_every=1", "checkpointing.every=1", "checkpointing.keep=2", "data.source=jsonl",
          f"data.train_file={d / 'train.jsonl'}", f"data.eval_file={d / 'eval.jsonl'}", *extra]


def _train_rows(run):
  rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  return [(r["step"], r["loss"], r["lr"]) for r in rows if r["kind"] == "train"]


def _same_adapter(a, b):
  x, y = jax.tree.leaves(adapter(a)), jax.tree.leaves(adapter(b))
  return len(x) == len(y) and all(np.array_equal(u, v) for u, v in zip(x, y))


def test_diverging_training_stops_with_status_1_and_exports_nothing(tmp_path, capsys, monkeypatch):
  """Issue 15.3: a learning rate of 1e12 exited 0 and wrote NaN adapters."""
  run, closed, close = tmp_path / "run", [], _state.Checkpoints.close
  monkeypatch.setattr(_state.Checkpoints, "close", lambda self: (closed.append(self.directory), close(self)))
  args = _args(tmp_path, "train.steps=8", "optimizer.learning_rate=1e12", "optimizer.warmup_steps=0",
               "optimizer.schedule=constant", f"outputs.dir={run}")
  assert cli.main(args) == 1
  assert closed == [os.fspath(run / "checkpoints")]  # the orbax manager is closed when the loop raises
  err = capsys.readouterr().err
  assert "Training diverged at step" in err and err.count("\n") == 1 and "Traceback" not in err
  step = int(err.split("Training diverged at step ")[1].split(":")[0])
  assert 1 < step <= 8
  assert not any((run / name).exists() for name in ("adapter", "peft", "config.yaml", "summary.json"))
  saved = sorted(int(s) for s in os.listdir(run / "checkpoints"))
  assert saved and max(saved) == step - 1  # every finished finite step was saved, the non-finite one never
  for s in saved:
    state = ocp.StandardCheckpointer().restore(run / "checkpoints" / str(s) / "state")
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state) if np.issubdtype(np.asarray(x).dtype, np.floating))
  assert max(r[0] for r in _train_rows(run)) == step - 1  # no NaN row in metrics.jsonl


def test_a_non_finite_merged_check_fails_loudly(tmp_path, monkeypatch):
  """Issue 15.3: the merged-vs-factored check printed `-inf` and the run succeeded."""
  real = jlora.merge

  def bad_merge(params, config, **kw):
    return jax.tree.map(lambda x: x * np.nan if np.issubdtype(x.dtype, np.floating) else x, real(params, config, **kw))

  monkeypatch.setattr(_outputs.jlora, "merge", bad_merge)
  config = train.load(TINY, _args(tmp_path, "train.steps=1", f"outputs.dir={tmp_path / 'run'}")[3:])
  with pytest.raises(train.Diverged, match=r"The merged-vs-factored check is not finite \(nan\) after step 1"):
    train.run(config, log=lambda s: None)
  assert not (tmp_path / "run" / "adapter").exists() and not (tmp_path / "run" / "config.yaml").exists()


def _damage(step_dir, how):
  state = step_dir / "state"
  data = sorted(p for p in state.rglob("*") if p.is_file() and p.parent.name == "d")
  if how == "truncated":
    for p in data:
      p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
  elif how == "flipped":
    for p in data:
      raw = bytearray(p.read_bytes())
      raw[len(raw) // 2] ^= 0xFF
      p.write_bytes(bytes(raw))
  elif how == "tampered":  # valid files holding other numbers: only the checksums catch it
    tree = ocp.StandardCheckpointer().restore(state)
    c_attn = tree["trainable"]["transformer"]["h_0"]["attn"]["c_attn"]
    c_attn["lora_b"] = np.asarray(c_attn["lora_b"]) + np.float32(1e-3)
    shutil.rmtree(state)
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(state, tree)
  elif how == "meta":
    meta = step_dir / "meta" / "metadata"
    meta.write_text(meta.read_text()[:40])
  elif how == "missing":
    shutil.rmtree(state)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted 6-step run with a checkpoint every step (5 and 6 kept) and its train arguments."""
  d = tmp_path_factory.mktemp("reference")
  args = _args(d, "train.steps=6")
  assert cli.main([*args, f"outputs.dir={d / 'run'}"]) == 0
  assert sorted(os.listdir(d / "run" / "checkpoints")) == ["5", "6"]
  return d / "run", args


@pytest.fixture(scope="module")
def template(reference):
  """The training state of the reference run's config at step 0 (shapes for restoring)."""
  run, _ = reference
  config = train.load(run / "config.yaml")
  task = _tasks.get(config.lora.task_type)
  setup = _setup.prepare(config, task, _data.examples(config.data, task))
  return _state.State(setup.trainable, setup.tx.init(setup.trainable), 0, np.zeros(2, np.uint32))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's abandoned read tasks
@pytest.mark.parametrize("how", ["truncated", "flipped", "tampered", "meta", "missing"])
def test_damage_is_detected_on_restore(reference, template, tmp_path, how):
  ref, _ = reference
  shutil.copytree(ref / "checkpoints", tmp_path / "checkpoints")
  _damage(tmp_path / "checkpoints" / "6", how)
  with _state.Checkpoints(tmp_path / "checkpoints") as checkpoints:
    expected = {"meta": "has no readable metadata", "tampered": r"cannot be restored \(ValueError: The training "
                r"checkpoint .*/6 is corrupt: leaf .*c_attn.*lora_b.* does not match its checksum"}
    with pytest.raises(_state.Damaged, match=rf"^checkpoint step 6 {expected.get(how, 'cannot be restored')}"):
      checkpoints.restore(template, 6)
    assert checkpoints.restore(template, 5).step == 5


def test_a_reader_leaves_a_save_in_progress_alone(reference, template, tmp_path):
  """A read-only reader neither removes orbax's temporary directories (a concurrent save's) nor writes."""
  ref, _ = reference
  shutil.copytree(ref / "checkpoints", tmp_path / "checkpoints")
  pending = tmp_path / "checkpoints" / "7.orbax-checkpoint-tmp"
  shutil.copytree(ref / "checkpoints" / "6", pending)  # as a save of step 7 in progress (or killed) leaves it
  with _state.Checkpoints(tmp_path / "checkpoints", read_only=True) as reader:
    assert reader.restore(template, 6).step == 6
    for call in (lambda: reader.save(template, data_position=(0, 0), fingerprint={}), lambda: reader.delete(5)):
      with pytest.raises(ValueError, match=r"^Checkpoints\.(save|delete): .* was opened with read_only=True"):
        call()
  assert pending.is_dir() and sorted(os.listdir(tmp_path / "checkpoints"))[:2] == ["5", "6"]
  with _state.Checkpoints(tmp_path / "checkpoints") as writer:  # a writer removes it (before its first save)
    assert writer.save(template._replace(step=8), data_position=(0, 0), fingerprint={})
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["5", "6", "8"]


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(reference, tmp_path, capsys):
  """Issue 15.9: a damaged newest checkpoint crashed the resume with three tracebacks."""
  ref, args = reference
  run = tmp_path / "run"
  shutil.copytree(ref, run)
  _damage(run / "checkpoints" / "6", "tampered")  # readable files, other numbers: only the checksums catch it
  capsys.readouterr()
  assert cli.main([*args, f"outputs.dir={run}"]) == 0
  out, err = capsys.readouterr()
  assert err.startswith("jlora train: warning: checkpoint step 6 cannot be restored (ValueError: The training "
                        "checkpoint") and "training resumes from step 5" in err, err
  assert err.count("\n") == 1 and "Resuming from step 5" in out
  assert _same_adapter(run, ref) and _train_rows(run) == _train_rows(ref)
  assert sorted(os.listdir(run / "checkpoints")) == ["5", "6"]  # step 6 written again, whole


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_every_checkpoint_damaged_is_an_error(reference, tmp_path, capsys):
  ref, args = reference
  run = tmp_path / "run"
  shutil.copytree(ref, run)
  for step in ("5", "6"):
    _damage(run / "checkpoints" / step, "truncated")
  assert cli.main([*args, f"outputs.dir={run}"]) == 2
  err = capsys.readouterr().err
  assert "No usable checkpoint in" in err and "`checkpointing.resume=false` to start over" in err
  assert err.count("\n") == 1


_KILLER = """
import os, random, signal, sys, threading
from jlora import cli
from jlora.train import _resume
mode, point, seed = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
EVENTS = {"open", "os.rename", "os.replace", "os.mkdir", "os.remove", "os.unlink", "os.rmdir", "shutil.rmtree"}
state = {"inside": False, "events": 0}
rng = random.Random(seed)
def kill():
  os.kill(os.getpid(), signal.SIGKILL)
def hook(event, args):  # the `point`-th file operation inside checkpoint saves
  if mode == "event" and state["inside"] and event in EVENTS:
    state["events"] += 1
    if state["events"] == int(point):
      kill()
sys.addaudithook(hook)
save = _resume.save
def killed_save(*a, **kw):
  timer = threading.Timer(rng.uniform(0, point), kill) if mode == "time" else None
  state["inside"] = True
  if timer:
    timer.start()
  try:
    return save(*a, **kw)
  finally:
    state["inside"] = False
    if timer:
      timer.cancel()
_resume.save = killed_save
sys.exit(cli.main(sys.argv[4:]))
"""


def test_sigkill_during_checkpoint_saves_resumes_exactly(reference, tmp_path):
  """Issue 15 "done when": SIGKILL at random points of checkpoint saves; the run still ends bit-identical."""
  ref, args = reference
  run, rng, codes = tmp_path / "run", random.Random(0), []
  for mode in ("event", "time"):  # each child resumes what the killed one left
    point = rng.randint(2, 90) if mode == "event" else 0.05
    proc = subprocess.run([sys.executable, "-c", _KILLER, mode, str(point), str(rng.randrange(1000)), *args,
                           f"outputs.dir={run}"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode in (0, -signal.SIGKILL), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    codes.append(proc.returncode)
    if proc.returncode == 0:
      break
  assert -signal.SIGKILL in codes
  assert cli.main([*args, f"outputs.dir={run}"]) == 0  # finishes what is left (or only rewrites the outputs)
  assert _same_adapter(run, ref) and _train_rows(run) == _train_rows(ref)
  left = os.listdir(run / "checkpoints")
  assert sorted(left) == ["5", "6"], left  # no temporary directories of killed saves, `keep` honoured
  assert json.loads((run / ".jlora-run.json").read_text())["checkpoints"] == [5, 6]
