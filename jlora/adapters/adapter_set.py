"""`AdapterSet`: several named adapters over one frozen base, as a pytree.

A set maps each name to the adapter's trainable tree (what `jlora.split` returns
as `trainable`: `lora_a` / `lora_b`, and trained biases or `modules_to_save`
leaves if its config has them) and keeps the adapter's own `LoraConfig` beside
it; ranks, alphas and targets may differ between adapters. It is immutable:
`add` and `remove` return a new set. The trees are its pytree children and the
names and configs its static part, so a set passes through `jax.jit`, and
`jax.tree.map` reaches every adapter's arrays.

Run one adapter with `jlora.apply(model, adapters.params(name, frozen),
adapters.config(name), x)`, or stack the set (`jlora.stack_adapters`) to pick
adapters by traced ids: per example in one batch, or one for the batch with no
recompilation when the choice changes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

import jax

from jlora.core.config import LoraConfig
from jlora.core.targets import LAYERS_KEY, is_head, selects, targets_slot
from jlora.core.tree import Params, _check_tree, combine, get_path, has_adapters, slots, split

__all__ = ["BASE", "AdapterSet", "check_name", "load_adapter_set"]

BASE = "__base__"  # the name that selects no adapter (the base model's output)


def check_name(name: Any) -> str:
  if not isinstance(name, str) or not name or name == BASE or "/" in name or name.startswith("."):
    raise ValueError(
        f"Adapter name {name!r}: names are non-empty strings without '/', not starting with '.', and not "
        f"{BASE!r} (which selects the base model); e.g. 'sql' or 'summarize-v2'."
    )
  return name


@jax.tree_util.register_pytree_node_class
class AdapterSet(Mapping):
  """An immutable mapping `name -> trainable adapter tree`, with each adapter's `LoraConfig`.

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, jlora
    >>> model, x = nn.Dense(4), jnp.ones((1, 8))
    >>> base = model.init(jax.random.key(0), x)["params"]
    >>> cfg = jlora.LoraConfig(r=2, target_modules=".*")
    >>> adapters = jlora.AdapterSet()
    >>> for i, name in enumerate(["sql", "chat"]):
    ...   adapters = adapters.add(name, jlora.init(jax.random.key(i), model, base, cfg, x), cfg)
    >>> adapters.names
    ('sql', 'chat')
    >>> jlora.apply(model, adapters.params("chat", base), adapters.config("chat"), x).shape
    (1, 4)
  """

  def __init__(self, adapters: Mapping[str, tuple[Params, LoraConfig]] | None = None):
    trees, configs = {}, {}
    for name, entry in (adapters or {}).items():
      if not (isinstance(entry, tuple) and len(entry) == 2):
        raise TypeError(f"AdapterSet({{{name!r}: ...}}): each value must be a (params, LoraConfig) pair, got "
                        f"{type(entry).__name__}.")
      trees[check_name(name)], configs[name] = _trainable(name, *entry), entry[1]
    self._trees, self._configs = trees, configs

  @classmethod
  def _make(cls, trees: dict, configs: dict) -> AdapterSet:
    out = cls.__new__(cls)
    out._trees, out._configs = trees, configs
    return out

  # -- pytree
  def tree_flatten(self):
    names = tuple(self._trees)
    return tuple(self._trees[n] for n in names), (names, tuple(self._configs[n] for n in names))

  @classmethod
  def tree_unflatten(cls, aux, children):
    names, configs = aux
    return cls._make(dict(zip(names, children)), dict(zip(names, configs)))

  # -- mapping
  def __getitem__(self, name: str) -> dict:
    if name not in self._trees:
      raise KeyError(f"No adapter named {name!r} in this AdapterSet; it holds {list(self._trees)}.")
    return self._trees[name]

  def __iter__(self) -> Iterator[str]:
    return iter(self._trees)

  def __len__(self) -> int:
    return len(self._trees)

  def __eq__(self, other: object) -> bool:  # identity: comparing the arrays elementwise has no single truth value
    return self is other

  __hash__ = object.__hash__

  def __repr__(self) -> str:
    inner = ", ".join(f"{n!r}: r={c.r}{' (+rank_pattern)' if c.rank_pattern else ''}{', DoRA' if c.use_dora else ''}"
                      for n, c in self._configs.items())
    return f"AdapterSet({{{inner}}})"

  @property
  def names(self) -> tuple[str, ...]:
    """The adapters' names, in the order they were added."""
    return tuple(self._trees)

  def config(self, name: str) -> LoraConfig:
    """The `LoraConfig` of adapter `name`."""
    self[name]
    return self._configs[name]

  def pairs(self, names: list[str] | None = None) -> list[tuple[dict, LoraConfig]]:
    """`[(trainable tree, config), ...]` of `names` (default: all), e.g. for `jlora.add_weighted_adapter`."""
    return [(self[n], self._configs[n]) for n in (self.names if names is None else names)]

  def params(self, name: str | None, frozen: Params) -> dict:
    """The params to run adapter `name` with: `combine(trainable, frozen)`; the base (`frozen`) for None/`'__base__'`."""
    _check_tree(frozen, "frozen")
    if has_adapters(frozen):
      raise ValueError("`frozen` already holds adapters; pass the base params (the `frozen` half of jlora.split).")
    return dict(frozen) if name in (None, BASE) else combine(self[name], frozen)

  # -- edits
  def add(self, name: str, params: Params, config: LoraConfig, *, replace: bool = False) -> AdapterSet:
    """A new set with adapter `name` added.

    Args:
      name: the adapter's name.
      params: a tree holding the adapter: the whole tree (`jlora.init`,
        `jlora.load_adapter`, `jlora.load_peft` return one) or its trainable half
        (`jlora.split(...)[0]`); only the trainable leaves are kept.
      config: the adapter's `LoraConfig`.
      replace: allow replacing an adapter of the same name.

    Raises:
      ValueError: a bad or taken name; `params` without adapters; an adapter
        whose rank or DoRA magnitude does not match `config`, or at a module
        that `config` does not select (`target_modules`, `exclude_modules`,
        `layers_to_transform`: the rule `jlora.apply` uses), named with the fix.
      TypeError: `config` is not a `LoraConfig`.
    """
    check_name(name)
    if name in self._trees and not replace:
      raise ValueError(f"AdapterSet.add: an adapter named {name!r} is already in the set; pass replace=True to "
                       "replace it, or remove it first.")
    return self._make({**self._trees, name: _trainable(name, params, config)}, {**self._configs, name: config})

  def remove(self, name: str) -> AdapterSet:
    """A new set without adapter `name`."""
    self[name]
    return self._make({n: t for n, t in self._trees.items() if n != name},
                      {n: c for n, c in self._configs.items() if n != name})


