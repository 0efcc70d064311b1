"""Quantized frozen kernels for QLoRA: NF4 and int4 (block-wise, double-quantized scales), int8 (per output channel).

A `QuantizedArray` stands in for one frozen kernel of shape `S + (d,)` in a param
tree. It is a pytree node: its children are arrays, its static metadata (method,
last dim, original dtype, block size, double quantization) is hashable aux data.

Layouts (`lead = shape[:-1]`; blocks and scales run along the LAST axis only):

* `nf4`: `codes` uint8 `lead + (ceil(d/2),)`, two 4-bit indices into `NF4_LEVELS`
  per byte (element `2j` in the high nibble, `2j+1` in the low one); the last axis
  is padded with zeros to `n_blocks · block_size` internally and stripped again.
* `int4`: the same layout with the 16 evenly spaced levels `(k - 8) / 7`
  (symmetric: a block's absmax is level ±1, `k = 0` is unused).
* `nf4` and `int4` `scale`: the absmax of each block, `lead + (n_blocks,)`, float32, or with
  double quantization int8 codes of it, decoded as `scale2 · code + offset`, with
  `scale2`, `offset` float32 `lead + (n2,)`, one per group of `min(256, n_blocks)`
  blocks (the paper subtracts the mean of the absmax values and quantizes them
  in 8 bits with block size 256; here the groups stay inside one row).
* `int8`: `codes` int8 of the kernel's shape, symmetric; `scale` float32, one per
  output channel (`absmax / 127`), with the kernel's ndim: `S + (1,) * k + (d,)`
  where `S` are `stack` leading (scan) axes and the `k` input axes are reduced.

So every nf4 child has all of `lead` first, every int8 child the `stack` axes:
slicing the leading axis of every child (`nn.scan`, `lax.dynamic_index_in_dim`)
gives the QuantizedArray of the slice, and a kernel's `PartitionSpec` maps onto
the children (`partition_specs`).
"""

from __future__ import annotations

import functools
import math
import statistics
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta as flax_meta
from jax.sharding import NamedSharding, PartitionSpec
from jax.tree_util import GetAttrKey

__all__ = ["NF4_LEVELS", "METHODS", "QuantizedArray", "quantize", "dequantize", "partition_specs"]

METHODS = ("nf4", "int4", "int8")
FOUR_BIT = ("nf4", "int4")  # block-wise, two 4-bit codes per byte
DQ_BLOCK = 256  # blocks of absmax values per second-level scale (QLoRA's double quantization)
MAX_BLOCK = 4096  # the largest NF4 block (bitsandbytes offers 64..4096); larger ones only pad


def _nf4_levels() -> np.ndarray:
  """The 16 NormalFloat levels of QLoRA (Dettmers et al. 2023, §3 and appendix E), float32, ascending.

  N(0, 1) quantiles at 8 evenly spaced probabilities from 1 − δ to ½ (the positive
  half, ½ itself dropped), at 7 from δ to ½ for the negative half, and an exact 0;
  all divided by the largest, so the levels run from −1 to 1. δ = ½(1/32 + 1/30),
  the mean of the outermost probability offsets of 16 and 15 equal parts
  (bitsandbytes writes 1 − δ as 0.9677083).
  """
  q = statistics.NormalDist().inv_cdf
  delta = 0.5 * (1 / 32 + 1 / 30)
  pos = [q(p) for p in np.linspace(1 - delta, 0.5, 9)[:-1]]
  neg = [-q(p) for p in np.linspace(1 - delta, 0.5, 8)[:-1]]
  v = np.sort(np.array([*pos, 0.0, *neg]))
  return (v / v[-1]).astype(np.float32)


NF4_LEVELS = _nf4_levels()
INT4_LEVELS = ((np.arange(16) - 8) / 7).astype(np.float32)  # symmetric int4: codes -7..7 (absmax / 7 per step)
_LEVELS = {"nf4": NF4_LEVELS, "int4": INT4_LEVELS}
_PAIRS = {m: np.stack([np.repeat(v, 16), np.tile(v, 16)], axis=-1) for m, v in _LEVELS.items()}  # (256, 2): a byte's
# two levels (one gather per byte decodes faster on CPU than unpacking the nibbles and computing `(k - 8) / 7`)


