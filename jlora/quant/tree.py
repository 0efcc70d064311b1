"""`jlora.quantize` / `jlora.dequantize`: a frozen base with NF4 or int8 kernels, for QLoRA.

`quantize(params)` replaces each selected kernel of a param tree by a
`QuantizedArray` (`jlora.quant.array`: packed codes and block scales, ~4.15 bits per
parameter for NF4 with double quantization); everything else is kept as is. The
quantized tree is the frozen half of LoRA training: a linen layer unboxes its
kernel where it reads it, so each kernel is dequantized inside the jitted step,
one layer at a time, and no full-precision copy is stored. Adapters, their
gradients and optimizer state stay float32.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from jax.tree_util import DictKey, SequenceKey

from jlora.core.sharding import partition_spec
from jlora.quant import array as _quant
from jlora.quant.array import QuantizedArray

__all__ = ["quantize", "dequantize", "is_kernel", "is_weight", "requantize", "shardings_like"]


def _path_names(path) -> tuple[str, ...]:
  return tuple(str(k.key if isinstance(k, DictKey) else k.idx if isinstance(k, SequenceKey) else getattr(k, "name", k))
               for k in path)


def is_weight(path: tuple[str, ...], leaf: Any, names: Collection[str] = ("kernel",)) -> bool:
  """Whether a leaf is a floating weight of at least 2 dimensions whose name is one of `names`."""
  return (bool(path) and path[-1] in names and hasattr(leaf, "ndim") and leaf.ndim >= 2
          and jnp.issubdtype(leaf.dtype, jnp.floating))


def is_kernel(path: tuple[str, ...], leaf: Any) -> bool:
  """The default selection: a floating leaf named `kernel` with at least 2 dimensions.

  That excludes embeddings (`embedding`), biases, norm scales and adapter leaves (`lora_*`).
  """
  return is_weight(path, leaf)


def quantize(params: Any, method: str = "nf4", *, block_size: int = 64, double_quant: bool = True,
             stack: int | Callable[[tuple[str, ...], Any], int] = 0,
             select: Callable[[tuple[str, ...], Any], bool] = is_kernel) -> Any:
  """Quantizes the kernels of a frozen base for QLoRA: NF4 (QLoRA's 16 NormalFloat levels), int4 or int8.

  Args:
    params: the base params (or any pytree); `QuantizedArray`s in it are kept.
    method: `"nf4"` (4-bit codes, two per byte, one absmax per `block_size`
      values along the last axis), `"int4"` (the same blocks with 15 evenly
      spaced symmetric levels) or `"int8"` (symmetric,
      one scale per output channel).
    block_size: NF4 / int4 block size (even; 64 as in the paper).
    double_quant: NF4 / int4: quantize the block absmax values too (8 bits, groups of
      256 blocks): ~4.15 instead of 4.5 bits per parameter.
    stack: int8 only: leading scan axes that keep their own scales (1 for the
      kernels of an `nn.scan` stack), or `stack(path, leaf) -> int`.
    select: `select(path, leaf) -> bool`, True = quantize; `path` is a tuple of
      key names, e.g. `('layers_0', 'attn', 'query', 'kernel')`. The default
      (`is_kernel`) takes floating leaves named `kernel` of 2+ dimensions, so
      embeddings, biases, norms and adapters stay as they are. Kernels with no
      elements are always left as they are.

  Returns:
    The tree with a `QuantizedArray` in place of each selected leaf; other leaves
    are the same objects. A kernel sharded over a mesh (`NamedSharding`) gives
    codes and scales sharded like it (axes that do not divide are replicated). Run it as the frozen half: `jlora.apply(model,
    jlora.combine(trainable, quantized), config, x)` (each kernel is dequantized
    where its layer reads it), `model.apply` for the base, and `jlora.merge` for
    full-precision merged kernels.

  Raises:
    ValueError: a bad `method`, `block_size` or `stack`; NaN or inf in a kernel
      (the message names its path).
  """
  _quant._check_args(method, block_size, double_quant)

  def one(path, leaf):
    names = _path_names(path)
    if isinstance(leaf, QuantizedArray) or not select(names, leaf) or getattr(leaf, "size", 1) == 0:
      return leaf
    s = stack(names, leaf) if callable(stack) else stack
    try:
      q = _quant.quantize(leaf, method, block_size=block_size, double_quant=double_quant, stack=s)
    except (ValueError, TypeError) as e:
      raise type(e)(f"At {'/'.join(names)!r}: {e}") from None
    return _like(q, getattr(leaf, "sharding", None))

  return jax.tree_util.tree_map_with_path(one, params, is_leaf=lambda x: isinstance(x, QuantizedArray))


def _like(q: QuantizedArray, sharding: Any) -> QuantizedArray:
  """`q` with codes and scales sharded like the kernel it packs (`shardings_like`), if that was on a mesh."""
  placed = shardings_like(q, sharding)
  return q if placed is None else jax.device_put(q, placed)


def shardings_like(q: QuantizedArray, sharding: Any) -> QuantizedArray | None:
  """The `NamedSharding` of each child of `q` (a tree shaped like it) for a kernel sharded by `sharding`.

  The children take the kernel's spec (`partition_specs`); an axis of a child that its mesh
  axes do not divide (e.g. 2 NF4 blocks over 4 devices) is replicated. None when `sharding`
  is not a `NamedSharding`. `q` may hold arrays or `jax.ShapeDtypeStruct`s.
  """
  if not isinstance(sharding, NamedSharding):
    return None
  mesh = sharding.mesh

  def fit(spec: PartitionSpec, child: Any) -> NamedSharding:
    def size(entry: Any) -> int:
      return int(np.prod([mesh.shape[a] for a in ((entry,) if isinstance(entry, str) else entry)]))

    axes = [e if e is None or n % size(e) == 0 else None for e, n in zip(tuple(spec), child.shape)]
    return NamedSharding(mesh, partition_spec(axes))

  specs = _quant.partition_specs(q, sharding.spec)
  return jax.tree.map(fit, specs, q, is_leaf=lambda x: isinstance(x, PartitionSpec))


def dequantize(params: Any, dtype: jax.typing.DTypeLike | None = None) -> Any:
  """`params` with every `QuantizedArray` dequantized (to `dtype`; None: each kernel's original dtype)."""
  return jax.tree.map(lambda x: _quant.dequantize(x, dtype) if isinstance(x, QuantizedArray) else x, params,
                      is_leaf=lambda x: isinstance(x, QuantizedArray))


def _stack(q: QuantizedArray) -> int:
  """The `stack` an int8 array was quantized with: its leading axes that keep their own scales."""
  if q.method != "int8":
    return 0
  same = [q.scale.shape[i] == q.shape[i] for i in range(q.ndim - 1)]
  return min(same.index(False) if False in same else q.ndim - 1, q.ndim - 2)


def requantize(merged: Any, like: Any) -> tuple[Any, dict[str, dict[str, float]]]:
  """Packs merged kernels again as the quantized base they were merged from, and reports what that loses.

  After QLoRA, `jlora.merge(jlora.combine(trainable, quantized), config)` gives
  full-precision kernels `W = Ŵ0 + s·A·B` (`Ŵ0` the dequantized base). To serve
  a quantized model, each is quantized again with its base kernel's method,
  block size and double quantization; the rounding then drops part of the
  learned update `s·A·B`, which this measures per kernel.

  Args:
    merged: the merged tree (full-precision kernels).
    like: the quantized base (`jlora.quantize`) `merged` came from: the kernels
      that are `QuantizedArray`s there are requantized; other leaves are kept,
      and so are kernels still quantized in `merged` (not adapted, so `merge`
      left them packed; they get no report entry).

  Returns:
    `(requantized tree, report)`; `report[path]` has `relative_error`
    `‖deq(q(W)) − W‖ / ‖W‖` and `error_to_update` `‖deq(q(W)) − W‖ / ‖W − Ŵ0‖`
    (the rounding error over the size of the adapter's update: much below 1
    keeps the update, near or above 1 drowns it; inf where the update is 0).

  Raises:
    ValueError: a kernel of `like` has no same-shaped leaf in `merged`.
  """
  boxed = lambda x: isinstance(x, QuantizedArray)  # noqa: E731
  flat_like = {p: v for p, v in jax.tree_util.tree_leaves_with_path(like, is_leaf=boxed) if boxed(v)}
  report: dict[str, dict[str, float]] = {}

  def one(path, leaf):
    base = flat_like.get(path)
    if base is None or boxed(leaf):  # not a quantized kernel of `like`, or one the merge left quantized (not adapted)
      return leaf
    where = "/".join(_path_names(path))
    if tuple(getattr(leaf, "shape", ())) != tuple(base.shape):
      raise ValueError(f"requantize: `merged` at {where!r} has shape {getattr(leaf, 'shape', None)}, but the quantized "
                       f"kernel of `like` there has {base.shape}; pass the quantized base `merged` was merged from.")
    q = _quant.quantize(leaf, base.method, block_size=base.block_size or 64, double_quant=base.double_quant,
                        stack=_stack(base))
    w = jnp.asarray(leaf, jnp.float32)
    err = float(jnp.linalg.norm(_quant.dequantize(q, jnp.float32) - w))
    update = float(jnp.linalg.norm(w - _quant.dequantize(base, jnp.float32)))
    report[where] = {"relative_error": err / max(float(jnp.linalg.norm(w)), np.finfo(np.float32).tiny),
                     "error_to_update": err / update if update > 0 else float("inf")}
    return _like(q, getattr(leaf, "sharding", None))

  missing = [p for p in flat_like if p not in dict(jax.tree_util.tree_leaves_with_path(merged, is_leaf=boxed))]
  if missing:
    raise ValueError(f"requantize: `merged` has no leaf at {'/'.join(_path_names(missing[0]))!r}, a quantized kernel of "
                     "`like`; pass the merged tree of the same model.")
  return jax.tree_util.tree_map_with_path(one, merged, is_leaf=boxed), report
