"""What a described layer really computes: the probe that `jlora.init` runs before adapting it.

LoRA's factored forward `y = layer(x) + s·(x·A)·B` and `jlora.merge`'s
`W0 + s·A·B` agree only when the layer's output is `x·W` in the layout its
`jlora.Layer` declares, plus terms that do not depend on `W` (a bias). The five
stock flax classes do that by construction; a registered class (a user's own,
or one shipped by qualified name such as gemma's `Einsum` and MaxText's
`DenseGeneral`) is checked once on concrete params:

1. the layer's own method is run alone (an unbound clone of the module, its own
   param dict, the non-input arguments of the real call) on a pseudo-random
   input of the real input's shape — its axes that do not meet the weight cut
   to at most 2 — with its weight `W`, then with `W + ΔW` for a pseudo-random
   `ΔW` of `W`'s RMS;
2. the change of its output must be `x·ΔW` in the declared layout, computed
   here in float32 at the highest matmul precision, within
   `4·eps·(‖y(W)‖ + ‖y(W + ΔW)‖) + 1e-3·‖x·ΔW‖` (Frobenius norms, compared in
   float64; `eps` of the coarsest float dtype among the layer's input, weight,
   output and `dtype` field, so a bfloat16 layer gets bfloat16's tolerance).
   The layer runs under `jax.default_matmul_precision("highest")`; one that
   sets its own `precision` gets bfloat16's tolerance off CPU.

Both runs and the reference are one jitted program per distinct probe, kept
in a small cache (a second `init` compiles nothing); only the small outputs
leave the device. That finds a square `(out, in)` weight declared `(in, out)`,
an output scaled or an input normalised by the layer, a weight read twice or
through a nonlinearity. Each distinct (class, field values, method, weight
name and shape, input shape and dtype, call arguments) is probed once, on the
first such call: layers 1..n of a model stand for layer 0 (and a scanned
stack's first slice for the stack).

Not probed (documented at `jlora.Layer`): stock classes (exact type), kinds
other than dense/einsum (subclasses of `nn.Conv` / `nn.Embed`), params that are
traced (`init` under `jit` / `eval_shape`: there is nothing concrete to run;
the check costs nothing there), kernels that are not plain floating arrays
(quantized) or not fully addressable (multi-process), inputs that are not
floating point, and calls with array arguments besides the input (their values
are not known outside the model's trace). A layer that cannot be run alone
(e.g. it needs an rng stream) gives a warning instead of the check.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jlora.core import ops as _ops
from jlora.core.targets import Site, path_str
from jlora.frontends.layers import Call, Layer

__all__ = ["STOCK_CLASSES", "INPUT", "Probe", "plan", "make", "check", "probe", "static"]

# Exact types that jlora adapts without a probe: flax's own layers compute `x·W` in their layout.
STOCK_CLASSES = (nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Conv, nn.Embed)
_PROBED_KINDS = ("dense", "dense_general", "einsum")
_CUT = 2  # input axes that do not meet the weight are cut to this size (a cheap probe of a big batch)
_REL_FLOOR = 1e-3  # relative tolerance of a float32 layer (summation order, big fan-in)


class _Input:
  """Marks where the input goes in a recorded call."""

  def __repr__(self) -> str:
    return "<input>"


_INPUT = INPUT = _Input()  # the input's place among a recorded call's arguments


class Probe(NamedTuple):
  """One recorded call of a described layer, to be run alone on concrete params.

  Attributes:
    site: the call's `Site` (path, weight name, per-layer weight shape).
    module: what runs the layer alone (`module.apply(variables, *args, method=...)`): an unbound clone of a linen
      module (same fields), `jlora.nnx`'s runner of an NNX layer, or the exception that making it raised.
    layer: its `jlora.Layer`.
    args, kwargs: the call's arguments, the input replaced by a marker.
    x: the input's shape and dtype.
    y_dtype: the output's dtype.
    equation: the einsum equation (einsum kind), else None.
    axes: the contracted input axes (dense kinds), else None.
    key: what makes two probes the same (one is run).
    skip: why this call is not probed ('' when it is).
  """

  site: Site
  module: nn.Module | Exception
  layer: Layer
  args: tuple
  kwargs: dict
  x: jax.ShapeDtypeStruct
  y_dtype: Any
  equation: str | None
  axes: tuple[int, ...] | None
  key: tuple
  skip: str


def _is_array(v: Any) -> bool:
  return isinstance(v, (jax.Array, np.ndarray, jax.core.Tracer))


def static(v: Any) -> Any:
  """A hashable stand-in of a call argument or field value, for the de-duplication key."""
  if callable(v) and not isinstance(v, nn.Module):
    return getattr(v, "__qualname__", None) or repr(type(v))
  try:
    hash(v)
    return v
  except TypeError:
    return repr(v)


def _fields(module: nn.Module) -> tuple:
  names = [f.name for f in dataclasses.fields(module) if f.name not in ("parent", "name")]
  return tuple((n, static(getattr(module, n, None))) for n in names)


def plan(call: Call, site: Site, y: Any) -> Probe | None:
  """The probe of one call seen while `jlora.init` traces the model, or None when the class needs none.

  Args:
    call: the intercepted call (module, description, arguments).
    site: its site.
    y: its (abstract) output.

  Returns:
    A `Probe`, or None for a stock class, a kind that is not probed, or a module jlora cannot adapt anyway.
  """
  module = call.module
  if type(module) in STOCK_CLASSES or site.kind not in _PROBED_KINDS or site.unsupported:
    return None
  x = call.input
  if not hasattr(x, "shape") or not hasattr(y, "dtype"):
    return None
  args = tuple(_INPUT if a is x else a for a in call.args)
  kwargs = {k: _INPUT if v is x else v for k, v in call.kwargs.items()}
  try:
    clone = module.clone(parent=None)
  except Exception as e:  # reported by `probe` as a layer it could not run alone
    clone = e
  return make(site, clone, call.layer, args, kwargs, jax.ShapeDtypeStruct(x.shape, x.dtype), y.dtype,
              call.equation if site.kind == "einsum" else None,
              None if site.kind == "einsum" else call.layer.axes(module), type(module), _fields(module))


def make(site: Site, runner: Any, layer: Layer, args: tuple, kwargs: dict, x: jax.ShapeDtypeStruct, y_dtype: Any,
         equation: str | None, axes: tuple[int, ...] | None, cls: type, fields: tuple) -> Probe:
  """The probe of one call, from its parts (any front-end).

  Args:
    site: the call's site.
    runner: runs the layer alone: `runner.apply(variables, *args, method=..., **kwargs)` with `variables =
      {'params': its params dict, ...}` (a linen module's clone; `jlora.nnx` gives its own), or the exception
      that making it raised.
    layer: the layer's description.
    args, kwargs: the call's arguments, the input replaced by `INPUT`.
    x: the input's shape and dtype.
    y_dtype: the output's dtype.
    equation: the einsum equation (einsum kind), else None.
    axes: the contracted input axes (dense kinds), else None.
    cls: the layer's class.
    fields: hashable settings of the layer (with the rest, what makes two probes the same).
  """
  skip = ""
  others = [v for v in jax.tree.leaves((args, kwargs)) if _is_array(v)]
  if any(isinstance(v, jax.core.Tracer) for v in others):
    skip = "called with array arguments besides its input"
  elif not jnp.issubdtype(x.dtype, jnp.floating):
    skip = f"its input is {x.dtype}, not floating point"
  # Concrete array arguments make every call its own probe (object(): never equal to another key).
  calls = (tuple(map(static, args)), tuple(sorted((k, static(v)) for k, v in kwargs.items()))) if not others \
      else object()
  key = (cls, static(layer), site.kernel_name, site.kernel_shape, tuple(x.shape), str(x.dtype), equation, axes,
         fields, calls)
  return Probe(site, runner, layer, args, kwargs, x, y_dtype, equation, axes, key, skip)


def check(probes: Sequence[Probe], params: Mapping[str, Any], adapted: Mapping[str, Any],
          variables: Mapping[str, Any] | None = None) -> None:
  """Runs each distinct probe of an adapted site on concrete params; raises on the first layer that fails.

  Args:
    probes: from `plan`, in call order.
    params: the (unboxed) base params, concrete or traced (traced: nothing is run).
    adapted: the params with adapters (a site is probed when it got a `lora_a`).
    variables: the model's other collections, if any.

  Raises:
    ValueError: a layer's output does not change by `x·ΔW` in its declared layout (see `probe`).
  """
  seen = set()
  for p in probes:
    if p.skip or p.key in seen or p.site.slot.a_key not in (_leaf(adapted, p.site.module) or {}):
      continue
    seen.add(p.key)
    probe(p, params, variables)


def _leaf(tree: Any, path: Sequence[str]) -> Any:
  for k in path:
    if not isinstance(tree, Mapping) or k not in tree:
      return None
    tree = tree[k]
  return tree


def _input_axes_kept(p: Probe) -> set[int]:
  """The input axes that meet the weight (kept whole in the probe input)."""
  n = len(p.x.shape)
  if p.equation is None:
    return {a % n for a in p.axes} if n else set()
  lhs, kernel, _ = _ops.parse_einsum(p.equation)
  if "..." in lhs:
    before, after = lhs.split("...")
    labels = list(before) + [""] * (n - len(before) - len(after)) + list(after)
  else:
    labels = list(lhs)
  return {i for i, c in enumerate(labels) if c and c in kernel}


def _eps(*dtypes: Any) -> float:
  eps = [float(jnp.finfo(d).eps) for d in dtypes if d is not None and _floating(d)]
  return max(eps) if eps else float(jnp.finfo(jnp.float32).eps)


def _floating(d: Any) -> bool:
  try:
    return jnp.issubdtype(jnp.dtype(d), jnp.floating)
  except TypeError:
    return False


_PROGRAMS: dict[tuple, Callable] = {}  # (probe key, input shape) -> jitted program: a second init compiles nothing
_MAX_PROGRAMS = 256


def _program(p: Probe, shape: tuple[int, ...]) -> Callable:
  """`f(collections, seed) -> (x, y(W), y(W + ΔW), x·ΔW)`: the whole probe of one layer as one jitted program.

  Everything kernel-sized (`ΔW`, `W + ΔW`) stays on the kernel's device; only the small outputs come back.
  """
  cached = _PROGRAMS.get((p.key, shape))
  if cached is not None:
    return cached
  name = p.site.kernel_name

  def run(collections: dict, x: jax.Array, weight: jax.Array) -> Any:
    args = tuple(x if a is _INPUT else a for a in p.args)
    kwargs = {k: x if v is _INPUT else v for k, v in p.kwargs.items()}
    variables = {**collections, "params": {**collections["params"], name: weight}}
    return p.module.apply(variables, *args, method=p.layer.method, **kwargs)

  def reference(x: jax.Array, dw: jax.Array) -> jax.Array:
    if p.equation is not None:
      return jnp.einsum(p.equation, x, dw, precision=lax.Precision.HIGHEST)
    return _ops.contract(p.site.kind, x, dw, p.axes, precision=lax.Precision.HIGHEST)

  def program(collections: dict, seed: jax.Array):
    stack = collections["params"][name].ndim - len(p.site.kernel_shape)
    first = (0,) * stack  # a scanned stack: its first layer stands for the others
    collections = {**collections, "params": jax.tree.map(lambda v: v[first] if v.ndim >= stack else v,
                                                         collections["params"])}
    w = collections["params"][name]
    w32 = w.astype(jnp.float32)
    rms = jnp.sqrt(jnp.mean(jnp.square(w32)))
    rms = jnp.where(jnp.isfinite(rms) & (rms > 0), rms, 1.0)
    moved = (w32 + rms * _noise(seed, w.shape)).astype(w.dtype)
    x = _noise(seed ^ jnp.uint32(0x5BD1E995), shape).astype(p.x.dtype)
    y0, y1 = run(collections, x, w), run(collections, x, moved)
    try:
      ref = reference(x.astype(jnp.float32), moved.astype(jnp.float32) - w32)
    except (ValueError, TypeError) as e:
      raise _LayoutMismatch(str(e)) from None
    return x, y0, y1, ref

  fn = jax.jit(program)
  if len(_PROGRAMS) >= _MAX_PROGRAMS:
    _PROGRAMS.clear()
  _PROGRAMS[(p.key, shape)] = fn
  return fn


def _noise(seed: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Pseudo-random float32 values of unit variance, uniform in ±√3, from a 32-bit integer hash of the index.

  Elementwise integer ops: compiles in a fraction of the time of `jax.random.normal` on CPU (threefry and
  erfinv), which dominated the probe's cost, and needs no transfer of kernel-sized data.
  """
  h = jnp.arange(math.prod(shape), dtype=jnp.uint32) * jnp.uint32(0x9E3779B1) + seed
  for shift, mul in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):  # murmur3's finalizer
    h = (h ^ (h >> shift)) * jnp.uint32(mul)
  h = h ^ (h >> 16)
  u = (h >> 8).astype(jnp.float32) * (1.0 / (1 << 24))  # [0, 1), 24 bits
  return ((u - 0.5) * math.sqrt(12.0)).reshape(shape)


