"""`jlora.save_quantized` / `jlora.load_quantized`: a (partly) quantized base, saved with its codes packed.

A quantized checkpoint is a directory of versions, each an orbax `CheckpointManager`
step, as for adapters (`jlora.formats.checkpoint`)::

    path/
      jlora_quantized.json      # marks the directory as jlora's; lists the versions jlora wrote
      3/                        # the newest complete version (orbax step 3)
        arrays/                 # every array as stored: a0, a1, … (orbax StandardSave)
        meta/metadata           # JSON: leaves, QuantizedArray metadata, shapes, dtypes, SHA-256s
      4.orbax-checkpoint-tmp-…  # a save in progress, or killed: never read

Each `QuantizedArray` is stored as its children (`codes`, `scale`, [`scale2`,
`offset`]) in their own dtypes, so NF4 codes stay two to a byte on disk; its static
metadata (method, last dim, dtype name, block size, double quantization) goes to
the JSON, never a pickle. Plain leaves are stored as they are (bfloat16 included).

The metadata lists every leaf by its path: its keys as JSON values (so integer keys
come back as integers) and, for messages and the SHA-256 list, the `/`-joined name
with each key escaped (`jlora.core.keys.escape`: `/` -> `%2F`). The arrays are stored
under their index (`a0`, `a1`, …), so no key has to survive orbax's own naming.

**Interruption, concurrency, corruption** as in `jlora.formats.checkpoint`: orbax commits a
version in one step and deletes the previous one after it; readers take the newest
committed version and retry if a writer replaces it while they read; every array
is checked against its SHA-256 at load, and the metadata against its own.
**Several processes** as in `jlora.formats.checkpoint`: every process calls save and load;
an array spread over several processes is stored with one SHA-256 per shard
(`blocks_sha256` of its entry) instead of `sha256`, each checked at load.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora.core.keys import escape, stringify
from jlora.core.tree import _check_tree
from jlora.formats import integrity as _integrity
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
from jlora.quant.array import FOUR_BIT, METHODS, QuantizedArray, _Meta

__all__ = ["save_quantized", "load_quantized"]

FORMAT, VERSION = "jlora.quantized", 1
MARKER = "jlora_quantized.json"
Keys = tuple[Any, ...]


# ------------------------------------------------------------------ tree walking
def _walk(tree: Mapping, keys: Keys = ()) -> Iterator[tuple[Keys, Any]]:
  """`(keys, leaf)` of every leaf of a nested dict, depth first, with the tree's own keys."""
  for k, v in tree.items():
    if isinstance(v, Mapping):
      yield from _walk(v, (*keys, k))
    else:
      yield (*keys, k), v


def _name(keys: Keys) -> str:
  return "/".join(escape(str(k)) for k in keys)


def _array(value: Any, where: str) -> Any:
  """`value` if it is a concrete array (jax or numpy), else a TypeError naming `where`."""
  if isinstance(value, np.generic):
    value = np.asarray(value)
  if isinstance(value, jax.core.Tracer) or not isinstance(value, jax.Array | np.ndarray):
    raise TypeError(f"save_quantized: the leaf at {where!r} is a {type(value).__name__}, not an array; `params` must "
                    "hold arrays and QuantizedArrays (from jlora.quantize) only, outside jit.")
  if isinstance(value, np.ndarray):  # stored, hashed and listed in the dtype jax holds it in (float64 -> float32
    value = np.asarray(value, jax.dtypes.canonicalize_dtype(value.dtype))  # without x64): as it loads
  return value


def _quant_meta(meta: _Meta) -> dict:
  return {"method": meta.method, "last_dim": int(meta.last_dim), "dtype": jnp.dtype(meta.dtype).name,
          "block_size": None if meta.block_size is None else int(meta.block_size),
          "double_quant": bool(meta.double_quant)}


def _children(meta: _Meta) -> tuple[str, ...]:
  return ("codes", "scale", "scale2", "offset") if meta.double_quant else ("codes", "scale")


