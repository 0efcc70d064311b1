"""Adapter checkpoints: the trainable leaves, in versions that orbax commits atomically.

A checkpoint is a directory of versions, each an orbax `CheckpointManager` step::

    path/
      jlora_adapter.json        # marks the directory as a jlora adapter checkpoint
      7/                        # the newest complete version (orbax step 7)
        state/                  # jlora.split(params, config)[0], orbax StandardSave
        meta/metadata           # JSON: config, leaf shapes/dtypes/SHA-256, base fingerprint
        _CHECKPOINT_METADATA, commit_success.txt                      (orbax's own)
      8.orbax-checkpoint-tmp-…  # a save in progress, or killed: never read

`state` holds the adapters (`lora_a: in_shape + (r,)`, `lora_b: (r,) + out_shape`,
stacked `(L, ...)` under `nn.scan`), the biases that `bias` trains and the
`modules_to_save` leaves; never the frozen base, only its fingerprint (path,
shape and dtype of each base leaf, and with `base_checksums=True` a SHA-256 of
its contents). `meta` carries its own SHA-256.

**Interruption.** Orbax writes a version into a temporary directory and commits
it in one step (a rename; a `commit_success.txt` on object stores); the previous
version is deleted only after that, so a save killed at any point leaves the
previous version or the new one. Readers take the newest committed version.
**Concurrency.** One writer at a time; any number of readers: a reader whose
version is replaced while it reads retries on the newer one.
**Corruption.** Every leaf is checked against its SHA-256 at load; anything
unreadable is a `ValueError` naming the checkpoint, never different numbers.
**Keys** holding `/` (Haiku) or `%` are written escaped (`%2F`, `%25`), integers (NNX) as strings;
`load_adapter` hands back the keys of the `params` it is given (`jlora._keys`).
Orbax is imported only when a checkpoint is saved or loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np

from jlora import _integrity, _io
from jlora._config import LoraConfig
from jlora._keys import escape, map_keys, restore, stringify, unescape
from jlora._placement import Shardings, abstract_tree
from jlora._targets import is_lora_key
from jlora._tree import Params, _check_tree, check_adapters, flatten, split, unflatten

__all__ = ["save_adapter", "load_adapter"]

FORMAT, VERSION = "jlora.adapter", 2
MARKER = "jlora_adapter.json"
_V1 = "jlora_checkpoint.json"  # the metadata file of format 1 (one orbax checkpoint, renamed into place)
_ITEMS = ("state", "meta")
_ATTEMPTS = 20  # reads retried while a concurrent save keeps replacing the newest version
Path = tuple[str, ...]


class _Unreadable(ValueError):
  """The files of a version are not what was committed (or vanished while being read)."""


# ------------------------------------------------------------------ tree helpers
def strip_adapters(params: Params) -> dict[Path, Any]:
  """`{path: leaf}` of every leaf except the adapter leaves: the base model's leaves."""
  return {p: v for p, v in flatten(params).items() if not is_lora_key(p[-1])}


def fingerprint(base: Mapping[Path, Any]) -> dict[str, list]:
  """`{'a/b/kernel': [shape, dtype]}` of the base leaves, sorted by path."""
  return {"/".join(p): [list(np.shape(v)), np.dtype(v.dtype).name] for p, v in sorted(base.items())}


def _checkable(flat: Mapping[Path, Any]) -> dict[Path, Any]:
  """The leaves this process can hash (all of them except arrays spread over several processes)."""
  return {p: v for p, v in flat.items() if getattr(v, "is_fully_addressable", True)}


def _seal(body: dict) -> str:
  return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# ------------------------------------------------------------------- container
def _container(path: str | os.PathLike) -> str:
  return os.path.abspath(os.fspath(path))


