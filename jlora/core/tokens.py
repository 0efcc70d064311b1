"""Trainable tokens (`LoraConfig.trainable_token_indices`): a few rows of an embedding train, the rest stay frozen.

Each targeted embedding gets one leaf beside its table `(vocab, dim)`: `trainable_tokens: (n_ids, dim)`
(`<weight>_trainable_tokens` for a weight that is not its module's main one, e.g. Haiku's `embeddings`), zero at
init, so the model is unchanged; the ids live in the config (static). Every view of the table sees
`table.at[ids].add(delta)`, computed without copying the table:

* the lookup (`nn.Embed.__call__`, `nnx.Embed.__call__`, `eqx.nn.Embedding.__call__`, `hk.Embed.__call__`:
  `y = table[x]`): `lookup` adds `delta[k]` to the rows of `y` whose id is `ids[k]` (a `(vocab,)` int map from id
  to row, a constant of the program, finds them);
* a tied head (`nn.Embed.attend`, `nnx.Embed.attend`, `y = q·tableᵀ`): `attend` adds `q·deltaᵀ` to the logits'
  columns `ids`;
* `merge` folds it into the table (`fold`) and `unmerge` takes it out (`unfold`); a read of the table by hand that
  a front-end sees (Haiku's `hk.Embed.embeddings`, an Equinox `TokensEmbedding.weight`) gets `fold`'s table.

The front-ends find the tables (`Embedding`s) and call `resolve` and `add` (`jlora.init`, `jlora.init_tree`,
`jlora.nnx.init`, `jlora.equinox.init`), then these corrections at their lookup and head calls.

Forming `table.at[ids].add(delta)` per step instead would copy the whole table in the forward pass and make its
gradient a dense `(vocab, dim)` array in the backward pass; the two corrections cost `O(tokens·dim)` and
`O(tokens·n_ids·dim)` and their gradient is `(n_ids, dim)`.

PEFT (`TrainableTokensLayer`) keeps the rows' trained *values* (its `trainable_tokens_delta` starts as a copy of the
rows and replaces them); jlora keeps their difference from the base rows, so that the leaf is zero at init, a
weight decay pulls it towards the base model, and `unmerge` needs no copy of the original rows. The forward is the
same: `table[ids] + delta` is PEFT's value; `jlora.formats.peft` converts at the file boundary.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from jlora.core.config import LoraConfig
from jlora.core.sharding import adapter_axes, partition_spec
from jlora.core.targets import (
  TOKENS_KEY,
  is_pair_key,
  is_saved,
  is_tokens_key,
  kernel_key,
  leaf_name,
  matches,
  path_str,
  tokens_weight,
)
from jlora.core.tree import Params, get_path, module_dicts

__all__ = ["Embedding", "Tokens", "plain_embeddings", "resolve", "add", "check_alone", "ids_for", "tokens", "lookup",
           "attend", "fold", "unfold", "EMBEDDING_NAMES"]

Path = tuple[str, ...]
# The leaf names of an embedding table in a plain tree (Flax `embedding`, Haiku `embeddings`; a PyTorch-style
# `(out, in)` `weight`, whose rows are tokens for an `Embedding` and for an output head alike, as in PEFT).
EMBEDDING_NAMES = ("embedding", "embeddings", "weight")
_INPUT_NAME = "embed_tokens"  # PEFT's fallback name of the input embedding


class Embedding(NamedTuple):
  """A table whose rows trainable tokens may train, as a front-end found it.

  Attributes:
    module: the path of the module dict holding the table.
    kernel_name: the table's leaf name (`'embedding'` for `nn.Embed`).
    shape: the table's shape, `(vocab, dim)` for a usable one.
    unsupported: why its rows cannot train ('' when they can).
  """

  module: Path
  kernel_name: str
  shape: tuple[int, ...]
  unsupported: str = ""


class Tokens(NamedTuple):
  """One trainable-tokens leaf of a tree, read beside its table and checked against the config.

  Attributes:
    module: the path of the module dict holding table and leaf.
    key: the leaf's name (`trainable_tokens`, `<weight>_trainable_tokens`).
    kernel_name: the table's leaf name.
    table: the table, `(vocab, dim)`.
    delta: the leaf, `(n_ids, dim)`: row `k` is added to `table[ids[k]]`.
    ids: the token ids, from the config.
  """

  module: Path
  key: str
  kernel_name: str
  table: Any
  delta: Any
  ids: tuple[int, ...]

  @property
  def where(self) -> str:
    return path_str(self.module)


def _listing(embeds: Sequence[Embedding]) -> str:
  return ", ".join(f"{path_str(e.module)!r} {e.shape}" for e in embeds) or "none"


def plain_embeddings(tree: Params) -> list[Embedding]:
  """The tables of a plain tree whose rows may train: 2-D leaves named `EMBEDDING_NAMES` (rows are tokens)."""
  return [Embedding(module, str(name), tuple(leaf.shape)) for module, node in module_dicts(tree)
          for name, leaf in node.items() if name in EMBEDDING_NAMES and len(getattr(leaf, "shape", ())) == 2]


def resolve(config: LoraConfig, embeds: Sequence[Embedding], others: Sequence[tuple[Path, str]], fn: str
            ) -> dict[Path, tuple[str, tuple[int, ...]]]:
  """The tables `config.trainable_token_indices` trains rows of: `{module path: (table name, ids)}`.

  Args:
    config: the config.
    embeds: the embedding tables the front-end found.
    others: `(module path, layer kind)` of the model's other layers (for the message when a name matches one).
    fn: the caller, for messages (`"jlora.init"`).

  Raises:
    ValueError: a name that matches no embedding (a layer that is not one, or nothing), or several; the list form
      when the model has no single input embedding; an embedding jlora cannot train rows of; an id outside the
      table's rows.
  """
  spec = config.trainable_token_indices
  if spec is None:
    return {}
  if isinstance(spec, Mapping):
    wanted = list(spec.items())
  else:
    usable = [e for e in embeds if not e.unsupported] or list(embeds)
    usable = [e for e in usable if e.kernel_name != "weight"] or usable  # a plain tree's `weight` may be a linear's
    named = [e for e in usable if e.module and e.module[-1] == _INPUT_NAME]
    if len(usable) != 1 and len(named) != 1:
      raise ValueError(
          f"{fn}: `trainable_token_indices` is a list of ids, which names the model's input embedding: its only "
          f"embedding table or the one named {_INPUT_NAME!r}; this model has {len(usable)} embedding tables "
          f"({_listing(usable)}). Name the table: trainable_token_indices={{'<module>': {list(spec)}}}."
      )
    wanted = [(path_str((usable if len(usable) == 1 else named)[0].module), spec)]
  out: dict[Path, tuple[str, tuple[int, ...]]] = {}
  for name, ids in wanted:
    hits = [e for e in embeds if matches((name,), e.module)]
    if not hits:
      layers = [f"{path_str(p)!r} ({kind})" for p, kind in others if matches((name,), p)]
      what = (f"names {', '.join(layers[:3])}, which is not an embedding" if layers else "matches no module")
      raise ValueError(
          f"{fn}: `trainable_token_indices` key {name!r} {what}; trainable tokens are rows of an embedding table. "
          f"Embedding tables of this model: {_listing(embeds)}."
      )
    if len(hits) > 1:
      raise ValueError(f"{fn}: `trainable_token_indices` key {name!r} matches several embeddings "
                       f"({_listing(hits)}); give a longer path suffix that names one.")
    e = hits[0]
    if e.unsupported:
      raise ValueError(f"{fn}: cannot train rows of {path_str(e.module)!r}: {e.unsupported}.")
    if len(e.shape) != 2:
      raise ValueError(f"{fn}: the embedding table {path_str(e.module)!r} has shape {e.shape}; trainable tokens "
                       "need one `(vocab, dim)` table (not a stacked or scanned one).")
    bad = [i for i in ids if i >= e.shape[0]]
    if bad:
      raise ValueError(
          f"{fn}: `trainable_token_indices` for {path_str(e.module)!r} holds ids {bad}, outside its vocabulary of "
          f"{e.shape[0]} rows (ids 0..{e.shape[0] - 1}). Resize the table first (new tokens need rows) or fix the ids."
      )
    if e.module in out:
      raise ValueError(f"{fn}: two `trainable_token_indices` keys name {path_str(e.module)!r}; give its ids once.")
    if is_saved(config, e.module):
      raise ValueError(f"{fn}: {path_str(e.module)!r} is both in `modules_to_save` (trained fully) and in "
                       "`trainable_token_indices` (some rows trained), as PEFT refuses too; keep one of them.")
    out[e.module] = (e.kernel_name, tuple(ids))
  return out


def add(tree: dict, targets: Mapping[Path, tuple[str, tuple[int, ...]]], *, dtype: Any, fn: str) -> None:
  """Puts a zero `(n_ids, dim)` leaf beside each targeted table of `tree` (a fresh copy, changed in place).

  On a mesh the leaf is sharded like the table's `dim` axis, its rows replicated.

  Raises:
    ValueError: a targeted table that LoRA adapts too (a module is adapted, or has trainable rows, not both).
  """
  for module, (kernel_name, ids) in targets.items():
    node = get_path(tree, module)
    check_alone(node, module, fn)
    table = node[kernel_name]
    delta = jnp.zeros((len(ids), table.shape[1]), dtype)
    sharding = getattr(table, "sharding", None)
    if isinstance(sharding, NamedSharding):  # the rule of `jlora.core.sharding`: `dim` like the table's, rows replicated
      axes = adapter_axes(tuple(sharding.spec), table.shape, delta.shape, "tokens")
      delta = jax.device_put(delta, NamedSharding(sharding.mesh, partition_spec(axes)))
    node[leaf_name(TOKENS_KEY, kernel_name)] = delta


def check_alone(node: Mapping[str, Any], module: Path, fn: str) -> None:
  """Raises when the module dict `node` of a table with trainable tokens also holds a LoRA adapter.

  Raises:
    ValueError: naming the module and the fix.
  """
  if any(is_pair_key(k) for k in node):
    raise ValueError(
        f"{fn}: {path_str(module)!r} is both in `target_modules` (a LoRA adapter) and in "
        "`trainable_token_indices` (trained rows); a table gets one of them. Exclude it from `target_modules` "
        "(exclude_modules=[...]) or drop its token ids."
    )


def ids_for(config: LoraConfig, module: Path) -> tuple[int, ...]:
  """The ids of the trainable-tokens leaf of the module at `module`, from the config.

  Raises:
    ValueError: the config has no `trainable_token_indices`, or none that names this module.
  """
  spec = config.trainable_token_indices
  where = path_str(module)
  if spec is None:
    raise ValueError(f"`params` holds trainable tokens at {where!r} but the config has trainable_token_indices=None; "
                     "pass the LoraConfig that created them.")
  if not isinstance(spec, Mapping):
    return spec
  key = next((k for k in spec if matches((k,), module)), None)
  if key is None:
    raise ValueError(f"`params` holds trainable tokens at {where!r}, which the config's trainable_token_indices "
                     f"(keys {sorted(spec)}) does not name; pass the LoraConfig that created them.")
  return spec[key]


def tokens(params: Params, config: LoraConfig, *, kernels: Params | None = None) -> Iterator[Tokens]:
  """Every trainable-tokens leaf of `params`, with its table and ids, checked.

  Args:
    params: a tree holding the leaves (and the tables, unless `kernels` is given).
    config: the config they were made with.
    kernels: a tree to read the tables from instead (a merged tree, when `params` is the trainable half).

  Raises:
    ValueError: a leaf without its table, of the wrong shape, or that the config does not name.
  """
  for module, node in module_dicts(params):
    for key in [k for k in node if is_tokens_key(k) and not isinstance(node[k], Mapping)]:
      where = path_str(module)
      holder = node
      if kernels is not None:
        try:
          holder = get_path(kernels, module)
        except (KeyError, TypeError):
          raise ValueError(f"There is no module {where!r} for the trainable tokens found there.") from None
      weight = tokens_weight(key)
      try:
        weight = weight if weight is not None else kernel_key(module, holder)
      except ValueError:
        weight = None
      if weight not in holder:
        raise ValueError(f"Module {where!r} holds {key!r} but no embedding table beside it; pass the whole params tree "
                         "(base and adapters), e.g. jlora.combine(trainable, frozen).")
      table, delta, ids = holder[weight], node[key], ids_for(config, module)
      if len(table.shape) != 2 or tuple(delta.shape) != (len(ids), table.shape[1]):
        raise ValueError(f"The trainable tokens at {where!r} have shape {tuple(delta.shape)}; its table "
                         f"{tuple(table.shape)} and {len(ids)} ids need ({len(ids)}, {table.shape[-1]}).")
      bad = [i for i in ids if i >= table.shape[0]]
      if bad:
        raise ValueError(f"The config's trainable_token_indices give {where!r} ids {bad}, outside its table of "
                         f"{table.shape[0]} rows; pass the LoraConfig that created these trainable tokens.")
      yield Tokens(module, str(key), weight, table, delta, tuple(ids))


# ------------------------------------------------------------------------------------------------- forward
def lookup(y: jax.Array, x: jax.Array, delta: jax.Array, ids: Sequence[int], vocab: int) -> jax.Array:
  """The lookup `table.at[ids].add(delta)[x]`, from the base lookup `y = table[x]`, without copying the table.

  Args:
    y: the base output, `x.shape + (dim,)`.
    x: the token ids looked up (ints).
    delta: `(n_ids, dim)`.
    ids: the trained ids (static).
    vocab: the table's rows.

  Returns:
    `y` with `delta[k]` added (in `result_type(y, delta)`, cast back to `y.dtype`) where `x == ids[k]`.
  """
  row = np.full((vocab,), -1, np.int32)
  row[np.asarray(ids)] = np.arange(len(ids), dtype=np.int32)
  k = jnp.take(jnp.asarray(row), x, axis=0, mode="fill", fill_value=-1)
  dt = jnp.result_type(y.dtype, delta.dtype)
  moved = (y.astype(dt) + jnp.take(delta, jnp.maximum(k, 0), axis=0).astype(dt)).astype(y.dtype)
  return jnp.where((k >= 0)[..., None], moved, y)


def attend(y: jax.Array, q: jax.Array, delta: jax.Array, ids: Sequence[int], precision: Any = None) -> jax.Array:
  """A tied head `q·table.at[ids].add(delta)ᵀ`, from the base logits `y = q·tableᵀ`: `q·deltaᵀ` added to the
  columns `ids` (in `result_type(q, delta)`, cast back to `y.dtype`)."""
  dt = jnp.result_type(q.dtype, delta.dtype)
  extra = jnp.einsum("...d,nd->...n", q.astype(dt), delta.astype(dt), precision=precision)
  cols = np.asarray(ids)
  return y.at[..., cols].set((y[..., cols].astype(dt) + extra).astype(y.dtype))


def _check_plain(table: Any, where: str) -> None:
  if not hasattr(table, "at"):
    raise ValueError(f"The embedding table at {where!r} is a {type(table).__name__} (e.g. quantized); trainable "
                     "tokens fold into a plain array only. Merge before quantizing it.")


def fold(table: jax.Array, delta: jax.Array, ids: Sequence[int], where: str = "") -> jax.Array:
  """`table.at[ids].add(delta)`, summed in float32 and cast back to the table's dtype (`merge`)."""
  _check_plain(table, where)
  rows = np.asarray(ids)
  return table.at[rows].set((table[rows].astype(jnp.float32) + delta.astype(jnp.float32)).astype(table.dtype))


def unfold(table: jax.Array, delta: jax.Array, ids: Sequence[int], where: str = "") -> jax.Array:
  """The inverse of `fold` (`unmerge`), up to the rounding of the float32 sums."""
  _check_plain(table, where)
  rows = np.asarray(ids)
  return table.at[rows].set((table[rows].astype(jnp.float32) - delta.astype(jnp.float32)).astype(table.dtype))
