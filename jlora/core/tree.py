"""Param-tree utilities: walking module dicts, trainable masks, labels, split and combine.

jlora trees are plain nested dicts (the `'params'` collection of a linen model):
adapter leaves `lora_a` / `lora_b` sit beside the kernel they adapt.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import jax.numpy as jnp

from jlora.core import ops as _ops
from jlora.core import stacks as _stacks
from jlora.core.config import LoraConfig
from jlora.core.targets import (
  KERNEL_KEYS,
  LAYERS_KEY,
  LORA_KEYS,
  MAGNITUDE_KEY,
  Slot,
  is_lora_key,
  is_pair_key,
  is_saved,
  lora_role,
  pair_weight,
)

__all__ = [
    "LORA_KEYS", "KERNEL_KEYS", "Adapter", "adapters", "check_adapters", "module_dicts", "slots",
    "adapted_modules", "check_magnitude", "labels", "trainable_mask", "split", "combine", "get_path", "has_adapters", "flatten",
    "pad_axis", "unflatten",
]

Params = Mapping[str, Any]


def _check_tree(params: Any, name: str = "params") -> None:
  if not isinstance(params, Mapping):
    raise TypeError(
        f"`{name}` must be a nested dict of arrays (the 'params' collection, e.g. variables['params']), "
        f"got {type(params).__name__}."
    )
  if list(params) == ["params"] and isinstance(params["params"], Mapping):
    raise ValueError(
        f"`{name}` looks like a whole variables dict ({{'params': ...}}); pass its 'params' collection, "
        "e.g. model.init(key, x)['params']."
    )


def module_dicts(params: Params, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Mapping]]:
  """Yields `(path, dict)` for every dict in the tree, depth first."""
  yield prefix, params
  for key, value in params.items():
    if isinstance(value, Mapping):
      yield from module_dicts(value, prefix + (str(key),))


def _node_slots(path: tuple[str, ...], node: Mapping) -> Iterator[Slot]:
  weights = {pair_weight(k) for k in node if is_pair_key(k)}
  for weight in sorted(weights, key=lambda w: (w is not None, w or "")):
    slot = Slot(path, weight)
    if not (slot.a_key in node and slot.b_key in node):
      raise ValueError(f"Module {'/'.join(path)!r} has only one of {slot.a_key} / {slot.b_key}; the adapter is "
                       "incomplete.")
    yield slot


def slots(params: Params) -> Iterator[Slot]:
  """Every adapter's `Slot` in a tree (complete or not: an incomplete one raises `ValueError`).

  A slot of a module's main weight has `kernel_name` None (the tree may hold only the adapters); `Slot.resolve`
  names the weight from the module dict that holds it.
  """
  for path, node in module_dicts(params):
    yield from _node_slots(path, node)


def adapted_modules(params: Params) -> Iterator[tuple[tuple[str, ...], Mapping]]:
  """Yields `(path, module dict)` for every module holding adapter leaves."""
  for path, node in module_dicts(params):
    if any(True for _ in _node_slots(path, node)):
      yield path, node


def has_adapters(params: Params) -> bool:
  return any(True for _ in slots(params))


class Adapter(NamedTuple):
  """One adapter of a params tree, read at its `Slot` and checked against its kernel and the config.

  Attributes:
    slot: where it lives, with `kernel_name` resolved (`slot.path` is what `config.rank_for` and PEFT names use).
    kernel: the weight it folds into, `S + kernel_shape` with `S` leading scan axes.
    leaves: `{role: leaf}` as `jlora.core.variants` takes them: `lora_a` (`S + in_shape + (r,)`, or the einsum
      broadcast layout, see `jlora.core.ops`), `lora_b` (`S + (r,) + out_shape`), and for DoRA `lora_magnitude`
      (`_ops.magnitude_shape`).
    rank: `r` for this module (after `rank_pattern`).
    scale: `s` for this module (`alpha / r`, or `alpha / sqrt(r)` with rsLoRA).
    layout: `"concat"` or `"broadcast"` (`nn.Einsum`); see `jlora.core.ops`.
    stack: the number of leading scan axes `len(S)`.
    layers: the layer mask `S` of an adapter of some layers of a scanned stack (`lora_layers`,
      `jlora.core.stacks`), or None (every layer, or no stack).
  """

  slot: Slot
  kernel: Any
  leaves: dict[str, Any]
  rank: int
  scale: float
  layout: str
  stack: int
  layers: Any = None

  @property
  def a(self) -> Any:
    return self.leaves[LORA_KEYS[0]]

  @property
  def b(self) -> Any:
    return self.leaves[LORA_KEYS[1]]

  @property
  def magnitude(self) -> Any:
    """The DoRA magnitude, or None for a plain LoRA adapter."""
    return self.leaves.get(MAGNITUDE_KEY)

  @property
  def groups(self) -> int:
    """A grouped convolution's feature groups (`jlora.core.ops.conv_groups`), 1 for every other adapter."""
    return _ops.conv_groups(self.a.shape, self.b.shape, self.kernel.shape)

  @property
  def b_rank_axis(self) -> int:
    """The axis of `lora_b` that holds the rank (`lora_a`'s is its last)."""
    return self.stack if self.layout == "concat" else self.b.ndim - 1