def _meta_from(d: Any, name: str) -> _Meta:
  """The `_Meta` of a saved QuantizedArray; a ValueError if the JSON does not describe one."""
  try:
    meta = _Meta(d["method"], d["last_dim"], jnp.dtype(d["dtype"]), d["block_size"], d["double_quant"])
  except (KeyError, TypeError) as e:
    raise ValueError(f"load_quantized: the metadata of {name!r} is not a QuantizedArray's ({e!r})") from None
  if (meta.method not in METHODS or not isinstance(meta.last_dim, int) or not isinstance(meta.double_quant, bool)
      or (meta.method in FOUR_BIT) != isinstance(meta.block_size, int)):
    raise ValueError(f"load_quantized: the metadata of {name!r} is not a QuantizedArray's: {d!r}")
  return meta


# ----------------------------------------------------------------------- target
# ------------------------------------------------------------------------- save
def save_quantized(path: str | os.PathLike, params: Any) -> None:
  """Saves a (partly) quantized param tree as a new version of the checkpoint at `path`.

  `QuantizedArray` kernels (from `jlora.quantize`) are written as their children,
  so NF4 codes stay packed (about 4.15 bits per parameter on disk); every other
  leaf is written as it is, in its own dtype. The version is committed by orbax
  in one step and the previous version deleted after it, so a save interrupted
  at any point leaves the previous checkpoint loadable (see the module docstring).

  Args:
    path: the checkpoint directory: absent, empty, or one `save_quantized` wrote.
    params: a nested dict (string or integer keys) of arrays and
      `QuantizedArray`s, e.g. `jlora.quantize(base, "nf4")`.

  Raises:
    TypeError: `params` is not a nested dict, a leaf is not a concrete array or
      QuantizedArray, or a key is neither a str nor an int.
    ValueError: `path` is a file or a directory jlora did not write, or a
      checkpoint holding entries jlora did not write (a folder named by a number,
      any file of yours: the message names them; nothing is changed), `params`
      holds no leaf, or two keys of one dict collide (`0`, `'0'`).

  Example:
    >>> jlora.save_quantized("ckpt/base-nf4", jlora.quantize(base, "nf4"))  # doctest: +SKIP
    >>> q = jlora.load_quantized("ckpt/base-nf4")                           # doctest: +SKIP
  """
  _check_tree(params)
  stringify(params)  # raises if two keys of one dict would have the same name
  leaves, arrays, flat = [], [], {}
  for keys, leaf in _walk(params):
    name = _name(keys)
    bad = [k for k in keys if not isinstance(k, str | int)]
    if bad:
      raise TypeError(f"save_quantized: the key {bad[0]!r} (at {name!r}) is a {type(bad[0]).__name__}; keys must be "
                      "str or int.")
    if isinstance(leaf, QuantizedArray):
      leaves.append({"name": name, "keys": list(keys), "quantized": _quant_meta(leaf.meta)})
      parts = [(c, _array(getattr(leaf, c), f"{name} ({c})")) for c in _children(leaf.meta)]
    else:
      leaves.append({"name": name, "keys": list(keys), "quantized": None})
      parts = [(None, _array(leaf, name))]
    for child, value in parts:
      key = f"a{len(arrays)}"
      flat[key] = value
      arrays.append({"leaf": name, "child": child, "shape": list(np.shape(value)), "dtype": jnp.dtype(value.dtype).name})
  if not leaves:
    raise ValueError("save_quantized: `params` holds no leaf; pass the base params, e.g. jlora.quantize(base).")
  hashable, blocks = checkable(flat), _integrity.block_digests({(k,): v for k, v in flat.items()})  # collective
  for key, entry in zip(flat, arrays):
    entry["sha256"] = _integrity.digest(flat[key]) if key in hashable else None
    if key in blocks:  # spread over several processes: one digest per shard
      entry["blocks_sha256"] = blocks[key]
  body = {"format": FORMAT, "version": VERSION, "leaves": leaves, "arrays": arrays}
  meta = {**body, "sha256": seal(body)}
  root = container(path)
  check_target(root, MARKER, "quantized checkpoint", fmt=FORMAT)
  commit(root, MARKER, {"format": FORMAT, "version": VERSION, "layout": "orbax CheckpointManager steps: arrays/ and "
         "meta/"}, arrays=flat, meta=meta)


