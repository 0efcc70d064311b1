"""The LoRA math per layer kind: adapter shapes, initial values, factored deltas, merge deltas.

Layouts (Flax kernels are `(in..., out...)`; `S` are leading scan axes, if any):

* `dense`, `dense_general`, `conv`, `embed` — the *concat* layout:
  `A: S + in_shape + (r,)`, `B: S + (r,) + out_shape`, `delta = A·B` reshaped to
  the kernel. For `conv`, `in_shape` is `kernel_size + (in_features,)` (A is a
  convolution with the base's window) and `B` is a 1×1 convolution `(r, out)`.
  A grouped convolution (`feature_group_count = g > 1`, kernel `window + (in/g, out)`) takes PEFT's
  adapter: `A: S + window + (in, r)`, a full convolution over all input features, and `B: S + (r/g, out)`, a
  grouped 1×1 convolution (output group `j` reads `x·A`'s features `j·r/g ... (j+1)·r/g - 1`). Its `A·B` is a
  dense (ungrouped) kernel, which the grouped kernel cannot hold: it has no merge (`check_foldable`).
* `einsum` — the *broadcast* layout, since an `nn.Einsum` kernel may interleave
  input, output and shared (batch) axes: `A` has the kernel's shape with every
  output axis of size 1, then `r`; `B` has the kernel's shape with every input
  axis of size 1, then `r`; `delta[...] = sum_r A[..., r] B[..., r]`.

Both layouts are recognised from the shapes alone, so `merge` needs no model.
"""

from __future__ import annotations

import math
import string

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jlora.core.targets import Site

__all__ = ["adapter_shapes", "layout", "conv_groups", "check_foldable", "grouped_last", "delta_kernel", "fold",
           "check_adapter", "check_equation", "dropout", "lora_delta", "ragged_delta", "contract_last",
           "magnitude_shape", "column_norm", "dora_fold", "dora_unfold", "contract", "parse_einsum", "as_matrix"]


# ----------------------------------------------------------------- shapes
def adapter_shapes(site: Site, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Per-layer shapes of `A` and `B` for a site (see the module docstring)."""
  k = site.kernel_shape
  if site.broadcast:
    a = tuple(1 if i in site.out_axes else d for i, d in enumerate(k)) + (r,)
    b = tuple(1 if i in site.in_axes else d for i, d in enumerate(k)) + (r,)
    return a, b
  a, b = tuple(k[i] for i in site.in_axes) + (r,), (r,) + tuple(k[i] for i in site.out_axes)
  if site.groups > 1:  # PEFT's: A over all input features, B a grouped 1×1 convolution
    a, b = a[:-2] + (a[-2] * site.groups, r), (r // site.groups,) + b[1:]
  return a, b


def layout(a_shape, b_shape, kernel_shape) -> tuple[str, int]:
  """`('broadcast', 0)` or `('concat', number of leading stack axes)`, from the shapes alone."""
  a_shape, b_shape, kernel_shape = tuple(a_shape), tuple(b_shape), tuple(kernel_shape)
  if len(a_shape) == len(b_shape) == len(kernel_shape) + 1:
    return "broadcast", 0
  return "concat", len(a_shape) + len(b_shape) - 2 - len(kernel_shape)


def conv_groups(a_shape, b_shape, kernel_shape) -> int:
  """The feature groups `g` of a grouped convolution's adapter (`A: S + window + (in, r)` over a kernel
  `S + window + (in/g, out)`, `B: S + (r/g, out)`), read from the shapes alone; 1 for every other adapter.

  A fitting adapter of any other kind has `A`'s last input axis equal to the kernel's, so it never reads as grouped.
  """
  a, b, k = tuple(a_shape), tuple(b_shape), tuple(kernel_shape)
  form, s = layout(a, b, k)
  if form != "concat" or len(b) != s + 2 or len(a) != len(k) or len(a) < s + 3 or k[-2] < 1 or b[s] < 1:
    return 1
  g, rest = divmod(a[-2], k[-2])
  if g < 2 or rest or a[:-2] != k[:-2] or a[-1] != g * b[s] or b[s + 1] != k[-1] or k[-1] % g:
    return 1
  return g


def check_foldable(path: str, a_shape, b_shape, kernel_shape) -> None:
  """Raises a `ValueError` naming `path` unless `A·B` has the kernel's layout (a grouped convolution's adapter does
  not: merge, unmerge, DoRA's norm and combinations of deltas cannot be formed for it)."""
  g = conv_groups(a_shape, b_shape, kernel_shape)
  if g > 1:
    which = f"The adapter at {path!r}" if path else "An adapter"
    raise ValueError(
        f"{which} belongs to a grouped convolution (feature_group_count={g}, kernel {tuple(kernel_shape)}): its A "
        f"reads all {tuple(a_shape)[-2]} input features, so s·A·B is a dense kernel that the grouped one cannot "
        "hold, and it cannot be merged, unmerged or combined (PEFT cannot merge it either). Keep it factored "
        "(jlora.apply), or leave the layer out (exclude_modules)."
    )


