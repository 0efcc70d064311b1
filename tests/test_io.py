"""`jlora.formats.atomic`: atomic files and directories, and nothing replaced that jlora did not write."""

import json
import os
import subprocess
import sys

import pytest

from jlora.formats import atomic as _io


def _tree(path):
  """`{relative path: content}` of every file under `path`."""
  out = {}
  for root, _, files in os.walk(path):
    for name in files:
      full = os.path.join(root, name)
      with open(full, encoding="utf-8") as f:
        out[os.path.relpath(full, path)] = f.read()
  return out


def test_write_text_replaces_atomically_and_cleans_up_on_failure(tmp_path):
  target = tmp_path / "config.yaml"
  _io.write_text(target, "one")
  _io.write_text(target, "two")
  assert target.read_text() == "two" and os.listdir(tmp_path) == ["config.yaml"]

  def fail(tmp):
    with open(tmp, "w") as f:
      f.write("half")
    raise OSError("disk full")

  with pytest.raises(OSError, match="disk full"):
    _io.write_file(target, fail)
  assert target.read_text() == "two" and os.listdir(tmp_path) == ["config.yaml"]
  with pytest.raises(ValueError, match="is a directory; jlora writes a file there"):
    _io.write_text(tmp_path, "x")


def test_directory_creates_and_replaces_what_it_wrote(tmp_path):
  target = tmp_path / "out"
  with _io.directory(target, what="`directory`") as tmp:
    (open(os.path.join(tmp, "a.json"), "w")).write("1")
  assert _tree(target) == {"a.json": "1", _io.MANIFEST: json.dumps({"written_by": "jlora", "entries": ["a.json"]})}
  with _io.directory(target, what="`directory`") as tmp:
    os.makedirs(os.path.join(tmp, "sub"))
    open(os.path.join(tmp, "sub", "b.txt"), "w").write("2")
  assert set(_tree(target)) == {"sub/b.txt", _io.MANIFEST}
  assert sorted(os.listdir(tmp_path)) == ["out"], "no temporary or backup directory is left"


def test_directory_refuses_what_jlora_did_not_write(tmp_path):
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "notes.txt").write_text("keep me")
  with pytest.raises(ValueError, match=r"`directory`: '.*mine' holds files jlora did not write \(notes\.txt\)"):
    with _io.directory(mine, what="`directory`"):
      pytest.fail("must refuse before yielding")
  assert _tree(mine) == {"notes.txt": "keep me"}
  # A jlora directory to which the user added a file is refused too: that file is theirs.
  with _io.directory(tmp_path / "peft", what="`directory`") as tmp:
    open(os.path.join(tmp, "adapter_config.json"), "w").write("{}")
  (tmp_path / "peft" / "README.md").write_text("mine")
  with pytest.raises(ValueError, match=r"holds files jlora did not write \(README\.md\)"), \
      _io.directory(tmp_path / "peft", what="`directory`"):
    pass
  (tmp_path / "file").write_text("x")
  with pytest.raises(ValueError, match="exists and is not a directory"), _io.directory(tmp_path / "file", what="`d`"):
    pass
  assert (tmp_path / "file").read_text() == "x"
  empty = tmp_path / "empty"
  empty.mkdir()
  with _io.directory(empty, what="`d`") as tmp:  # an empty directory holds nothing to lose
    open(os.path.join(tmp, "x"), "w").write("y")
  assert _tree(empty)["x"] == "y"


def test_failure_inside_leaves_the_old_directory(tmp_path):
  target = tmp_path / "out"
  with _io.directory(target, what="`d`") as tmp:
    open(os.path.join(tmp, "v"), "w").write("old")
  with pytest.raises(RuntimeError, match="boom"), _io.directory(target, what="`d`") as tmp:
    open(os.path.join(tmp, "v"), "w").write("new")
    raise RuntimeError("boom")
  assert _tree(target)["v"] == "old" and sorted(os.listdir(tmp_path)) == ["out"]


@pytest.mark.parametrize("exchange", [True, False])
def test_swap_with_and_without_renameat2(tmp_path, monkeypatch, exchange):
  if not exchange:
    monkeypatch.setattr(_io, "_exchange", lambda a, b: False)
  target = tmp_path / "out"
  for version in ("1", "2", "3"):
    with _io.directory(target, what="`d`") as tmp:
      open(os.path.join(tmp, "v"), "w").write(version)
    assert _tree(target)["v"] == version
  assert sorted(os.listdir(tmp_path)) == ["out"]


def test_recover_puts_back_the_backup_of_an_interrupted_swap(tmp_path, monkeypatch):
  """Killed between 'old -> backup' and 'new -> target': readers see the backup, the next writer restores it."""
  monkeypatch.setattr(_io, "_exchange", lambda a, b: False)
  target = tmp_path / "out"
  with _io.directory(target, what="`d`") as tmp:
    open(os.path.join(tmp, "v"), "w").write("old")
  real_rename = os.rename
  calls = []

  def die_after_first_rename(src, dst):
    real_rename(src, dst)
    if os.fspath(src) == os.fspath(target) and not calls:
      calls.append(dst)
      raise KeyboardInterrupt  # the process "dies" with the old directory moved aside

  for _ in range(2):  # twice in a row: the second interrupted save must not lose the first backup
    calls.clear()
    monkeypatch.setattr(os, "rename", die_after_first_rename)
    with pytest.raises(KeyboardInterrupt), _io.directory(target, what="`d`") as tmp:
      open(os.path.join(tmp, "v"), "w").write("new")
    monkeypatch.setattr(os, "rename", real_rename)
    assert not target.exists()
    assert _tree(_io.readable(target))["v"] == "old"  # read-only: nothing moves
    assert not target.exists()
    _io.recover(target)
    assert _tree(target)["v"] == "old"
    os.rename(target, _io._sibling(os.fspath(target), "previous"))  # back to the interrupted state
  with _io.directory(target, what="`d`") as tmp:  # the next save recovers first, then replaces
    open(os.path.join(tmp, "v"), "w").write("newer")
  assert _tree(target)["v"] == "newer" and sorted(os.listdir(tmp_path)) == ["out"]


def test_recover_removes_the_temporary_file_of_a_dead_writer_and_keeps_a_live_ones(tmp_path):
  """A writer killed inside `write_file` leaves `.NAME.jlora-tmp-PID-XXXXXXXX`, a file: removed once PID is gone."""
  dead_pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                                text=True).stdout)
  target = tmp_path / "marker.json"
  dead = tmp_path / f".marker.json.jlora-tmp-{dead_pid}-0123abcd"
  alive = tmp_path / ".marker.json.jlora-tmp-1-89abcdef"  # PID 1 runs
  dead_dir = tmp_path / f".marker.json.jlora-tmp-{dead_pid}-fedcba98"
  mine = tmp_path / f".marker.json.jlora-tmp-{dead_pid}-notours"  # not jlora's name pattern: kept
  for f in (dead, alive, mine):
    f.write_text("{")
  dead_dir.mkdir()
  (dead_dir / "x").write_text("y")
  _io.recover(target)
  assert sorted(os.listdir(tmp_path)) == sorted([alive.name, mine.name])
  assert _io.is_leftover(alive.name, "marker.json") and not _io.is_leftover(mine.name, "marker.json")
  assert not _io.is_leftover(".marker.json.jlora-tmp-12-0123abcd", "other.json")
  assert _io.is_leftover(".marker.json.jlora-previous-12-0123abcd", "marker.json")
  _io.write_text(target, "{}")  # a writer that runs now is not disturbed
  assert target.read_text() == "{}"
