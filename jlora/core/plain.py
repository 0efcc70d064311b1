"""Sites of a plain param tree (Haiku, Equinox as a dict, NNX pure dicts, hand-written jnp): which leaves are
weights, and which of their axes meet the layer's input and which reach its output.

A tree carries no layer classes, so the layout of a weight is read from its name
or declared by the caller:

* a 2-D leaf named `kernel` or `w` (Flax, Haiku) is `(in, out)`: `y = x·W`;
* a 2-D leaf named `weight` (Equinox, PyTorch-style) is `(out, in)`: `y = W·x`;
* anything else is declared with `layout=`: `(input_axes, output_axes)` per leaf,
  e.g. `((1,), (0,))` for `(out, in)`, `((0,), (1, 2))` for an attention
  projection `(d_model, heads, head_dim)`, `((0, 1), (2,))` for its output
  `(heads, head_dim, d_model)`. Negative axes count from the end. Kernel axes in
  neither set are kept by both factors: leading ones are stacked layers
  (`(L, d_in, d_out)`, as under `nn.scan`), others are shared axes (per-head weights).
  A dict entry's key is a leaf name or a trailing part of a leaf's path
  (`"weight"`, `"attn/out/kernel"`), or a module's name or path suffix
  (`"attn.out"`), which then applies to the module's weight (a `kernel_names`
  leaf); the first matching entry wins. A function gets `(leaf path, leaf)` for
  every leaf of two or more axes and returns the axes or None.

`A` keeps the input axes (it is on the input side) and `B` the output axes; when
the input axes do not all come first, the adapters take the broadcast layout of
`jlora.core.ops`, which `merge` recognises from the shapes alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from jlora.core.targets import KERNEL_KEYS, Site, adapter_path, is_head, is_lora_key, matches

__all__ = ["Axes", "LayoutLike", "KERNEL_NAMES", "TORCH_STYLE", "axes_for", "is_head", "site", "weight_site",
           "tree_sites"]

Path = tuple[str, ...]
Axes = tuple[tuple[int, ...], tuple[int, ...]]
LayoutLike = Mapping[str, Any] | Callable[[Path, Any], Any] | None

# Leaf names that `init_tree` treats as dense weights without a declared layout: the main-weight names
# (`KERNEL_KEYS`) but `embedding`, whose table is not a dense `(in, out)` weight (`jlora.init` finds `nn.Embed`).
KERNEL_NAMES = tuple(k for k in KERNEL_KEYS if k != "embedding")
# 2-D leaves with these names are `(out, in)` (Equinox, PyTorch); other 2-D weights are `(in, out)`.
TORCH_STYLE = ("weight",)
_EXAMPLE = "e.g. ((1,), (0,)) for a PyTorch-style (out, in) weight"


def _normalize(value: Any, ndim: int, where: str) -> Axes:
  """`(input_axes, output_axes)`, each sorted and non-negative, checked against the leaf's rank."""
  try:
    ins, outs = value
    ins, outs = ((ins,) if isinstance(ins, int) else tuple(ins)), ((outs,) if isinstance(outs, int) else tuple(outs))
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ins + outs):
      raise TypeError
  except (TypeError, ValueError):
    raise TypeError(f"`layout` for {where!r} must be a pair (input axes, output axes), {_EXAMPLE}; "
                    f"got {value!r}.") from None
  if not ins or not outs or any(not -ndim <= i < ndim for i in ins + outs):
    raise ValueError(f"`layout` for {where!r}: {value!r} must name at least one input and one output axis of its "
                     f"{ndim} axes ({_EXAMPLE}).")
  ins, outs = tuple(sorted(i % ndim for i in ins)), tuple(sorted(i % ndim for i in outs))
  if len(set(ins + outs)) != len(ins + outs):
    raise ValueError(f"`layout` for {where!r}: {value!r} names an axis twice; an axis is an input or an output.")
  return ins, outs


def _declared(layout: LayoutLike, path: Path, leaf: Any, weights: Sequence[str] = ()) -> Any:
  """What `layout` says for a leaf (None: nothing); a module's name or path matches only its `weights` leaves."""
  if layout is None:
    return None
  if callable(layout) and not isinstance(layout, Mapping):
    return layout(path, leaf)
  if not isinstance(layout, Mapping):
    raise TypeError(f"`layout` must be a dict {{leaf name or path suffix: (input axes, output axes)}} or a function "
                    f"(path, leaf) -> axes or None, got {type(layout).__name__}.")
  own = path[-1] in weights
  return next((v for k, v in layout.items() if matches((k,), path) or (own and matches((k,), path[:-1]))), None)


