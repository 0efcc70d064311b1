"""`target_parameters`: weights adapted by their parameter's name (PEFT's `ParamWrapper`), e.g. mixture-of-experts.

PEFT's rule: an entry matches a parameter whose path `module.name` equals it or
ends with `.` + entry; in a Flax tree the path is the module path plus the
leaf's name (`('moe', 'experts', 'w')`, written `moe.experts.w` or `moe/experts/w`).

A matched weight is adapted in one of two ways:

* it is the weight of a layer jlora knows (a described class, `jlora.register_layer`,
  whose call is an einsum such as `"ecd,edf->ecf"` or a `jax.lax.ragged_dot`):
  that layer's site, so `jlora.apply` adds the adapter factored;
* it is a parameter the module uses in its own code: a site of kind `"parameter"`,
  read from the weight's shape alone — 2-D `(in, out)` (a plain tree's 2-D `weight`
  is `(out, in)`), 3-D `(experts, in, out)` — which `jlora.merge` /
  `jlora.apply_merged` fold in and which `jlora.apply` refuses to skip (its
  adapter is not read by any layer it intercepts).

A 3-D weight gets one rank-`r` adapter per expert in the broadcast layout of
`jlora.core.ops` (the expert axis is a shared axis): `A: (E, in, 1, r)`,
`B: (E, 1, out, r)`, and `W[e] + s·A[e]·B[e]` per expert when merged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from jlora.core.config import LoraConfig
from jlora.core.plain import LayoutLike, axes_for
from jlora.core.plain import site as _plain_site
from jlora.core.targets import Site, adapter_path, is_head, is_lora_key, matches, path_str, targets_parameter

__all__ = ["PARAMETER", "parameter_sites", "own_site", "moe_hint", "refuse"]

Path = tuple[str, ...]
# The kind of a targeted parameter that no known layer holds: merged (`apply_merged`), never factored.
PARAMETER = "parameter"


def moe_hint(where: str) -> str:
  """What to do for a targeted parameter that `jlora.apply` cannot reach factored."""
  return (f"{where!r} is a parameter that its module uses in its own code, where jlora.apply cannot add an adapter "
          "factored. Either move the contraction into a small layer class and describe it with "
          "jlora.register_layer (an einsum, e.g. jlora.Layer(weight='w', input='x', equation='ecd,edf->ecf'), or "
          "jlora.Layer(weight='w', input='x', group_sizes='group_sizes') for tokens sorted by "
          "expert), or run the model with jlora.apply_merged(lambda p, *a: model.apply({'params': p}, *a), params, "
          "config, ...), which folds W0 + s·A·B into the weight (docs/moe.md)")


def _listing(leaves: Mapping[Path, Any], limit: int = 40) -> str:
  rows = [f"  {path_str(p)}  {tuple(v.shape)}" for p, v in leaves.items() if len(getattr(v, "shape", ())) >= 2]
  more = f"\n  ... and {len(rows) - limit} more" if len(rows) > limit else ""
  return "\n".join(rows[:limit]) + more or "  (none)"


def own_site(param: Path, leaf: Any, per_layer: Sequence[int], layout: LayoutLike) -> Site:
  """The `"parameter"` site of a targeted weight no known layer holds (`per_layer`: its shape without scan axes);
  refused unless 2-D or 3-D per layer, or declared in `layout`."""
  module, name, shape = param[:-1], param[-1], tuple(leaf.shape)
  stack = len(shape) - len(per_layer)
  declared = axes_for(param, leaf, layout) if layout is not None else None
  if declared is not None:
    return _plain_site(module, name, shape, declared, kind=PARAMETER)
  path = adapter_path(module, name)
  if len(per_layer) == 2:
    ins, outs = axes_for(param, tuple(per_layer))
    return Site(path, PARAMETER, name, tuple(per_layer), ins, outs, is_head=is_head(module))
  if len(per_layer) == 3:
    return Site(path, PARAMETER, name, tuple(per_layer), (1,), (2,), batch_axes=(0,), is_head=is_head(module))
  scan = f" ({stack} leading scan axes, {tuple(per_layer)} per layer)" if stack else ""
  raise ValueError(
      f"`target_parameters` matched {path_str(param)!r} of shape {shape}{scan}; a target parameter is a 2-D "
      "`(in, out)` weight or a 3-D stack of expert weights `(experts, in, out)` (as PEFT's ParamWrapper: 2-D or 3-D), "
      "with one more leading axis when stacked by nn.scan. Name another parameter, or (plain trees) declare its "
      "axes with `layout=`."
  )


def parameter_sites(config: LoraConfig, leaves: Mapping[Path, Any], sites: Sequence[Site], *,
                    per_layer: Mapping[Path, Sequence[int]] | None = None, layout: LayoutLike = None) -> list[Site]:
  """`sites` with a site for every parameter that `config.target_parameters` names and no site holds yet.

  Args:
    config: the LoRA config.
    leaves: `{leaf path: leaf}` of the base params (flat).
    sites: the sites the front-end found (described layers; a plain tree's weights).
    per_layer: `{leaf path: shape seen by its module}` (linen: without the scan axes); default the leaf's shape,
      read as `(L, experts, in, out)` when 4-D.
    layout: a plain tree's declared layouts (`jlora.init_tree`'s `layout=`), which win over the default by shape.

  Returns:
    The sites, the targeted parameters' own sites appended (a site of an undeclared weight that is targeted is
    replaced by it).

  Raises:
    ValueError: an entry matches no parameter (the message lists those there are), or a matched parameter is
      neither 2-D nor 3-D per layer (the message gives its shape).
  """
  if not config.target_parameters:
    return list(sites)
  params = {p: v for p, v in leaves.items() if not is_lora_key(p[-1]) and hasattr(v, "shape")}
  for entry in config.target_parameters:
    if not any(matches((entry,), p) for p in params):
      raise ValueError(
          f"`target_parameters` entry {entry!r} matched no parameter. Parameters of two or more axes:\n"
          f"{_listing(params)}\nGive a parameter's path or a trailing part of it (module names, then the "
          "parameter's name, joined by '.' or '/')."
      )
  held = {(*s.module, s.kernel_name): s for s in sites if not s.unsupported}
  out = [s for s in sites if not (s.unsupported and targets_parameter(config, (*s.module, s.kernel_name)))]
  for path, leaf in params.items():
    if path in held or not targets_parameter(config, path):
      continue
    shape = tuple(leaf.shape)
    default = per_layer.get(path, shape) if per_layer is not None else (shape[1:] if len(shape) == 4 else shape)
    out.append(own_site(path, leaf, default, layout))
  return out


def refuse(fn: str, config: LoraConfig | None) -> None:
  """Raises for a front-end that does not apply `target_parameters` (NNX, Equinox, Haiku) when `config` sets it
  (None: no config, nothing to refuse).

  Raises:
    ValueError: naming `fn` and the paths that do apply them.
  """
  if config is not None and config.target_parameters:
    raise ValueError(
        f"{fn}: the config has target_parameters={list(config.target_parameters)!r}, which this front-end does not "
        "apply. Target parameters work with linen models (jlora.init + jlora.apply, factored where a described "
        "layer holds the weight) and plain param trees (jlora.init_tree, run with jlora.apply_merged); for this "
        "model use its params tree that way, or adapt the layers with `target_modules`."
    )