class _Meta(NamedTuple):
  method: str
  last_dim: int
  dtype: np.dtype
  block_size: int | None
  double_quant: bool


@jax.tree_util.register_pytree_with_keys_class
class QuantizedArray(flax_meta.AxisMetadata):
  """One quantized kernel: array children (`codes`, `scale`, [`scale2`, `offset`]) and static metadata.

  Build it with `quantize`; read it back with `dequantize`. The layouts are in
  the module docstring. `shape`, `ndim` and `size` are those of the original
  kernel (read from the children, so a sliced QuantizedArray reports the slice);
  `dtype` is the original dtype; `nbytes` sums the children.

  It is a flax `AxisMetadata` box: a linen layer's `self.param` unboxes it, so a
  stock `nn.Dense` holding one computes with the kernel dequantized right there,
  inside the traced step (and per layer inside `nn.scan`); `jnp.asarray(q)`
  dequantizes too (to the original dtype).
  """

  __slots__ = ("codes", "meta", "offset", "scale", "scale2")

  def __init__(self, codes: Any, scale: Any, scale2: Any = None, offset: Any = None, *, meta: _Meta):
    self.codes, self.scale, self.scale2, self.offset, self.meta = codes, scale, scale2, offset, meta

  def _names(self) -> tuple[str, ...]:
    return ("codes", "scale", "scale2", "offset") if self.meta.double_quant else ("codes", "scale")

  def tree_flatten_with_keys(self):
    return tuple((GetAttrKey(n), getattr(self, n)) for n in self._names()), self.meta

  @classmethod
  def tree_unflatten(cls, meta: _Meta, children) -> QuantizedArray:
    return cls(*children, meta=meta)

  method = property(lambda self: self.meta.method, doc="`'nf4'`, `'int4'` or `'int8'`.")
  dtype = property(lambda self: self.meta.dtype, doc="The dtype of the kernel before quantization.")
  block_size = property(lambda self: self.meta.block_size,
                        doc="NF4 / int4 block size along the last axis (None: int8).")
  double_quant = property(lambda self: self.meta.double_quant, doc="Whether the 4-bit block scales are quantized.")

  shape = property(lambda self: (*self.codes.shape[:-1], self.meta.last_dim), doc="The kernel's shape `lead + (d,)`.")
  ndim = property(lambda self: len(self.shape))
  size = property(lambda self: math.prod(self.shape))
  sharding = property(lambda self: getattr(self.codes, "sharding", None),
                      doc="The sharding of `codes`, which carry the kernel's spec (`partition_specs`): where the "
                          "kernel lies, for the adapters' rule.")
  nbytes = property(lambda self: sum(int(getattr(self, n).nbytes) for n in self._names()), doc="Bytes of all children.")
  bits_per_param = property(lambda self: 8 * self.nbytes / self.size,
                            doc="`8 · nbytes / size`: 4.5 for NF4 without double quantization, ≈ 4.13-4.15 with it.")

  # flax AxisMetadata: unboxed where a layer reads its param; scan/vmap axes are the children's leading axes
  def unbox(self) -> jax.Array:
    return dequantize(self, None)

  def replace_boxed(self, val: Any) -> Any:
    return val

  def add_axis(self, index: int, params: dict[Any, Any]) -> QuantizedArray:
    return self

  def remove_axis(self, index: int, params: dict[Any, Any]) -> QuantizedArray:
    return self

  def __jax_array__(self) -> jax.Array:
    return dequantize(self, None)

  def __repr__(self) -> str:
    m = self.meta
    extra = f", block_size={m.block_size}, double_quant={m.double_quant}" if m.method in FOUR_BIT else ""
    # children may be specs, None, types (`jax.tree.map(type, ...)`), ...: a shape only when they have one
    shape = self.shape if isinstance(getattr(self.codes, "shape", None), tuple) else "?"
    return f"QuantizedArray({m.method}, shape={shape}, dtype={np.dtype(m.dtype).name}{extra})"


