"""Writing files and directories so that a reader sees the old or the new version, never half of one.

Two rules hold for every plain file and directory jlora writes (PEFT adapters,
Hugging Face checkpoints, `jlora train` outputs; orbax checkpoints have their own
commit, see `jlora.formats.checkpoint`):

* **Atomic.** A file is written to a temporary name beside it, flushed to disk and
  renamed over the target. A directory is built complete in a temporary directory
  beside the target, then swapped in: with Linux `renameat2(RENAME_EXCHANGE)` in one
  step; elsewhere the old directory is first renamed to a backup, which `recover`
  puts back if the process died between the two renames.
* **Only what jlora wrote is replaced.** A directory jlora writes holds a manifest
  (`.jlora-manifest.json`) naming its entries. An existing target is replaced only
  when it is empty or every entry in it is listed in its manifest; anything else is
  refused with a `ValueError` that names the foreign entries.
* **A killed writer blocks nothing.** What a writer leaves beside a target when it
  is killed (its temporary file or directory, `.NAME.jlora-tmp-PID-XXXXXXXX`, and
  the backup of the fallback swap, `.NAME.jlora-previous-PID-XXXXXXXX`) is
  recognised by that name: `recover` removes the temporaries of writers whose
  process is gone (files and directories alike) and puts a backup back or drops it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["MANIFEST", "write_file", "write_text", "write_json", "directory", "recover", "readable", "check_replaceable",
           "is_leftover"]

MANIFEST = ".jlora-manifest.json"
_TMP, _BACKUP = "tmp", "previous"


def _fsync(path: str) -> None:
  """Flushes a file or a directory entry to disk (where the OS allows opening it)."""
  with contextlib.suppress(OSError):
    fd = os.open(path, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


def _sibling(target: str, tag: str) -> str:
  parent, name = os.path.split(target)
  return os.path.join(parent, f".{name}.jlora-{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def write_file(path: str | os.PathLike, write: Callable[[str], Any]) -> None:
  """Calls `write(tmp_path)` and renames the finished file over `path` (atomic replace).

  Raises:
    ValueError: `path` is a directory.
  """
  path = os.path.abspath(os.fspath(path))
  if os.path.isdir(path):
    raise ValueError(f"{path!r} is a directory; jlora writes a file there and does not replace directories.")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = _sibling(path, _TMP)
  try:
    write(tmp)
    _fsync(tmp)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise
  _fsync(os.path.dirname(path))


def write_text(path: str | os.PathLike, text: str) -> None:
  """Writes `text` (UTF-8) to `path` atomically."""

  def write(tmp: str) -> None:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)

  write_file(path, write)


def write_json(path: str | os.PathLike, data: Any, **dump_kwargs: Any) -> None:
  """Writes `data` as JSON (with a final newline) to `path` atomically."""
  write_text(path, json.dumps(data, **dump_kwargs) + "\n")


# ------------------------------------------------------------------ directories
def _read_manifest(path: str) -> set[str] | None:
  try:
    with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
      entries = json.load(f).get("entries")
  except (OSError, ValueError, AttributeError):
    return None
  return set(entries) if isinstance(entries, list) else None


def check_replaceable(target: str | os.PathLike, what: str) -> None:
  """Raises unless `target` is absent, an empty directory, or a directory jlora wrote.

  Args:
    target: the directory about to be replaced.
    what: the argument it came from, for the message (e.g. "`directory`").

  Raises:
    ValueError: `target` is a file, or a directory holding entries that its
      manifest does not list (files jlora did not write).
  """
  target = os.fspath(target)
  if not os.path.lexists(target):
    return
  if not os.path.isdir(target) or os.path.islink(target):
    raise ValueError(f"{what}: {target!r} exists and is not a directory; jlora only replaces directories it wrote. "
                     "Choose a new path.")
  entries = set(os.listdir(target))
  if not entries:
    return
  listed = _read_manifest(target)
  foreign = sorted(entries - {MANIFEST} - (listed or set()))
  if listed is None or foreign:
    shown = ", ".join(foreign[:8]) + (f" … and {len(foreign) - 8} more" if len(foreign) > 8 else "")
    raise ValueError(
        f"{what}: {target!r} holds files jlora did not write ({shown}); jlora replaces only directories it wrote "
        "itself, so nothing of yours is overwritten or deleted. Choose a new or empty directory."
    )


_RENAME_EXCHANGE = 2


def _exchange(a: str, b: str) -> bool:
  """Atomically swaps two paths with Linux `renameat2(RENAME_EXCHANGE)`; False where unsupported."""
  if not sys.platform.startswith("linux"):
    return False
  try:
    fn = ctypes.CDLL(None, use_errno=True).renameat2
  except (OSError, AttributeError):
    return False
  at_fdcwd = -100
  if fn(at_fdcwd, a.encode(), at_fdcwd, b.encode(), _RENAME_EXCHANGE) == 0:
    return True
  err = ctypes.get_errno()
  if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
    return False
  raise OSError(err, os.strerror(err), b)


def is_leftover(entry: str, name: str) -> bool:
  """Whether `entry` (a name in a directory) is a temporary or backup that a jlora writer of `name` left there.

  Such names are `.NAME.jlora-tmp-PID-XXXXXXXX` and `.NAME.jlora-previous-PID-XXXXXXXX`
  (see `_sibling`): a decimal PID and eight hexadecimal digits.
  """
  for tag in (_TMP, _BACKUP):
    prefix = f".{name}.jlora-{tag}-"
    if entry.startswith(prefix):
      pid, _, suffix = entry[len(prefix):].partition("-")
      return pid.isascii() and pid.isdigit() and len(suffix) == 8 and all(c in "0123456789abcdef" for c in suffix)
  return False


def _remove(path: str) -> None:
  """Removes a file, link or directory tree; silently where it is already gone."""
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path, ignore_errors=True)
  else:
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)


def _jlora_siblings(target: str, tag: str) -> list[str]:
  parent, name = os.path.split(target)
  if not os.path.isdir(parent):
    return []
  prefix = f".{name}.jlora-{tag}-"
  found = []
  for entry in os.listdir(parent):
    if entry.startswith(prefix) and is_leftover(entry, name):
      try:  # another process may remove it meanwhile
        found.append((os.stat(os.path.join(parent, entry), follow_symlinks=False).st_mtime_ns, entry))
      except FileNotFoundError:
        continue
  return [os.path.join(parent, e) for _, e in sorted(found)]  # oldest first


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def recover(target: str | os.PathLike) -> None:
  """Repairs what an interrupted `directory` swap left beside `target`.

  If `target` is missing and a backup of it exists (the process died between
  moving the old directory aside and moving the new one in), the backup is put
  back. Temporaries (files or directories, recognised by their name: see
  `is_leftover`) of writers that are no longer running are removed; a backup is
  removed only once `target` exists again. `target` may be a file (e.g. a
  checkpoint's marker) or a directory.
  """
  target = os.path.abspath(os.fspath(target))
  backups = _jlora_siblings(target, _BACKUP)
  if not os.path.lexists(target) and backups:
    os.rename(backups[-1], target)
    backups = backups[:-1]
  for path in backups:  # `target` is complete again: the old version is no longer needed
    _remove(path)
  for path in _jlora_siblings(target, _TMP):
    pid = int(os.path.basename(path).rsplit("-", 2)[-2])
    if pid != os.getpid() and not _pid_alive(pid):
      _remove(path)


def readable(target: str | os.PathLike) -> str:
  """`target`, or the backup an interrupted swap left while `target` is missing (read-only: nothing moves)."""
  target = os.path.abspath(os.fspath(target))
  if not os.path.lexists(target):
    backups = _jlora_siblings(target, _BACKUP)
    if backups:
      return backups[-1]
  return target


def _swap(tmp: str, target: str) -> None:
  if not os.path.lexists(target):
    os.rename(tmp, target)
  elif _exchange(tmp, target):
    shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous directory
  else:
    backup = _sibling(target, _BACKUP)
    os.rename(target, backup)
    os.rename(tmp, target)
    shutil.rmtree(backup, ignore_errors=True)
  _fsync(os.path.dirname(target))


@contextlib.contextmanager
def directory(target: str | os.PathLike, *, what: str) -> Iterator[str]:
  """Yields an empty temporary directory that replaces `target` as one unit on success.

  Everything written into the yielded directory appears at `target` at once, with a
  manifest of its entries. On an exception the temporary directory is removed and
  `target` is untouched.

  Args:
    target: the directory to create or replace.
    what: the argument `target` came from, for error messages.

  Raises:
    ValueError: `target` holds files jlora did not write (see `check_replaceable`).
  """
  target = os.path.abspath(os.fspath(target))
  os.makedirs(os.path.dirname(target), exist_ok=True)
  recover(target)
  check_replaceable(target, what)
  tmp = _sibling(target, _TMP)
  os.makedirs(tmp)
  try:
    yield tmp
    entries = sorted(os.listdir(tmp))
    with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
      json.dump({"written_by": "jlora", "entries": entries}, f)
    for root, _, files in os.walk(tmp):
      for name in files:
        _fsync(os.path.join(root, name))
      _fsync(root)
    _swap(tmp, target)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
