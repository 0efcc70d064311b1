"""Param-tree utilities: walking module dicts, trainable masks, labels, split and combine.

jlora trees are plain nested dicts (the `'params'` collection of a linen model):
adapter leaves `lora_a` / `lora_b` sit beside the kernel they adapt.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

from jlora import _ops
from jlora._config import LoraConfig
from jlora._targets import is_saved

__all__ = [
    "LORA_KEYS", "KERNEL_KEYS", "Adapter", "adapters", "check_adapters", "module_dicts", "adapted_modules", "labels",
    "trainable_mask", "split", "combine", "get_path", "has_adapters", "flatten", "unflatten",
]

LORA_KEYS = ("lora_a", "lora_b")
# Names of the weight an adapter folds into, in order of preference (Flax, Haiku, Equinox/PyTorch-style trees).
KERNEL_KEYS = ("kernel", "embedding", "w", "weight")

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


def adapted_modules(params: Params) -> Iterator[tuple[tuple[str, ...], Mapping]]:
  """Yields `(path, module dict)` for every module holding `lora_a` and `lora_b`."""
  for path, node in module_dicts(params):
    if "lora_a" in node or "lora_b" in node:
      if not ("lora_a" in node and "lora_b" in node):
        raise ValueError(f"Module {'/'.join(path)!r} has only one of lora_a / lora_b; the adapter is incomplete.")
      yield path, node


def has_adapters(params: Params) -> bool:
  return any(True for _ in adapted_modules(params))


def kernel_key(path: tuple[str, ...], node: Mapping) -> str:
  """The name of the weight an adapter folds into: a `KERNEL_KEYS` name, else the module's only matrix."""
  for key in KERNEL_KEYS:
    if key in node:
      return key
  matrices = [k for k, v in node.items() if k not in LORA_KEYS and getattr(v, "ndim", 0) >= 2]
  if len(matrices) == 1:
    return matrices[0]
  raise ValueError(
      f"Module {'/'.join(path)!r} holds lora_a/lora_b but no single weight ({', '.join(KERNEL_KEYS)}) to adapt; "
      "pass the whole params tree (base and adapters), e.g. jlora.combine(trainable, frozen)."
  )


class Adapter(NamedTuple):
  """One adapter of a params tree, checked against its kernel and the config.

  Attributes:
    path: the module path, e.g. `('layers_0', 'attn', 'query')`.
    kernel_name: the weight it folds into (`kernel`, `embedding`, ...).
    kernel: that weight, `S + kernel_shape` with `S` leading scan axes.
    a: `lora_a`, `S + in_shape + (r,)` (or the einsum broadcast layout, see `jlora._ops`).
    b: `lora_b`, `S + (r,) + out_shape`.
    rank: `r` for this module (after `rank_pattern`).
    scale: `s` for this module (`alpha / r`, or `alpha / sqrt(r)` with rsLoRA).
    layout: `"concat"` or `"broadcast"` (`nn.Einsum`); see `jlora._ops`.
    stack: the number of leading scan axes `len(S)`.
  """

  path: tuple[str, ...]
  kernel_name: str
  kernel: Any
  a: Any
  b: Any
  rank: int
  scale: float
  layout: str
  stack: int

  @property
  def where(self) -> str:
    """The module path as `a/b/c`, for messages."""
    return "/".join(self.path)


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
  for path, node in adapted_modules(params):
    holder = node
    if kernels is not None:
      try:
        holder = get_path(kernels, path)
      except (KeyError, TypeError):
        raise ValueError(f"There is no module {'/'.join(path)!r} for the adapter found there.") from None
    name = kernel_key(path, holder)
    kernel, a, b = holder[name], node["lora_a"], node["lora_b"]
    where = "/".join(path)
    rank = config.rank_for(where)
    _ops.check_adapter(where, kernel.shape, a.shape, b.shape, rank)
    layout, stack = _ops.layout(a.shape, b.shape, kernel.shape)
    yield Adapter(path, name, kernel, a, b, rank, config.scale_for(where), layout, stack)


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
  node: Any = tree
  for key in path:
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
  if name in LORA_KEYS:
    return name
  if is_saved(config, path[:-1]):
    return "saved"
  if name == "bias" and (config.bias == "all" or (config.bias == "lora_only" and "lora_a" in siblings)):
    return "bias"
  return "frozen"


def labels(params: Params, config: LoraConfig) -> dict:
  """Per-leaf labels for `optax.partition`: `lora_a`, `lora_b`, `bias`, `saved` or `frozen`.

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
  """A bool tree, `True` where a leaf trains: adapters, biases per `bias`, `modules_to_save`."""
  _check_tree(params)
  return _map_with_path(lambda path, _, siblings: _label(config, path, siblings) != "frozen", params)


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
  saved modules); differentiate and optimize only it, and keep `frozen` (the
  base) out of the optimizer. `combine(trainable, frozen)` restores the tree.
  Pass `frozen` to a jitted step as an argument, `step(trainable, frozen, batch)`:
  a jitted function that closes over it compiles the whole base in as constants.
  """
  _check_tree(params)
  return _partition(params, trainable_mask(params, config))


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
