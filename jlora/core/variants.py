"""Variants and initialisations as values: what an adapter adds beside a kernel, and how it changes the layer.

A `Variant` (cf. optax's `GradientTransformation`) is a NamedTuple of pure functions:
the leaves it adds and their shapes and initial values, its factored term, and how
it folds into the kernel and back. `LORA` and `DORA` are the two values; every
front-end runs them through one call, `jlora.core.adapted.adapted`, and `merge`
through `fold` / `unfold`, so a new variant touches this module only.

Leaves are passed as a dict keyed by *role* (`ROLES`): `"lora_a"` (`A`, per layer
`in_shape + (r,)`), `"lora_b"` (`B`, `(r,) + out_shape`) and, for DoRA,
`"lora_magnitude"` (`m`, the kernel's shape with input axes of size 1). Where they
sit in a tree (`lora_a`, `<weight>_lora_a`, ...) is `jlora.core.targets.leaf_name`.

An initialisation (`INITS`, keyed by `LoraConfig.init_lora_weights`) is a value too:
`Init(fn, reads_kernel, rewrites_kernel)`, `fn(key, site, r, scale, stack, kernel, dtype) -> (A, B, W or None)`
(`W` when it rewrites the kernel: PiSSA's and OLoRA's residual, LoftQ's quantized `QuantizedArray`).

DoRA (Liu et al. 2024) writes the adapted weight as a magnitude times a direction,
`W = m · (W0 + s·A·B) / ‖W0 + s·A·B‖`, the norm taken per output element over its
input axes (`jlora.core.ops.column_norm`) and treated as a constant in the backward
pass (paper §4.3). With `g = m / ‖W0 + s·A·B‖` the layer computes

    y = base(x) + (g − 1) · (x_d·W0) + g · s·(x_d·A)·B

with `x_d` the LoRA input (after LoRA dropout), as PEFT does; for `nn.Embed.attend`
(a tied head, the embedding's columns are the inputs) `y = (x ⊙ g)·(W0 + s·A·B)ᵀ`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jlora.core import ops as _ops
from jlora.core.fields import LOFTQ_BITS, pissa_niter
from jlora.core.targets import LORA_KEYS, MAGNITUDE_KEY, Site
from jlora.quant.array import QuantizedArray, dequantize, quantize

__all__ = ["Variant", "LORA", "DORA", "ROLES", "variant_of", "variant_of_leaves", "Init", "INITS", "init_for"]

Leaves = Mapping[str, Any]  # role -> leaf
A, B, M = LORA_KEYS[0], LORA_KEYS[1], MAGNITUDE_KEY


class Variant(NamedTuple):
  """One adapter variant: a value of pure functions (see the module docstring).

  Attributes:
    name: `"lora"` or `"dora"`.
    roles: the leaves it holds beside a kernel, e.g. `("lora_a", "lora_b")`.
    shapes: `shapes(a_shape, b_shape, kernel_shape) -> {role: shape}` of the leaves beyond `A` and `B`
      (shapes with the kernel's leading stack axes).
    init: `init(kernel, a, b, scale) -> {role: value}`: the leaves beyond `A` and `B`, given the kernel
      (`S + kernel_shape`) and the new `A`, `B`; float32.
    reads_kernel: whether `init` reads the kernel (the init then needs the base's values, not only shapes).
    term: `term(site, x, y, kernel, leaves, scale, lora, base, norm) -> delta`: what the layer adds to its
      base output `y`, given the LoRA input `x` (after dropout, in the term's dtype), the per-layer kernel
      (`jnp.asarray`-able; a quantized kernel dequantizes), the per-layer leaves (in the term's dtype),
      the scale `s`, the factored `lora = s·(x·A)·B` in the output's shape, `base()` giving `x·W0`
      without bias, and `norm` a cached `‖W0 + s·A·B‖` or None. In the term's dtype.
    fold: `fold(kernel, leaves, scale) -> W`: the merged kernel, in the kernel's dtype.
    unfold: `unfold(merged, leaves, scale, norm) -> W0`: the inverse of `fold` (`norm` as `term`; DoRA needs it).
  """

  name: str
  roles: tuple[str, ...]
  shapes: Callable[..., dict[str, tuple[int, ...]]]
  init: Callable[..., dict[str, jax.Array]]
  reads_kernel: bool
  term: Callable[..., jax.Array]
  fold: Callable[..., jax.Array]
  unfold: Callable[..., jax.Array]


# ------------------------------------------------------------------ LoRA
def _lora_term(site, x, y, kernel, leaves, scale, lora, base, norm):
  return lora


def _lora_fold(kernel, leaves, scale):
  return _ops.fold(kernel, leaves[A], leaves[B], scale)


def _lora_unfold(merged, leaves, scale, norm=None):
  return _ops.fold(merged, leaves[A], leaves[B], scale, sign=-1)


LORA = Variant("lora", (A, B), lambda a_shape, b_shape, kernel_shape: {}, lambda kernel, a, b, scale: {}, False,
               _lora_term, _lora_fold, _lora_unfold)


# ------------------------------------------------------------------ DoRA
def _dora_shapes(a_shape, b_shape, kernel_shape):
  return {M: _ops.magnitude_shape(a_shape, b_shape, kernel_shape)}


def _dora_init(kernel, a, b, scale):
  """The magnitude starts at `‖W0 + s·A·B‖`, so the model is unchanged at init."""
  return {M: _ops.column_norm(kernel, a, b, scale)}


def _to_output(site: Site, g: jax.Array, n_in: int) -> tuple[jax.Array, str | None]:
  """`g` (kernel-shaped, its `n_in` input axes of size 1) arranged to multiply the layer output: `(g, einsum spec
  or None)`."""
  if site.kind != "einsum":
    return g.reshape(g.shape[n_in:]), None
  lhs, kernel, out = _ops.parse_einsum(site.equation)
  summed = [c for c in kernel if c not in lhs and c not in out]
  if summed:
    raise ValueError(
        f"DoRA at {'/'.join(site.path)!r}: the einsum {site.equation!r} sums the kernel's own axis {summed} away, so "
        "its output has no element per weight column for DoRA's magnitude to scale. Exclude this layer "
        "(exclude_modules) or use plain LoRA for it."
    )
  ins = {c for c in kernel if c in lhs and c not in out}
  labels = "".join(c for c in kernel if c not in ins)
  squeezed = g.reshape(tuple(d for c, d in zip(kernel, g.shape) if c not in ins))
  return squeezed, f"{out},{labels}->{out}"


def _times(t: jax.Array, g: jax.Array, spec: str | None) -> jax.Array:
  return t * g if spec is None else jnp.einsum(spec, t, g)


def _dora_term(site, x, y, kernel, leaves, scale, lora, base, norm):
  dt = lora.dtype
  a, b, m = leaves[A], leaves[B], leaves[M]
  kernel = jnp.asarray(kernel)
  norm = _ops.column_norm(kernel, a, b, scale) if norm is None else jnp.asarray(norm, jnp.float32)
  g = (m.astype(jnp.float32) / lax.stop_gradient(norm)).astype(dt)
  if site.kind == "attend":  # the embedding's features are this product's inputs
    xg = x * g.reshape(-1)
    w0x = lax.dot_general(xg, kernel.astype(dt), (((xg.ndim - 1,), (1,)), ((), ())), precision=site.precision)
    return w0x - y.astype(dt) + _ops.lora_delta("attend", xg, a, b, scale=scale, precision=site.precision)
  g, spec = _to_output(site, g, a.ndim - 1)
  return _times(base().astype(dt), g - 1, spec) + _times(lora, g, spec)


def _dora_fold(kernel, leaves, scale):
  return _ops.dora_fold(kernel, leaves[A], leaves[B], scale, leaves[M])


def _dora_unfold(merged, leaves, scale, norm=None):
  if norm is None:
    raise ValueError("DoRA's unfold needs the norm ‖W0 + s·A·B‖ taken before the merge (jlora.dora_norms).")
  return _ops.dora_unfold(merged, leaves[A], leaves[B], scale, leaves[M], norm)


DORA = Variant("dora", (A, B, M), _dora_shapes, _dora_init, True, _dora_term, _dora_fold, _dora_unfold)

# Every role a variant may hold, in order.
ROLES = (A, B, M)


def variant_of(config: Any) -> Variant:
  """The variant a `LoraConfig` asks for: `DORA` with `use_dora`, else `LORA`."""
  return DORA if config.use_dora else LORA


def variant_of_leaves(leaves: Leaves) -> Variant:
  """The variant whose roles a leaf dict holds: `DORA` when it has a magnitude, else `LORA`."""
  return DORA if leaves.get(M) is not None else LORA


# ------------------------------------------------------------------ initialisations
class Init(NamedTuple):
  """An initialisation of `A` and `B`: `fn(key, site, r, scale, stack, kernel, dtype) -> (A, B, W or None)`.

  `stack` are the kernel's leading scan axes (a different draw per layer); `kernel` is the
  kernel's value when `reads_kernel`, else None; `W` is the kernel it writes (PiSSA's and
  OLoRA's residual, when `rewrites_kernel`) or None when it leaves the kernel alone.
  """

  fn: Callable[..., tuple[jax.Array, jax.Array, jax.Array | None]]
  reads_kernel: bool = False
  rewrites_kernel: bool = False


# Draws are made flat and reshaped: the same values as a draw of the full shape, but XLA on CPU compiles a
# multi-axis draw (einsum, conv and stacked adapters) 4-7x slower.
def _uniform(key: jax.Array, shape: tuple[int, ...], bound: float) -> jax.Array:
  return jax.random.uniform(key, (math.prod(shape),), jnp.float32, -bound, bound).reshape(shape)


def _normal(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  return jax.random.normal(key, (math.prod(shape),), jnp.float32).reshape(shape)


def _drawn(method: Any) -> Callable[..., tuple[jax.Array, jax.Array, None]]:
  """PEFT's random inits: `True` A ~ U(±1/sqrt(fan_in)) (kaiming-uniform, a=√5), B = 0; `"gaussian"`
  A ~ N(0, 1/r²), B = 0; `False` B ~ U(±1/sqrt(r)) too. For `nn.Embed` the roles swap as in PEFT: A = 0 and
  B ~ N(0, 1), or both normal with `False`."""

  def fn(key, site, r, scale, stack, kernel, dtype):
    a_shape, b_shape = _ops.adapter_shapes(site, r)
    a_shape, b_shape = stack + a_shape, stack + b_shape
    ka, kb = jax.random.split(key)
    if site.kind == "embed":
      b = _normal(kb, b_shape)
      a = _normal(ka, a_shape) if method is False else jnp.zeros(a_shape, jnp.float32)
      return a.astype(dtype), b.astype(dtype), None
    if method == "gaussian":
      a = _normal(ka, a_shape) / r
    else:
      a = _uniform(ka, a_shape, 1.0 / math.sqrt(site.fan_in))
    b = _uniform(kb, b_shape, 1.0 / math.sqrt(r)) if method is False else jnp.zeros(b_shape, jnp.float32)
    return a.astype(dtype), b.astype(dtype), None

  return fn


# The matrix inits (orthogonal, PiSSA, OLoRA) work on each layer's kernel as a matrix `(fan_in, fan_out)` (inputs ×
# outputs, PyTorch's weight transposed) and give `A: (fan_in, r)`, `B: (r, fan_out)`, per layer of a stack.
def _matrix_site(method: str, site: Site) -> None:
  if site.batch_axes:
    raise ValueError(
        f"init_lora_weights={method!r} is not supported for the {site.kind} at {'/'.join(site.path)!r}: "
        "its kernel has axes shared by input and output (e.g. experts); use True or 'gaussian'."
    )


def _perm(site: Site, stack: tuple[int, ...]) -> tuple[int, ...]:
  ns = len(stack)
  return tuple(range(ns)) + tuple(ns + i for i in site.in_axes + site.out_axes)


def _to_matrix(site: Site, stack: tuple[int, ...], kernel: jax.Array) -> jax.Array:
  """The kernel `S + kernel_shape` as float32 matrices `S + (fan_in, fan_out)`."""
  w = jnp.transpose(kernel.astype(jnp.float32), _perm(site, stack))
  return w.reshape(stack + (site.fan_in, site.fan_out))


def _from_matrix(site: Site, stack: tuple[int, ...], w: jax.Array, dtype: Any) -> jax.Array:
  """The inverse of `_to_matrix`, in `dtype`."""
  k = site.kernel_shape
  w = w.reshape(stack + tuple(k[i] for i in site.in_axes + site.out_axes))
  return jnp.transpose(w, np.argsort(_perm(site, stack))).astype(dtype)


def _leaves(site: Site, r: int, stack: tuple[int, ...], a: jax.Array, b: jax.Array, dtype: Any):
  """`A: S + (fan_in, r)`, `B: S + (r, fan_out)` in the site's adapter layout (`jlora.core.ops`), in `dtype`."""
  a_shape, b_shape = _ops.adapter_shapes(site, r)
  if site.broadcast:
    b = jnp.swapaxes(b, -1, -2)
  return a.reshape(stack + a_shape).astype(dtype), b.reshape(stack + b_shape).astype(dtype)


def _residual(site, r, stack, kernel, a, b, scale, dtype):
  """`(A, B, W0 − s·A·B)` in the site's layouts: the kernel an init that moves `s·A·B` out of it writes."""
  w = _to_matrix(site, stack, kernel) - scale * jnp.matmul(a, b, precision=lax.Precision.HIGHEST)
  return (*_leaves(site, r, stack, a, b, dtype), _from_matrix(site, stack, w, kernel.dtype))


def _orthogonal(key, site, r, scale, stack, kernel, dtype):
  """PEFT's `"orthogonal"`: with `Q` the QR factor of an `(r, r)` normal draw, `A = G_A·Q[0::2] / 10` and
  `B = Q[1::2]ᵀ·G_B / 10` (`G` normal draws of `(fan_in, r/2)` and `(r/2, fan_out)`): both non-zero, of rank
  `r/2`, and `A·B = 0` (the rows of `Q` are orthonormal), so the model is unchanged at init."""
  _matrix_site("orthogonal", site)
  if r % 2:
    raise ValueError(f"init_lora_weights='orthogonal' needs an even rank (its A and B each take half of an "
                     f"orthogonal basis), but {'/'.join(site.path)!r} has r={r}; use an even `r` (and "
                     "`rank_pattern` values).")
  kq, ka, kb = jax.random.split(key, 3)
  q, _ = jnp.linalg.qr(_normal(kq, stack + (r, r)))
  a = jnp.matmul(_normal(ka, stack + (site.fan_in, r // 2)), q[..., 0::2, :], precision=lax.Precision.HIGHEST)
  b = jnp.matmul(jnp.swapaxes(q[..., 1::2, :], -1, -2), _normal(kb, stack + (r // 2, site.fan_out)),
                 precision=lax.Precision.HIGHEST)
  return (*_leaves(site, r, stack, a / 10, b / 10, dtype), None)


def _pissa(niter: int | None) -> Callable[..., tuple[jax.Array, jax.Array, jax.Array]]:
  """PiSSA: A, B from the top-r singular triplets of W0, and the residual `W_res = W0 − s·A·B` as the kernel.

  With `W0 = U S Vᵀ` (inputs × outputs), `A = U_r √S_r / √s`, `B = √S_r V_rᵀ / √s`, so the
  model is unchanged at init and the adapter starts on the principal subspace. `niter=None`
  takes the exact SVD (`"pissa"`); an int, the randomized one of `"pissa_niter_[n]"` (PEFT's
  `torch.svd_lowrank(W, q=r, niter=n)`, Halko et al. 2009, Algorithm 4.4 then 5.1).
  """

  def fn(key, site, r, scale, stack, kernel, dtype):
    _matrix_site("pissa" if niter is None else f"pissa_niter_{niter}", site)
    w = _to_matrix(site, stack, kernel)
    svd = jnp.linalg.svd(w, full_matrices=False) if niter is None else _svd_lowrank(key, w, r, niter)
    return _residual(site, r, stack, kernel, *_top_r(svd, r, scale), scale, dtype)

  return fn


def _top_r(svd: tuple[jax.Array, jax.Array, jax.Array], r: int, scale: float) -> tuple[jax.Array, jax.Array]:
  """`(A, B)` from an SVD `(U, S, Vᵀ)` of `S + (fan_in, fan_out)` matrices: `A = U_r √S_r / √s`,
  `B = √S_r V_rᵀ / √s`, so that `s·A·B` is the best rank-r approximation (PiSSA, LoftQ)."""
  u, sv, vh = svd
  root = jnp.sqrt(sv[..., :r]) / math.sqrt(scale)
  return u[..., :, :r] * root[..., None, :], root[..., :, None] * vh[..., :r, :]


def _svd_lowrank(key: jax.Array, w: jax.Array, q: int, niter: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The rank-`q` randomized SVD `(U, S, Vᵀ)` of `w: S + (m, n)`, as `torch.svd_lowrank(w, q, niter)` computes it
  (no oversampling; a tall matrix, `w` or `wᵀ`; a normal draw `(n, q)`; `niter` subspace iterations)."""
  wide = w.shape[-1] > w.shape[-2]
  m = jnp.swapaxes(w, -1, -2) if wide else w
  mt = jnp.swapaxes(m, -1, -2)
  mul = functools.partial(jnp.matmul, precision=lax.Precision.HIGHEST)
  basis = jnp.linalg.qr(mul(m, _normal(key, m.shape[:-2] + (m.shape[-1], q))))[0]
  for _ in range(niter):
    basis = jnp.linalg.qr(mul(m, jnp.linalg.qr(mul(mt, basis))[0]))[0]
  u, sv, vh = jnp.linalg.svd(mul(jnp.swapaxes(basis, -1, -2), m), full_matrices=False)
  u = mul(basis, u)
  return (jnp.swapaxes(vh, -1, -2), sv, jnp.swapaxes(u, -1, -2)) if wide else (u, sv, vh)


def _olora(key, site, r, scale, stack, kernel, dtype):
  """OLoRA (Büyükakyüz 2024): `Wᵀ = Q R` (PyTorch's `(out, in)` weight), `B = Q_rᵀ`, `A = R_rᵀ` (PEFT's
  `lora_B = Q[:, :r]`, `lora_A = R[:r]`), and the residual `W0 − s·A·B` as the kernel: the model is unchanged at
  init and the adapter starts on an orthonormal basis of W0's leading output directions."""
  _matrix_site("olora", site)
  q, rr = jnp.linalg.qr(jnp.swapaxes(_to_matrix(site, stack, kernel), -1, -2))
  return _residual(site, r, stack, kernel, jnp.swapaxes(rr[..., :r, :], -1, -2), jnp.swapaxes(q[..., :, :r], -1, -2),
                   scale, dtype)


def _loftq(bits: int, iters: int) -> Callable[..., tuple[jax.Array, jax.Array, QuantizedArray]]:
  """LoftQ (Li et al. 2023; PEFT's `loftq_init`): the kernel becomes its quantization `Q` (NF4 for 4 bits, int8
  for 8) and `A`, `B` the top-r SVD of what quantizing lost, scaled so that `deq(Q) + s·A·B ≈ W0`.

  Each of `iters` rounds quantizes `W0 − s·A·B` (the first quantizes `W0` itself) and takes the SVD of
  `W0 − deq(Q)`; `A = U_r √S_r / √s`, `B = √S_r V_rᵀ / √s` (PEFT puts `√S` in both factors too, but leaves out
  `s`, which is the same at `lora_alpha = r`). The kernel written is the `QuantizedArray` `Q`, in the kernel's
  dtype: the QLoRA base that this adapter starts fitted to.
  """
  method = LOFTQ_BITS[bits]

  def fn(key, site, r, scale, stack, kernel, dtype):
    _matrix_site("loftq", site)
    w = kernel.astype(jnp.float32)
    target = w
    for i in range(iters):
      q = quantize(target.astype(kernel.dtype), method, stack=len(stack) if method == "int8" else 0)
      lost = _to_matrix(site, stack, w - dequantize(q, jnp.float32))
      a, b = _top_r(jnp.linalg.svd(lost, full_matrices=False), r, scale)
      if i + 1 < iters:
        target = w - _from_matrix(site, stack, scale * jnp.matmul(a, b, precision=lax.Precision.HIGHEST), jnp.float32)
    return (*_leaves(site, r, stack, a, b, dtype), q)

  return fn


# `LoraConfig.init_lora_weights` -> its initialisation. A new init is one entry here (and its name in
# `jlora.core.fields`); `"pissa_niter_[n]"` and `"loftq"` (with its `loftq_config`) are read by `init_for`.
INITS: dict[Any, Init] = {
    True: Init(_drawn(True)),
    "gaussian": Init(_drawn("gaussian")),
    False: Init(_drawn(False)),
    "orthogonal": Init(_orthogonal),
    "pissa": Init(_pissa(None), reads_kernel=True, rewrites_kernel=True),
    "olora": Init(_olora, reads_kernel=True, rewrites_kernel=True),
}


def init_for(method: Any, loftq_config: Mapping[str, int] | None = None) -> Init:
  """The `Init` of an `init_lora_weights` value (`"pissa_niter_[n]"`: PiSSA by a randomized SVD of `n` iterations;
  `"loftq"`: LoftQ with `loftq_config`).

  Raises:
    ValueError: a method jlora does not initialise with (PEFT's data-driven inits, which a config read from a
      trained adapter may name), or `"loftq"` without `loftq_config`.
  """
  if method == "loftq":
    if not loftq_config:
      raise ValueError("init_lora_weights='loftq' needs `loftq_config` (how to quantize the base), as in PEFT; e.g. "
                       "LoraConfig(init_lora_weights='loftq', loftq_config={'loftq_bits': 4, 'loftq_iter': 1}).")
    return Init(_loftq(loftq_config["loftq_bits"], loftq_config["loftq_iter"]), reads_kernel=True,
                rewrites_kernel=True)
  for key, init in INITS.items():
    if type(key) is type(method) and key == method:
      return init
  if method == "eva":
    raise ValueError("init_lora_weights='eva' is data-driven: A comes from each layer's inputs over a few batches. "
                     "Initialise with jlora.init_eva(key, model, params, config, batches) (which also gives the "
                     "config with the ranks EVA chose), not jlora.init.")
  niter = pissa_niter(method)
  if niter is not None:
    return Init(_pissa(niter), reads_kernel=True, rewrites_kernel=True)
  raise ValueError(
      f"`init_lora_weights`={method!r} is an initialisation of PEFT's that jlora.init does not implement (a config "
      "read from a trained PEFT adapter may name it: its A and B are loaded, not initialised). Initialise with one "
      f"of {[*INITS, 'pissa_niter_[n]']}."
  )
