"""The run directory (`outputs.dir`): what jlora owns in it, an exclusive lock, and atomic file writes.

A run directory holds a marker, `.jlora-run.json`, that says it is a `jlora train`
run's and records what jlora wrote there:

* `fingerprint`: the run whose training state is in `checkpoints/` (config + data);
* `outputs`: the fingerprint and step of the adapter whose outputs (`adapter/`,
  `config.yaml`, `summary.json`, `peft/`, ...) are in the directory, so that outputs of
  another adapter are removed before a new adapter replaces theirs;
* `files`: the SHA-256 of each plain file jlora wrote whole (`config.yaml`,
  `summary.json`, `curves.png`; a list, which holds the old and the new one while a
  file is being replaced), which jlora replaces or removes only while it is unchanged;
  `metrics.jsonl` is jlora's once listed (appended to, so without a checksum);
* `checkpoints`: the steps jlora wrote (listed before each save), the only ones it deletes.

A directory that is not empty and has no marker is someone else's: it is refused, and
nothing in it is touched. Plain files are written atomically (`jlora.formats.atomic`). While a run
writes, it holds an exclusive `fcntl.flock` on `.jlora-run.lock` (released by the OS
when the process ends, even by SIGKILL); a second run into the same directory is refused.

The same rules serve the directory of a `jlora compare` (`COMPARE`: marker
`.jlora-compare.json`, lock `.jlora-compare.lock`, its table and plot as whole files, and
one run directory per variant inside); `Kind` says which.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from jlora.formats import atomic as _io

try:
  import fcntl
except ImportError:  # not POSIX: no lock
  fcntl = None

__all__ = ["COMPARE", "LOCK", "MARKER", "RUN", "Kind", "RunDir", "inspect"]


class Kind(NamedTuple):
  """A kind of directory jlora owns: its marker and lock, the files it writes whole, and what names it."""

  marker: str
  lock: str
  written_by: str  # the marker's `written_by`, and the command named in messages
  whole_files: tuple[str, ...]  # written whole, replaced only while unchanged
  appended: tuple[str, ...]  # jlora's once listed in the marker (appended to, so without a checksum)
  dirs: tuple[str, ...]  # entries that must be directories when present
  key: str  # the setting that names the directory, in messages
  fields: tuple[tuple[str, Any], ...]  # the marker's other fields and their initial values


RUN = Kind(".jlora-run.json", ".jlora-run.lock", "jlora train", ("config.yaml", "summary.json", "curves.png"),
           ("metrics.jsonl",), ("checkpoints", "adapter", "peft", "merged", "model"), "`outputs.dir`",
           (("fingerprint", None), ("outputs", None), ("checkpoints", ())))
COMPARE = Kind(".jlora-compare.json", ".jlora-compare.lock", "jlora compare",
               ("compare.md", "compare.json", "compare.png"), (), (), "`--out`", ())
MARKER, LOCK = RUN.marker, RUN.lock
WHOLE_FILES = RUN.whole_files


def _sha256(path: str) -> str | None:
  try:
    with open(path, "rb") as f:
      return hashlib.file_digest(f, "sha256").hexdigest()
  except FileNotFoundError:
    return None


def _read_marker(path: str, kind: Kind) -> dict | None:
  try:
    with open(os.path.join(path, kind.marker), encoding="utf-8") as f:
      marker = json.load(f)
  except (OSError, ValueError):
    return None
  if not isinstance(marker, dict) or marker.get("written_by") != kind.written_by:
    return None
  marker.setdefault("files", {})
  if kind == RUN:
    marker.setdefault("checkpoints", [])
  return marker


def _ancestor(path: str) -> str:
  while not os.path.lexists(path):
    path = os.path.dirname(path)
  return path


def inspect(path: str, kind: Kind = RUN) -> dict | None:
  """Checks, reading only, that `path` may take a `jlora train` run (or `kind`'s); returns its marker (None: new).

  Raises:
    ValueError: `path` is a file, lies under a file, is not writable, holds files
      jlora did not write (no marker), or holds a file jlora wrote that changed since.
  """
  what, key = f"{kind.key}: {path!r}", kind.key
  if os.path.islink(path) and not os.path.exists(path):
    raise ValueError(f"{what} is a symbolic link to {os.readlink(path)!r}, which does not exist; create that "
                     f"directory or choose another {key}.")
  if os.path.lexists(path) and not os.path.isdir(path):
    whose = "run" if kind == RUN else "comparison"
    raise ValueError(f"{what} is a file, not a directory; choose a directory for the {whose}'s outputs.")
  top = _ancestor(path)
  if not os.path.isdir(top):
    raise ValueError(f"{what} cannot be created: {top!r} is a file; choose another {key}.")
  if not os.access(top, os.W_OK | os.X_OK):
    raise ValueError(f"{what} is not writable ({top!r}: permission denied); choose another {key}.")
  if top != path:
    return None
  entries = sorted(set(os.listdir(path)) - {kind.lock})
  marker = _read_marker(path, kind)
  if marker is None:
    if entries:
      shown = ", ".join(entries[:6]) + (f" and {len(entries) - 6} more" if len(entries) > 6 else "")
      raise ValueError(f"{what} holds files that are not a `{kind.written_by}` run's ({shown}; no {kind.marker}); "
                       f"jlora never writes over them. Choose a new or empty {key}" + (
                         " (a run directory of an older jlora has no marker either: continue in a new one)."
                         if kind == RUN else "."))
    return None
  for name in kind.whole_files:
    digest = _sha256(os.path.join(path, name))
    if digest is not None and digest not in (marker["files"].get(name) or ()):
      raise ValueError(f"{what}: {name} was not written by jlora or changed since (its checksum differs from "
                       f"{kind.marker}'s); move it out of the directory, then run again.")
  for name in kind.appended:
    if os.path.exists(os.path.join(path, name)) and name not in marker["files"]:
      raise ValueError(f"{what}: {name} was not written by jlora; move it out of the directory, then run again.")
  for name in kind.dirs:
    if os.path.lexists(os.path.join(path, name)) and not os.path.isdir(os.path.join(path, name)):
      raise ValueError(f"{what}: {name} is a file that jlora did not write; move it away, then run again.")
  return marker


class RunDir:
  """An inspected, locked run directory: the marker, and writes that keep it true.

  Use `RunDir.open(path)`; everything written goes through it.
  """

  def __init__(self, path: str, marker: dict | None, kind: Kind = RUN):
    self.path, self.kind = path, kind
    self.marker = marker or {"written_by": kind.written_by, "version": 1,
                             **{k: list(v) if isinstance(v, tuple) else v for k, v in kind.fields}, "files": {}}

  @classmethod
  @contextlib.contextmanager
  def open(cls, path: str | os.PathLike, kind: Kind = RUN) -> Iterator[RunDir]:
    """Creates `path` if needed, takes its lock, checks it again (`inspect`) and yields a `RunDir`.

    Raises:
      ValueError: as `inspect`, the directory cannot be created, or another process holds the lock.
    """
    path = os.path.abspath(os.fspath(path))
    inspect(path, kind)
    try:
      os.makedirs(path, exist_ok=True)
      fd = os.open(os.path.join(path, kind.lock), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise ValueError(f"{kind.key}: {path!r} cannot be created or written ({e.strerror}); choose another "
                       f"{kind.key}.") from None
    try:
      if fcntl is not None:
        try:
          fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
          holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
          raise ValueError(f"{kind.key}: another `{kind.written_by}` (pid {holder}) is writing into {path!r}; wait "
                           f"for it to finish or choose another {kind.key}.") from None
      os.ftruncate(fd, 0)
      os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
      marker = inspect(path, kind)  # checked again under the lock
      run_dir = cls(path, marker, kind)
      if marker is None:
        run_dir.update()  # marked before anything else is written: a crash leaves no unmarked files
      yield run_dir
    finally:
      os.close(fd)  # releases the lock

  def join(self, *names: str) -> str:
    """A path inside the run directory."""
    return os.path.join(self.path, *names)

  def update(self, **fields: Any) -> None:
    """Sets marker fields and writes the marker (atomically)."""
    self.marker.update(fields)
    _io.write_json(self.join(self.kind.marker), self.marker, indent=1)

  def _check_unchanged(self, name: str) -> None:
    digest = _sha256(self.join(name))
    if digest is not None and name in self.kind.whole_files and digest not in (self.marker["files"].get(name) or ()):
      raise ValueError(f"{self.kind.key}: {self.join(name)!r} changed since jlora wrote it; move it away, then run "
                       "again.")

  def write(self, name: str, write: Callable[[str], Any]) -> None:
    """Replaces the file `name` atomically by what `write(tmp_path)` writes, and records its checksum.

    The new checksum is recorded (beside the old one) before the file is renamed into
    place, so a process killed at any point leaves a file the marker accepts.
    """
    self._check_unchanged(name)
    new: list[str] = []

    def write_and_record(tmp: str) -> None:
      write(tmp)
      new.append(_sha256(tmp))
      self.update(files={**self.marker["files"], name: [*(self.marker["files"].get(name) or ()), *new]})

    _io.write_file(self.join(name), write_and_record)
    self.update(files={**self.marker["files"], name: new})

  def write_text(self, name: str, text: str) -> None:
    """`write` of a UTF-8 text."""

    def write(tmp: str) -> None:
      with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)

    self.write(name, write)

  def remove(self, name: str) -> None:
    """Removes the file `name` if jlora wrote it and it is unchanged (else raises ValueError)."""
    self._check_unchanged(name)
    with contextlib.suppress(FileNotFoundError):
      os.remove(self.join(name))
    self.update(files={k: v for k, v in self.marker["files"].items() if k != name})
