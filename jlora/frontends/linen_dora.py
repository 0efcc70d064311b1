"""DoRA's term for one layer call (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"), as PEFT computes it.

DoRA writes the adapted weight as a magnitude times a direction,
`W = m · (W0 + s·A·B) / ‖W0 + s·A·B‖`, the norm taken per output element over
its input axes (`jlora.core.ops.column_norm`) and treated as a constant in the
backward pass (paper §4.3). With `g = m / ‖W0 + s·A·B‖` the layer computes

    y = base(x) + (g − 1) · (x_d·W0) + g · s·(x_d·A)·B

where `x_d` is the LoRA input (`x` after LoRA dropout): without dropout
`x_d·W0` is the base output less its bias, as in PEFT; with dropout it is
computed again from `x_d`, as in PEFT. The norm needs `W0 + s·A·B` formed
per layer (PEFT does the same); the LoRA product itself stays factored.

For `nn.Embed.attend` (a tied output head) the embedding's columns are the
inputs: `y = (x ⊙ g)·(W0 + s·A·B)ᵀ`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jlora.core import ops as _ops
from jlora.core.ops import parse_einsum
from jlora.core.targets import MAGNITUDE_KEY
from jlora.core.tree import Params, _check_tree, flatten, unflatten

__all__ = ["dora_delta", "norm_key", "with_norms"]


def norm_key(m_key: str) -> str:
  """The leaf name a cached norm takes beside its magnitude, inside `jlora.apply(..., dora_norms=...)` only."""
  return f"{m_key}_norm"


def with_norms(params: Params, norms: Any) -> dict:
  """`params` with each of `norms` (from `jlora.dora_norms`) beside its magnitude, where the forward reads it.

  The norms go into the param tree (not beside it) so that `nn.scan` slices them
  per layer like the magnitudes.

  Raises:
    TypeError: `norms` is not a nested dict.
    ValueError: a norm without a same-shaped magnitude in `params`, or a
      magnitude without its norm.
  """
  _check_tree(norms, "dora_norms")
  flat, given = flatten(params), flatten(norms)
  magnitudes = {p for p in flat if str(p[-1]).endswith(MAGNITUDE_KEY)}  # `lora_magnitude`, `<weight>_lora_magnitude`
  fix = "pass jlora.dora_norms(params, config) of these very params"
  for path, norm in given.items():
    if path not in magnitudes or jnp.shape(norm) != jnp.shape(flat[path]):
      got = "no DoRA magnitude" if path not in magnitudes else f"a magnitude of shape {jnp.shape(flat[path])}"
      raise ValueError(f"`dora_norms` at {'/'.join(path)!r} has shape {jnp.shape(norm)}, but `params` holds {got} "
                       f"there; {fix}.")
  missing = sorted("/".join(p) for p in magnitudes - set(given))
  if missing:
    raise ValueError(f"`dora_norms` has no norm for the DoRA magnitudes at {missing[:4]}{' …' if len(missing) > 4 else ''}; "
                     f"{fix}.")
  return unflatten({**flat, **{(*p[:-1], norm_key(p[-1])): n for p, n in given.items()}})


def _to_output(kind: str, equation: str | None, g: jax.Array, n_in: int, where: str) -> tuple[jax.Array, str | None]:
  """`g` (kernel-shaped, input axes of size 1) arranged to multiply the layer output: `(g, einsum spec or None)`."""
  if kind != "einsum":
    return g.reshape(g.shape[n_in:]), None
  lhs, kernel, out = parse_einsum(equation)
  summed = [c for c in kernel if c not in lhs and c not in out]
  if summed:
    raise ValueError(
        f"DoRA at {where!r}: the einsum {equation!r} sums the kernel's own axis {summed} away, so its output has no "
        "element per weight column for DoRA's magnitude to scale. Exclude this layer (exclude_modules) or use plain "
        "LoRA for it."
    )
  ins = {c for c in kernel if c in lhs and c not in out}
  labels = "".join(c for c in kernel if c not in ins)
  squeezed = g.reshape(tuple(d for c, d in zip(kernel, g.shape) if c not in ins))
  return squeezed, f"{out},{labels}->{out}"


def _times(t: jax.Array, g: jax.Array, spec: str | None) -> jax.Array:
  return t * g if spec is None else jnp.einsum(spec, t, g)


def _base_product(module, call, kind: str, x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`x·W0` without bias, computed from `x` (the layer's own contraction)."""
  from jlora.frontends.linen_forward import BYPASS  # the conv helper must pass the interceptor untouched

  precision = getattr(module, "precision", None)
  if kind == "einsum":
    return jnp.einsum(call.equation, x, kernel, precision=precision)
  if kind == "embed":
    return jnp.take(kernel, x, axis=0).astype(kernel.dtype)
  if kind == "conv":
    plain = module.clone(parent=None, use_bias=False, mask=None, dtype=x.dtype, param_dtype=kernel.dtype)
    token = BYPASS.set(True)
    try:
      return plain.apply({"params": {"kernel": kernel}}, x)
    finally:
      BYPASS.reset(token)
  return _ops.contract(kind, x, kernel, call.layer.axes(module), precision)


