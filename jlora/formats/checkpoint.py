"""Adapter checkpoints: the trainable leaves, in versions that orbax commits atomically.

A checkpoint is a directory of versions, each an orbax `CheckpointManager` step::

    path/
      jlora_adapter.json        # marks the directory as jlora's; lists the versions jlora wrote
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
previous version or the new one, and what it left behind is cleaned up by the next
save. Readers take the newest committed version that the marker lists.
**Only what jlora wrote.** A save refuses a checkpoint directory holding anything
jlora did not write (see `jlora.formats.versioned`): a folder named by a number,
which orbax would take for a version and delete, or any other file of the user's.
**Concurrency.** One writer at a time; any number of readers: a reader whose
version is replaced while it reads retries on the newer one.
**Corruption.** Every leaf is checked against its SHA-256 at load; anything
unreadable is a `ValueError` naming the checkpoint, never different numbers.
**Several processes.** In a multi-process JAX run every process calls `save_adapter`
and `load_adapter` with its part of the same sharded tree, on a directory they all
see (a shared file system or a bucket): each writes and reads only its own shards
through orbax's collective commit, process 0 alone checks the directory and writes
the marker and `meta` (the others wait), and all read the version process 0 sees.
A leaf spread over several processes is checked block by block (`jlora.formats.integrity`):
every element is under a SHA-256, whatever mesh (or single device) it is loaded onto.
**Paths** may be URLs that orbax opens (`gs://bucket/adapter`); see `jlora.formats.versioned`
for what differs there.
**Keys** holding `/` (Haiku) or `%` are written escaped (`%2F`, `%25`), integers (NNX) as strings;
`load_adapter` hands back the keys of the `params` it is given (`jlora.core.keys`).
Orbax is imported only when a checkpoint is saved or loaded.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jlora.core.config import LoraConfig
from jlora.core.keys import escape, map_keys, restore, stringify, unescape
from jlora.core.targets import is_lora_key
from jlora.core.tree import Params, _check_tree, check_adapters, flatten, split, unflatten
from jlora.formats import integrity as _integrity
from jlora.formats.placement import Shardings, abstract_tree
from jlora.formats.versioned import (
  Unreadable,
  check_target,
  checkable,
  commit,
  container,
  is_dir,
  is_file,
  read_meta,
  read_newest,
  restore_item,
  seal,
)

__all__ = ["save_adapter", "load_adapter"]

FORMAT, VERSION = "jlora.adapter", 2
MARKER = "jlora_adapter.json"
_V1 = "jlora_checkpoint.json"  # the metadata file of format 1 (one orbax checkpoint, renamed into place)
Path = tuple[str, ...]


# ------------------------------------------------------------------ tree helpers
def strip_adapters(params: Params) -> dict[Path, Any]:
  """`{path: leaf}` of every leaf except the adapter leaves: the base model's leaves."""
  return {p: v for p, v in flatten(params).items() if not is_lora_key(p[-1])}


def fingerprint(base: Mapping[Path, Any]) -> dict[str, list]:
  """`{'a/b/kernel': [shape, dtype]}` of the base leaves, sorted by path."""
  return {"/".join(p): [list(np.shape(v)), np.dtype(v.dtype).name] for p, v in sorted(base.items())}