def _check_target(root: str) -> None:
  """Raises unless `root` is absent, an empty directory, or a checkpoint jlora wrote (it holds `MARKER`)."""
  if not os.path.lexists(root):
    return
  if not os.path.isdir(root) or os.path.islink(root):
    raise ValueError(f"`path`: {root!r} exists and is not a directory; jlora writes adapter checkpoints into a "
                     "directory of its own. Choose a new path.")
  if os.path.isfile(os.path.join(root, MARKER)):
    return
  _io.recover(os.path.join(root, MARKER))  # removes the temporary marker file of a first save that was killed
  entries = sorted(os.listdir(root))
  if not entries:
    return
  if _V1 in entries:
    raise ValueError(f"`path`: {root!r} is an adapter checkpoint of an older jlora (format 1, {_V1}), which this "
                     "version neither reads nor replaces. Save to a new path.")
  shown = ", ".join(entries[:8]) + (f" … and {len(entries) - 8} more" if len(entries) > 8 else "")
  raise ValueError(
      f"`path`: {root!r} holds files that are not a jlora adapter checkpoint ({shown}; no {MARKER}); jlora only "
      "replaces checkpoints it wrote, so nothing of yours is overwritten or deleted. Choose a new or empty directory."
  )


def _versions(root: str) -> list[int]:
  """The committed versions in `root`, oldest first (orbax's rule: temporary directories are not committed)."""
  from orbax.checkpoint.path import step as step_lib

  return sorted(m.step for m in step_lib.standard_name_format().find_all(root))


# ------------------------------------------------------------------------ save
def save_adapter(path: str | os.PathLike, params: Params, config: LoraConfig, *, base_checksums: bool = False) -> None:
  """Saves the trainable part of `params` and `config` as a new version of the checkpoint at `path`.

  Only `jlora.split(params, config)[0]` is written: the adapters
  (`lora_a: in_shape + (r,)`, `lora_b: (r,) + out_shape`, with leading scan axes
  when stacked), the biases that `config.bias` trains and the `modules_to_save`
  leaves, in their own dtypes, each with a SHA-256; the frozen base is never
  written, only its fingerprint. The version is committed by orbax in one step
  and the previous version is deleted after it, so a save interrupted at any
  point leaves the previous checkpoint loadable (see the module docstring).

  Args:
    path: the checkpoint directory: absent, empty, or a checkpoint jlora wrote.
    params: the params with adapters, e.g. `jlora.combine(trainable, frozen)`.
    config: the config the adapters were created with.
    base_checksums: also store a SHA-256 of every frozen base leaf, so that
      `load_adapter` refuses a base of the same shapes with other weights. Costs
      one pass over the base (fetched to the host), at save and at load.

  Raises:
    TypeError: `params` is not a nested dict or `config` not a `LoraConfig`.
    ValueError: `path` is a file or a directory jlora did not write (nothing
      is changed), `params` holds nothing trainable, or an adapter does not fit
      its kernel or the config's rank.

  Example:
    >>> jlora.save_adapter("ckpt/adapter", params, config)            # doctest: +SKIP
    >>> params, config = jlora.load_adapter("ckpt/adapter", base)     # doctest: +SKIP
  """
  _check_tree(params)
  if not isinstance(config, LoraConfig):
    raise TypeError(f"`config` must be a jlora.LoraConfig, got {type(config).__name__}.")
  if not isinstance(base_checksums, bool):
    raise TypeError(f"`base_checksums` must be True or False, got {base_checksums!r}.")
  params = stringify(params)
  check_adapters(params, config)
  trainable, frozen = split(params, config)
  params, trainable, frozen = (map_keys(t, escape) for t in (params, trainable, frozen))  # paths join with "/"
  if not trainable:
    raise ValueError(
        "save_adapter: `params` holds no trainable leaf (no lora_a/lora_b, no trained bias or modules_to_save); "
        "pass the params with adapters, e.g. jlora.combine(trainable, frozen)."
    )
  root = _container(path)
  _check_target(root)
  base = strip_adapters(params)
  flat = flatten(trainable)
  frozen = flatten(frozen)
  if base_checksums and len(_checkable(frozen)) < len(frozen):
    raise ValueError("save_adapter: `base_checksums=True` needs every base leaf on this process; some are spread "
                     "over several processes. Save without it.")
  body = {
      "format": FORMAT, "version": VERSION, "config": config.to_dict(),
      "trainable": fingerprint(flat), "trainable_sha256": _integrity.digests(_checkable(flat)),
      "base": fingerprint(base), "base_sha256": _integrity.digests(frozen) if base_checksums else None,
  }
  meta = {**body, "sha256": _seal(body)}
  if not os.path.isfile(os.path.join(root, MARKER)):
    if jax.process_index() == 0:  # written atomically, into the directory itself (never replaced: it may be the cwd)
      os.makedirs(root, exist_ok=True)
      _io.write_json(os.path.join(root, MARKER), {"format": FORMAT, "version": VERSION,
                                                  "layout": "orbax CheckpointManager steps: state/ and meta/"})
    if jax.process_count() > 1:  # the others wait for the container before orbax writes into it
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("jlora.save_adapter: container")
  import orbax.checkpoint as ocp

  options = ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False, cleanup_tmp_directories=True,
                                         save_root_metadata=False)
  with ocp.CheckpointManager(root, item_names=_ITEMS, options=options) as manager:
    manager.save((manager.latest_step() or 0) + 1, force=True,
                 args=ocp.args.Composite(state=ocp.args.StandardSave(trainable), meta=ocp.args.JsonSave(meta)))