def check_adapter(path: str, kernel_shape, a_shape, b_shape, r: int, groups: int | None = None) -> None:
  """Raises a `ValueError` naming `path` unless A and B fit the kernel with rank `r` (and, where the caller knows
  the layer, its feature `groups`)."""
  kernel_shape, a_shape, b_shape = tuple(kernel_shape), tuple(a_shape), tuple(b_shape)
  form, s = layout(a_shape, b_shape, kernel_shape)
  g = conv_groups(a_shape, b_shape, kernel_shape)
  if groups is not None and g != groups:
    raise ValueError(
        f"Adapter at {path!r} (lora_a {a_shape}, lora_b {b_shape}) was made for a convolution with "
        f"feature_group_count={g}, but the layer's kernel {kernel_shape} has {groups}. Were the adapters made for "
        "another base model?"
    )
  if g > 1:
    fits, rank = True, (a_shape[-1], b_shape[s] * g)
  elif form == "broadcast":
    try:
      fits = np.broadcast_shapes(a_shape[:-1], b_shape[:-1]) == kernel_shape
    except ValueError:
      fits = False
    rank = (a_shape[-1], b_shape[-1])
  else:
    fits = (
        0 <= s < len(a_shape) - 1
        and a_shape[:s] == b_shape[:s] == kernel_shape[:s]
        and a_shape[:-1] + b_shape[s + 1:] == kernel_shape
    )
    rank = (a_shape[-1], b_shape[s] if 0 <= s < len(b_shape) else None)
  if not fits or rank[0] != rank[1]:
    raise ValueError(
        f"Adapter at {path!r} does not fit its kernel {kernel_shape}: lora_a {a_shape}, lora_b {b_shape}. "
        "Were the adapters made for another base model or config?"
    )
  if rank[0] != r:
    raise ValueError(
        f"Adapter at {path!r} has rank {rank[0]} but the config gives r={r} for it; "
        "pass the LoraConfig the adapters were created with (check `r` and `rank_pattern`)."
    )


def check_equation(path: str, einsum_str: str, kernel_shape, a_shape) -> None:
  """Raises unless an einsum adapter's `A` (broadcast layout) was made for this equation's input/output axes."""
  ins, outs, _ = einsum_axes(einsum_str)
  kernel_shape = tuple(kernel_shape)
  want = tuple(1 if i in outs else d for i, d in enumerate(kernel_shape))
  if tuple(a_shape)[-len(kernel_shape) - 1:-1] != want:
    raise ValueError(
        f"The einsum at {path!r} is called with {einsum_str!r}, whose input axes {ins} and output axes {outs} of the "
        f"kernel {kernel_shape} are not the ones its adapter was made for (lora_a {tuple(a_shape)}). Call it with the "
        "equation it had when the adapter was created."
    )


def delta_kernel(a: jax.Array, b: jax.Array, kernel_shape) -> jax.Array:
  """`A·B` in the kernel's layout (unscaled, in float32). Shapes as in the module docstring."""
  check_foldable("", a.shape, b.shape, kernel_shape)
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  form, s = layout(a.shape, b.shape, tuple(kernel_shape))
  if form == "broadcast":
    return jnp.einsum("...r,...r->...", a, b)
  r = a.shape[-1]
  a2 = a.reshape(a.shape[:s] + (-1, r))
  b2 = b.reshape(b.shape[:s] + (r, -1))
  return jnp.matmul(a2, b2, precision=lax.Precision.HIGHEST).reshape(kernel_shape)