def dora_delta(module, call, kind: str, y: jax.Array, x: jax.Array, dropped: bool, lora: jax.Array,
               kernel: jax.Array, a: jax.Array, b: jax.Array, scale, magnitude: jax.Array, where: str,
               norm: jax.Array | None = None) -> jax.Array:
  """What DoRA adds to the base output `y` of one call (see the module docstring).

  Args:
    module: the layer.
    call: its `jlora.frontends.layers.Call`.
    kind: the layer kind.
    y: the base layer's output (with its bias).
    x: the LoRA input (after dropout; cast to the term's dtype).
    dropped: whether dropout changed `x` (then `x·W0` is computed again).
    lora: `s·(x·A)·B`, in the output's shape (unused for `attend`, recomputed).
    kernel: the layer's `W0` (per layer).
    a: per-layer `A`.
    b: per-layer `B`.
    scale: `s`.
    magnitude: `m`, the kernel's shape with input axes of size 1.
    where: the adapter's path, for messages.
    norm: `‖W0 + s·A·B‖` cached by the caller (`jlora.apply(..., dora_norms=)`), or
      None to compute it here.

  Returns:
    The term, in `lora`'s dtype and the output's shape.
  """
  dt = lora.dtype
  kernel = jnp.asarray(kernel)
  norm = lax.stop_gradient(_ops.column_norm(kernel, a, b, scale) if norm is None else jnp.asarray(norm, jnp.float32))
  g = (magnitude.astype(jnp.float32) / norm).astype(dt)
  if kind == "attend":  # the embedding's features are this product's inputs
    xg = x * g.reshape(-1)
    base = lax.dot_general(xg, kernel.astype(dt), (((xg.ndim - 1,), (1,)), ((), ())))
    return base - y.astype(dt) + _ops.lora_delta("attend", xg, a, b, scale=scale)
  n_in = a.ndim - 1
  g, spec = _to_output(kind, call.equation if kind == "einsum" else None, g, n_in, where)
  has_bias = module.has_variable("params", "bias")
  # x·W0 is read off the base output only for flax's own layers, whose output is exactly x·W0 (+ `bias`); a
  # registered class may add other terms after its product, which DoRA must not scale
  stock = type(module) in (nn.Dense, nn.DenseGeneral, nn.Conv, nn.Einsum, nn.Embed)
  if dropped or not stock or (kind == "einsum" and has_bias):
    base = _base_product(module, call, kind, x, kernel).astype(dt)
  else:
    base = y.astype(dt)
    if has_bias:  # dense kinds and convolutions add their bias over the trailing output axes
      base = base - jnp.asarray(module.get_variable("params", "bias")).astype(dt)
  return _times(base, g - 1, spec) + _times(lora, g, spec)