# ------------------------------------------------------------------------ load
def _base_mismatch(meta: Mapping[str, Any], base: Mapping[Path, Any]) -> str | None:
  """Which check of the base fails (paths, shapes, dtypes, contents) and at which first leaf; None if none."""
  saved, given = meta["base"], fingerprint(base)
  only_saved, only_given = sorted(set(saved) - set(given)), sorted(set(given) - set(saved))
  if only_saved or only_given:
    n = len(only_saved) + len(only_given)
    first = (f"{only_saved[0]!r} is in the checkpoint's base but not in `params`" if only_saved else
             f"{only_given[0]!r} is in `params` but not in the checkpoint's base")
    return f"paths: {first}{f' ({n - 1} more differ)' if n > 1 else ''}"
  for i, check in enumerate(("shapes", "dtypes")):
    bad = [p for p in saved if saved[p][i] != given[p][i]]
    if bad:
      show = (lambda v: str(tuple(v))) if i == 0 else str
      more = f" ({len(bad) - 1} more differ)" if len(bad) > 1 else ""
      return f"{check}: {bad[0]!r} is {show(saved[bad[0]][i])} in the checkpoint's base, {show(given[bad[0]][i])} " \
             f"in `params`{more}"
  if meta.get("base_sha256"):  # the frozen leaves only: trained biases and saved modules differ from the base's
    for p, expected in sorted(meta["base_sha256"].items()):
      if _integrity.digest(base[tuple(p.split("/"))]) != expected:
        return f"contents: {p!r} holds other values than the base the adapter was saved with (SHA-256 differs)"
  return None


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


def _restore(root: str, version: int, item: str, args: Any) -> Any:
  """One item of a version, read by orbax; any failure to read it is an `_Unreadable`."""
  import orbax.checkpoint as ocp

  try:
    with _quiet_closed_loop(), ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
      return ckptr.restore(os.path.join(root, str(version)), args=ocp.args.Composite(**{item: args}))[item]
  except Exception as e:  # orbax / tensorstore / JSON errors of damaged or vanishing files
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    raise _Unreadable(f"its {item!r} item could not be read ({type(e).__name__}: {first})") from None


def _read_meta(root: str, version: int) -> dict:
  import orbax.checkpoint as ocp

  meta = _restore(root, version, "meta", ocp.args.JsonRestore())
  body = {k: v for k, v in meta.items() if k != "sha256"} if isinstance(meta, dict) else None
  if body is None or meta.get("sha256") != _seal(body):
    raise _Unreadable("its metadata does not match its SHA-256")
  if body.get("format") != FORMAT or not isinstance(body.get("version"), int) or body["version"] > VERSION:
    raise ValueError(f"`path`: {root!r} has format {body.get('format')!r} version {body.get('version')!r}; this "
                     f"jlora reads {FORMAT!r} up to version {VERSION}. Upgrade jlora.")
  return body


