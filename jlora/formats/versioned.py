"""Versioned checkpoint directories that orbax commits atomically (adapters, quantized bases).

A directory holds a marker file (`jlora_adapter.json`, `jlora_quantized.json`)
that says jlora wrote it, and versions, each an orbax `CheckpointManager` step
with named items (the arrays, and `meta`: JSON with its own SHA-256). Orbax
writes a version into a temporary directory and commits it in one step; the
previous version is deleted only after that, so a save killed at any point
leaves the previous version or the new one. Readers take the newest committed
version and retry when a concurrent save replaces it. Orbax is imported only
when a checkpoint is saved or loaded.

**Only what jlora wrote.** Orbax takes every directory named by a number for one
of its steps and deletes the older ones, so a folder `42/` of the user's inside a
checkpoint would be lost at the next save. The marker therefore lists the
versions jlora wrote (`steps`: rewritten atomically before orbax starts a
version, so it names every version on disk that jlora began). A save refuses a
directory holding anything else (a numbered directory jlora did not write, a
file of the user's, a marker that is not jlora's), naming the entries, before
orbax touches anything; readers take the newest of the versions the marker lists.
What a killed save left is jlora's and never blocks the next one: orbax's
temporary directories (removed by orbax) and jlora's temporary marker files
(removed by `jlora.formats.atomic.recover` once their writer's process is gone).

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
import gc
import hashlib
import inspect
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import jax
import numpy as np

from jlora.formats import atomic as _io
from jlora.parallel.processes import is_spread, on_primary

__all__ = ["Unreadable", "checkable", "seal", "container", "is_dir", "is_file", "check_target", "versions",
           "restore_item", "read_meta", "commit", "read_newest", "quiet_failed_reads", "dropping_unraisable",
           "is_closed_loop_report"]

ATTEMPTS = 20  # reads retried while a concurrent save keeps replacing the newest version
T = TypeVar("T")
_ORBAX_TMP = re.compile(r"[0-9]+\.orbax-checkpoint-tmp(-.*)?")  # a version orbax is writing (or a killed one)
_STEP_ITEMS = {"_CHECKPOINT_METADATA", "commit_success.txt", "meta", "state", "arrays"}  # inside a version


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


def check_target(root: str, marker: str, what: str, *, older: str | None = None, fmt: str | None = None) -> None:
  """Raises unless `root` is absent, an empty directory, or a checkpoint jlora wrote that holds only jlora's files.

  Checked by process 0 only (see `on_primary`): another process must not clean
  up the temporary marker file process 0 may be writing.

  Args:
    root: the checkpoint directory.
    marker: the marker file of this kind of checkpoint.
    what: its name in messages, e.g. `"adapter checkpoint"`.
    older: the metadata file of an older format, which is neither read nor replaced.
    fmt: the `format` the marker must name (None: any `jlora.` format).

  Raises:
    ValueError: `root` is a file; it holds no `marker` but other entries; its
      marker is not one jlora wrote; or it holds entries jlora did not write (a
      numbered directory that is not one of its versions, any other file).
  """
  on_primary(lambda: _check_target(root, marker, what, older, fmt), send=False)


def _entries(root: str) -> dict[str, bool]:
  """`{name: is a directory}` of the entries of `root` (through `etils.epath` on a URL)."""
  if _remote(root):
    from etils import epath

    return {p.name: p.is_dir() for p in epath.Path(root).iterdir()}
  out = {}
  for entry in os.scandir(root):
    try:
      out[entry.name] = entry.is_dir(follow_symlinks=False)
    except FileNotFoundError:  # removed meanwhile
      continue
  return out


def _read_marker(root: str, marker: str) -> Any:
  """The JSON in `root/marker`, or None where it is missing or not JSON."""
  path = os.path.join(root, marker)
  try:
    if _remote(root):
      from etils import epath

      return json.loads(epath.Path(path).read_text())
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _ledger(body: Any) -> set[int] | None:
  """The versions a marker lists as written by jlora; None for a marker of a jlora that kept no list."""
  steps = body.get("steps") if isinstance(body, dict) else None
  if isinstance(steps, list) and all(isinstance(s, int) and not isinstance(s, bool) for s in steps):
    return set(steps)
  return None


def _looks_like_version(root: str, name: str) -> bool:
  """Whether the directory `root/name` holds only what orbax puts into a version (for markers without `steps`)."""
  if _remote(root):
    from etils import epath

    inside = {p.name for p in epath.Path(root, name).iterdir()}
  else:
    inside = set(os.listdir(os.path.join(root, name)))
  return bool(inside) and inside <= _STEP_ITEMS


def _show(names: list[str]) -> str:
  return ", ".join(repr(n) for n in names[:8]) + (f" … and {len(names) - 8} more" if len(names) > 8 else "")


def _check_target(root: str, marker: str, what: str, older: str | None, fmt: str | None) -> None:
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
  else:
    _io.recover(os.path.join(root, marker))  # removes the temporary marker files of saves that were killed
  entries = _entries(root)
  if marker in entries:
    body = _read_marker(root, marker)
    kind = body.get("format") if isinstance(body, dict) else None
    if entries[marker] or not isinstance(kind, str) or not (kind == fmt if fmt else kind.startswith("jlora.")):
      raise ValueError(
          f"`path`: {root!r} holds a {marker} that jlora did not write (it does not name the format of a jlora "
          f"{what}); jlora only replaces checkpoints it wrote, so nothing of yours is overwritten or deleted. Choose "
          "a new or empty directory."
      )
    ledger = _ledger(body)
    foreign, numbered = [], []
    for name, folder in sorted(entries.items()):
      if name == marker or _io.is_leftover(name, marker) or (folder and _ORBAX_TMP.fullmatch(name)):
        continue
      if folder and name.isascii() and name.isdigit() and str(int(name)) == name and (
          int(name) in ledger if ledger is not None else _looks_like_version(root, name)):
        continue  # a version jlora wrote (or began: a killed save, or one orbax was deleting)
      (numbered if folder and (name.isdigit() or name.split("_")[-1].isdigit()) else foreign).append(name)
    if numbered or foreign:
      it = "it" if len(numbered) == 1 else "them"
      shown = ([f"{_show(numbered)} (named by a number: orbax would take {it} for a version of the checkpoint and "
                f"delete {it} at the next save)"] if numbered else []) + ([_show(foreign)] if foreign else [])
      raise ValueError(
          f"`path`: the jlora {what} {root!r} holds entries jlora did not write: {', '.join(shown)}. "
          f"jlora saves nothing into it while they are there, so nothing of yours is deleted: move them out of "
          f"{root!r}, then save again (or save to a new path)."
      )
    return
  names = sorted(n for n in entries if not _io.is_leftover(n, marker))  # a first save's, still running
  if not names:
    return
  if older is not None and older in names:
    raise ValueError(f"`path`: {root!r} is an {what} of an older jlora (format 1, {older}), which this version "
                     "neither reads nor replaces. Save to a new path.")
  shown = ", ".join(names[:8]) + (f" … and {len(names) - 8} more" if len(names) > 8 else "")
  raise ValueError(
      f"`path`: {root!r} holds files that are not a jlora {what} ({shown}; no {marker}); jlora only replaces "
      "checkpoints it wrote, so nothing of yours is overwritten or deleted. Choose a new or empty directory."
  )


def versions(root: str) -> list[int]:
  """The committed versions in `root`, oldest first (orbax's rule: temporary directories are not committed)."""
  from orbax.checkpoint.path import step as step_lib

  return sorted(m.step for m in step_lib.standard_name_format().find_all(root))


def _orbax_noise(report: Any) -> bool:
  """Whether an unraisable-exception report is the aftermath of a failed orbax read (and nothing of anyone else's).

  Two kinds: "Event loop is closed" from tensorstore callbacks that complete after
  orbax closed its event loop, and the errors of orbax's own read coroutines
  (`_read_array_index_and_device_put`, …) that nobody awaited any more once the
  first read failed, reported when those coroutines are collected.
  """
  return is_closed_loop_report(report) or _is_orbax_coroutine(report.object)


def is_closed_loop_report(report: Any) -> bool:
  """Whether an unraisable-exception report is tensorstore's "Event loop is closed": a callback completing after
  orbax closed its event loop (noise after a failed read, or a failed write such as a full disk)."""
  return isinstance(report.exc_value, RuntimeError) and str(report.exc_value) == "Event loop is closed"


def _is_orbax_coroutine(obj: Any) -> bool:
  return inspect.iscoroutine(obj) and f"{os.sep}orbax{os.sep}" in obj.cr_code.co_filename


def _close_abandoned() -> None:
  """Closes the orbax coroutines that a failed read left suspended on its closed event loop (they never resume).

  Left alone they stay referenced until the interpreter exits and report there, one
  traceback each, out of reach of any hook; closed here, what they raise comes
  back to this call and is dropped. The tasks of the closed loop that ended with a
  read error are marked as retrieved (else asyncio logs "Task exception was never
  retrieved" for each). Only tasks on a closed event loop are touched, which
  nothing can run or await any more: another thread's orbax work is not.
  """
  import asyncio

  time.sleep(0.05)  # the reads still in flight complete within milliseconds
  objects = gc.get_objects()
  for task in [t for t in objects if isinstance(t, asyncio.Task) and t.get_loop().is_closed()]:
    coro = task.get_coro()
    if task.done():  # finished with an error nobody can retrieve any more: asyncio would log it when collected
      if not task.cancelled():
        task.exception()
    elif _is_orbax_coroutine(coro) and coro.cr_frame is not None and not coro.cr_running:
      with contextlib.suppress(BaseException):  # orbax turns the GeneratorExit into its read error
        coro.close()


@contextlib.contextmanager
def quiet_failed_reads() -> Iterator[None]:
  """Silences the reports Python prints after a failed orbax read (see `_orbax_noise`), and nothing else.

  When one read of a damaged checkpoint fails, orbax stops waiting for the others:
  their callbacks hit its closed event loop on tensorstore's threads, and their
  coroutines end with errors nobody awaits; Python prints each as an "Exception
  ignored in …" report (some 65 lines for a few arrays) beside jlora's one clear
  error. While a restore runs, and after a failed one until its reads in flight
  have reported and its coroutines are collected, this hook drops exactly those
  and passes everything else to the previous hook.
  """
  with dropping_unraisable(_orbax_noise):
    try:
      yield
    except BaseException:
      _close_abandoned()
      raise


@contextlib.contextmanager
def dropping_unraisable(drop: Callable[[Any], bool]) -> Iterator[None]:
  """While it runs, `sys.unraisablehook` drops the reports `drop(report)` is True for and passes every other on."""
  previous = sys.unraisablehook

  def hook(report: Any) -> None:
    if not drop(report):
      previous(report)

  sys.unraisablehook = hook
  try:
    yield
  finally:
    if sys.unraisablehook is hook:
      sys.unraisablehook = previous


def restore_item(root: str, version: int, item: str, args: Any) -> Any:
  """One item of a version, read by orbax; any failure to read it is an `Unreadable`."""
  import orbax.checkpoint as ocp

  try:
    with quiet_failed_reads(), ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
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
  """Writes (or replaces) the marker file, whole or not at all."""
  path = os.path.join(root, marker)
  if _remote(root):  # one object write: whole or absent (no rename on object stores)
    from etils import epath

    epath.Path(root).mkdir(parents=True, exist_ok=True)
    epath.Path(path).write_text(json.dumps(body) + "\n")
  else:  # written atomically (temporary file renamed), into the directory itself
    os.makedirs(root, exist_ok=True)
    _io.write_json(path, body)


def _begin(root: str, marker: str, marker_body: dict) -> int:
  """The number of the next version; the marker, listing it beside the versions on disk, is written first."""
  on_disk = [] if not is_dir(root) else [
      int(name) for name, folder in _entries(root).items() if folder and name.isascii() and name.isdigit()]
  step = max(on_disk, default=0) + 1
  _write_marker(root, marker, {**marker_body, "steps": sorted({*on_disk, step})})
  return step


def commit(root: str, marker: str, marker_body: dict, *, meta: dict, **arrays: Any) -> None:
  """Writes the next version of `root`: each `arrays` item with orbax's StandardSave, and `meta` as JSON.

  Call `check_target` first: every numbered directory in `root` is then a version
  jlora wrote. The marker, listing the new version, is written first, by process 0
  (the others wait for it and take its version number); then orbax commits the
  version, every process writing its own shards, and deletes the previous one.
  Orbax writes `meta` from process 0.
  """
  step = int(on_primary(lambda: _begin(root, marker, marker_body)))
  import orbax.checkpoint as ocp

  options = ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False, cleanup_tmp_directories=True,
                                         save_root_metadata=False)
  items = {name: ocp.args.StandardSave(tree) for name, tree in arrays.items()}
  with ocp.CheckpointManager(root, item_names=(*arrays, "meta"), options=options) as manager:
    manager.save(step, force=True, args=ocp.args.Composite(**items, meta=ocp.args.JsonSave(meta)))


