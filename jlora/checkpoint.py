"""Adapter checkpoints with orbax: only the trainable leaves, written atomically.

A checkpoint is a directory:

* `state/` — an orbax PyTree checkpoint of `jlora.split(params, config)[0]`: the
  adapters (`lora_a: in_shape + (r,)`, `lora_b: (r,) + out_shape`, stacked
  `(L, ...)` under `nn.scan`), the biases that `bias` trains and the
  `modules_to_save` leaves. Never the frozen base.
* `adapter_config.json` — `config.to_json()` (PEFT's config format).
* `jlora_checkpoint.json` — format version, the path/shape/dtype of every
  saved leaf, and a fingerprint of the base: the path, shape and dtype of every
  leaf that is not an adapter.

`save_adapter` writes everything into a temporary directory beside the target
and only then renames it into place (an atomic exchange with the previous
checkpoint where the OS supports it), so a save that is interrupted at any point
leaves the previous checkpoint intact and loadable. Single-process only: under
multi-host `jax.distributed` orbax needs every process to take part, which this
rename protocol does not coordinate.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import shutil
import sys
import uuid
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from jlora import _ops
from jlora._config import LoraConfig
from jlora._tree import LORA_KEYS, Params, _check_tree, adapted_modules, flatten, kernel_key, split, unflatten

__all__ = ["save_adapter", "load_adapter"]

FORMAT = "jlora.adapter"
VERSION = 1
_STATE, _CONFIG, _META = "state", "adapter_config.json", "jlora_checkpoint.json"
Path = tuple[str, ...]
Shardings = jax.sharding.Sharding | Mapping[str, Any] | None


# ------------------------------------------------------------------ tree helpers
def strip_adapters(params: Params) -> dict[Path, Any]:
  """`{path: leaf}` of every leaf except `lora_a` / `lora_b`: the base model's leaves."""
  return {p: v for p, v in flatten(params).items() if p[-1] not in LORA_KEYS}


def _spec(leaf: Any) -> list:
  return [list(np.shape(leaf)), np.dtype(leaf.dtype).name]


def fingerprint(base: Mapping[Path, Any]) -> dict[str, list]:
  """`{'a/b/kernel': [shape, dtype]}` of the base leaves, sorted by path."""
  return {"/".join(p): _spec(v) for p, v in sorted(base.items())}


def _digest(fp: Mapping[str, list]) -> str:
  return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()


def _first_mismatch(saved: Mapping[str, list], given: Mapping[str, list]) -> str:
  diffs = []
  for path in sorted(set(saved) | set(given)):
    if path not in given:
      diffs.append(f"{path!r}: in the checkpoint's base {tuple(saved[path][0])} {saved[path][1]}, absent from `params`")
    elif path not in saved:
      diffs.append(f"{path!r}: in `params` {tuple(given[path][0])} {given[path][1]}, absent from the checkpoint's base")
    elif saved[path][0] != given[path][0]:
      diffs.append(f"{path!r}: shape {tuple(saved[path][0])} in the checkpoint's base, {tuple(given[path][0])} given")
    elif saved[path][1] != given[path][1]:
      diffs.append(f"{path!r}: dtype {saved[path][1]} in the checkpoint's base, {given[path][1]} given")
  more = f" (and {len(diffs) - 1} more mismatches)" if len(diffs) > 1 else ""
  return diffs[0] + more