def axes_for(path: Path, leaf: Any, layout: LayoutLike = None) -> Axes | None:
  """The `(input_axes, output_axes)` of a weight leaf at `path` (its last component is the leaf's name).

  The declared layout if `layout` gives one, else the default of a 2-D leaf by
  name (`weight`: `(out, in)`; any other: `(in, out)`), else None.
  """
  return _axes(path, leaf, _declared(layout, path, leaf, (path[-1],)))


def _axes(path: Path, leaf: Any, declared: Any) -> Axes | None:
  ndim = len(getattr(leaf, "shape", leaf))  # a leaf, or a shape
  if declared is not None:
    return _normalize(declared, ndim, "/".join(path))
  if ndim == 2:
    return ((1,), (0,)) if path[-1] in TORCH_STYLE else ((0,), (1,))
  return None


def site(module: Path, name: str, shape: Sequence[int], axes: Axes | None, *, kind: str = "") -> Site:
  """The `Site` of weight `name` in module `module`; leading axes in neither set of `axes` are stack axes.

  Without `axes` the site is listed but cannot be adapted (its message says how to declare the layout).
  """
  path, shape = adapter_path(module, name), tuple(shape)
  if axes is None:
    why = (f"its weight {name!r} has shape {shape} and no declared layout; pass "
           f"`layout={{{'/'.join((*module, name))!r}: (input_axes, output_axes)}}` ({_EXAMPLE})")
    return Site(path, "undeclared", name, shape, (), (), is_head=is_head(module), unsupported=why)
  ins, outs = axes
  stack = min(ins + outs)
  ins, outs = tuple(i - stack for i in ins), tuple(i - stack for i in outs)
  shape = shape[stack:]
  shared = tuple(i for i in range(len(shape)) if i not in ins + outs)
  kind = kind or ("einsum" if shared else "dense" if len(shape) == 2 else "dense_general")
  return Site(path, kind, name, shape, ins, outs, batch_axes=shared, is_head=is_head(module))


def weight_site(module: Path, name: str, leaf: Any, layout: LayoutLike = None, *, stack: int = 0) -> Site | None:
  """The site of a known weight (e.g. one PEFT adapts): its declared layout (axes of the whole leaf), else the
  default by name for its per-layer shape after `stack` leading axes; None when neither gives one."""
  path = (*module, name)
  declared = _declared(layout, path, leaf, (name,))
  if declared is None:
    axes = _axes(path, leaf.shape[stack:], None)
    declared = axes and tuple(tuple(i + stack for i in group) for group in axes)
  return site(module, name, leaf.shape, _axes(path, leaf, declared)) if declared else None


def _candidates(node: Mapping, module: Path, kernel_names: Sequence[str], layout: LayoutLike) -> Iterator[Site]:
  main = next((k for k in KERNEL_KEYS if k in node), None)  # the weight `lora_a`/`lora_b` fold into (`kernel_key`)
  for name, leaf in node.items():
    if isinstance(leaf, Mapping) or is_lora_key(name) or len(getattr(leaf, "shape", ())) < 2:
      continue
    path = (*module, name)
    if name in KERNEL_KEYS and name != main:
      continue
    declared = _declared(layout, path, leaf, kernel_names)
    if declared is not None or name in kernel_names:
      yield site(module, name, leaf.shape, _axes(path, leaf, declared))


def tree_sites(params: Mapping, kernel_names: Sequence[str] = KERNEL_NAMES, layout: LayoutLike = None,
               prefix: Path = ()) -> list[Site]:
  """Every weight of a string-keyed tree that `init_tree` may adapt, in tree order.

  Args:
    params: nested dict of arrays, with string keys.
    kernel_names: leaf names that are weights (2-D: layout by name; N-D: only with a declared layout).
    layout: declared layouts (see the module docstring).
    prefix: the path of `params` in the whole tree.
  """
  if isinstance(kernel_names, str):
    raise TypeError(f"`kernel_names` must be a sequence of leaf names, e.g. ('kernel', 'w'), got {kernel_names!r}.")
  out = list(_candidates(params, prefix, kernel_names, layout))
  for key, value in params.items():
    if isinstance(value, Mapping):
      out += tree_sites(value, kernel_names, layout, (*prefix, key))
  return out
