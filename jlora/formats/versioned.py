"""Versioned checkpoint directories that orbax commits atomically (adapters, quantized bases).

A directory holds a marker file (`jlora_adapter.json`, `jlora_quantized.json`)
that says jlora wrote it, and versions, each an orbax `CheckpointManager` step
with named items (the arrays, and `meta`: JSON with its own SHA-256). Orbax
writes a version into a temporary directory and commits it in one step; the
previous version is deleted only after that, so a save killed at any point
leaves the previous version or the new one. Readers take the newest committed
version and retry when a concurrent save replaces it. Orbax is imported only
when a checkpoint is saved or loaded.

**Several processes** (a multi-process JAX run) call save and load together, on
a directory they all see: every process writes and reads its own shards through
orbax, whose save, commit and restore are collective. What is done once is done by
process 0: the check of the target directory and the marker file (orbax writes
`meta` from process 0 too); the others wait for it and raise its error. Readers
read the version process 0 sees as the newest. A read error that only some
processes meet (a damaged file of one shard) leaves the others waiting in orbax's
restore barrier until its timeout.

**Paths** are local paths or URLs that orbax and `etils.epath` open (`gs://bucket/dir`,
with gcsfs or TensorFlow installed for epath). On a URL jlora's checks list and
test through `etils.epath` and refuse foreign files as locally; the marker is
written by one object write, which object stores show whole or not at all
(there is no rename), and there are no temporary files of jlora's to clean up.
What holds there is orbax's commit: on `gs://` a version is written at its final
name and committed by a `commit_success.txt` (orbax's listing skips it until
then); on other URLs (`s3://`) orbax renames the temporary directory, which an
object store does not do in one step, so a reader racing such a save can see the
new version incomplete and report it damaged (a later load reads it whole).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import jax
import numpy as np

from jlora.formats import atomic as _io
from jlora.parallel.processes import is_spread, on_primary

__all__ = ["Unreadable", "checkable", "seal", "container", "is_dir", "is_file", "check_target", "versions",
           "restore_item", "read_meta", "commit", "read_newest"]

ATTEMPTS = 20  # reads retried while a concurrent save keeps replacing the newest version
T = TypeVar("T")


class Unreadable(ValueError):
  """The files of a version are not what was committed (or vanished while being read)."""


def checkable(flat: Mapping[Any, Any]) -> dict[Any, Any]:
  """The leaves this process can hash (all of them except arrays spread over several processes)."""
  return {p: v for p, v in flat.items() if not is_spread(v)}


def seal(body: dict) -> str:
  """The SHA-256 of a JSON body (sorted keys), stored beside it."""
  return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _remote(path: str) -> bool:
  return "://" in path


def container(path: str | os.PathLike) -> str:
  """`path` made absolute, or as it is (less a trailing `/`) where it is a URL such as `gs://bucket/dir`."""
  path = os.fspath(path)
  return path.rstrip("/") if _remote(path) else os.path.abspath(path)


def is_dir(path: str) -> bool:
  """Whether `path` is a directory (through `etils.epath` on a URL)."""
  if _remote(path):
    from etils import epath

    return epath.Path(path).is_dir()
  return os.path.isdir(path)


def is_file(path: str) -> bool:
  """Whether `path` is a file (through `etils.epath` on a URL)."""
  if _remote(path):
    from etils import epath

    return epath.Path(path).is_file()
  return os.path.isfile(path)


def check_target(root: str, marker: str, what: str, *, older: str | None = None) -> None:
  """Raises unless `root` is absent, an empty directory, or a checkpoint jlora wrote (it holds `marker`).

  Checked by process 0 only (see `on_primary`): another process must not clean
  up the temporary marker file process 0 may be writing.

  Args:
    root: the checkpoint directory.
    marker: the marker file of this kind of checkpoint.
    what: its name in messages, e.g. `"adapter checkpoint"`.
    older: the metadata file of an older format, which is neither read nor replaced.
  """
  on_primary(lambda: _check_target(root, marker, what, older), send=False)


def _check_target(root: str, marker: str, what: str, older: str | None) -> None:
  if _remote(root):
    from etils import epath

    if not epath.Path(root).exists():
      return
    if not is_dir(root):
      raise ValueError(f"`path`: {root!r} exists and is not a directory; jlora writes {what}s into a directory of "
                       "its own. Choose a new path.")
  elif not os.path.lexists(root):
    return
  elif not os.path.isdir(root) or os.path.islink(root):
    raise ValueError(f"`path`: {root!r} exists and is not a directory; jlora writes {what}s into a directory of its "
                     "own. Choose a new path.")
  if is_file(os.path.join(root, marker)):
    return
  if _remote(root):
    entries = sorted(p.name for p in epath.Path(root).iterdir())
  else:
    _io.recover(os.path.join(root, marker))  # removes the temporary marker file of a first save that was killed
    entries = sorted(os.listdir(root))
  if not entries:
    return
  if older is not None and older in entries:
    raise ValueError(f"`path`: {root!r} is an {what} of an older jlora (format 1, {older}), which this version "
                     "neither reads nor replaces. Save to a new path.")
  shown = ", ".join(entries[:8]) + (f" … and {len(entries) - 8} more" if len(entries) > 8 else "")
  raise ValueError(
      f"`path`: {root!r} holds files that are not a jlora {what} ({shown}; no {marker}); jlora only replaces "
      "checkpoints it wrote, so nothing of yours is overwritten or deleted. Choose a new or empty directory."
  )


def versions(root: str) -> list[int]:
  """The committed versions in `root`, oldest first (orbax's rule: temporary directories are not committed)."""
  from orbax.checkpoint.path import step as step_lib

  return sorted(m.step for m in step_lib.standard_name_format().find_all(root))


@contextlib.contextmanager
def _quiet_closed_loop() -> Iterator[None]:
  """Silences the "Event loop is closed" reports that follow a failed orbax read (and nothing else).

  When one read of a damaged checkpoint fails, orbax closes its event loop while
  tensorstore still completes the other reads; their callbacks then hit the
  closed loop on tensorstore's threads and Python prints each as an unraisable
  exception. While a restore runs (and briefly after a failed one), this hook
  drops exactly those and passes everything else to the previous hook.
  """
  previous = sys.unraisablehook

  def hook(report: Any) -> None:
    if not (isinstance(report.exc_value, RuntimeError) and str(report.exc_value) == "Event loop is closed"):
      previous(report)

  sys.unraisablehook = hook
  try:
    yield
  except BaseException:
    time.sleep(0.05)  # the reads still in flight report within milliseconds
    raise
  finally:
    if sys.unraisablehook is hook:
      sys.unraisablehook = previous


def restore_item(root: str, version: int, item: str, args: Any) -> Any:
  """One item of a version, read by orbax; any failure to read it is an `Unreadable`."""
  import orbax.checkpoint as ocp

  try:
    with _quiet_closed_loop(), ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
      return ckptr.restore(os.path.join(root, str(version)), args=ocp.args.Composite(**{item: args}))[item]
  except Exception as e:  # orbax / tensorstore / JSON errors of damaged or vanishing files
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    raise Unreadable(f"its {item!r} item could not be read ({type(e).__name__}: {first})") from None


def read_meta(root: str, version: int, fmt: str, newest: int) -> dict:
  """The `meta` item of a version, checked against its SHA-256 and for a format this jlora reads."""
  import orbax.checkpoint as ocp

  meta = restore_item(root, version, "meta", ocp.args.JsonRestore())
  body = {k: v for k, v in meta.items() if k != "sha256"} if isinstance(meta, dict) else None
  if body is None or meta.get("sha256") != seal(body):
    raise Unreadable("its metadata does not match its SHA-256")
  if body.get("format") != fmt or not isinstance(body.get("version"), int) or body["version"] > newest:
    raise ValueError(f"`path`: {root!r} has format {body.get('format')!r} version {body.get('version')!r}; this "
                     f"jlora reads {fmt!r} up to version {newest}. Upgrade jlora.")
  return body


def _write_marker(root: str, marker: str, body: dict) -> None:
  """Writes the marker file once (never replaced: the directory may be the cwd)."""
  path = os.path.join(root, marker)
  if is_file(path):
    return
  if _remote(root):  # one object write: whole or absent (no rename on object stores)
    from etils import epath

    epath.Path(root).mkdir(parents=True, exist_ok=True)
    epath.Path(path).write_text(json.dumps(body) + "\n")
  else:  # written atomically (temporary file renamed), into the directory itself
    os.makedirs(root, exist_ok=True)
    _io.write_json(path, body)


def commit(root: str, marker: str, marker_body: dict, *, meta: dict, **arrays: Any) -> None:
  """Writes the next version of `root`: each `arrays` item with orbax's StandardSave, and `meta` as JSON.

  The marker is written first, by process 0 (the others wait for it); then orbax
  commits the version, every process writing its own shards, and deletes the
  previous one. Orbax writes `meta` from process 0.
  """
  on_primary(lambda: _write_marker(root, marker, marker_body), send=False)
  import orbax.checkpoint as ocp

  options = ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False, cleanup_tmp_directories=True,
                                         save_root_metadata=False)
  items = {name: ocp.args.StandardSave(tree) for name, tree in arrays.items()}
  with ocp.CheckpointManager(root, item_names=(*arrays, "meta"), options=options) as manager:
    manager.save((manager.latest_step() or 0) + 1, force=True,
                 args=ocp.args.Composite(**items, meta=ocp.args.JsonSave(meta)))