def _trainable(name: str, params: Params, config: LoraConfig) -> dict:
  if not isinstance(config, LoraConfig):
    raise TypeError(f"Adapter {name!r}: `config` must be a jlora.LoraConfig, got {type(config).__name__}.")
  _check_tree(params)
  if not has_adapters(params):
    raise ValueError(f"Adapter {name!r}: `params` holds no lora_a/lora_b leaves; pass the tree jlora.init or "
                     "jlora.load_adapter returned (or its trainable half from jlora.split).")
  for slot in slots(params):  # what can be checked without the base: each rank, and DoRA's magnitude
    node = get_path(params, slot.module)
    where = slot.where
    r, want = node[slot.a_key].shape[-1], config.rank_for(where)
    has_m = slot.m_key in node
    if r != want or has_m != config.use_dora:
      got = f"rank {r}" if r != want else f"{'a' if has_m else 'no'} DoRA magnitude"
      raise ValueError(f"Adapter {name!r}: the adapter at {where!r} has {got}, but its config gives "
                       f"{f'r={want}' if r != want else f'use_dora={config.use_dora}'} there; pass the config it "
                       "was made with.")
    if not (selects(config, slot.path, "dense", is_head=is_head(slot.module),  # `jlora.apply`'s rule, for every use
                    masked=slot.key(LAYERS_KEY) in node)
            or targets_slot(config, slot)):
      raise ValueError(
          f"Adapter {name!r}: `params` holds an adapter at {where!r} ({slot.a_key} / {slot.b_key}), which its config "
          f"(target_modules={config.target_modules!r}, exclude_modules={config.exclude_modules!r}, "
          f"layers_to_transform={config.layers_to_transform!r}) does not select; jlora.apply would refuse it. Pass "
          "the LoraConfig that created it, or drop those leaves."
      )
  return split(params, config)[0]


def load_adapter_set(directory: str | os.PathLike, params: Params, *, names: list[str] | None = None) -> AdapterSet:
  """Loads the adapters saved under `directory` (one `jlora.save_adapter` checkpoint per subdirectory, by name).

  Args:
    directory: a directory whose subdirectories `NAME/` are adapter checkpoints,
      e.g. written by `jlora.save_adapter(f"{directory}/{name}", ...)`.
    params: the base params they were trained on (each is checked against it).
    names: which to load (default: every subdirectory that is an adapter
      checkpoint, sorted).

  Returns:
    An `AdapterSet` of those adapters.
  """
  from jlora.formats.checkpoint import MARKER, load_adapter

  root = os.fspath(directory)
  if not os.path.isdir(root):
    raise ValueError(f"`directory`: {root!r} is not a directory.")
  found = sorted(n for n in os.listdir(root) if os.path.isfile(os.path.join(root, n, MARKER)))
  if names is None:
    names = found
    if not names:
      raise ValueError(f"`directory`: {root!r} holds no adapter checkpoint (subdirectories written by "
                       "jlora.save_adapter).")
  missing = [n for n in names if n not in found]
  if missing:
    raise ValueError(f"`names`: {missing} are not adapter checkpoints under {root!r}; it holds {found}.")
  out = AdapterSet()
  for name in names:
    out = out.add(name, *load_adapter(os.path.join(root, name), params))
  return out
