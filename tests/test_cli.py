"""The `jlora` command: help, argument errors, the default job's config, `merge` and `export-peft`."""

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


def test_no_command_prints_help(capsys):
  assert cli.main([]) == 2
  assert "train" in capsys.readouterr().out


@pytest.mark.parametrize(
  ("args", "message"),
  [
    (["train", TINY, "train.stepz=1"], "unknown key(s) ['train.stepz']; allowed `train` keys"),
    (["train", TINY, "optimizer.learning_rate=fast"], "`optimizer.learning_rate` must be a number"),
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
  assert "not a `jlora train` output directory" in capsys.readouterr().err