class _LayoutMismatch(Exception):
  """The declared layout does not fit the input and weight shapes."""


def probe(p: Probe, params: Mapping[str, Any], variables: Mapping[str, Any] | None = None) -> None:
  """Runs one layer alone with its weight `W` and `W + ΔW` and checks the change is `x·ΔW` (module docstring).

  Raises:
    ValueError: it is not; the message names the layer, the declared layout, what was measured and the fixes.
  """
  site = p.site
  own = _leaf(params, site.module)
  kernel = own.get(site.kernel_name) if isinstance(own, Mapping) else None
  if isinstance(kernel, jax.core.Tracer) or not isinstance(kernel, (jax.Array, np.ndarray)):
    return  # traced (init under jit / eval_shape: nothing concrete to run), quantized, or absent
  if not _floating(kernel.dtype) or (isinstance(kernel, jax.Array) and not kernel.is_fully_addressable):
    return
  if any(isinstance(v, jax.core.Tracer) or not isinstance(v, (jax.Array, np.ndarray)) for v in jax.tree.leaves(own)):
    return
  stack = kernel.ndim - len(site.kernel_shape)
  if stack < 0:
    return
  collections = {"params": own}  # sliced to the first layer of a stack inside the program
  for name, tree in (variables or {}).items():
    sub = _leaf(tree, site.module)
    if sub is not None and not stack and name != "params":
      collections[name] = sub
  seed = np.uint32(zlib.crc32(path_str(site.path).encode()))
  full = tuple(p.x.shape)
  kept = _input_axes_kept(p)
  small = tuple(d if i in kept else min(d, _CUT) for i, d in enumerate(full))
  failure = p.module if isinstance(p.module, Exception) else None
  for shape in dict.fromkeys((small, full)) if failure is None else ():
    try:
      with jax.default_matmul_precision("highest"):
        x, y0, y1, ref = _program(p, shape)(collections, seed)
      break
    except _LayoutMismatch as e:
      raise ValueError(
          f"jlora.init: {_where(p)}: its declared layout ({_declared(p)}) does not fit its input {shape} and "
          f"weight {site.kernel_name!r} {site.kernel_shape} ({e}). {_FIX}"
      ) from None
    except Exception as e:  # the layer run alone: a failure is reported below, never swallowed
      failure = e
  else:
    warnings.warn(
        f"jlora.init could not run {_where(p)} alone to check that it computes x·W in the layout its jlora.Layer "
        f"declares ({type(failure).__name__}: {failure}); it is adapted unchecked. If its output is not x·W "
        "(+ terms without W) in that layout, jlora.merge will not reproduce the trained model.",
        UserWarning,
        stacklevel=4,
    )
    return
  # A precision the layer sets itself is not overridden by "highest": off CPU, float32 matmuls may then run on
  # bfloat16 passes (TPU) or TF32 (GPU); give them bfloat16's tolerance.
  coarse = jnp.bfloat16 if getattr(p.module, "precision", None) is not None and jax.default_backend() != "cpu" else None
  eps = _eps(p.x.dtype, kernel.dtype, p.y_dtype, getattr(p.module, "dtype", None), coarse)
  _compare(p, x.shape, y0, y1, ref, eps)


