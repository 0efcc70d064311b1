"""Layer descriptions: the one table of linen layer classes that `jlora.init` / `jlora.apply` adapt.

A `Layer` says where a class keeps its weight, how the weight meets the input
(a dense layout, or an einsum equation) and which call argument is the input.
The five stock classes (`nn.Dense`, `nn.DenseGeneral`, `nn.Einsum`, `nn.Conv`,
`nn.Embed` and `nn.Embed.attend`) are entries of this table like any other, and
users add theirs with `jlora.register_layer` — by class, or by qualified class
name so that jlora needs no import of the package (gemma and MaxText entries
ship this way).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn

from jlora.core import ops as _ops

__all__ = ["Layer", "register_layer", "registered_layers", "describe", "lookup", "is_nnx_class", "Call", "NNX_STOCK"]

Attr = Any  # a constant, or a function of the module returning it
_KINDS = ("dense", "einsum", "ragged_dot")
_STOCK_KINDS = ("dense_general", "conv", "embed", "attend")


@dataclasses.dataclass(frozen=True)
class Layer:
  """How jlora adapts a layer class: its weight, the weight's layout, and its input.

  The layer's output must be `x·W` in that layout (plus a bias, or anything
  added after), so that the adapted output `x·W + s·(x·A)·B` equals
  `x·(W + s·A·B)`, what `jlora.merge` computes.

  `jlora.init` checks this for every adapted layer whose class is not exactly
  one of flax's stock classes (so registered classes, the gemma and MaxText
  entries, and subclasses of `nn.Dense` / `nn.DenseGeneral` / `nn.Einsum`): it
  runs the layer's method alone on a random input of the real input's shape
  with its weight `W`, then with `W + ΔW` for a random `ΔW`, and refuses
  (`ValueError` naming the layer, the declared layout, what was measured and
  the fixes) unless the output changed by `x·ΔW` in the declared layout, within
  a tolerance scaled by the layer's dtype (bfloat16 layers get bfloat16's).
  That catches a square `(out, in)` weight declared with the dense layout, an
  output scaled or an input normalised inside the layer, a weight read twice.
  It runs once per distinct class, field values, weight and input shapes (one
  small jitted program each, cached: a second `init` compiles nothing), on the
  first layer of a scanned stack, and only on concrete params: under `jit` /
  `eval_shape` it is skipped at no cost (run `init` once eagerly to check).
  Not checked: subclasses of `nn.Conv` / `nn.Embed`, quantized or
  multi-process (not fully addressable) kernels, non-float inputs, calls with
  other array arguments than the input; a layer that cannot run alone (e.g.
  it needs an rng stream) gives a warning instead.
  There is no switch to skip the check: a layer it refuses is one whose merge
  would be wrong; describe it right, mark it `unsupported`, or exclude it.

  The NNX and Equinox front-ends have no description table: they adapt their
  own stock classes (`nnx.Linear`, `nnx.LinearGeneral`, `nnx.Einsum`,
  `nnx.Conv`, `nnx.Embed`; `eqx.nn.Linear`, `eqx.nn.Embedding`) by
  `isinstance`, so there is no declared layout to probe there (a subclass that
  changes what `__call__` computes is not checked).

  Attributes:
    weight: the weight's param name (`"kernel"`), or a function of the module
      that returns it (gemma's `Einsum`: `lambda m: m.weight_name`).
    input: the call argument holding the input `x`: a parameter name of
      `method` (`"inputs"`, `"x"`) or a position (0 is the first after `self`).
    axis: dense layout (the default): the axes of `x` contracted, in this order,
      with the weight's leading axes; the weight is `(x.shape[axis]..., outputs...)`.
      An int, a tuple, or a function of the module (`lambda m: m.axis`). A weight
      stored `(out, in)` is not a dense layout: describe it with
      `equation="...i,oi->...o"`.
    equation: einsum layout: the equation `"x_labels,w_labels->y_labels"`, or a
      function of the module returning it (`lambda m: m.einsum_str`).
    equation_arg: einsum layout: the call argument holding the equation (a name
      or a position); when the call passes none, `equation` is used.
    group_sizes: `jax.lax.ragged_dot` layout (mixture-of-experts over tokens sorted
      by expert): the call argument holding the group sizes `(E,)` (a name or a
      position). The layer's output must be `ragged_dot(x, W, group_sizes)` for
      `x: (tokens, in)` and a weight `W: (E, in, out)`; each expert gets its own
      adapter (`A: (E, in, 1, r)`, `B: (E, 1, out, r)`), applied factored as
      `ragged_dot(ragged_dot(x, A), B)` (docs/moe.md). Not probed at init (the
      group sizes are an array argument).
    method: the method computing the layer.
    unsupported: optional function of the module returning why this instance
      cannot be adapted exactly (`""` when it can), e.g. a weight scaled after
      it is read, which a merge would not reproduce.
    kind: derived (`"dense"`, `"einsum"`, or `"ragged_dot"` when `group_sizes` is given); jlora's own entries for `nn.Conv`,
      `nn.Embed` and flax's `DenseGeneral` use other kinds.

  Example (a layer that keeps a `(d_in, d_out)` weight named `w`)::

      jlora.register_layer(MyDense, jlora.Layer(weight="w", input="x"))
      jlora.register_layer("gemma.gm.nn._layers.Einsum",  # by name: no import of gemma
                           jlora.Layer(weight=lambda m: m.weight_name, input="x", equation_arg="eqn"))
  """

  weight: Attr = "kernel"
  input: str | int = 0
  axis: Attr = -1
  equation: Attr = None
  equation_arg: str | int | None = None
  group_sizes: str | int | None = None
  method: str = "__call__"
  unsupported: Callable[[nn.Module], str] | None = None
  kind: str = ""

  def __post_init__(self):
    einsum = self.equation is not None or self.equation_arg is not None
    kind = self.kind or ("ragged_dot" if self.group_sizes is not None else "einsum" if einsum else "dense")
    if kind == "ragged_dot" and (self.group_sizes is None or einsum):
      raise ValueError("Layer: the ragged_dot layout needs `group_sizes=` (the call argument holding the group sizes) "
                       "and no einsum equation.")
    if kind not in _KINDS + _STOCK_KINDS:
      raise ValueError(f"Layer: `kind` must be one of {_KINDS + _STOCK_KINDS}, got {self.kind!r}; leave it unset "
                       "(dense, or einsum when an equation is given).")
    object.__setattr__(self, "kind", kind)
    if not (callable(self.weight) or isinstance(self.weight, str)):
      raise TypeError(f"Layer: `weight` must be a param name or a function of the module, got {self.weight!r}.")
    if not isinstance(self.input, (str, int)) or isinstance(self.input, bool):
      raise TypeError(f"Layer: `input` must be an argument name or position, got {self.input!r}.")
    if not isinstance(self.method, str):
      raise TypeError(f"Layer: `method` must be a method name such as '__call__', got {self.method!r}.")
    if self.equation is not None and not (callable(self.equation) or isinstance(self.equation, str)):
      raise TypeError(f"Layer: `equation` must be an einsum string or a function of the module, got {self.equation!r}.")
    if isinstance(self.equation, str):
      _ops.einsum_axes(self.equation)  # raises on a malformed equation now, not at the first forward

  def weight_name(self, module: nn.Module) -> str:
    return self.weight(module) if callable(self.weight) else self.weight

  def axes(self, module: nn.Module) -> tuple[int, ...]:
    axis = self.axis(module) if callable(self.axis) else self.axis
    return (axis,) if isinstance(axis, int) else tuple(axis)

  def why_not(self, module: nn.Module) -> str:
    return (self.unsupported(module) or "") if self.unsupported is not None else ""


class Call:
  """One intercepted call of a described layer: its module, description and arguments."""

  def __init__(self, module: Any, layer: Layer, args: tuple, kwargs: Mapping[str, Any], cls: type | None = None):
    self.module, self.layer, self.args, self.kwargs = module, layer, args, kwargs
    self.cls = cls or type(module)  # whose signature names the arguments (NNX: the class before adaptation)

  def argument(self, which: str | int) -> Any:
    """A call argument by parameter name or position (None when the call leaves it out)."""
    names = _params(self.cls, self.layer.method)
    if isinstance(which, int):
      if which < len(self.args):
        return self.args[which]
      which = names[which] if which < len(names) else ""  # passed by keyword
    if which in self.kwargs:
      return self.kwargs[which]
    i = names.index(which) if which in names else None
    return self.args[i] if i is not None and i < len(self.args) else None

  @property
  def input(self) -> Any:
    x = self.argument(self.layer.input)
    if x is None:
      raise TypeError(
          f"jlora: the call of {type(self.module).__name__}.{self.layer.method} has no argument "
          f"{self.layer.input!r}, which its jlora.Layer names as the input; fix `input=` in register_layer."
      )
    return x

  @property
  def equation(self) -> str:
    eq = self.argument(self.layer.equation_arg) if self.layer.equation_arg is not None else None
    if eq is None:
      eq = self.layer.equation(self.module) if callable(self.layer.equation) else self.layer.equation
    if not isinstance(eq, str):
      raise TypeError(
          f"jlora: no einsum equation for {type(self.module).__name__} (got {eq!r}); set `equation=` or "
          "`equation_arg=` in its jlora.Layer."
      )
    return eq.replace(" ", "")

  @property
  def group_sizes(self) -> Any:
    """The group sizes of a `ragged_dot` layer's call (`(E,)` int32)."""
    sizes = self.argument(self.layer.group_sizes)
    if sizes is None:
      raise TypeError(f"jlora: the call of {type(self.module).__name__}.{self.layer.method} has no argument "
                      f"{self.layer.group_sizes!r}, which its jlora.Layer names as the group sizes; fix "
                      "`group_sizes=` in register_layer.")
    return sizes


@functools.cache
def _params(cls: type, method: str) -> tuple[str, ...]:
  """The parameter names of `cls.method` after `self`."""
  try:
    names = list(inspect.signature(getattr(cls, method)).parameters)
  except (TypeError, ValueError):
    return ()
  return tuple(names[1:])


def _dense_general_check(m: nn.Module) -> str:
  return "nn.DenseGeneral with batch_dims is not supported" if m.batch_dims else ""


def _conv_check(m: nn.Module) -> str:
  return "masked convolutions are not supported" if m.mask is not None else ""


def _scaled_weight_check(m: nn.Module) -> str:
  scale = getattr(m, "w_scale", None)
  return f"its weight is scaled by w_scale={scale} after it is read" if scale is not None else ""


_REGISTRY: dict[tuple[type | str, str], Layer] = {
    # Inputs by position: subclasses may rename the parameter.
    (nn.Dense, "__call__"): Layer(),
    (nn.DenseGeneral, "__call__"): Layer(axis=lambda m: m.axis, kind="dense_general", unsupported=_dense_general_check),
    (nn.Einsum, "__call__"): Layer(equation=lambda m: m.einsum_str, equation_arg="einsum_str"),
    (nn.Conv, "__call__"): Layer(kind="conv", unsupported=_conv_check),
    (nn.Embed, "__call__"): Layer(weight="embedding", kind="embed"),
    (nn.Embed, "attend"): Layer(weight="embedding", method="attend", kind="attend"),
}
# Layer classes of other packages, by qualified name (no import of those packages).
for _name in ("gemma.gm.nn._layers.Einsum", "gemma.gm.nn.gemma4._layers.Einsum"):
  _REGISTRY[(_name, "__call__")] = Layer(weight=lambda m: m.weight_name, input="x", equation_arg="eqn",
                                         unsupported=_scaled_weight_check)


def _maxtext_check(m: Any) -> str:
  if getattr(m, "quant", None) is not None or getattr(m, "kernel_scale", None) is not None:
    return "its kernel is quantized (quant= or an fp8 kernel_scale), which jlora cannot merge into"
  return ""


# MaxText's DenseGeneral: the linen class (MaxText <= 0.1, `MaxText.layers.linears`) and the NNX one (maxtext 0.2,
# `maxtext.layers.linears`); both keep `kernel: in_shape + out_shape` and contract the input's `axis`, in the given order.
for _name in ("MaxText.layers.linears.DenseGeneral", "maxtext.layers.linears.DenseGeneral"):
  _REGISTRY[(_name, "__call__")] = Layer(input="inputs", axis=lambda m: m.axis, unsupported=_maxtext_check)

# Hugging Face transformers 4.x (its Flax models; transformers 5 has none): GPT-2's projections keep `kernel (out, in)`.
_REGISTRY[("transformers.models.gpt2.modeling_flax_gpt2.FlaxConv1D", "__call__")] = Layer(
    input="inputs", equation="...i,oi->...o")

# flax NNX's own layers, which `jlora.nnx` adapts (by name: `import jlora` imports no flax.nnx).
_NNX = "flax.nnx.nn.linear."


def _nnx_general_check(m: Any) -> str:
  return "nn.LinearGeneral with batch_axis is not supported" if m.batch_axis else ""


NNX_STOCK = {
    (_NNX + "Linear", "__call__"): Layer(input="inputs"),
    (_NNX + "LinearGeneral", "__call__"): Layer(input="inputs", axis=lambda m: m.axis, kind="dense_general",
                                                unsupported=_nnx_general_check),
    (_NNX + "Einsum", "__call__"): Layer(input="inputs", equation=lambda m: m.einsum_str, equation_arg="einsum_str"),
    (_NNX + "Conv", "__call__"): Layer(input="inputs", kind="conv", unsupported=_conv_check),
    (_NNX + "Embed", "__call__"): Layer(weight="embedding", input="inputs", kind="embed"),
    (_NNX + "Embed", "attend"): Layer(weight="embedding", input="query", method="attend", kind="attend"),
}
_REGISTRY.update(NNX_STOCK)


def register_layer(cls: type | str, layer: Layer) -> None:
  """Teaches jlora a linen layer class, so that `init` finds it and `apply` adapts it factored.

  A class inherits the description of its nearest described base class; a
  registration replaces an earlier one of the same class and method.

  The description is checked against what the layer computes when `jlora.init`
  first adapts it on concrete params (see `jlora.Layer`): a layer whose output
  does not change by `x·ΔW` in the declared layout when its weight changes by
  `ΔW` is refused there, before any training, with the measured change.

  Args:
    cls: the `flax.linen.Module` subclass, or its qualified name
      (`"package.module.Class"`, as `f"{cls.__module__}.{cls.__qualname__}"`), which
      needs no import of the package.
    layer: the description.

  Raises:
    TypeError: `cls` is not a linen Module class or a dotted name, or `layer` is not a `jlora.Layer`.
  """
  if not isinstance(layer, Layer):
    raise TypeError(f"register_layer: `layer` must be a jlora.Layer, got {type(layer).__name__}.")
  if isinstance(cls, str):
    if "." not in cls:
      raise TypeError(
          f"register_layer: a class name must be qualified, e.g. 'mypackage.layers.MyDense', got {cls!r}."
      )
  elif not (isinstance(cls, type) and (issubclass(cls, nn.Module) or is_nnx_class(cls))):
    raise TypeError(
        f"register_layer: `cls` must be a flax.linen or flax.nnx Module class or its qualified name, got {cls!r}. "
        "(Equinox: jlora.equinox; other models: jlora.init_tree + jlora.apply_merged.)"
    )
  if is_nnx_class(cls) and layer.kind not in ("dense", "einsum"):
    raise ValueError(f"register_layer: an NNX layer is described with the dense layout or an einsum equation, got "
                     f"kind={layer.kind!r} for {cls.__name__}; leave `kind` unset.")
  _REGISTRY[(cls, layer.method)] = layer


def is_nnx_class(cls: Any) -> bool:
  """Whether `cls` is a flax NNX Module class (flax.nnx is not imported for this: such a class implies it is)."""
  nnx = sys.modules.get("flax.nnx")
  return nnx is not None and isinstance(cls, type) and issubclass(cls, nnx.Module)


def registered_layers() -> dict[tuple[type | str, str], Layer]:
  """The layer classes jlora adapts, linen and NNX: a copy of the table `{(class or qualified name, method): Layer}`.

  It holds flax's stock classes (linen's `nn.Dense`, `nn.DenseGeneral`, `nn.Einsum`, `nn.Conv`, `nn.Embed` as
  classes; NNX's `nnx.Linear`, `nnx.LinearGeneral`, `nnx.Einsum`, `nnx.Conv`, `nnx.Embed` by qualified name, so
  that `import jlora` needs no flax.nnx), the entries jlora ships by qualified name (gemma's `Einsum`, MaxText's
  `DenseGeneral`, linen and NNX), and every `jlora.register_layer`. Changing the copy changes nothing.

  Example:
    >>> import flax.linen as nn, jlora
    >>> jlora.registered_layers()[(nn.Dense, "__call__")]
    Layer(weight='kernel', input=0, axis=-1, equation=None, equation_arg=None, group_sizes=None, method='__call__', unsupported=None, kind='dense')
  """
  return dict(_REGISTRY)


def lookup(module: Any, method: str) -> tuple[type | str, Layer] | None:
  """`(key, description)` of `module.method`: its class's entry or the nearest described base class's."""
  for cls in type(module).__mro__:
    for key in (cls, f"{cls.__module__}.{cls.__qualname__}"):
      layer = _REGISTRY.get((key, method))
      if layer is not None:
        return key, layer
  return None


def describe(module: Any, method: str) -> Layer | None:
  """The description of `module.method`, from its class or the nearest described base class.

  Subclasses inherit their base's entry (flax's `nn.remat(nn.Dense)` is one); a subclass whose method
  computes something else than the base's must be registered itself.
  """
  found = lookup(module, method)
  return found[1] if found is not None else None


def kinds_listing(nnx: bool = False) -> str:
  """The described classes of one front-end (linen, or NNX), for messages."""
  names = {k.__name__ if isinstance(k, type) else k for k, _ in _REGISTRY
           if (is_nnx_class(k) or (isinstance(k, str) and k.startswith(_NNX))) == nnx
           or (isinstance(k, str) and not k.startswith(("flax.", _NNX)))}
  return ", ".join(sorted(names))