def pad_axis(x: Any, axis: int, size: int) -> Any:
  """`x` with zeros appended along `axis` up to `size` (an adapter's rank padded: the product is unchanged)."""
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths)


def adapters(params: Params, config: LoraConfig, *, kernels: Params | None = None) -> Iterator[Adapter]:
  """Every adapter in `params`, each checked to fit its kernel with the config's rank for it.

  Args:
    params: a tree holding `lora_a` / `lora_b` leaves (and, unless `kernels` is
      given, the kernels beside them).
    config: the config the adapters were made with.
    kernels: a tree to read the kernels from instead (e.g. a merged tree, when
      `params` is only the trainable half).

  Raises:
    ValueError: an adapter is incomplete, has no kernel to fold into, or does not
      fit its kernel or the config's rank (the message names the module).
  """
  for slot in slots(params):
    node = get_path(params, slot.module)
    holder = node
    if kernels is not None:
      try:
        holder = get_path(kernels, slot.module)
      except (KeyError, TypeError):
        raise ValueError(f"There is no module {'/'.join(slot.module)!r} for the adapter found there.") from None
    slot = slot.resolve(holder)
    if slot.kernel_name not in holder:
      raise ValueError(
          f"Module {'/'.join(slot.module)!r} holds {slot.a_key} / {slot.b_key} but no weight {slot.kernel_name!r} "
          "to adapt; pass the whole params tree (base and adapters), e.g. jlora.combine(trainable, frozen)."
      )
    kernel, a, b = holder[slot.kernel_name], node[slot.a_key], node[slot.b_key]
    rank = config.rank_for(slot.where)
    _ops.check_adapter(slot.where, kernel.shape, a.shape, b.shape, rank)
    layout, stack = _ops.layout(a.shape, b.shape, kernel.shape)
    magnitude = node.get(slot.m_key)
    check_magnitude(slot.where, config, magnitude, _ops.magnitude_shape(a.shape, b.shape, kernel.shape))
    leaves = {LORA_KEYS[0]: a, LORA_KEYS[1]: b} | ({} if magnitude is None else {MAGNITUDE_KEY: magnitude})
    mask = node.get(slot.key(LAYERS_KEY))
    if mask is not None:
      _stacks.check(slot.where, slot.path, mask, kernel.shape, config)
    yield Adapter(slot, kernel, leaves, rank, config.scale_for(slot.where), layout, stack, mask)


def check_magnitude(where: str, config: LoraConfig, magnitude: Any, shape: tuple[int, ...]) -> None:
  """Raises unless a DoRA magnitude is there exactly when `config.use_dora`, with the shape its kernel gives."""
  if config.use_dora and magnitude is None:
    raise ValueError(f"The config has use_dora=True but the adapter at {where!r} has no DoRA magnitude "
                     "(lora_magnitude leaf); pass the config the adapter was made with, or the whole adapter.")
  if not config.use_dora and magnitude is not None:
    raise ValueError(f"The adapter at {where!r} is a DoRA adapter (it has a lora_magnitude leaf) but the config has "
                     "use_dora=False; pass the config it was made with.")
  if magnitude is not None and tuple(magnitude.shape) != shape:
    raise ValueError(f"The DoRA magnitude at {where!r} has shape {tuple(magnitude.shape)}; its kernel needs {shape}.")


def check_adapters(params: Params, config: LoraConfig) -> None:
  """Raises (as `adapters` does) unless every adapter in `params` fits its kernel with the config's rank."""
  for _ in adapters(params, config):
    pass