def _where(p: Probe) -> str:
  where, cls = path_str(p.site.path), p.key[0].__name__  # key[0]: the module's class
  return f"{cls} at {where!r}" if where else f"{cls} (the model itself)"


def _declared(p: Probe) -> str:
  if p.equation is not None:
    return f"einsum {p.equation!r}"
  return f"dense: input axes {p.axes} contracted, in order, with the weight's leading axes"


def _compare(p: Probe, x_shape: tuple[int, ...], y0: Any, y1: Any, ref: jax.Array, eps: float) -> None:
  """Raises unless `y1 - y0` is `ref` (`x·ΔW` in the declared layout), within the module docstring's tolerance."""
  site = p.site
  if not (hasattr(y0, "shape") and hasattr(y1, "shape")):
    raise ValueError(f"jlora.init: {_where(p)} returns {type(y0).__name__}, not an array; jlora adds its LoRA term "
                     f"to the output of a described layer. {_FIX}")
  y0, y1, ref = (np.asarray(v, np.float64) for v in (y0, y1, ref))
  diff = y1 - y0
  if diff.shape != ref.shape:
    raise ValueError(
        f"jlora.init: {_where(p)} returns shape {diff.shape} on an input {tuple(x_shape)}, but x·W in its "
        f"declared layout ({_declared(p)}) has shape {ref.shape}. {_FIX}"
    )
  n_ref, n_diff, err = (float(np.linalg.norm(v)) for v in (ref, diff, diff - ref))
  tol = 4 * eps * (float(np.linalg.norm(y0)) + float(np.linalg.norm(y1))) + _REL_FLOOR * n_ref
  if np.isfinite(err) and err <= tol:
    return
  raise ValueError(
      f"jlora.init: {_where(p)} does not compute x·W in the layout its jlora.Layer declares ({_declared(p)}), so "
      f"LoRA would train one model and jlora.merge (W + s·A·B) would give another. Measured on a random input "
      f"{tuple(x_shape)} with its weight {site.kernel_name!r} {site.kernel_shape} moved by a random ΔW: the output "
      f"changes by {n_diff:.3g} (norm) where x·ΔW predicts {n_ref:.3g}, off by {err:.3g} (tolerance {tol:.2g}): "
      f"{_diagnose(diff, ref, tol)}. {_FIX}"
  )


