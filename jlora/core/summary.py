"""`summary`: what an adapter trains and costs, per module and in total."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax

from jlora.core import stacks as _stacks
from jlora.core.config import LoraConfig
from jlora.core.fields import ALL_LINEAR
from jlora.core.tree import Params, _check_tree, adapters, split
from jlora.core.unadapted import left_out
from jlora.quant.array import QuantizedArray

__all__ = ["summary", "Summary", "ModuleRow"]


class ModuleRow(NamedTuple):
  """One adapted module: `path`, kernel shape, rank, scale and parameter counts (of a scanned stack whose layers
  `layers_to_transform` picks, those of its picked layers: the unrolled model's rows of those layers, summed)."""

  path: str
  kernel_shape: tuple[int, ...]
  r: int
  scale: float
  base_params: int
  adapter_params: int


class Summary(NamedTuple):
  """Parameter counts of a LoRA tree. `str(summary)` is a table.

  Attributes:
    trainable: parameters that train (adapters, biases per `bias`, `modules_to_save`).
    total: every parameter in the tree, adapters included (PEFT's "all params").
    adapter_params: `lora_a` + `lora_b` (+ the DoRA magnitude) parameters.
    trainable_bytes: bytes of the trainable leaves (what an adapter file holds).
    Of a scanned stack whose layers `layers_to_transform` picks, only the picked layers' adapters count (not the
    zeros of the others, nor the layer mask): the counts of the same model unrolled.
    rows: one `ModuleRow` per adapted module.
    not_adapted: with `target_modules="all-linear"`: `(weight path, shape)` of each matmul-like weight (two or
      more axes, not an embedding table, a bias or a norm scale) that holds no adapter: the output head, kinds
      all-linear does not cover (convolutions), and what `jlora.init` / `init_tree` warned they cannot adapt.
      Empty for other configs, which name what they adapt.
  """

  trainable: int
  total: int
  adapter_params: int
  trainable_bytes: int
  rows: tuple[ModuleRow, ...]
  not_adapted: tuple[tuple[str, tuple[int, ...]], ...] = ()

  @property
  def percent(self) -> float:
    """Trainable share of all parameters, in percent."""
    return 100.0 * self.trainable / self.total if self.total else 0.0

  def __str__(self) -> str:
    width = max([len("module")] + [len(r.path) for r in self.rows])
    lines = [f"{'module':<{width}}  {'kernel':>18}  {'r':>4}  {'scale':>7}  {'base':>12}  {'adapter':>10}  {'saving':>6}"]
    for r in self.rows:
      saving = 100.0 * (1 - r.adapter_params / r.base_params) if r.base_params else 0.0
      lines.append(
          f"{r.path:<{width}}  {r.kernel_shape!s:>18}  {r.r:>4}  {r.scale:>7.3g}  {r.base_params:>12,}  "
          f"{r.adapter_params:>10,}  {saving:>5.0f}%"
      )
    lines.append(
        f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"
        f" || adapter bytes: {self.trainable_bytes:,}"
    )
    if self.not_adapted:
      lines.append(f"all-linear left {len(self.not_adapted)} matmul-like weight(s) without an adapter (the output "
                   "head, kinds it does not cover such as convolutions, and what init warned it cannot adapt): "
                   + ", ".join(f"{p} {shape}" for p, shape in self.not_adapted))
    return "\n".join(lines)


def _count(tree) -> tuple[int, int]:
  """`(parameters, bytes)`; a quantized kernel (`jlora.quantize`) counts its logical size and its packed bytes."""
  leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, QuantizedArray))
  nbytes = [x.nbytes if isinstance(x, QuantizedArray) else math.prod(x.shape) * x.dtype.itemsize for x in leaves]
  return sum(math.prod(x.shape) for x in leaves), sum(nbytes)


def summary(params: Params, config: LoraConfig) -> Summary:
  """Counts trainable and total parameters and the adapter's bytes, per adapted module.

  Example:
    A 512×64 dense layer with r=8 has 8·(512+64) = 4,608 adapter parameters,
    86% fewer than its 32,768 (`str(jlora.summary(params, config))` prints the table).
  """
  _check_tree(params)
  rows = []
  n_train, train_bytes = 0, 0  # less what is no parameter of the model: a stack's masked layers and its mask
  for ad in adapters(params, config):
    leaves = list(ad.leaves.values())
    sizes = [math.prod(x.shape) for x in leaves]
    if ad.layers is not None:  # only the layers `layers_to_transform` adapts count, as in the unrolled model
      kept = [_stacks.kept(ad.layers, n) for n in sizes]
      n_train -= sum(sizes) - sum(kept) + math.prod(ad.layers.shape)
      train_bytes -= sum((n - k) * x.dtype.itemsize for n, k, x in zip(sizes, kept, leaves))
      train_bytes -= math.prod(ad.layers.shape) * ad.layers.dtype.itemsize
      sizes = kept
    base = math.prod(ad.kernel.shape)
    rows.append(ModuleRow(ad.slot.where, tuple(ad.kernel.shape), ad.rank, ad.scale,
                          base if ad.layers is None else _stacks.kept(ad.layers, base), sum(sizes)))
  trainable, frozen = split(params, config)
  n, nbytes = _count(trainable)
  n_train, train_bytes = n_train + n, train_bytes + nbytes
  n_frozen, _ = _count(frozen)
  skipped = tuple(left_out(params)) if config.target_modules == ALL_LINEAR else ()
  return Summary(n_train, n_train + n_frozen, sum(r.adapter_params for r in rows), train_bytes, tuple(rows), skipped)