# ------------------------------------------------------------------------- load
def _load_version(root: str, version: int, sharding: jax.sharding.Sharding) -> dict:
  import orbax.checkpoint as ocp

  meta = read_meta(root, version, FORMAT, VERSION)
  arrays = meta["arrays"]
  abstract = {}
  for i, entry in enumerate(arrays):
    shape, where = tuple(entry["shape"]), entry["leaf"] + (f" ({entry['child']})" if entry["child"] else "")
    try:
      sharding.shard_shape(shape)
    except ValueError as e:
      raise ValueError(f"`shardings` does not fit {where!r} of shape {shape}: {e}") from None
    abstract[f"a{i}"] = jax.ShapeDtypeStruct(shape, jnp.dtype(entry["dtype"]), sharding=sharding)
  restored = restore_item(root, version, "arrays", ocp.args.StandardRestore(abstract))
  if not isinstance(restored, Mapping) or set(restored) != set(abstract) or any(
      tuple(np.shape(restored[k])) != abstract[k].shape for k in abstract):
    raise Unreadable("its arrays are not those its metadata lists")
  bad_keys = set(_integrity.check({(k,): restored[k] for k in abstract},
                                  {k: e["sha256"] for k, e in zip(abstract, arrays) if e["sha256"]},
                                  {k: e["blocks_sha256"] for k, e in zip(abstract, arrays) if e.get("blocks_sha256")}))
  bad = [e for k, e in zip(abstract, arrays) if k in bad_keys]
  if bad:
    child = f" (its {bad[0]['child']!r})" if bad[0]["child"] else ""
    more = f" ({len(bad) - 1} more)" if len(bad) > 1 else ""
    raise Unreadable(f"leaf {bad[0]['leaf']!r}{child} does not match its checksum{more}")
  parts: dict[str, dict] = {}
  for k, entry in zip(abstract, arrays):
    parts.setdefault(entry["leaf"], {})[entry["child"]] = restored[k]
  out: dict = {}
  for leaf in meta["leaves"]:
    name, have = leaf["name"], parts.get(leaf["name"], {})
    if leaf["quantized"] is None:
      value = have.get(None)
    else:
      q = _meta_from(leaf["quantized"], name)
      value = QuantizedArray(**have, meta=q) if set(have) == set(_children(q)) else None
    if value is None:
      raise ValueError(f"load_quantized: {root!r}: the arrays of {name!r} do not match its metadata (written by "
                       "another jlora?).")
    node = out
    for key in leaf["keys"][:-1]:
      node = node.setdefault(key, {})
    node[leaf["keys"][-1]] = value
  return out


def _default_sharding() -> jax.sharding.Sharding:
  device = jax.config.jax_default_device
  return jax.sharding.SingleDeviceSharding(device if isinstance(device, jax.Device) else jax.devices()[0])


def load_quantized(path: str | os.PathLike, *, shardings: jax.sharding.Sharding | None = None) -> dict:
  """Loads the newest version of a checkpoint written by `save_quantized`.

  Args:
    path: the checkpoint directory.
    shardings: one `jax.sharding.Sharding` for every stored array (each
      `QuantizedArray` child and each plain leaf), restored straight onto it;
      None: the default device.

  Returns:
    The saved tree: the same keys (integers included), `QuantizedArray`s rebuilt
    with their metadata, every array bit for bit as saved, in its own dtype.

  Raises:
    TypeError: `shardings` is not a `jax.sharding.Sharding`.
    ValueError: no quantized checkpoint at `path`, a sharding that does not fit
      an array, or files that are damaged (an array's SHA-256 differs, or orbax
      cannot read them; the message names the checkpoint, version and leaf).
  """
  if shardings is None:
    shardings = _default_sharding()
  elif not isinstance(shardings, jax.sharding.Sharding):
    raise TypeError(f"`shardings` must be a jax.sharding.Sharding or None, got {type(shardings).__name__}.")
  root = container(path)
  if not is_dir(root):
    raise ValueError(f"`path`: no quantized checkpoint at {os.fspath(path)!r} (no such directory).")
  if not is_file(os.path.join(root, MARKER)):
    raise ValueError(f"`path`: {os.fspath(path)!r} is not a jlora quantized checkpoint (no {MARKER}). Write one with "
                     "jlora.save_quantized.")
  return read_newest(root, lambda version: _load_version(root, version, shardings), "load_quantized",
                     "quantized checkpoint", marker=MARKER)