def _as_stored(leaf: Any) -> Any:
  """A numpy leaf in the dtype jax holds it in (float64 -> float32 without x64): what orbax restores, and hashes so."""
  return np.asarray(leaf, jax.dtypes.canonicalize_dtype(leaf.dtype)) if isinstance(leaf, np.ndarray) else leaf


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
    path: the checkpoint directory: absent, empty, or a checkpoint jlora wrote;
      a local path or a URL orbax opens (`gs://…`).
    params: the params with adapters, e.g. `jlora.combine(trainable, frozen)`.
      In a multi-process run every process passes the same tree of global
      arrays and each writes its own shards (see "Several processes" above).
    config: the config the adapters were created with.
    base_checksums: also store a SHA-256 of every frozen base leaf, so that
      `load_adapter` refuses a base of the same shapes with other weights. Costs
      one pass over the base (fetched to the host), at save and at load. Not
      available while a base leaf is spread over several processes.

  Raises:
    TypeError: `params` is not a nested dict or `config` not a `LoraConfig`.
    ValueError: `path` is a file or a directory jlora did not write, or a
      checkpoint holding entries jlora did not write (a folder of yours named by a
      number, which orbax would take for a version and delete; any file of yours:
      the message names them, nothing is changed), `params` holds nothing
      trainable, or an adapter does not fit its kernel or the config's rank.

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
  root = container(path)
  check_target(root, MARKER, "adapter checkpoint", older=_V1, fmt=FORMAT)
  base = strip_adapters(params)
  flat = {p: _as_stored(v) for p, v in flatten(trainable).items()}
  trainable = unflatten(flat)
  frozen = flatten(frozen)
  if base_checksums and len(checkable(frozen)) < len(frozen):
    raise ValueError("save_adapter: `base_checksums=True` needs every base leaf on this process; some are spread "
                     "over several processes. Save without it.")
  body = {
      "format": FORMAT, "version": VERSION, "config": config.to_dict(),
      "trainable": fingerprint(flat), "trainable_sha256": _integrity.digests(checkable(flat)),
      "base": fingerprint(base), "base_sha256": _integrity.digests(frozen) if base_checksums else None,
  }
  blocks = _integrity.block_digests(flat)  # leaves spread over several processes (collective)
  if blocks:
    body["trainable_blocks_sha256"] = blocks
  meta = {**body, "sha256": seal(body)}
  commit(root, MARKER, {"format": FORMAT, "version": VERSION, "layout": "orbax CheckpointManager steps: state/ and meta/"},
         state=trainable, meta=meta)


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


def _load_version(root: str, version: int, params: Params, shardings: Shardings) -> tuple[dict, LoraConfig]:
  import orbax.checkpoint as ocp

  meta = read_meta(root, version, FORMAT, VERSION)
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
  restored = flatten(restore_item(root, version, "state", ocp.args.StandardRestore(abstract)))
  if set(restored) != set(shapes) or any(tuple(np.shape(v)) != shapes[p] for p, v in restored.items()):
    raise Unreadable("its state does not hold the leaves its metadata lists")
  bad = _integrity.check(restored, meta["trainable_sha256"], meta.get("trainable_blocks_sha256"))
  if bad:
    raise Unreadable(f"leaf {bad[0]!r} does not match its checksum{f' ({len(bad) - 1} more)' if len(bad) > 1 else ''}")
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
      `NamedSharding` (by the rule of `jlora.adapter_shardings`), so arrays are restored directly
      into their shards: on any mesh, whatever mesh saved them, or one device.
      In a multi-process run every process calls `load_adapter`.

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
  root = container(path)
  if not is_dir(root):
    raise ValueError(f"`path`: no adapter checkpoint at {os.fspath(path)!r} (no such directory).")
  if not is_file(os.path.join(root, MARKER)):
    old = f" It is one of an older jlora (format 1, {_V1}), which this version does not read." if is_file(
        os.path.join(root, _V1)) else ""
    raise ValueError(f"`path`: {os.fspath(path)!r} is not a jlora adapter checkpoint (no {MARKER}).{old} Write one "
                     "with jlora.save_adapter.")
  tree = map_keys(stringify(params), escape)  # the names on disk (see "Keys" in the module docstring)
  places = map_keys(shardings, escape) if isinstance(shardings, Mapping) else shardings
  loaded, config = read_newest(root, lambda version: _load_version(root, version, tree, places), "load_adapter",
                               "adapter checkpoint", marker=MARKER)
  return restore(map_keys(loaded, unescape), params), config
