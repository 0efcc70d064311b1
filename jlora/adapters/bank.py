"""`AdapterBank`: an `AdapterSet` stacked so that traced ids pick the adapter, per example or per batch.

Per adapted weight the bank holds `lora_a: a_shape + (n,)` and
`lora_b: b_shape + (n,)` (and `lora_magnitude: m_shape + (n,)` where a DoRA
adapter is among them): the n adapters stacked on a new last axis (last, so
that the leading layer axis of a scanned stack stays where `nn.scan` slices
it), every rank padded with zeros to the largest at that weight (exact: the
padded rows and columns add nothing and their gradients are zero), and zeros
for an adapter that does not target that weight. Each adapter's scale and
dropout rate per weight are the bank's static part. `jlora.apply` runs a
model with it: example `i` gets adapter `ids[i]`, `-1` (`'__base__'`) the base
model exactly, and a scalar id selects one adapter for the whole batch, so
switching adapters never recompiles.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jlora.adapters.adapter_set import BASE, AdapterSet
from jlora.core import ops as _ops
from jlora.core import stacks as _stacks
from jlora.core.config import LoraConfig
from jlora.core.targets import Slot, is_lora_key, is_tokens_key, selects
from jlora.core.tree import Params, _check_tree, adapters, combine, flatten, has_adapters, pad_axis, unflatten
from jlora.frontends.linen import check_model, run_forward
from jlora.frontends.linen_forward import Forward

__all__ = ["AdapterBank", "BankApply", "apply_bank", "stack_adapters"]


class BankEntry(NamedTuple):
  """One adapted weight of a bank: where its stacked leaves live, and each adapter's rank and scale there.

  Attributes:
    slot: where the stacked leaves live (the weight named).
    rank_axis: the axis of `r` in `lora_b` (before the adapter axis).
    ranks: each adapter's rank here (0 where it has no adapter; its leaves are zeros).
    scales: each adapter's scale here (0.0 where absent).
    magnitudes: which adapters hold a DoRA magnitude here (stacked at `slot.m_key`, zeros for the others, which
      add their plain LoRA term); all False when none does (no magnitude leaf).
    masked: which adapters adapt only some layers of this scanned stack (`layers_to_transform`, a layer mask): the
      bank holds their other layers' `A` and `B` as zeros, which add nothing.
  """

  slot: Slot
  rank_axis: int
  ranks: tuple[int, ...]
  scales: tuple[float, ...]
  magnitudes: tuple[bool, ...]
  masked: tuple[bool, ...] = ()


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True, eq=False)
class AdapterBank:
  """Stacked adapters (see the module docstring). Make one with `jlora.stack_adapters`.

  Attributes:
    tree: the stacked `lora_a` / `lora_b` leaves, nested like a params tree; the
      bank's only pytree leaves, so `jax.grad` and optax see exactly the adapters.
    names: the adapters' names; adapter `k` is `names[k]`.
    configs: their `LoraConfig`s.
    entries: one `BankEntry` per adapted weight.
  """

  tree: dict
  names: tuple[str, ...]
  configs: tuple[LoraConfig, ...]
  entries: tuple[BankEntry, ...]

  def tree_flatten(self):
    return (self.tree,), (self.names, self.configs, self.entries)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(children[0], *aux)

  def __repr__(self) -> str:
    return f"AdapterBank(names={self.names}, weights={len(self.entries)})"

  def index(self, name: str | None) -> int:
    """The id of adapter `name`; -1 for None or `'__base__'`."""
    if name is None or name == BASE:
      return -1
    if name not in self.names:
      raise ValueError(f"No adapter named {name!r} in this bank; it holds {list(self.names)} (and {BASE!r}).")
    return self.names.index(name)

  def ids(self, which: Any) -> jax.Array:
    """int32 adapter ids, checked: from a name (shape `()`), a list of names (`(batch,)`), or ids (-1: the base).

    Names are the bank's, or None / `'__base__'` for the base model. Ids are
    checked to lie in -1..n-1 when concrete; traced ids pass as they are.
    """
    if which is None or isinstance(which, str):
      return jnp.int32(self.index(which))
    if isinstance(which, (list, tuple)) and any(w is None or isinstance(w, str) for w in which):
      return jnp.asarray([self.index(w) for w in which], jnp.int32)
    ids = jnp.asarray(which)
    if not jnp.issubdtype(ids.dtype, jnp.integer) or ids.ndim > 1:
      raise TypeError(f"`ids` must be ints of shape () or (batch,), or adapter names; got {ids.dtype}{ids.shape}.")
    if not isinstance(which, jax.core.Tracer):
      bad = [int(i) for i in np.asarray(which).reshape(-1) if not -1 <= int(i) < len(self.names)]
      if bad:
        raise ValueError(f"`ids` holds {bad[:5]}, outside -1..{len(self.names) - 1} (the bank holds "
                         f"{list(self.names)}; -1 is the base model).")
    return ids.astype(jnp.int32)

  def entry(self, slot: Slot) -> BankEntry:
    """The entry of the adapted weight at `slot` (the weight named)."""
    for e in self.entries:
      if e.slot == slot:
        return e
    raise ValueError(f"The adapter leaves at {slot.where!r} are not this bank's; pass the bank and base params "
                     "separately (jlora.apply(model, frozen, bank, x, adapter_ids=ids)).")

  def lookup(self, slot: Slot) -> tuple[tuple[float, ...], tuple[float, ...], tuple[bool, ...]]:
    """`(scales, dropout rates, which hold a DoRA magnitude)` of every adapter at the weight at `slot`."""
    e = self.entry(slot)
    return e.scales, tuple(c.lora_dropout for c in self.configs), e.magnitudes

  def check_selected(self, slot: Slot, kind: str, head: bool) -> None:
    """Raises unless every adapter present at `slot` is selected there by its own config (`jlora.apply`'s rule);
    and for expert weights (`target_parameters`, a `ragged_dot` layer), whose tokens are dispatched by expert, so
    that the input's axis 0 is not the batch that `adapter_ids` index."""
    if kind == "ragged_dot" or any(c.target_parameters for c in self.configs):
      raise ValueError(
          f"A mixed batch (jlora.AdapterBank) cannot hold the adapter at {slot.where!r}: adapters of "
          "`target_parameters` and of ragged_dot layers act on tokens dispatched by expert, whose leading axis is "
          "not the batch that `adapter_ids` index. Run each adapter alone with jlora.apply."
      )
    entry = self.entry(slot)
    masked = entry.masked or (False,) * len(self.names)
    for name, config, rank, mask in zip(self.names, self.configs, entry.ranks, masked):
      if rank and not selects(config, slot.path, "embed" if kind == "attend" else kind, is_head=head, masked=mask):
        raise ValueError(
            f"The bank's adapter {name!r} holds an adapter at {slot.where!r}, which its config "
              f"(target_modules={config.target_modules!r}) does not select for this {kind} layer; jlora.apply "
              "would refuse it. Stack adapters with the LoraConfigs that created them."
          )

  def unstack(self) -> AdapterSet:
    """The `AdapterSet` this bank was stacked from (ranks unpadded), e.g. after training the bank."""
    flat = flatten(self.tree)
    out = AdapterSet()
    for k, (name, config) in enumerate(zip(self.names, self.configs)):
      leaves = {}
      for e in self.entries:
        r, a, b = e.ranks[k], e.slot.leaf("lora_a"), e.slot.leaf("lora_b")
        if r:
          leaves[a] = flat[a][..., k][..., :r]
          leaves[b] = jax.lax.slice_in_dim(flat[b][..., k], 0, r, axis=e.rank_axis)
          if e.magnitudes[k]:
            m = e.slot.leaf("lora_magnitude")
            leaves[m] = flat[m][..., k]
      out = out.add(name, unflatten(leaves), config)
    return out

  def task_mean(self, values: jax.Array, ids: jax.Array) -> jax.Array:
    """`sum_k mean(values[ids == k])`: a multi-task loss in which each adapter's gradient is that of training it
    alone on its own examples with a mean loss. Examples with id -1 and adapters without examples add nothing.

    Args:
      values: `(batch,)` per-example losses.
      ids: `(batch,)` the examples' adapter ids (or names).
    """
    ids = self.ids(ids)
    if ids.ndim != 1 or jnp.shape(values) != ids.shape:
      raise ValueError(f"task_mean: `values` {jnp.shape(values)} and `ids` {ids.shape} must both be (batch,): one "
                       "loss and one adapter id (or name) per example.")
    onehot = (ids[:, None] == jnp.arange(len(self.names))).astype(values.dtype)
    counts = onehot.sum(0)
    return jnp.sum((onehot * values[:, None]).sum(0) / jnp.maximum(counts, 1))


def stack_adapters(adapter_set: AdapterSet, params: Params, *, names: Sequence[str] | None = None,
                   dtype: Any = None) -> AdapterBank:
  """Stacks adapters of a set into an `AdapterBank` for `jlora.apply(model, base, bank, ..., adapter_ids=...)`.

  Args:
    adapter_set: the adapters (ranks, alphas and targets may differ).
    params: the base params they adapt (without adapters); each adapter is
      checked against it.
    names: which adapters, in which order (default: all, in the set's order);
      adapter `k` of the bank is `names[k]`.
    dtype: the bank's dtype (default: the adapters' common dtype).

  Returns:
    The bank: per adapted weight (the union of every adapter's targets),
    `lora_a: a_shape + (n,)` and `lora_b: b_shape + (n,)` with ranks padded to
    the largest.

  Raises:
    TypeError: `adapter_set` is not an `AdapterSet`.
    ValueError: an unknown name; `params` holding adapters; an adapter that does
      not fit the base; an adapter that trains more than A and B (biases,
      `modules_to_save`), or a DoRA adapter of some layers of a scanned stack
      (a layer mask), which a mixed batch cannot hold (run it alone). A LoRA
      adapter of some layers of a stack is held with zeros at its other layers.
  """
  if not isinstance(adapter_set, AdapterSet):
    raise TypeError(f"`adapter_set` must be a jlora.AdapterSet, got {type(adapter_set).__name__}.")
  _check_tree(params)
  if has_adapters(params):
    raise ValueError("`params` holds adapters; pass the base params (the `frozen` half of jlora.split).")
  names = adapter_set.names if names is None else tuple(names)
  if not names:
    raise ValueError("stack_adapters: no adapters to stack (the set is empty, or `names` is).")
  per_slot: dict[Slot, dict[int, Any]] = {}
  for k, name in enumerate(names):
    tree, config = adapter_set[name], adapter_set.config(name)
    extra = [p for p in flatten(tree) if not is_lora_key(p[-1]) or is_tokens_key(p[-1])]
    if extra:
      raise ValueError(
          f"Adapter {name!r} trains leaves other than LoRA's A and B ({'/'.join(extra[0])!r} and {len(extra) - 1} "
          "more: trained biases, modules_to_save or trainable tokens), which differ per adapter and cannot share one batch. Run it "
          "alone (jlora.apply with adapter_set.params(name, frozen)), or train it with bias='none' and no "
          "modules_to_save."
      )
    for ad in adapters(tree, config, kernels=params):
      if ad.groups > 1:
        raise ValueError(
            f"stack_adapters: adapter {name!r} adapts the grouped convolution {ad.slot.where!r} "
            f"(feature_group_count={ad.groups}), which a mixed batch does not take (its B is grouped by rank blocks, "
            "which padding to a common rank would break). Run it alone (jlora.apply), or leave the layer out "
            "(exclude_modules)."
        )
      if ad.layers is not None and ad.magnitude is not None:
        raise ValueError(
            f"Adapter {name!r} is a DoRA adapter of some layers of the scanned stack at {ad.slot.where!r} "
            "(layers_to_transform, a layer mask); a mixed batch (jlora.AdapterBank) scales each adapter's layers "
            "alike and cannot leave those layers out exactly. Run it alone (jlora.apply with "
            "adapter_set.params(name, frozen))."
        )
      if ad.layers is not None:  # LoRA: a left-out layer's A and B as zeros add exactly nothing (as jlora.init has them)
        zeros = {role: _stacks.select(ad.layers, x, jnp.zeros_like(x)) for role, x in ad.leaves.items()}
        ad = ad._replace(leaves=zeros)
      per_slot.setdefault(ad.slot, {})[k] = ad
  dtype = dtype or jnp.result_type(*(x for ads in per_slot.values() for ad in ads.values() for x in (ad.a, ad.b)))
  leaves, entries = {}, []
  for slot, ads in per_slot.items():
    first = next(iter(ads.values()))
    rank_axis = first.b_rank_axis
    big = max(ad.rank for ad in ads.values())
    a_shape = first.a.shape[:-1] + (big,)
    b_shape = tuple(big if i == rank_axis else d for i, d in enumerate(first.b.shape))
    stack_a, stack_b = [], []
    for k in range(len(names)):
      ad = ads.get(k)
      stack_a.append(jnp.zeros(a_shape, dtype) if ad is None else pad_axis(ad.a.astype(dtype), ad.a.ndim - 1, big))
      stack_b.append(jnp.zeros(b_shape, dtype) if ad is None else pad_axis(ad.b.astype(dtype), rank_axis, big))
    leaves[slot.leaf("lora_a")] = jnp.stack(stack_a, axis=-1)
    leaves[slot.leaf("lora_b")] = jnp.stack(stack_b, axis=-1)
    # DoRA magnitudes, where an adapter has one: zeros for the others (they keep their LoRA term, g = 1)
    magnitudes = tuple(k in ads and ads[k].magnitude is not None for k in range(len(names)))
    if any(magnitudes):
      m_shape = _ops.magnitude_shape(first.a.shape, first.b.shape, first.kernel.shape)
      leaves[slot.leaf("lora_magnitude")] = jnp.stack([ads[k].magnitude.astype(dtype) if magnitudes[k] else
                                            jnp.zeros(m_shape, dtype) for k in range(len(names))], axis=-1)
    entries.append(BankEntry(slot, rank_axis, tuple(ads[k].rank if k in ads else 0 for k in range(len(names))),
                             tuple(float(ads[k].scale) if k in ads else 0.0 for k in range(len(names))), magnitudes,
                             tuple(k in ads and ads[k].layers is not None for k in range(len(names)))))
  return AdapterBank(unflatten(leaves), names, tuple(adapter_set.config(n) for n in names), tuple(entries))


def apply_bank(model: nn.Module, params: Params, bank: AdapterBank, ids: Any, *args,
               rngs: Mapping[str, jax.Array] | None = None, variables: Mapping[str, Any] | None = None,
               allow_unused: bool = False, **kwargs) -> Any:
  """The LoRA forward of a linen model with the adapter of each example chosen from a bank: `jlora.apply` with an
  `AdapterBank` in place of the config (`adapter_ids=ids`) runs this.

  Example `i` of the batch gets adapter `ids[i]`'s term `s_k·(dropout(x)·A_k)·B_k`
  at every adapted layer (a DoRA adapter's DoRA term, with its own magnitude and
  norm `‖W0 + s_k·A_k·B_k‖`; LoRA and DoRA adapters mix in one bank), computed by
  `jlora.core.adapted.adapted_batch`: a per-example gather of the leaves and a
  vmap of the one adapted call over the examples; id -1 gets nothing added, so its
  output is the base model's (exactly when run eagerly; under jit up to XLA
  fusion). A scalar id applies one adapter to the whole batch. `ids` are
  traced: changing them never recompiles; a traced id outside -1..n-1 gives
  NaN rows (concrete ones are refused).

  Args:
    model: the linen module.
    params: the base params, without adapters.
    bank: from `jlora.stack_adapters`.
    ids: int32 `()` or `(batch,)` adapter ids (`bank.ids(names)`), or the names.
      Per-example ids index axis 0 of every adapted layer's input.
    *args: model inputs.
    rngs: rng streams; `'lora_dropout'` enables each adapter's LoRA dropout.
    variables: other collections.
    allow_unused: as for `jlora.apply`.
    **kwargs: passed to `model.apply`.

  Returns:
    What `model.apply` returns.

  Raises:
    ValueError: ids out of range (when concrete); an adapted layer whose input
      does not keep the examples on axis 0; bank leaves no layer read.
  """
  check_model(model)
  if not isinstance(bank, AdapterBank):
    raise TypeError(f"`bank` must be a jlora.AdapterBank (from jlora.stack_adapters), got {type(bank).__name__}.")
  _check_tree(params)
  if has_adapters(params):
    raise ValueError("`params` holds adapters; with a bank, jlora.apply takes the base params and the bank "
                     "separately.")
  forward = Forward(None, bank, bank.ids(ids))
  return run_forward(forward, model, combine(bank.tree, params), args, kwargs, rngs, variables, allow_unused,
                     "jlora.apply")


@dataclasses.dataclass(frozen=True)
class BankApply:
  """`fn(variables, *args, **kwargs)`: `jlora.apply` with a bank in `model.apply`'s slot (`jlora.apply_fn`).

  `variables` holds `'params'` (the base), `'lora_bank'` (an `AdapterBank`) and
  `'lora_ids'`, plus any other collections; hashable, so it is a static
  `jax.jit` argument (e.g. `jlora.models.generate` uses it for `adapters=`).
  """

  model: nn.Module
  allow_unused: bool = False

  def __call__(self, variables: Mapping[str, Any], *args, rngs=None, **kwargs) -> Any:
    missing = [k for k in ("params", "lora_bank", "lora_ids") if k not in variables]
    if missing:
      raise TypeError(f"`variables` needs 'params', 'lora_bank' and 'lora_ids'; it lacks {missing}.")
    others = {k: v for k, v in variables.items() if k not in ("params", "lora_bank", "lora_ids")}
    return apply_bank(self.model, variables["params"], variables["lora_bank"], variables["lora_ids"], *args,
                      rngs=rngs, variables=others, allow_unused=self.allow_unused, **kwargs)