def _newest(root: str, marker: str | None) -> int | None:
  """The newest committed version of `root` that its marker lists, as process 0 sees it (collective)."""
  found = versions(root)
  if marker is not None and found:  # read after the listing: the marker lists a version before orbax writes it
    ledger = _ledger(_read_marker(root, marker))
    found = found if ledger is None else [v for v in found if v in ledger]
  newest = found[-1] if found else -1
  if jax.process_count() > 1:  # every process reads the same version
    from jax.experimental import multihost_utils

    newest = int(multihost_utils.broadcast_one_to_all(np.int32(newest)))
  return None if newest < 0 else newest


def read_newest(root: str, load_version: Callable[[int], T], caller: str, what: str, *,
                marker: str | None = None) -> T:
  """`load_version(newest committed version)`, retried while concurrent saves replace it.

  With `marker`, only the versions that the marker lists as jlora's are read.

  Raises:
    ValueError: no complete version; the newest version is damaged (an
      `Unreadable` that no newer save explains); replaced too often.
  """
  seen, empty = None, 0
  for _ in range(ATTEMPTS):
    newest = _newest(root, marker)
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
      if _newest(root, marker) == newest:  # nothing replaced it while we read: the files are damaged
        raise ValueError(
            f"{caller}: version {newest} of the {what} {root!r} is damaged: {e}. The files changed after they were "
            "written (disk or copy error) or cannot be read; restore the checkpoint from a good copy."
        ) from None
      seen = e
      time.sleep(0.01)
  raise ValueError(f"{caller}: {root!r} was replaced by new saves {ATTEMPTS} times while being read (last: {seen}); "
                   "load it when the writer pauses.")
