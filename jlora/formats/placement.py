"""Where restored adapter leaves go: the shardings `load_adapter` restores into.

By default an adapter follows its kernel's `NamedSharding` (`A: in_shape + (r,)`
keeps the kernel's input- and stack-axis specs, `B: (r,) + out_shape` its
output-axis specs, `r` replicated), and a bias or `modules_to_save` leaf the
sharding of the base leaf it replaces, so that arrays are restored straight
into their shards.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from jlora.core.sharding import adapter_axes, partition_spec
from jlora.core.targets import Slot, is_pair_key, pair_weight
from jlora.core.tree import Params, get_path, unflatten

__all__ = ["Shardings", "default_sharding", "abstract_tree"]

Path = tuple[str, ...]
Shardings = jax.sharding.Sharding | Mapping[str, Any] | None


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


def default_sharding(path: Path, shapes: Mapping[Path, tuple], base: Params) -> jax.sharding.Sharding:
  """Where a restored leaf goes when no sharding is given.

  Adapters inherit the partitioning of their kernel (a `NamedSharding`): `A` keeps
  the kernel's input-axis (and stack-axis) specs and replicates `r`; `B`
  replicates `r` and keeps the output-axis specs. A bias or `modules_to_save`
  leaf takes the sharding of the base leaf it replaces. Anything else goes to
  the kernel's device, or the default device.

  Args:
    path: the restored leaf's path, e.g. `('fc_0', 'lora_a')`.
    shapes: `{path: shape}` of every restored leaf.
    base: the base params (nested dict).
  """
  try:
    node = get_path(base, path[:-1])
  except (KeyError, TypeError):
    node = {}
  leaf = path[-1]
  if not is_pair_key(leaf):  # a DoRA magnitude is small: placed like any other leaf
    return _device_sharding(node.get(leaf) if isinstance(node, Mapping) else None)
  slot = Slot(path[:-1], pair_weight(leaf))
  is_a = leaf == slot.a_key
  try:
    kernel = node[slot.resolve(node).kernel_name]
  except (ValueError, TypeError, KeyError, AttributeError):
    return _device_sharding(None)
  sharding = getattr(kernel, "sharding", None)
  if not isinstance(sharding, NamedSharding):
    return _device_sharding(kernel)
  own, other = shapes[slot.leaf("lora_a")], shapes[slot.leaf("lora_b")]
  if not is_a:
    own, other = other, own
  out = adapter_axes(sharding.spec, kernel.shape, own, "a" if is_a else "b", other)
  return NamedSharding(sharding.mesh, partition_spec(out))


def abstract_tree(specs: Mapping[Path, tuple[tuple[int, ...], str]], base: Params, shardings: Shardings) -> dict:
  """The `jax.ShapeDtypeStruct` tree (with shardings) to restore `{path: (shape, dtype)}` into.

  Args:
    specs: shape and dtype name of each leaf to restore.
    base: the base params (nested dict) the leaves go onto.
    shardings: one `Sharding` for all leaves, a nested dict of them shaped like
      the restored tree (missing entries use `default_sharding`), or None.

  Raises:
    TypeError: an entry of `shardings` is not a `jax.sharding.Sharding`.
    ValueError: a sharding does not divide its leaf's shape.
  """
  shapes = {p: tuple(shape) for p, (shape, _) in specs.items()}
  out = {}
  for p, (shape, dtype) in specs.items():
    if isinstance(shardings, jax.sharding.Sharding):
      sharding = shardings
    else:
      node: Any = shardings
      for key in p:
        node = node.get(key) if isinstance(node, Mapping) else None
      sharding = _as_sharding(node, "/".join(p)) if node is not None else default_sharding(p, shapes, base)
    try:
      sharding.shard_shape(tuple(shape))
    except ValueError as e:
      raise ValueError(f"`shardings`: the sharding for {'/'.join(p)!r} does not fit its shape {tuple(shape)}: {e}") \
          from None
    out[p] = jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype), sharding=sharding)
  return unflatten(out)