def _plus(kernel: jax.Array, a: jax.Array, b: jax.Array, scale) -> jax.Array:
  """`W0 + s·A·B` in the kernel's layout, in float32 (a quantized kernel is dequantized)."""
  return jnp.asarray(kernel).astype(jnp.float32) + scale * delta_kernel(a, b, kernel.shape)


def fold(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float, sign: int = 1) -> jax.Array:
  """`W0 + sign·s·A·B` in the kernel's layout and dtype, summed in float32 (merge: +1, unmerge: -1)."""
  return _plus(kernel, a, b, sign * scale).astype(kernel.dtype)


# --------------------------------------------------------------- DoRA
def magnitude_shape(a_shape, b_shape, kernel_shape) -> tuple[int, ...]:
  """The shape of a DoRA magnitude: the kernel's (with its stack axes), input axes of size 1 (it broadcasts)."""
  form, s = layout(a_shape, b_shape, kernel_shape)
  if form == "broadcast":
    return tuple(b_shape[:-1])
  n_in = len(a_shape) - 1 - s
  return tuple(kernel_shape[:s]) + (1,) * n_in + tuple(kernel_shape[s + n_in:])


def _norm(v: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """`‖v‖` over the axes that `shape` (a `magnitude_shape`) has of size 1 and `v` does not, keepdims."""
  axes = tuple(i for i, (m, k) in enumerate(zip(shape, v.shape)) if m == 1 and k != 1)
  return jnp.sqrt(jnp.sum(jnp.square(v), axis=axes, keepdims=True))


def column_norm(kernel: jax.Array, a: jax.Array, b: jax.Array, scale) -> jax.Array:
  """`‖W0 + s·A·B‖` over each output element's input axes, float32, in `magnitude_shape` (keepdims).

  DoRA's weight norm: `W0 + s·A·B` is formed per layer (d_in × d_out, as PEFT does).
  """
  return _norm(_plus(kernel, a, b, scale), magnitude_shape(a.shape, b.shape, kernel.shape))


def dora_fold(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float, magnitude: jax.Array) -> jax.Array:
  """DoRA's merge `m · (W0 + s·A·B) / ‖W0 + s·A·B‖`, in float32, cast back to the kernel's dtype."""
  v = _plus(kernel, a, b, scale)
  norm = lax.stop_gradient(_norm(v, magnitude_shape(a.shape, b.shape, kernel.shape)))  # a constant, as in forward
  return (magnitude.astype(jnp.float32) / norm * v).astype(kernel.dtype)


def dora_unfold(merged: jax.Array, a: jax.Array, b: jax.Array, scale: float, magnitude: jax.Array,
                norm: jax.Array) -> jax.Array:
  """The inverse of `dora_fold`, given the norm `‖W0 + s·A·B‖` from before the merge (the merge loses it)."""
  w = merged.astype(jnp.float32) * (norm.astype(jnp.float32) / magnitude.astype(jnp.float32))
  return (w - scale * delta_kernel(a, b, merged.shape)).astype(merged.dtype)


# ------------------------------------------------------------ forward
def dropout(key: jax.Array | None, x: jax.Array, rate) -> jax.Array:
  """Inverted dropout of the LoRA input: each entry kept with probability `1 - rate`, scaled by `1/(1 - rate)`.

  `rate` is a float, or an array broadcastable to `x` (a rate per example in a
  mixed-adapter batch). The identity when `rate` is 0 or `key` is None (no
  dropout stream given).
  """
  if key is None or (isinstance(rate, (int, float)) and rate == 0.0):
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def contract_last(u: jax.Array, b: jax.Array, precision) -> jax.Array:
  """`u (..., r) · B (r, out...) -> (..., out...)`."""
  return lax.dot_general(u, b, (((u.ndim - 1,), (0,)), ((), ())), precision=precision)


def grouped_last(u: jax.Array, b: jax.Array, precision) -> jax.Array:
  """A grouped 1×1 convolution: `u (..., r)` with `B (r/g, out)`, output group `j` reading `u`'s `j`-th block of
  `r/g` features -> `(..., out)`; `contract_last` when `g = 1`."""
  g = u.shape[-1] // b.shape[0]
  if g == 1:
    return contract_last(u, b, precision)
  ug = u.reshape(u.shape[:-1] + (g, b.shape[0]))
  bg = b.reshape(b.shape[0], g, b.shape[1] // g)
  y = jnp.einsum("...gj,jgo->...go", ug, bg, precision=precision)
  return y.reshape(u.shape[:-1] + (b.shape[1],))


def as_matrix(kind: str, x: jax.Array, axis) -> tuple[jax.Array, tuple[int, ...]]:
  """A dense layer's input as `(N, d_in)` (its contracted axes last, flattened), and the leading shape; a 1-D input
  `(d_in,)` as it is."""
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  if x.ndim == 1 and len(axes) == 1:  # one example (Equinox): `(d_in,)` stays 1-D, so a vmap over it gives 2-D dots
    return x, ()
  if kind == "dense_general":  # flax's DenseGeneral / LinearGeneral contract their input axes sorted
    axes = tuple(sorted(ax % x.ndim for ax in axes))
  n_in = len(axes)
  x = jnp.moveaxis(x, [ax % x.ndim for ax in axes], list(range(x.ndim - n_in, x.ndim)))
  lead = x.shape[: x.ndim - n_in]
  return x.reshape(-1, math.prod(x.shape[x.ndim - n_in:])), lead


def contract(kind: str, x: jax.Array, w: jax.Array, axis, precision=None) -> jax.Array:
  """A dense layer's `x·W` (no bias) for a kernel `w: in_shape + out_shape`, as the layer contracts `axis`."""
  x2, lead = as_matrix(kind, x, axis)
  n_in = 1 if isinstance(axis, int) else len(axis)
  return jnp.matmul(x2, w.reshape(x2.shape[-1], -1), precision=precision).reshape(lead + w.shape[n_in:])


def _low_rank_2d(x2: jax.Array, a: jax.Array, b: jax.Array, scale: float, precision) -> jax.Array:
  """`s·(x2 (N, d_in) · A (d_in, r)) · B (r, d_out)` as two plain 2-D matmuls."""
  u = jnp.matmul(x2, a.reshape(-1, a.shape[-1]), precision=precision) * scale
  return jnp.matmul(u, b.reshape(b.shape[0], -1), precision=precision)


def lora_delta(kind: str, x: jax.Array, a: jax.Array, b: jax.Array, *, scale: float = 1.0, axis=(-1,),
               einsum_str=None, precision=None, group_sizes=None) -> jax.Array:
  """The factored LoRA term `s·(x·A)·B` for one layer, never forming `A·B`.

  Dense-like kinds flatten the input to 2-D `(N, d_in)` first: on CPU, XLA's
  dots on 3-D activations with an r-wide operand (and their transposes in the
  backward pass) cost several times the 2-D form. The scale multiplies the
  rank-r intermediate `x·A`, the narrowest tensor on the path, rather than the
  `(N, d_out)` term and its gradient (`benchmarks/`, docs/performance.md).

  Args:
    kind: `dense`, `dense_general`, `einsum`, `embed` (x are ids) or `attend`
      (`nn.Embed.attend`: x are queries `(..., features)`, result `(..., vocab)`).
      Convolutions go through `jlora.core.adapted.low_rank` with the front-end's own convolution.
    x: the layer input; for `dense`: `(..., d_in)`.
    a: per-layer A, e.g. `(d_in, r)`.
    b: per-layer B, e.g. `(r, d_out)`.
    scale: `s`, e.g. `lora_alpha / r`.
    axis: the input axes of `x` contracted with the kernel's leading axes, in
      that order (`dense`, default the last); for `dense_general` (flax's
      `DenseGeneral` / `LinearGeneral`) in ascending order, as flax sorts them.
    einsum_str: `nn.Einsum`'s equation.
    precision: the layer's matmul precision.
    group_sizes: `ragged_dot` (x: `(tokens, d_in)` sorted by expert, a: `(E, d_in, 1, r)`,
      b: `(E, 1, d_out, r)`): the tokens per expert, `(E,)`.

  Returns:
    The term in the layer's output shape, e.g. `(..., d_out)`.
  """
  if kind == "ragged_dot":
    return ragged_delta(x, a, b, group_sizes, scale=scale, precision=precision)
  if kind in ("dense", "dense_general"):
    x2, lead = as_matrix(kind, x, axis)
    return _low_rank_2d(x2, a, b, scale, precision).reshape(lead + b.shape[1:])
  if kind == "embed":
    return contract_last(jnp.take(a, x, axis=0) * scale, b, precision)
  if kind == "attend":
    u = lax.dot_general(x, b, (((x.ndim - 1,), (1,)), ((), ())), precision=precision) * scale
    return lax.dot_general(u, a, (((u.ndim - 1,), (1,)), ((), ())), precision=precision)
  if kind == "einsum":
    return _einsum_delta(einsum_str, x, a, b, scale, precision)
  raise ValueError(f"unknown layer kind {kind!r}")


def ragged_delta(x: jax.Array, a: jax.Array, b: jax.Array, group_sizes: jax.Array, *, scale=1.0,
                 precision=None) -> jax.Array:
  """`s·ragged_dot(ragged_dot(x, A), B)`: each token through its expert's adapter, factored.

  Args:
    x: `(tokens, d_in)`, sorted by expert.
    a: `(E, d_in, 1, r)` (the broadcast layout of an `(E, d_in, d_out)` weight).
    b: `(E, 1, d_out, r)`.
    group_sizes: `(E,)` tokens per expert.
    scale: `s`.
    precision: the layer's matmul precision.

  Returns:
    `(tokens, d_out)`.
  """
  if x.ndim != 2:
    raise ValueError(f"ragged_dot layer: the input must be (tokens, d_in) sorted by expert, got shape {x.shape}.")
  a3 = a.reshape(a.shape[0], a.shape[1], a.shape[-1])
  b3 = jnp.swapaxes(b.reshape(b.shape[0], b.shape[2], b.shape[-1]), 1, 2)  # (E, r, d_out)
  u = lax.ragged_dot(x, a3.astype(x.dtype), group_sizes, precision=precision) * scale
  return lax.ragged_dot(u, b3.astype(u.dtype), group_sizes, precision=precision)


def einsum_axes(einsum_str: str) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
  """`(in_axes, out_axes, batch_axes)` of an `nn.Einsum` kernel, from `"lhs,kernel->out"`."""
  lhs, kernel, out = parse_einsum(einsum_str)
  in_axes = tuple(i for i, c in enumerate(kernel) if c in lhs and c not in out)
  batch = tuple(i for i, c in enumerate(kernel) if c in lhs and c in out)
  out_axes = tuple(i for i, c in enumerate(kernel) if c not in lhs)
  return in_axes, out_axes, batch


def parse_einsum(einsum_str: str) -> tuple[str, str, str]:
  eq = einsum_str.replace(" ", "")
  try:
    lhs, rest = eq.split(",")
    kernel, out = rest.split("->")
  except ValueError:
    raise ValueError(
        f"einsum equation {einsum_str!r}: jlora needs the form 'input_labels,kernel_labels->output_labels', "
        "e.g. '...D,DF->...F'."
    ) from None
  if "." in kernel or len(set(kernel)) != len(kernel):
    raise ValueError(f"nn.Einsum equation {einsum_str!r}: jlora needs a kernel with distinct, explicit labels.")
  return lhs, kernel, out


def _einsum_delta(einsum_str, x, a, b, scale, precision):
  lhs, kernel, out = parse_einsum(einsum_str)
  in_axes, out_axes, _ = einsum_axes(einsum_str)
  rank = next(c for c in string.ascii_letters if c not in einsum_str)
  ins = {kernel[i] for i in in_axes}
  outs = {kernel[i] for i in out_axes}
  a_labels = "".join(c for c in kernel if c not in outs)
  b_labels = "".join(c for c in kernel if c not in ins)
  u_labels = "".join(c for c in lhs if c not in ins) + rank
  a_sq = a.reshape(tuple(d for c, d in zip(kernel, a.shape) if c not in outs) + a.shape[-1:])
  b_sq = b.reshape(tuple(d for c, d in zip(kernel, b.shape) if c not in ins) + b.shape[-1:])
  u = jnp.einsum(f"{lhs},{a_labels}{rank}->{u_labels}", x, a_sq, precision=precision) * scale
  return jnp.einsum(f"{u_labels},{b_labels}{rank}->{out}", u, b_sq, precision=precision)
