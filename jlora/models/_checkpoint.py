"""Hugging Face checkpoint I/O and layout conversion, shared by every model.

A model describes its Hugging Face layout with an :class:`HFSpec`; the functions here turn
a Flax `'params'` tree into Hugging Face tensor names and back. The rule is mechanical:
the Flax path `transformer/h_0/attn/c_attn/kernel` is the tensor
`transformer.h.0.attn.c_attn.weight`. Linear kernels are transposed (torch stores
`(out, in)`, Flax `(in, out)`) except for GPT-2's `Conv1D` layers. Stacked expert weights
(`HFSpec.raw_leaves`) keep their own name (`mlp.experts.gate_up_proj`, no `.weight`) and swap
their last two axes (torch `(E, out, in)`, Flax `(E, in, out)`); a leaf named `weight` is kept
in torch's layout on both sides (Mixtral's router). A scanned stack
(`layers` with a leading axis `L`) maps to `layers.0` … `layers.{L-1}`.
Safetensors are read with `safetensors.numpy` (no torch, no pickle).
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from jlora.core.tree import flatten, unflatten
from jlora.formats.peft.torch_names import NameMap

__all__ = ["HFSpec", "from_hf_tensors", "module_name", "name_map", "read_config", "read_safetensors", "to_hf_tensors"]

_LEAF_NAMES = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias", "weight": "weight"}


class HFSpec(NamedTuple):
  """How one model's Flax params map to Hugging Face tensor names.

  Attributes:
    base_prefix: prefix of the base model in task checkpoints, e.g. `"transformer."`;
      checkpoints saved without it (`GPT2Model` instead of `GPT2LMHeadModel`) load too.
    list_names: module names that are lists of layers (`h` for `h_0` -> `h.0`).
    scan_name: the module holding a scanned stack of layers (`layers`), or None.
    no_transpose: module names whose kernels are already `(in, out)` (GPT-2 Conv1D).
    ignore: regexes of checkpoint tensors that are not parameters (buffers, tied copies,
      heads of other tasks) and are skipped.
    new_head: regexes of Flax paths (`/`-joined) that may be missing from the checkpoint
      and are then freshly initialized if a `key` is given (a new task head).
    head_hint: added to the error for missing `new_head` params without a `key` (another way out).
    raw_leaves: leaf names of parameters named as themselves (`module.leaf`, no `.weight`): stacked
      expert weights, `(E, in, out)` in Flax and `(E, out, in)` in torch (Mixtral's
      `experts.gate_up_proj`).
    param_order: the PyTorch modules' order of those parameters (`NameMap.param_order`: PEFT nests the
      wrappers of a module's target parameters in it; Flax param dicts come sorted by name).
    read: converts the tensors of a checkpoint saved in another layout to the names above (Mixtral's
      per-expert `block_sparse_moe.experts.{j}.w1.weight`), or None; applied before loading.
    write: converts the tensors of :func:`to_hf_tensors` to the layout `save_pretrained` writes (what
      `transformers`' `save_pretrained` writes), or None.
  """

  base_prefix: str = ""
  list_names: tuple[str, ...] = ()
  scan_name: str | None = None
  no_transpose: tuple[str, ...] = ()
  ignore: tuple[str, ...] = ()
  new_head: tuple[str, ...] = ()
  head_hint: str = ""
  raw_leaves: tuple[str, ...] = ()
  param_order: tuple[str, ...] = ()
  read: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]] | None = None
  write: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]] | None = None


def read_config(path: str | os.PathLike) -> dict[str, Any]:
  """Reads `config.json` of a local checkpoint directory.

  Raises:
    ValueError: if the directory or its `config.json` does not exist.
  """
  path = os.fspath(path)
  file = os.path.join(path, "config.json")
  if not os.path.isdir(path):
    raise ValueError(
      f"Checkpoint directory `{path}` does not exist; pass a local directory "
      "holding config.json and model.safetensors (nothing is downloaded)."
    )
  if not os.path.isfile(file):
    raise ValueError(
      f"`{path}` has no config.json; a Hugging Face checkpoint directory needs config.json next to model.safetensors."
    )
  with open(file) as f:
    return json.load(f)


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads all tensors of a checkpoint directory as numpy arrays.

  Reads `model.safetensors` or, when sharded, every file named in
  `model.safetensors.index.json`.

  Raises:
    ValueError: if there is no safetensors file, or the index names missing shards.
  """
  path = os.fspath(path)
  single = os.path.join(path, "model.safetensors")
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(single):
    return dict(safetensors.numpy.load_file(single))
  if not os.path.isfile(index):
    raise ValueError(
      f"`{path}` has neither model.safetensors nor model.safetensors.index.json. Only "
      "safetensors checkpoints are read (never pickle .bin files); convert with "
      "`transformers` (`model.save_pretrained(dir, safe_serialization=True)`)."
    )
  with open(index) as f:
    weight_map: dict[str, str] = json.load(f)["weight_map"]
  shards = sorted(set(weight_map.values()))
  missing = [s for s in shards if not os.path.isfile(os.path.join(path, s))]
  if missing:
    raise ValueError(
      f"model.safetensors.index.json in `{path}` names shard files that do not "
      f"exist: {missing}; download all shards into the same directory."
    )
  tensors: dict[str, np.ndarray] = {}
  for shard in shards:
    tensors.update(safetensors.numpy.load_file(os.path.join(path, shard)))
  absent = sorted(set(weight_map) - set(tensors))
  if absent:
    raise ValueError(
      f"Tensors listed in model.safetensors.index.json are in none of the "
      f"shards: {_few(absent)}; the shards and the index do not match."
    )
  return tensors


def _few(names: list[str], n: int = 8) -> str:
  more = f" … and {len(names) - n} more" if len(names) > n else ""
  return ", ".join(names[:n]) + more


def module_name(module: tuple[str, ...], spec: HFSpec) -> str:
  """The Hugging Face name of a Flax module path: `h_0` -> `h.0`; a scanned stack gets `{i}` for its layer."""
  parts: list[str] = []
  for p in module:
    m = re.fullmatch(r"(.+)_(\d+)", p)
    if m and m.group(1) in spec.list_names:
      parts += [m.group(1), m.group(2)]
    elif p == spec.scan_name:
      parts += [p, "{i}"]
    else:
      parts.append(p)
  return ".".join(parts)


def name_map(spec: HFSpec) -> NameMap:
  """The model's PEFT name map (`jlora.formats.peft.torch_names`): module names as in `transformers`, Conv1D layers noted."""
  return NameMap(functools.partial(module_name, spec=spec), frozenset(spec.no_transpose), spec.param_order)


def _hf_name(path: tuple[str, ...], spec: HFSpec) -> tuple[str, bool, bool]:
  """(name, transpose, stacked) for a Flax leaf path; name has `{i}` when stacked; transpose swaps the last two axes."""
  leaf = path[-1]
  module = module_name(path[:-1], spec)
  if leaf in spec.raw_leaves:
    return f"{module}.{leaf}", True, "{i}" in module
  if leaf not in _LEAF_NAMES:
    raise ValueError(f"Cannot map parameter `{'/'.join(path)}` to a Hugging Face name.")
  transpose = leaf == "kernel" and path[-2] not in spec.no_transpose
  return ".".join([module, _LEAF_NAMES[leaf]]) if module else _LEAF_NAMES[leaf], transpose, "{i}" in module


def _swap(a: np.ndarray) -> np.ndarray:
  """`a` with its last two axes swapped: torch `(..., out, in)` <-> Flax `(..., in, out)`."""
  return np.swapaxes(a, -1, -2)


def _strip(name: str, prefix: str) -> str:
  return name[len(prefix) :] if prefix and name.startswith(prefix) else name


def to_hf_tensors(params: Mapping, spec: HFSpec) -> dict[str, np.ndarray]:
  """Converts a Flax `'params'` tree to Hugging Face tensor names and layouts.

  Leaves that are not base parameters (e.g. LoRA `lora_a`/`lora_b`) are skipped.

  Args:
    params: the `'params'` collection of a jlora reference model.
    spec: the model's :class:`HFSpec`.

  Returns:
    `{hf_name: np.ndarray}` with torch layouts (linear weights `(out, in)`).
  """
  out = {}
  for path, leaf in flatten(params).items():
    if path[-1] not in _LEAF_NAMES and path[-1] not in spec.raw_leaves:
      continue
    name, transpose, stacked = _hf_name(path, spec)
    arr = np.asarray(jax.device_get(leaf))
    layers = list(enumerate(arr)) if stacked else [(None, arr)]
    for i, a in layers:
      out[name.format(i=i) if stacked else name] = np.ascontiguousarray(_swap(a) if transpose else a)
  return out


def _canonical(tensors: Mapping[str, np.ndarray], spec: HFSpec) -> dict[str, str]:
  """Maps canonical names (base prefix stripped, LayerNorm gamma/beta renamed) to given names."""
  out = {}
  for name in tensors:
    canon = _strip(name, spec.base_prefix)
    canon = re.sub(r"(LayerNorm|layer_norm|ln_\w+)\.gamma$", r"\1.weight", canon)
    canon = re.sub(r"(LayerNorm|layer_norm|ln_\w+)\.beta$", r"\1.bias", canon)
    out[canon] = name
  return out


def _place(arrays: list[np.ndarray], stacked: bool, dtype: Any, sharding: jax.sharding.Sharding | None) -> jax.Array:
  """One parameter on device: `arrays` (one per layer when `stacked`) stacked, cast to `dtype`, placed.

  With a `sharding`, each device's slice is cut from the host arrays and cast there (stacked
  layers are never stacked in full on the host).
  """
  if sharding is None:
    return jnp.asarray(np.stack(arrays) if stacked else arrays[0], dtype)
  shape = ((len(arrays),) if stacked else ()) + arrays[0].shape

  def piece(index: tuple[slice, ...]) -> np.ndarray:
    if stacked:
      return np.stack([a[index[1:]] for a in arrays[index[0]]]).astype(np.dtype(dtype))
    return np.asarray(arrays[0][index]).astype(np.dtype(dtype))

  return jax.make_array_from_callback(shape, sharding, piece)


def from_hf_tensors(
  tensors: Mapping[str, np.ndarray],
  shapes: Mapping,
  spec: HFSpec,
  *,
  dtype: Any,
  fresh: Mapping | None = None,
  shardings: Mapping | None = None,
) -> dict:
  """Builds a Flax `'params'` tree from Hugging Face tensors, validating every one.

  Args:
    tensors: `{hf_name: array}` as read from the checkpoint.
    shapes: the expected `'params'` tree of `jax.ShapeDtypeStruct` (from `jax.eval_shape`).
    spec: the model's :class:`HFSpec`.
    dtype: dtype of the returned params.
    fresh: optional freshly initialized params, used for missing `spec.new_head` paths.
    shardings: optional tree like `shapes` of `jax.sharding.Sharding`: each tensor is then
      placed with `jax.make_array_from_callback`, every device reading only its own slice of
      the host tensors (no device holds a full copy), instead of `jnp.asarray`.

  Returns:
    The `'params'` tree (nested dict of `jax.Array`).

  Raises:
    ValueError: naming missing, unexpected and mis-shaped tensors.
  """
  if spec.read is not None:
    tensors = spec.read(tensors)
  given = _canonical(tensors, spec)
  fresh_flat = flatten(fresh) if fresh is not None else {}
  shardings_flat = flatten(shardings) if shardings is not None else {}
  used: set[str] = set()
  missing, misshaped, new_heads = [], [], []
  out = {}
  for path, sds in flatten(shapes).items():
    name, transpose, stacked = _hf_name(path, spec)
    full = [name.format(i=i) for i in range(sds.shape[0])] if stacked else [name]
    names = [_strip(n, spec.base_prefix) for n in full]
    absent = [f for f, n in zip(full, names) if n not in given]
    if absent:
      if any(re.fullmatch(p, "/".join(path)) for p in spec.new_head):
        if path in fresh_flat:
          out[path] = jnp.asarray(fresh_flat[path], dtype)
          continue
        new_heads.append("/".join(path))
        continue
      missing += absent
      continue
    arrays = []
    want = tuple(sds.shape[1:] if stacked else sds.shape)
    want_hf = want[:-2] + want[-2:][::-1] if transpose else want
    for n in names:
      used.add(n)
      a = np.asarray(tensors[given[n]])
      if a.shape != want_hf:
        misshaped.append(f"`{given[n]}`: expected {want_hf}, given {a.shape}")
        continue
      arrays.append(_swap(a) if transpose else a)
    if len(arrays) == len(names):
      out[path] = _place(arrays, stacked, dtype, shardings_flat.get(path))
  unexpected = sorted(given[n] for n in set(given) - used if not any(re.fullmatch(p, n) for p in spec.ignore))
  problems = []
  if missing:
    problems.append(f"missing tensors: {_few(sorted(missing))}")
  if new_heads:
    problems.append(
      f"missing head parameters: {_few(new_heads)} (the checkpoint has no weights "
      f"for this task head; pass `key=jax.random.key(0)` to initialize it{spec.head_hint})"
    )
  if misshaped:
    problems.append(f"tensors with the wrong shape: {_few(misshaped)}")
  if unexpected:
    problems.append(f"unexpected tensors: {_few(unexpected)}")
  if problems:
    raise ValueError(
      "The checkpoint does not match the model built from its config.json: "
      + "; ".join(problems)
      + ". Check that config.json belongs to these weights (sizes, layer count, "
      "model_type, task head)."
    )
  return unflatten(out)