_FIX = (
    "Fix: declare the layout the layer really uses in jlora.register_layer (a weight stored (out, in): "
    "jlora.Layer(weight=..., input=..., equation='...i,oi->...o'); other axes: `axis=` or `equation=`), or "
    "declare it not adaptable with jlora.Layer(unsupported=lambda m: 'why'), or leave it out of the adapted "
    "modules (`exclude_modules`)."
)


def _diagnose(diff: np.ndarray, ref: np.ndarray, tol: float) -> str:
  """What the measured change looks like, in words."""
  if not np.all(np.isfinite(diff)):
    return "the output is not finite"
  if np.linalg.norm(diff) <= tol:
    return "the output does not depend on that weight"
  dot = float(np.vdot(diff, ref))
  alpha = dot / max(float(np.vdot(ref, ref)), 1e-300)
  if np.linalg.norm(diff - alpha * ref) <= tol:
    return f"the layer scales its output by {alpha:.3g}"
  if ref.ndim >= 2:  # one factor per row (per example / position): the input is rescaled, e.g. normalised
    d2, r2 = diff.reshape(-1, diff.shape[-1]), ref.reshape(-1, ref.shape[-1])
    rows = np.sum(d2 * r2, axis=1) / np.maximum(np.sum(r2 * r2, axis=1), 1e-300)
    if np.linalg.norm(d2 - rows[:, None] * r2) <= tol:
      return ("it rescales each input row by its own factor (it normalises its input?); the factor varies from "
              f"{rows.min():.3g} to {rows.max():.3g}")
  corr = dot / max(float(np.linalg.norm(diff) * np.linalg.norm(ref)), 1e-300)
  return (f"the change is not a multiple of x·ΔW (correlation {corr:.2f}): the weight meets the input in another "
          "layout (e.g. stored (out, in), or its axes in another order), or the layer reads it twice or through "
          "a nonlinearity")