# --------------------------------------------------------------- atomic writes
def _tmp_name(target: str, tag: str) -> str:
  parent, name = os.path.split(os.path.abspath(target))
  return os.path.join(parent, f".{name}.jlora-{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _clean_stale(target: str) -> None:
  """Removes temporary directories left beside `target` by writers that died (e.g. SIGKILL)."""
  parent, name = os.path.split(os.path.abspath(target))
  prefix = f".{name}.jlora-"
  for entry in os.listdir(parent):
    if entry.startswith(prefix):
      try:
        pid = int(entry[len(prefix):].split("-")[1])
      except (IndexError, ValueError):
        continue
      if pid != os.getpid() and not _pid_alive(pid):
        shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


_RENAME_EXCHANGE = 2


def _exchange(a: str, b: str) -> bool:
  """Atomically swaps two paths with Linux `renameat2(RENAME_EXCHANGE)`; False where unsupported."""
  if not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.renameat2
  except (OSError, AttributeError):
    return False
  at_fdcwd = -100
  if fn(at_fdcwd, a.encode(), at_fdcwd, b.encode(), _RENAME_EXCHANGE) == 0:
    return True
  err = ctypes.get_errno()
  if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
    return False
  raise OSError(err, os.strerror(err), b)


def _fsync_dir(path: str) -> None:
  with contextlib.suppress(OSError):
    fd = os.open(path, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


def _finalize(tmp: str, target: str) -> None:
  """Moves the fully written `tmp` directory to `target`, replacing a previous checkpoint.

  With `renameat2(RENAME_EXCHANGE)` the swap is one atomic step. Elsewhere the old
  checkpoint is first renamed to a `.jlora-previous-*` sibling, which
  `load_adapter` falls back on if the process dies between the two renames.
  """
  if not os.path.lexists(target):
    os.rename(tmp, target)
  elif _exchange(tmp, target):
    shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous checkpoint
  else:
    backup = _tmp_name(target, "previous")
    os.rename(target, backup)
    os.rename(tmp, target)
    shutil.rmtree(backup, ignore_errors=True)
  _fsync_dir(os.path.dirname(os.path.abspath(target)))


def _recover(target: str) -> str:
  """`target`, or the previous checkpoint that an interrupted non-atomic swap left beside it."""
  if os.path.isdir(target):
    return target
  parent, name = os.path.split(os.path.abspath(target))
  if os.path.isdir(parent):
    backups = sorted(e for e in os.listdir(parent) if e.startswith(f".{name}.jlora-previous-"))
    for entry in backups:
      if os.path.isfile(os.path.join(parent, entry, _META)):
        return os.path.join(parent, entry)
  raise ValueError(f"`path`: no adapter checkpoint at {os.fspath(target)!r} (no such directory).")


# ------------------------------------------------------------------------ save
def save_adapter(path: str | os.PathLike, params: Params, config: LoraConfig) -> None:
  """Saves the trainable part of `params` and `config` as an orbax checkpoint directory.

  Only `jlora.split(params, config)[0]` is written: the adapters
  (`lora_a: in_shape + (r,)`, `lora_b: (r,) + out_shape`, with leading scan axes
  when stacked), the biases that `config.bias` trains and the `modules_to_save`
  leaves, in their own dtypes (orbax's zstd-compressed chunks: the files are at
  most the raw adapter bytes plus a few kB of metadata); the frozen base is never
  written, only its fingerprint (path, shape and dtype of each base leaf). The
  write is atomic: everything goes to a temporary directory beside `path`, which
  then replaces `path` in one rename, so an interrupted save leaves the previous
  checkpoint intact.

  Args:
    path: the checkpoint directory (created or replaced).
    params: the params with adapters, e.g. `jlora.combine(trainable, frozen)`.
    config: the config the adapters were created with.

  Raises:
    TypeError: `params` is not a nested dict or `config` not a `LoraConfig`.
    ValueError: `params` holds nothing trainable, or an adapter does not fit its
      kernel or the config's rank.

  Example:
    >>> jlora.save_adapter("ckpt/step_100", params, config)            # doctest: +SKIP
    >>> params, config = jlora.load_adapter("ckpt/step_100", base)     # doctest: +SKIP
  """
  _check_tree(params)
  if not isinstance(config, LoraConfig):
    raise TypeError(f"`config` must be a jlora.LoraConfig, got {type(config).__name__}.")
  for mpath, node in adapted_modules(params):
    kernel = node[kernel_key(mpath, node)]
    where = "/".join(mpath)
    _ops.check_adapter(where, kernel.shape, node["lora_a"].shape, node["lora_b"].shape, config.rank_for(where))
  trainable, _ = split(params, config)
  if not trainable:
    raise ValueError(
        "save_adapter: `params` holds no trainable leaf (no lora_a/lora_b, no trained bias or modules_to_save); "
        "pass the params with adapters, e.g. jlora.combine(trainable, frozen)."
    )
  base_fp = fingerprint(strip_adapters(params))
  meta = {
      "format": FORMAT,
      "version": VERSION,
      "trainable": {"/".join(p): _spec(v) for p, v in sorted(flatten(trainable).items())},
      "base_sha256": _digest(base_fp),
      "base": base_fp,
  }
  target = os.path.abspath(os.fspath(path))
  os.makedirs(os.path.dirname(target), exist_ok=True)
  _clean_stale(target)
  tmp = _tmp_name(target, "tmp")
  try:
    os.makedirs(tmp)
    ocp.PyTreeCheckpointer().save(os.path.join(tmp, _STATE), trainable)
    config.to_json(os.path.join(tmp, _CONFIG))
    with open(os.path.join(tmp, _META), "w", encoding="utf-8") as f:
      json.dump(meta, f)
      f.flush()
      os.fsync(f.fileno())
    _fsync_dir(tmp)
    _finalize(tmp, target)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


# ------------------------------------------------------------------------ load
def _as_sharding(value: Any, where: str) -> jax.sharding.Sharding:
  if not isinstance(value, jax.sharding.Sharding):
    raise TypeError(f"`shardings` at {where!r} must be a jax.sharding.Sharding, got {type(value).__name__}.")
  return value


def _device_sharding(leaf: Any) -> jax.sharding.Sharding:
  sharding = getattr(leaf, "sharding", None)
  if isinstance(sharding, jax.sharding.Sharding):
    devices = sorted(sharding.device_set, key=lambda d: d.id)
    if len(devices) == 1:
      return SingleDeviceSharding(devices[0])
    return NamedSharding(jax.sharding.Mesh(np.array(devices), ("d",)), PartitionSpec())
  return SingleDeviceSharding(jax.devices()[0])


def default_sharding(path: Path, shapes: Mapping[Path, tuple], base: Mapping[Path, Any]) -> jax.sharding.Sharding:
  """Where a restored leaf goes when no sharding is given.

  Adapters inherit the partitioning of their kernel (a `NamedSharding`): `A` keeps
  the kernel's input-axis (and stack-axis) specs and replicates `r`; `B`
  replicates `r` and keeps the output-axis specs. A bias or `modules_to_save`
  leaf takes the sharding of the base leaf it replaces. Anything else goes to
  the kernel's device, or the default device.
  """
  if path[-1] not in LORA_KEYS:
    return _device_sharding(base.get(path))
  module = path[:-1]
  name = next((k for k in ("kernel", "embedding", "w", "weight") if (*module, k) in base), None)
  kernel = base.get((*module, name)) if name else None
  sharding = getattr(kernel, "sharding", None)
  if not isinstance(sharding, NamedSharding):
    return _device_sharding(kernel)
  k_shape = tuple(kernel.shape)
  spec = tuple(sharding.spec) + (None,) * (len(k_shape) - len(sharding.spec))
  a_shape, b_shape = shapes[(*module, "lora_a")], shapes[(*module, "lora_b")]
  layout, s = _ops.layout(a_shape, b_shape, k_shape)
  own = a_shape if path[-1] == "lora_a" else b_shape
  if layout == "broadcast":
    out = tuple(p if own[i] == k_shape[i] else None for i, p in enumerate(spec)) + (None,)
  else:
    n_in = len(a_shape) - 1 - s
    out = spec[: s + n_in] + (None,) if path[-1] == "lora_a" else spec[:s] + (None,) + spec[s + n_in:]
  return NamedSharding(sharding.mesh, PartitionSpec(*out))


def load_adapter(path: str | os.PathLike, params: Params, *,
                 shardings: Shardings = None) -> tuple[dict, LoraConfig]:
  """Loads an adapter saved by `save_adapter` onto a base, checking that the base matches.

  Args:
    path: the checkpoint directory.
    params: the base params (without adapters), or a tree that already holds
      adapters: those, and the trained biases / `modules_to_save` leaves, are
      replaced by the checkpoint's.
    shardings: where to restore the leaves: one `jax.sharding.Sharding` for all,
      or a nested dict shaped like the saved trainable tree (missing entries use
      the default). By default each adapter inherits its kernel's
      `NamedSharding` (see `default_sharding`), so arrays are restored directly
      into their shards.

  Returns:
    `(params, config)`: the base leaves of `params` (the same arrays) with the
    checkpoint's trainable leaves, and the `LoraConfig` saved with them.

  Raises:
    ValueError: no checkpoint at `path`, an unknown format, or a base whose
      leaves differ from the one the adapter was saved with (the message names
      the first mismatching path and whether shape, dtype or presence differs).
  """
  _check_tree(params)
  where = _recover(os.path.abspath(os.fspath(path)))
  meta_file = os.path.join(where, _META)
  if not os.path.isfile(meta_file):
    raise ValueError(f"`path`: {os.fspath(path)!r} is not a jlora adapter checkpoint (no {_META}).")
  with open(meta_file, encoding="utf-8") as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT or meta.get("version", 0) > VERSION:
    raise ValueError(
        f"`path`: {os.fspath(path)!r} has format {meta.get('format')!r} version {meta.get('version')!r}; "
        f"this jlora reads {FORMAT!r} up to version {VERSION}."
    )
  config = LoraConfig.from_json(os.path.join(where, _CONFIG))
  base = strip_adapters(params)
  given = fingerprint(base)
  if _digest(given) != meta["base_sha256"]:
    raise ValueError(
        f"load_adapter: `params` is not the base this adapter was saved with: {_first_mismatch(meta['base'], given)}. "
        "Load the base model the adapter was trained on."
    )
  shapes = {tuple(k.split("/")): tuple(v[0]) for k, v in meta["trainable"].items()}
  abstract = {}
  for p, shape in shapes.items():
    joined = "/".join(p)
    if isinstance(shardings, jax.sharding.Sharding):
      sharding = shardings
    else:
      node: Any = shardings
      for key in p:
        node = node.get(key) if isinstance(node, Mapping) else None
      sharding = _as_sharding(node, joined) if node is not None else default_sharding(p, shapes, base)
    abstract[p] = jax.ShapeDtypeStruct(shape, np.dtype(meta["trainable"][joined][1]), sharding=sharding)
  item = unflatten(abstract)
  restored = ocp.PyTreeCheckpointer().restore(
      os.path.join(where, _STATE),
      args=ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item)),
  )
  return unflatten({**base, **flatten(restored)}), config