def flatten(tree: Params, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  """`{path: leaf}` of a nested dict, depth first."""
  out: dict[tuple[str, ...], Any] = {}
  for key, value in tree.items():
    path = (*prefix, str(key))
    if isinstance(value, Mapping):
      out.update(flatten(value, path))
    else:
      out[path] = value
  return out


def unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
  """The inverse of `flatten`."""
  out: dict = {}
  for path, value in flat.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return out


def get_path(tree: Params, path: tuple[str, ...]) -> Any:
  """The node at `path`; a path component also finds a key whose `str()` it is (NNX's integer keys)."""
  node: Any = tree
  for key in path:
    if key not in node and isinstance(node, Mapping):
      key = next((k for k in node if str(k) == key), key)
    node = node[key]
  return node


def _map_with_path(fn: Callable[[tuple[str, ...], Any, Mapping], Any], tree: Params, prefix=()) -> dict:
  out = {}
  for key, value in tree.items():
    path = prefix + (str(key),)
    out[key] = _map_with_path(fn, value, path) if isinstance(value, Mapping) else fn(path, value, tree)
  return out


def _label(config: LoraConfig, path: tuple[str, ...], siblings: Mapping) -> str:
  name = path[-1]
  if is_lora_key(name):
    return lora_role(name)
  if is_saved(config, path[:-1]):
    return "saved"
  if name == "bias" and (config.bias == "all" or (config.bias == "lora_only" and any(map(is_lora_key, siblings)))):
    return "bias"
  return "frozen"


def labels(params: Params, config: LoraConfig) -> dict:
  """Per-leaf labels for `optax.partition`: `lora_a`, `lora_b`, `lora_magnitude` (DoRA), `trainable_tokens`
  (`trainable_token_indices`), `bias`, `saved`, `lora_layers` or `frozen`.

  `lora_layers` marks the layer mask of an adapter of some layers of a scanned stack (`layers_to_transform` over
  `nn.scan`, `jlora.core.stacks`): part of the adapter, never trained; give it `optax.set_to_zero()`.

  `bias` marks biases that train under `config.bias`; `saved` marks every leaf of
  a `modules_to_save` module. Works on a whole tree or on any part of it (such as
  the trainable half of `split`).

  Example (LoRA+: B learns 16× faster than A)::

      tx = optax.partition(
          {"lora_a": optax.adamw(1e-4), "lora_b": optax.adamw(16e-4), "bias": optax.adamw(1e-4),
           "saved": optax.adamw(1e-4), "frozen": optax.set_to_zero()},
          jlora.labels(params, config))
  """
  _check_tree(params)
  return _map_with_path(lambda path, _, siblings: _label(config, path, siblings), params)


def trainable_mask(params: Params, config: LoraConfig) -> dict:
  """A bool tree, `True` where a leaf trains: adapters, trainable tokens, biases per `bias`, `modules_to_save` (not a
  scanned stack's layer mask, `lora_layers`, which `split` keeps with the adapter)."""
  _check_tree(params)
  return _map_with_path(lambda path, _, siblings: _label(config, path, siblings) not in ("frozen", LAYERS_KEY), params)


def _partition(params: Params, mask: Mapping) -> tuple[dict, dict]:
  keep, rest = {}, {}
  for key, value in params.items():
    if isinstance(value, Mapping):
      k, r = _partition(value, mask[key])
      if k:
        keep[key] = k
      if r:
        rest[key] = r
    elif mask[key]:
      keep[key] = value
    else:
      rest[key] = value
  return keep, rest


def split(params: Params, config: LoraConfig) -> tuple[dict, dict]:
  """Splits a tree into `(trainable, frozen)` nested dicts holding only their own leaves.

  `trainable` is the small tree that a task's adapter is (A, B, trained biases,
  saved modules, and the layer mask of a scanned stack under `layers_to_transform`,
  `lora_layers`: its gradient is zero and `jlora.optimizer` keeps it bit-identical);
  differentiate and optimize only it, and keep `frozen` (the
  base) out of the optimizer. `combine(trainable, frozen)` restores the tree.
  Pass `frozen` to a jitted step as an argument, `step(trainable, frozen, batch)`:
  a jitted function that closes over it compiles the whole base in as constants.
  """
  _check_tree(params)
  return _partition(params, _map_with_path(lambda path, _, siblings: _label(config, path, siblings) != "frozen", params))


def combine(*trees: Params) -> dict:
  """Merges nested dicts with disjoint leaves (the inverse of `split`).

  Raises:
    ValueError: two trees hold a leaf at the same path, or a path is a leaf in
      one and a module in another.
  """
  out: dict = {}
  for i, tree in enumerate(trees):
    _check_tree(tree, f"trees[{i}]")
    _merge_into(out, tree, ())
  return out


def _merge_into(out: dict, tree: Params, prefix: tuple[str, ...]) -> None:
  for key, value in tree.items():
    path = prefix + (str(key),)
    if isinstance(value, Mapping):
      existing = out.setdefault(key, {})
      if not isinstance(existing, dict):
        raise ValueError(f"combine: {'/'.join(path)!r} is a leaf in one tree and a module in another.")
      _merge_into(existing, value, path)
    elif key in out:
      raise ValueError(
          f"combine: both trees hold a leaf at {'/'.join(path)!r}; combine takes disjoint trees, e.g. "
          "the two halves of jlora.split."
      )
    else:
      out[key] = value