# ------------------------------------------------------------------ helpers
def _blocks(x: jax.Array, b: int) -> jax.Array:
  """`(..., n)` → `(..., ceil(n/b), b)`, the last axis padded with zeros."""
  n = x.shape[-1]
  nb = -(-n // b)
  x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, nb * b - n)])
  return x.reshape(x.shape[:-1] + (nb, b))


def _pack(idx: jax.Array) -> jax.Array:
  """4-bit indices `(..., 2m)` → bytes `(..., m)`, uint8 (even elements in the high nibble)."""
  idx = idx.astype(jnp.uint8)
  return (idx[..., 0::2] << 4) | idx[..., 1::2]


def _unpack(codes: jax.Array) -> jax.Array:
  """Bytes `(..., m)` → 4-bit indices `(..., 2m)`, uint8: the inverse of `_pack`."""
  return jnp.stack([codes >> 4, codes & 15], axis=-1).reshape(codes.shape[:-1] + (-1,))


def _quantize_scales(absmax: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Double quantization of `absmax` `lead + (nb,)`: int8 codes `lead + (nb,)`, `scale2`, `offset` `lead + (n2,)`."""
  nb = absmax.shape[-1]
  g = min(DQ_BLOCK, nb)
  valid = _blocks(jnp.ones((nb,), bool), g)  # (n2, g): False on the padding
  a = _blocks(absmax, g)
  offset = jnp.sum(a, -1) / jnp.sum(valid, -1)  # the mean of each group's absmax values
  centered = jnp.where(valid, a - offset[..., None], 0.0)
  scale2 = jnp.max(jnp.abs(centered), -1) / 127
  codes = jnp.round(centered / jnp.where(scale2 > 0, scale2, 1.0)[..., None])
  codes = jnp.clip(codes, -127, 127).astype(jnp.int8).reshape(a.shape[:-2] + (-1,))[..., :nb]
  return codes, scale2, offset


def _absmax(q: QuantizedArray) -> jax.Array:
  """The block absmax values of a 4-bit array, float32 `lead + (n_blocks,)` (decoded if double-quantized)."""
  if not q.double_quant:
    return jnp.asarray(q.scale, jnp.float32)
  nb = q.scale.shape[-1]
  g = min(DQ_BLOCK, nb)
  spread = lambda v: jnp.repeat(jnp.asarray(v), g, axis=-1)[..., :nb]  # noqa: E731  (..., n2) → (..., nb)
  a = jnp.asarray(q.scale, jnp.float32) * spread(q.scale2) + spread(q.offset)
  return jnp.maximum(a, 0.0)  # a decoded absmax is never negative


def _lookup(codes: jax.Array, method: str) -> jax.Array:
  """Bytes `(..., m)` → their two levels `(..., m, 2)`, float32: one gather from a 256-entry table."""
  s, out = jax.typeof(codes).sharding, None
  if s.mesh.shape_tuple:  # an Explicit-axes mesh: the gather must be told that its output follows the codes
    out = NamedSharding(s.mesh, PartitionSpec(*tuple(s.spec), *(None,) * (codes.ndim + 1 - len(s.spec))))
  return jnp.asarray(_PAIRS[method]).at[codes.astype(jnp.uint32)].get(out_sharding=out)  # unsigned: no negative wrap


@functools.partial(jax.jit, static_argnames=("method", "block_size", "double_quant"))
def _four_bit(x: jax.Array, method: str, block_size: int, double_quant: bool):
  d = x.shape[-1]
  blocks = _blocks(x.astype(jnp.float32), block_size)  # lead + (nb, bs)
  absmax = jnp.max(jnp.abs(blocks), axis=-1)
  y = blocks / jnp.where(absmax > 0, absmax, 1.0)[..., None]
  levels = _LEVELS[method]
  midpoints = (levels[:-1] + levels[1:]) / 2  # (15,): nearest level = number of midpoints below
  idx = jnp.searchsorted(jnp.asarray(midpoints), y, method="compare_all")  # ties go to the lower level
  codes = _pack(idx.reshape(idx.shape[:-2] + (-1,))[..., :2 * (-(-d // 2))])
  if not double_quant:
    return (codes, absmax), absmax
  return (codes, *_quantize_scales(absmax)), absmax


@functools.partial(jax.jit, static_argnames=("stack",))
def _int8(x: jax.Array, stack: int):
  x = x.astype(jnp.float32)
  scale = jnp.max(jnp.abs(x), axis=tuple(range(stack, x.ndim - 1)), keepdims=True) / 127
  codes = jnp.clip(jnp.round(x / jnp.where(scale > 0, scale, 1.0)), -127, 127).astype(jnp.int8)
  return (codes, scale), scale


def _check_args(method: Any, block_size: Any, double_quant: Any) -> None:
  if method not in METHODS:
    raise ValueError(f"`method` must be one of {METHODS}, got {method!r}; e.g. quantize(w, 'nf4') for QLoRA.")
  if (not isinstance(block_size, int) or isinstance(block_size, bool) or not 0 < block_size <= MAX_BLOCK
      or block_size % 2):
    raise ValueError(
        f"`block_size` must be an even int in [2, {MAX_BLOCK}] (two 4-bit codes share a byte; bitsandbytes' largest "
        f"NF4 block is {MAX_BLOCK}), got {block_size!r}; QLoRA uses block_size=64."
    )
  if not isinstance(double_quant, bool):
    raise TypeError(f"`double_quant` must be a bool, got {double_quant!r}.")


# ------------------------------------------------------------------ public
def quantize(x: jax.typing.ArrayLike, method: str = "nf4", *, block_size: int = 64, double_quant: bool = True,
             stack: int = 0) -> QuantizedArray:
  """Quantizes one kernel `x` of shape `S + (d,)` (at least 2-D, floating).

  Pure and jittable (metadata is static); outside `jit` it also checks that `x`
  is finite (one read of the small absmax array).

  Args:
    x: the kernel, any floating dtype; Flax layout `(in..., out)`, optionally with
      leading stack axes `(L, in..., out)`.
    method: `'nf4'`: NormalFloat4, one absmax per `block_size` elements along the
      last axis. `'int4'`: the same blocks with 15 evenly spaced symmetric levels
      (`round(7·x/absmax)`). `'int8'`: symmetric, one
      scale per output channel (last axis).
    block_size: 4-bit block length along the last axis; positive and even (QLoRA: 64).
      Checked for every method, used by NF4 and int4 only.
    double_quant: NF4 and int4 only: quantize the float32 block absmax values to int8 in
      groups of up to 256 after subtracting each group's mean (QLoRA's double
      quantization: 4.127-4.15 bits per parameter instead of 4.5).
    stack: int8 only: the number of leading stack axes (1 for a `nn.scan` stack
      `(L, d_in, d_out)`) that keep their own scales; the scale reduces over axes
      `stack .. ndim-2`, so `0 <= stack <= ndim - 2`. (NF4 needs no `stack`.)

  Returns:
    A `QuantizedArray` with `shape == x.shape` and `dtype == x.dtype`.

  Raises:
    ValueError: a bad `method`, `block_size` or `stack`, `x` with fewer than 2
      dimensions or no elements, or (outside `jit`) NaN or inf in `x`.
    TypeError: `x` not floating, `double_quant` not a bool.
  """
  _check_args(method, block_size, double_quant)
  x = jnp.asarray(x)
  if x.ndim < 2:
    raise ValueError(
        f"`x` must be a kernel with at least 2 dimensions, got shape {x.shape}; leave biases, norms and scalars "
        "unquantized (quantize_tree skips them)."
    )
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"`x` must be floating (the kernel to quantize), got dtype {x.dtype}.")
  if x.size == 0:
    raise ValueError(f"`x` has shape {x.shape}, with no elements: there is nothing to quantize; leave it as it is "
                     "(jlora.quantize of a tree skips empty kernels).")
  if method == "int8" and (not isinstance(stack, int) or not 0 <= stack <= x.ndim - 2):
    raise ValueError(
        f"`stack` must be an int in [0, {x.ndim - 2}] for a kernel of shape {x.shape} (the number of leading "
        f"scan axes; at least one input axis must remain), got {stack!r}."
    )
  if method in FOUR_BIT:
    children, absmax = _four_bit(x, method, block_size, double_quant)
    meta = _Meta(method, x.shape[-1], x.dtype, block_size, double_quant)
  else:
    children, absmax = _int8(x, stack)
    meta = _Meta("int8", x.shape[-1], x.dtype, None, False)
  if not isinstance(absmax, jax.core.Tracer) and not np.isfinite(np.asarray(absmax)).all():
    bad = int(np.sum(~np.isfinite(np.asarray(absmax))))
    raise ValueError(
        f"`x` (shape {x.shape}) has NaN or inf values in {bad} {'block(s)' if method in FOUR_BIT else 'channel(s)'}; "
        "quantizing would spread them over whole blocks. Check the checkpoint the kernel came from."
    )
  return QuantizedArray(*children, meta=meta)


def dequantize(q: QuantizedArray, dtype: jax.typing.DTypeLike | None = jnp.bfloat16) -> jax.Array:
  """The kernel a `QuantizedArray` stands for, `q.shape`, in `dtype` (None: `q.dtype`).

  Pure, jittable, and elementwise apart from one 256-entry table lookup: XLA
  fuses it into one pass over the codes (computed in float32, cast once).
  Call it inside the jitted step so that no full-precision copy is stored.
  """
  if not isinstance(q, QuantizedArray):
    raise TypeError(f"`q` must be a QuantizedArray (from jlora quantize), got {type(q).__name__}.")
  return _dequantize(q, q.dtype if dtype is None else jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnames=("dtype",))  # eager calls compile once, not once per op
def _dequantize(q: QuantizedArray, dtype: np.dtype) -> jax.Array:
  codes = jnp.asarray(q.codes)
  if q.method == "int8":
    return (codes.astype(jnp.float32) * jnp.asarray(q.scale)).astype(dtype)
  lead, m = codes.shape[:-1], codes.shape[-1]
  absmax = _absmax(q)
  nb, bs = absmax.shape[-1], q.block_size
  vals = _lookup(codes, q.method).reshape(lead + (2 * m,))
  vals = jnp.pad(vals, [(0, 0)] * len(lead) + [(0, nb * bs - 2 * m)]).reshape(lead + (nb, bs))
  return (vals * absmax[..., None]).reshape(lead + (nb * bs,))[..., :q.meta.last_dim].astype(dtype)


def partition_specs(q: QuantizedArray, spec: PartitionSpec) -> QuantizedArray:
  """Per-child `PartitionSpec`s for `q` from its kernel's `spec`: a tree shaped like `q` (for `jax.device_put`,
  `jit`'s `in_shardings`, `NamedSharding` trees).

  `codes` and the NF4 / int4 `scale` take `spec` as is (a sharded last axis keeps blocks
  local when `d` is a multiple of `n_shards · block_size`); `scale2` / `offset`
  replicate their last axis; the int8 `scale` replicates its reduced (size-1) axes.
  """
  if not isinstance(q, QuantizedArray):
    raise TypeError(f"`q` must be a QuantizedArray, got {type(q).__name__}.")
  full = tuple(spec) + (None,) * (q.ndim - len(spec))
  if q.method == "int8":
    scale = PartitionSpec(*(a if n != 1 else None for a, n in zip(full, q.scale.shape)))
    return QuantizedArray(PartitionSpec(*full), scale, meta=q.meta)
  extra = (PartitionSpec(*full[:-1], None),) * 2 if q.double_quant else ()
  return QuantizedArray(PartitionSpec(*full), PartitionSpec(*full), *extra, meta=q.meta)
