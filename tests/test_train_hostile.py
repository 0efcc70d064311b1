"""`jlora train` against hostile directories (issue 22): every output location is checked before the first step,
symbolic links are followed or named, and a full disk ends with one line and its own exit status."""

import errno
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from jlora import cli, train

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = os.fspath(ROOT / "configs" / "causal_lm_tiny.yaml")
FAST = ["-q", "train.steps=2", "train.log_every=1", "checkpointing.every=1", "train.eval_batch_size=16",
        "outputs.plot=false", "data.max_train=32", "data.max_eval=16"]


def _args(run, *extra):
  return ["train", TINY, *FAST, f"outputs.dir={run}", *extra]


def _state(run):
  """What training changes in a run directory: the checkpoint steps and the metrics lines."""
  return sorted(os.listdir(run / "checkpoints")), (run / "metrics.jsonl").read_text()


def _one_line(capsys):
  err = capsys.readouterr().err
  assert "Traceback" not in err and err.startswith("jlora train: ") and err.count("\n") == 1, err
  return err


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished two-step run (adapter/, peft/, checkpoints/)."""
  run = tmp_path_factory.mktemp("hostile") / "run"
  assert cli.main(_args(run)) == 0
  return run


@pytest.fixture
def run(finished, tmp_path):
  copy = tmp_path / "run"
  shutil.copytree(finished, copy, symlinks=True)
  return copy


@pytest.mark.parametrize(("entry", "extra", "message"), [
  ("peft/notes.txt", [], r"`outputs.peft`: '{run}/peft' holds files jlora did not write (notes.txt); jlora replaces "
   "only directories it wrote itself"),
  ("merged/notes.txt", ["outputs.merged=true"], r"`outputs.merged`: '{run}/merged' holds files jlora did not write "
   "(notes.txt)"),
  ("adapter/notes.txt", [], "`outputs.dir`: the jlora adapter checkpoint '{run}/adapter' holds entries jlora did not "
   "write: "),
])
def test_a_user_file_in_an_output_location_is_refused_before_the_first_step(run, capsys, entry, extra, message):
  (run / entry).parent.mkdir(exist_ok=True)
  (run / entry).write_text("mine")
  before = _state(run)
  assert cli.main(_args(run, "train.steps=4", *extra)) == 2  # two more steps, were it to train
  err = _one_line(capsys)
  assert message.format(run=run) in err and "notes.txt" in err
  assert _state(run) == before and (run / entry).read_text() == "mine"


@pytest.mark.parametrize("name", ["peft", "adapter", "merged"])
def test_an_output_location_that_is_a_symlink_is_named(run, tmp_path, capsys, name):
  target = tmp_path / "elsewhere"
  if (run / name).exists():
    shutil.move(run / name, target)
  else:
    target.mkdir()
  os.symlink(target, run / name)
  before = _state(run)
  assert cli.main(_args(run, "train.steps=4", "outputs.merged=true")) == 2
  assert f"`outputs.dir`: '{run / name}' is a symbolic link (to '{target}'); jlora replaces it as a whole" in \
    _one_line(capsys)
  assert _state(run) == before


def test_outputs_dir_that_is_a_symlink_to_a_directory_is_followed(run, tmp_path, capsys):
  os.symlink(run, tmp_path / "link")
  assert cli.main(_args(tmp_path / "link", "train.steps=3")) == 0
  capsys.readouterr()
  assert json.loads((run / "summary.json").read_text())["steps"] == 3 and "3" in os.listdir(run / "checkpoints")


@pytest.mark.parametrize("error", [
  OSError(errno.ENOSPC, "No space left on device", "{run}/adapter/x"),
  OSError(errno.EDQUOT, "Disk quota exceeded", "{run}/adapter/x"),
  ValueError('RESOURCE_EXHAUSTED: Failed writing: "{run}/adapter/x": Failed to write 3520 bytes to file 7: No space '
             "left on device [os_error_code='28']"),
])
def test_a_full_disk_is_one_line_with_exit_status_3(monkeypatch, tmp_path, capsys, error):
  run = tmp_path / "run"
  if isinstance(error, OSError):
    error = OSError(error.errno, error.strerror, error.filename.format(run=run))
  else:
    error = ValueError(str(error).format(run=run))

  def full(config, **kwargs):
    try:
      raise error
    except Exception as e:  # wrapped, as orbax and the atomic writers do
      raise RuntimeError("saving failed") from e

  monkeypatch.setattr(train, "run", full)
  assert cli.main(_args(run)) == cli.EXIT_DISK_FULL == 3
  err = _one_line(capsys)
  assert f"no space left on the device while writing '{run}/adapter/x' (" in err and " free of " in err
  assert "run the same command again: it resumes from the last checkpoint" in err


def test_other_os_errors_are_one_line_with_exit_status_2(monkeypatch, tmp_path, capsys):
  def fails(config, **kwargs):
    raise PermissionError(errno.EACCES, "Permission denied", os.fspath(tmp_path / "run" / "summary.json"))

  monkeypatch.setattr(train, "run", fails)
  assert cli.main(_args(tmp_path / "run")) == 2
  assert f"'{tmp_path / 'run' / 'summary.json'}': Permission denied" in _one_line(capsys)


def _tmpfs(path, size):
  path.mkdir()
  if os.geteuid() != 0 or shutil.which("mount") is None:
    pytest.skip("needs root to mount a tmpfs")
  proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", os.fspath(path)], capture_output=True)
  if proc.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")


@pytest.mark.parametrize("size", ["150k"])
def test_a_real_full_disk_ends_in_one_line_with_exit_status_3(tmp_path, size):
  disk = tmp_path / "disk"
  _tmpfs(disk, size)
  try:
    proc = subprocess.run([sys.executable, "-m", "jlora", *_args(disk / "run", "train.steps=30", "checkpointing.keep=20",
                                                             "outputs.merged=true")],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
  finally:
    subprocess.run(["umount", os.fspath(disk)], check=True)
  assert proc.returncode == 3, proc.stderr
  assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
  # The path is the file being written, or the run directory itself when the failed call names it (which call
  # fills the disk first depends on timing: under load it was the directory).
  assert re.search(f"no space left on the device while writing '{re.escape(str(disk))}/run(/[^']+)?' ",
                   proc.stderr), proc.stderr
  assert "free of" in proc.stderr, proc.stderr


def test_the_guards_do_not_change_the_data(finished):
  """The stdlib data sources read `sys`: nothing `jlora train` installs (log filters, the unraisable-report hook) may
  be in place while they are read, or a run's data (and fingerprint) would depend on how it was started."""
  from jlora.train import _data, _setup, _tasks

  config = train.load(TINY, [*FAST[1:], f"outputs.dir={finished}"])
  examples = _data.examples(config.data, _tasks.get(config.lora.task_type))
  marker = json.loads((finished / ".jlora-run.json").read_text())
  assert marker["fingerprint"]["examples_sha256"] == _setup.fingerprint(config, examples)["examples_sha256"]