def _newest(root: str) -> int | None:
  """The newest committed version of `root`, as process 0 sees it (collective in a multi-process run)."""
  found = versions(root)
  newest = found[-1] if found else -1
  if jax.process_count() > 1:  # every process reads the same version
    from jax.experimental import multihost_utils

    newest = int(multihost_utils.broadcast_one_to_all(np.int32(newest)))
  return None if newest < 0 else newest


def read_newest(root: str, load_version: Callable[[int], T], caller: str, what: str) -> T:
  """`load_version(newest committed version)`, retried while concurrent saves replace it.

  Raises:
    ValueError: no complete version; the newest version is damaged (an
      `Unreadable` that no newer save explains); replaced too often.
  """
  seen, empty = None, 0
  for _ in range(ATTEMPTS):
    newest = _newest(root)
    if newest is None:
      empty += 1  # a listing that races a commit (new version not yet seen, old one deleted) can come back empty
      if empty < 5:
        time.sleep(0.02)
        continue
      raise ValueError(f"`path`: the {what} {root!r} holds no complete version (its first save did not finish); "
                       "save it again.")
    try:
      return load_version(newest)
    except Unreadable as e:
      if _newest(root) == newest:  # nothing replaced it while we read: the files are damaged
        raise ValueError(
            f"{caller}: version {newest} of the {what} {root!r} is damaged: {e}. The files changed after they were "
            "written (disk or copy error) or cannot be read; restore the checkpoint from a good copy."
        ) from None
      seen = e
      time.sleep(0.01)
  raise ValueError(f"{caller}: {root!r} was replaced by new saves {ATTEMPTS} times while being read (last: {seen}); "
                   "load it when the writer pauses.")
