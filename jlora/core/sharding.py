"""The sharding rule of adapters, and flax's partitioning boxes around a param tree.

Adapters inherit the partitioning of the kernel they adapt, axis by axis:

* concat layout (`Dense`, `DenseGeneral`, `Conv`, `Embed`; `S` leading scan axes):
  `A: S + in_shape + (r,)` takes the kernel's stack- and input-axis specs,
  `B: S + (r,) + out_shape` its stack- and output-axis specs;
* broadcast layout (`Einsum`): `A` and `B` have the kernel's rank, and keep the
  spec of every axis whose size they share with the kernel (size-1 axes are
  replicated);
* a DoRA magnitude keeps the specs of the axes it shares with the kernel;
* trainable tokens `(n_ids, dim)` keep the spec of their table's `dim` axis, rows replicated;
* the rank axis `r` is replicated (`rank_axis=None`), or named (`'lora_rank'`
  for logical partitioning), so the gradient of a data-parallel step is
  adapter-sized and a tensor-parallel layer needs no gather of its adapter;
  a mesh axis named as `rank_axis` (e.g. `'fsdp'`) splits the rank axis only
  of the leaves that do not use that mesh axis already, and only where it
  divides the rank: under FSDP every adapter leaf is then split over `fsdp`
  (ZeRO-style), `A` along its kernel's input axis and `B` along its rank, or
  the other way round, where the kernel's input axis is the unsplit one.

The rule is a function of shapes and per-axis specs only, so it serves concrete
arrays (`NamedSharding`), abstract ones (`jax.ShapeDtypeStruct` with a
sharding, for the `out_shardings` of a user's jitted init), `PartitionSpec`
trees, and the logical names of flax's `nn.Partitioned` /
`nn.LogicallyPartitioned` boxes alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import NamedSharding, PartitionSpec

from jlora.core import ops as _ops
from jlora.core.targets import LAYERS_KEY, is_tokens_key, kernel_key, tokens_weight
from jlora.core.tree import Params, _check_tree, flatten, get_path, module_dicts, slots, unflatten

__all__ = ["LOGICAL_RANK", "adapter_axes", "adapter_shardings", "adapter_specs", "box", "partition_spec", "unbox"]

Path = tuple[str, ...]
LOGICAL_RANK = "lora_rank"  # the logical name of the rank axis of boxed adapters (replicated unless a rule maps it)


def adapter_axes(kernel_axes: Sequence[Any], kernel_shape: Sequence[int], shape: Sequence[int], role: str,
                 other_shape: Sequence[int] = (), *, rank_axis: Any = None) -> tuple:
  """The per-axis specs of one adapter leaf, from its kernel's.

  Args:
    kernel_axes: the kernel's spec entries (mesh axes, logical names or None),
      one per axis (missing trailing entries are None).
    kernel_shape: the kernel's shape (with its stack axes).
    shape: the leaf's shape.
    role: `'a'`, `'b'`, `'magnitude'`, `'tokens'` or `'layers'` (a scanned stack's layer mask).
    other_shape: the shape of the pair's other leaf (`B` for `A`, `A` for `B`).
    rank_axis: the spec of the rank axis.

  Returns:
    A tuple with one entry per axis of the leaf.
  """
  k_shape, shape = tuple(kernel_shape), tuple(shape)
  spec = tuple(kernel_axes) + (None,) * (len(k_shape) - len(tuple(kernel_axes)))
  if role == "magnitude":
    return tuple(p if shape[i] == k_shape[i] else None for i, p in enumerate(spec))
  if role == "tokens":
    return (None, *spec[1:])
  if role == "layers":  # a scanned stack's layer mask: its kernel's stack axes
    return spec[:len(shape)]
  a_shape, b_shape = (shape, tuple(other_shape)) if role == "a" else (tuple(other_shape), shape)
  form, s = _ops.layout(a_shape, b_shape, k_shape)
  if form == "broadcast":
    kept = tuple(p if shape[i] == k_shape[i] else None for i, p in enumerate(spec))
    return kept + (_free(rank_axis, kept),)
  n_in = len(a_shape) - 1 - s
  if role == "a":
    return spec[: s + n_in] + (_free(rank_axis, spec[: s + n_in]),)
  return spec[:s] + (_free(rank_axis, spec[:s] + spec[s + n_in:]),) + spec[s + n_in:]


def _names(entry: Any) -> tuple:
  """The mesh axes (or logical names) of one spec entry: None, a name, or a tuple of names."""
  return () if entry is None else tuple(entry) if isinstance(entry, tuple | list) else (entry,)


def _free(rank_axis: Any, others: Sequence[Any]) -> Any:
  """`rank_axis`, unless a name of it is used by another axis of the leaf (an axis may appear once in a spec)."""
  used = {name for entry in others for name in _names(entry)}
  return None if used & set(_names(rank_axis)) else rank_axis


def _divisible(spec: Sequence[Any], shape: Sequence[int], mesh: Any) -> tuple:
  """`spec` with every entry whose mesh axes do not divide that dimension replicated (None)."""
  sizes = dict(mesh.shape)
  return tuple(e if shape[i] % math.prod(sizes.get(n, 1) for n in _names(e)) == 0 else None for i, e in enumerate(spec))


def _adapter_leaves(params: Params) -> dict[Path, tuple[Path, str, Path]]:
  """`{adapter leaf path: (kernel path, role, other leaf path)}` of every adapter leaf in a tree."""
  out = {}
  for slot in slots(params):
    node = get_path(params, slot.module)
    slot = slot.resolve(node)
    kernel, a, b = (*slot.module, slot.kernel_name), slot.leaf("lora_a"), slot.leaf("lora_b")
    out[a], out[b] = (kernel, "a", b), (kernel, "b", a)
    if slot.m_key in node:
      out[slot.leaf("lora_magnitude")] = (kernel, "magnitude", ())
    if slot.key(LAYERS_KEY) in node:
      out[slot.leaf(LAYERS_KEY)] = (kernel, "layers", ())
  for module, node in module_dicts(params):
    for key in [k for k in node if is_tokens_key(k)]:
      out[(*module, key)] = ((*module, tokens_weight(key) or kernel_key(module, node)), "tokens", ())
  return out


def adapter_specs(params: Params, kernel_specs: Callable[[Path], Any], *, rank_axis: Any = None) -> dict[Path, tuple]:
  """`{adapter leaf path: per-axis specs}` for every adapter leaf of `params`.

  Args:
    params: a tree with adapters (leaves with `.shape`).
    kernel_specs: `kernel path -> the kernel's per-axis specs` (a tuple), or None
      when the kernel has no spec (its adapters are left out).
    rank_axis: the spec of the rank axis.
  """
  flat = flatten(params)
  out = {}
  for path, (kernel, role, other) in _adapter_leaves(params).items():
    axes = kernel_specs(kernel)
    if axes is not None:
      out[path] = adapter_axes(axes, flat[kernel].shape, flat[path].shape, role, flat[other].shape if other else (),
                               rank_axis=rank_axis)
  return out


def partition_spec(axes: Sequence[Any]) -> PartitionSpec:
  """`PartitionSpec(*axes)` less its trailing None entries: the form in which jitted functions return shardings, so
  that a step fed its own outputs sees the same spec and does not compile again."""
  axes = list(axes)
  while axes and axes[-1] is None:
    axes.pop()
  return PartitionSpec(*axes)


def _specs_of(sharding: Any) -> tuple | None:
  if isinstance(sharding, NamedSharding):
    return tuple(sharding.spec)
  if isinstance(sharding, PartitionSpec):
    return tuple(sharding)
  return None


def _lookup(tree: Any, path: Path) -> Any:
  for key in path:
    if not isinstance(tree, Mapping) or key not in tree:
      return None
    tree = tree[key]
  return tree


def adapter_shardings(params: Params, shardings: Params | None = None, *, rank_axis: Any = None) -> dict:
  """The sharding of every leaf of a param tree with adapters, adapters placed by the rule.

  Use it to place adapters yourself, or to build the `out_shardings` of your
  own jitted init (`jlora.init` on a base of `NamedSharding` arrays already
  creates each adapter on its devices by this rule):

      abstract = jax.eval_shape(lambda p: jlora.init(key, model, p, config, x), base)
      out = jlora.adapter_shardings(abstract, base_shardings)
      params = jax.jit(lambda p: jlora.init(key, model, p, config, x), out_shardings=out)(base)

  Args:
    params: a nested dict holding adapters (`lora_a`/`lora_b` leaves beside
      their kernels): arrays or `jax.ShapeDtypeStruct`s.
    shardings: the base's shardings: a tree shaped like `params` (its adapter
      entries may be absent) whose leaves are `jax.sharding.Sharding`s or
      `PartitionSpec`s. None: each leaf's own `.sharding`.
    rank_axis: the spec of the rank axis (None: replicated); a mesh axis (e.g.
      `'fsdp'`) splits the rank of the leaves that do not use it already, where
      it divides the rank (ZeRO-style adapters under FSDP; `jlora train` does so).

  Returns:
    A tree shaped like `params`: base leaves keep their sharding; each adapter
    leaf gets its kernel's `NamedSharding` mesh with the rule's spec (or a
    `PartitionSpec` where the kernel has one; a kernel on one device, or fully
    replicated by a non-named sharding, gives its adapters that same sharding).

  Raises:
    TypeError: `params` is not a nested dict, or a sharding is neither a
      `Sharding` nor a `PartitionSpec`.
    ValueError: a leaf has no sharding (an array without `.sharding` and no
      entry in `shardings`).
  """
  _check_tree(params)
  flat = flatten(params)
  adapters = _adapter_leaves(params)

  def given(path: Path) -> Any:
    value = getattr(flat[path], "sharding", None) if shardings is None else _lookup(shardings, path)
    if value is None:
      source = "it has no `.sharding`" if shardings is None else "`shardings` has no entry for it"
      raise ValueError(f"adapter_shardings: no sharding for {'/'.join(path)!r} ({source}). Pass `shardings`, a tree "
                       "of the base's shardings (e.g. from nn.logical_to_mesh_sharding), or place the base first.")
    if not isinstance(value, (jax.sharding.Sharding, PartitionSpec)):
      raise TypeError(f"`shardings` at {'/'.join(path)!r} must be a jax.sharding.Sharding or PartitionSpec, got "
                      f"{type(value).__name__}.")
    return value

  specs = adapter_specs(params, lambda kernel: _specs_of(given(kernel)) or (), rank_axis=rank_axis)
  out = {}
  for path in flat:
    if path not in adapters:
      out[path] = given(path)
      continue
    kernel = given(adapters[path][0])
    if isinstance(kernel, NamedSharding):
      out[path] = NamedSharding(kernel.mesh, partition_spec(_divisible(specs[path], flat[path].shape, kernel.mesh)))
    elif isinstance(kernel, PartitionSpec):
      out[path] = partition_spec(specs[path])
    else:
      out[path] = kernel
  return unflatten(out)


# ----------------------------------------------------------------- flax partitioning boxes
def unbox(params: Params) -> tuple[Params, dict[Path, nn.Partitioned]]:
  """`(params without nn.Partitioned boxes, {path: box})`; other leaves (a `QuantizedArray`) are kept."""
  flat = flatten(params)
  boxes = {p: v for p, v in flat.items() if isinstance(v, nn.Partitioned)}
  if not boxes:
    return params, {}
  return unflatten({p: boxes[p].unbox() if p in boxes else v for p, v in flat.items()}), boxes


def box(params: Params, boxes: Mapping[Path, nn.Partitioned]) -> Params:
  """Puts the boxes of `unbox` back, and boxes each adapter leaf like its kernel (names by the rule).

  Leaves whose path held a box get it back around their (possibly new) value;
  adapter leaves of a boxed kernel get a box of the kernel's class, mesh and
  rules, with the rule's names and a rank axis named `'lora_rank'`
  (`LogicallyPartitioned`) or None (`Partitioned`, whose names are mesh axes).
  """
  if not boxes:
    return params
  flat = flatten(params)
  out = {p: boxes[p].replace_boxed(v) if p in boxes else v for p, v in flat.items()}
  kernels = {path: kernel for path, (kernel, _, _) in _adapter_leaves(params).items()}
  for kind, rank in ((nn.LogicallyPartitioned, LOGICAL_RANK), (nn.Partitioned, None)):
    names = {p: b.names for p, b in boxes.items() if type(b) is kind}
    for path, axes in adapter_specs(params, names.get, rank_axis=rank).items():
      out[path] = boxes[kernels[path]].replace(value=flat[path], names=axes)
  return unflatten(out)