def _load_version(root: str, version: int, params: Params, shardings: Shardings) -> tuple[dict, LoraConfig]:
  import orbax.checkpoint as ocp

  meta = _read_meta(root, version)
  base = strip_adapters(params)
  problem = _base_mismatch(meta, base)
  if problem is not None:
    raise ValueError(
        f"load_adapter: `params` is not the base this adapter was saved with (check failed: {problem}). "
        "Load the base model the adapter was trained on."
    )
  config = LoraConfig.from_dict(meta["config"])
  specs = {tuple(k.split("/")): v for k, v in meta["trainable"].items()}
  shapes = {p: tuple(v[0]) for p, v in specs.items()}
  abstract = abstract_tree(specs, params, shardings)
  restored = flatten(_restore(root, version, "state", ocp.args.StandardRestore(abstract)))
  if set(restored) != set(shapes) or any(tuple(np.shape(v)) != shapes[p] for p, v in restored.items()):
    raise _Unreadable("its state does not hold the leaves its metadata lists")
  expected = meta["trainable_sha256"]
  got = _integrity.digests({p: v for p, v in _checkable(restored).items() if "/".join(p) in expected})
  bad = sorted(p for p, digest in got.items() if digest != expected[p])
  if bad:
    raise _Unreadable(f"leaf {bad[0]!r} does not match its checksum{f' ({len(bad) - 1} more)' if len(bad) > 1 else ''}")
  return unflatten({**base, **restored}), config


def load_adapter(path: str | os.PathLike, params: Params, *, shardings: Shardings = None) -> tuple[dict, LoraConfig]:
  """Loads the newest version of an adapter checkpoint onto a base, checking that the base matches.

  Args:
    path: the checkpoint directory written by `save_adapter`.
    params: the base params (without adapters), or a tree that already holds
      adapters: those, and the trained biases / `modules_to_save` leaves, are
      replaced by the checkpoint's.
    shardings: where to restore the leaves: one `jax.sharding.Sharding` for all,
      or a nested dict shaped like the saved trainable tree (missing entries use
      the default). By default each adapter inherits its kernel's
      `NamedSharding` (see `jlora._placement`), so arrays are restored directly
      into their shards.

  Returns:
    `(params, config)`: the base leaves of `params` (the same arrays) with the
    checkpoint's trainable leaves, and the `LoraConfig` saved with them.

  Raises:
    ValueError: no checkpoint at `path`; a base that differs from the one the
      adapter was saved with (the message names the check that failed: paths,
      shapes, dtypes or, when saved with `base_checksums=True`, contents; and
      the first leaf); files that are damaged (a leaf's SHA-256 differs, or
      orbax cannot read them; the message names the checkpoint and version).
  """
  _check_tree(params)
  root = _container(path)
  if not os.path.isdir(root):
    raise ValueError(f"`path`: no adapter checkpoint at {os.fspath(path)!r} (no such directory).")
  if not os.path.isfile(os.path.join(root, MARKER)):
    old = f" It is one of an older jlora (format 1, {_V1}), which this version does not read." if os.path.isfile(
        os.path.join(root, _V1)) else ""
    raise ValueError(f"`path`: {os.fspath(path)!r} is not a jlora adapter checkpoint (no {MARKER}).{old} Write one "
                     "with jlora.save_adapter.")
  tree = map_keys(stringify(params), escape)  # the names on disk (see "Keys" in the module docstring)
  places = map_keys(shardings, escape) if isinstance(shardings, Mapping) else shardings
  seen, empty = None, 0
  for _ in range(_ATTEMPTS):
    versions = _versions(root)
    if not versions:
      empty += 1  # a listing that races a commit (new version not yet seen, old one deleted) can come back empty
      if empty < 5:
        time.sleep(0.02)
        continue
      raise ValueError(f"`path`: the adapter checkpoint {root!r} holds no complete version (its first save did not "
                       "finish); save it again.")
    try:
      loaded, config = _load_version(root, versions[-1], tree, places)
      return restore(map_keys(loaded, unescape), params), config
    except _Unreadable as e:
      if _versions(root)[-1:] == versions[-1:]:  # nothing replaced it while we read: the files are damaged
        raise ValueError(
            f"load_adapter: version {versions[-1]} of the adapter checkpoint {root!r} is damaged: {e}. The files "
            "changed after they were written (disk or copy error) or cannot be read; restore the checkpoint from a "
            "good copy."
        ) from None
      seen = e
      time.sleep(0.01)
  raise ValueError(f"load_adapter: {root!r} was replaced by new saves {_ATTEMPTS} times while being read (last: "
                   f"{seen}); load it when the writer pauses.")
