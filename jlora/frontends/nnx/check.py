"""The registered-layer check for NNX: each adapted layer of a described class is run alone before it is trusted.

`jlora.nnx.init` hands every adapted layer of a class described with
`jlora.register_layer` (not flax's own) to the same probe as linen's
(`jlora.frontends.layer_check`): the layer runs alone on a random input of its
real input's shape with its weight `W`, then `W + ΔW`, and its output must move
by `x·ΔW` in the declared layout, or `init` refuses it. Here is only what NNX
needs for that: a runner that rebuilds the layer from a params dict (`Runner`),
and the probes of the calls that the abstract run saw (`plans`).
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from jlora.core.targets import Site
from jlora.core.tree import flatten
from jlora.frontends import layer_check
from jlora.frontends.nnx.graph import Path, Seen
from jlora.frontends.nnx.layer import description
from jlora.frontends.nnx.vars import PARAM_TYPES

__all__ = ["Runner", "plans"]


class Runner:
  """An NNX layer run alone as `apply({'params': params_dict}, *args, method=..., **kwargs)` (linen's signature).

  Its parameters come from the params dict (`jlora.nnx.to_params` layout: attribute names, list indices as
  strings); its other state (rng streams, ...) is its own.
  """

  def __init__(self, module: nnx.Module):
    self.graphdef, params, self.rest = nnx.split(nnx.clone(module), PARAM_TYPES, ...)
    leaves, self.treedef = jax.tree_util.tree_flatten_with_path(params)
    self.paths = [tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)) for path, _ in leaves]
    self.precision, self.dtype = getattr(module, "precision", None), getattr(module, "dtype", None)

  def apply(self, variables: dict, *args: Any, method: str, **kwargs: Any) -> Any:
    flat = flatten(variables["params"])
    state = jax.tree.unflatten(self.treedef, [flat[p] for p in self.paths])
    return getattr(nnx.merge(self.graphdef, state, self.rest), method)(*args, **kwargs)


def _fields(module: nnx.Module) -> tuple:
  plain = (int, float, str, bool, tuple, type(None))
  return tuple(sorted((k, layer_check.static(v)) for k, v in vars(module).items()
                      if isinstance(v, plain) and not k.startswith("_")))


def plans(modules: dict[Path, nnx.Module], sites: list[Site], seen: dict[Path, Seen],
          equations: dict[Path, str]) -> list[layer_check.Probe]:
  """The probes of the described (registered) layers the abstract run called, one per site."""
  out = []
  for site in sites:
    call, module = seen.get(site.module), modules.get(site.module)
    if call is None or module is None or site.unsupported:
      continue
    layer, stock = description(module)
    if stock:
      continue
    try:
      runner: Any = Runner(module)
    except Exception as e:  # reported by the probe as a layer it could not run alone
      runner = e
    equation = equations.get(site.module) if site.kind == "einsum" else None
    out.append(layer_check.make(site, runner, layer, call.args, call.kwargs, call.x, call.y_dtype, equation,
                                None if site.kind == "einsum" else layer.axes(module), type(module), _fields(module)))
  return out
