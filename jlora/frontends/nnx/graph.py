"""An NNX model as jlora sees it: module paths, parameters as a plain params dict, and adaptable sites.

A module path is the tuple of attribute names (list indices as strings) from the
root, e.g. `('layers', '0', 'attn', 'query')`; it is also where the module's
parameters sit in `to_params`, so paths, targeting rules and the params dict read
exactly as for linen models. A module or variable reachable along several paths
(shared) is seen once, at the first path NNX's graph traversal meets.

With example inputs, `sites` also runs the model abstractly (`jax.eval_shape`, no
FLOPs) on a clone whose layers record their calls: a layer whose output the model
returns unchanged is the output head (as `jlora.init` decides for linen), and an
`nnx.Einsum` given its equation at call time gets it from the call.
"""

from __future__ import annotations

import contextvars
import types
from typing import Any

import flax.linen as nn
import jax
from flax import nnx
from flax.core.meta import AxisMetadata

from jlora.core.config import LoraConfig
from jlora.core.targets import Site, path_str
from jlora.core.tree import unflatten
from jlora.frontends.nnx.layer import einsum_of, is_adapted, kind_of, site_of
from jlora.frontends.nnx.vars import PARAM_TYPES, Frozen, Trainable, retype

__all__ = ["Path", "check_model", "check_config", "walk", "to_params", "adapted", "require_adapters", "sites"]

Path = tuple[str, ...]


def check_model(model: Any, name: str = "model") -> None:
  """Raises a `TypeError` unless `model` is an NNX module (a linen one is told where to go)."""
  if isinstance(model, nn.Module):
    raise TypeError(
        f"`{name}` is a flax.linen Module ({type(model).__name__}), but jlora.nnx works on flax.nnx Modules. "
        "For linen models use jlora.init(key, model, params, config, *example_inputs) and jlora.apply."
    )
  if not isinstance(model, nnx.Module):
    raise TypeError(f"`{name}` must be a flax.nnx Module, got {type(model).__name__}.")


def check_config(config: Any) -> None:
  if not isinstance(config, LoraConfig):
    raise TypeError(f"`config` must be a jlora.LoraConfig, got {type(config).__name__}.")


def walk(model: nnx.Module) -> tuple[dict[Path, nnx.Module], dict[Path, nnx.Variable]]:
  """`({path: module}, {path: variable})` of every module and variable in the model, each at its first path."""
  modules: dict[Path, nnx.Module] = {}
  variables: dict[Path, nnx.Variable] = {}
  for path, node in nnx.iter_graph(model, graph=True):
    key = tuple(str(p) for p in path)
    if isinstance(node, nnx.Module):
      modules[key] = node
    elif isinstance(node, nnx.Variable):
      variables[key] = node
  return modules, variables


def to_params(model: nnx.Module) -> dict:
  """The model's parameters as jlora's plain params dict (the layout of a linen model's `'params'`).

  Every `nnx.Param` (and `Trainable` / `Frozen`) value, keyed by its path with list
  indices as strings, and the adapters beside the kernel they adapt:
  `{'layers': {'0': {'attn': {'query': {'kernel': W0, 'bias': b, 'lora_a': A, 'lora_b': B}}}}}`.
  Layers made with `nnx.vmap` (scanned stacks) keep their leading layer axis,
  e.g. `lora_a: (L, d_in, r)`. Other variables (batch statistics, rng state,
  caches) are left out. The arrays are the model's own (no copy).

  This is the tree `jlora.save_adapter`, `jlora.save_peft`, `jlora.summary`,
  `jlora.split` and `jlora.load_adapter` / `jlora.load_peft` (as the base) take;
  `jlora.nnx.from_params` goes back.

  Args:
    model: an NNX model, with or without adapters.

  Returns:
    A nested dict of arrays.
  """
  check_model(model)
  _, variables = walk(model)
  return unflatten({p: v.get_value() for p, v in variables.items() if isinstance(v, PARAM_TYPES)})


def adapted(model: nnx.Module) -> dict[Path, nnx.Module]:
  """`{path: module}` of the model's adapted layers."""
  modules, _ = walk(model)
  return {p: m for p, m in modules.items() if is_adapted(m)}


def require_adapters(model: Any, caller: str) -> dict[Path, nnx.Module]:
  """The adapted layers of `model`; a `ValueError` when it has none (and a `TypeError` for a non-NNX model)."""
  check_model(model)
  modules, variables = walk(model)
  layers = {p: m for p, m in modules.items() if is_adapted(m)}
  if not layers and not any(isinstance(v, Trainable) for v in variables.values()):
    raise ValueError(
        f"jlora.nnx.{caller}: `model` holds no LoRA adapter (no layer made by jlora.nnx.init and no "
        "jlora.nnx.Trainable variable), so there is nothing to train, split off or merge. Create the adapters "
        "first: model = jlora.nnx.init(key, model, config)."
    )
  return layers


# ------------------------------------------------------------------------- sites
def sites(model: nnx.Module, args: tuple, kwargs: dict) -> tuple[list[Site], dict[Path, str]]:
  """Every adaptable module of the model as a `Site`, and the equation of each `nnx.Einsum`.

  Args:
    model: the NNX model (not modified).
    args: example inputs of `model(*args, **kwargs)`, or `()` for none.
    kwargs: example keyword inputs.

  Returns:
    `(sites, equations)`: a `Site` per adaptable module, list indices in numeric
    order (`is_head` by name, and with inputs by the returned output; `unsupported`
    set where jlora cannot adapt it), and `{path: equation}` of each `nnx.Einsum`
    (from the call when inputs are given, else its `einsum_str`).

  Raises:
    ValueError: an `nnx.Einsum` is called with two different equations.
  """
  modules, _ = walk(model)
  found = {p: (m, k) for p, m in modules.items() if (k := kind_of(m)) is not None}
  heads: set[Path] = set()
  eqs = {p: eq for p, (m, k) in found.items() if k == "einsum" and (eq := einsum_of(m, (), {}))}
  if args or kwargs:
    heads, called = _trace(model, args, kwargs)
    for p, seen in called.items():
      if len(seen) > 1:
        raise ValueError(f"The nnx.Einsum at {path_str(p)!r} is called with two equations {sorted(seen)}; jlora "
                         "adapts one kernel layout per module.")
      eqs[p] = next(iter(seen))
  out = [site_of(p, m, k, eqs.get(p), p in heads) for p, (m, k) in sorted(found.items(), key=_natural)]
  return out, eqs


def _natural(item: tuple[Path, Any]) -> tuple:
  """Sort key of a path: list indices in numeric order (`layers/2` before `layers/10`)."""
  return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in item[0])


_RECORD: contextvars.ContextVar[list | None] = contextvars.ContextVar("jlora_nnx_probe", default=None)


class _Probe(nnx.Module):
  """Mixin of the discovery clone's layers: records `(path, output, einsum equation)` of each call."""

  def __call__(self, *args, **kwargs):
    y = super().__call__(*args, **kwargs)
    record = _RECORD.get()
    if record is not None:
      eq = einsum_of(self, args[1:], kwargs) if isinstance(self, nnx.Einsum) else None
      record.append((self.jlora_probe_path, y, eq))
    return y


_PROBES: dict[type, type] = {}


def _probe_class(base: type) -> type:
  if base not in _PROBES:
    _PROBES[base] = types.new_class(f"Probe{base.__name__}", (_Probe, base), {"pytree": base._pytree__is_pytree},
                                    lambda ns: ns.update(__module__=__name__))
  return _PROBES[base]


def _trace(model: nnx.Module, args: tuple, kwargs: dict) -> tuple[set[Path], dict[Path, set[str]]]:
  """Runs a probed clone abstractly: the paths whose output the model returns, and each Einsum's equations."""
  probe = nnx.clone(model)
  modules, variables = walk(probe)
  for var in variables.values():  # a quantized kernel (QuantizedArray) is read dequantized through `Frozen`
    if isinstance(var, nnx.Param) and isinstance(var.get_value(), AxisMetadata):
      retype(var, Frozen)
  for path, module in modules.items():
    if kind_of(module) is not None:
      object.__setattr__(module, "__class__", _probe_class(type(module)))
      module.jlora_probe_path = path
  graphdef, state = nnx.split(probe)
  heads: set[Path] = set()
  called: dict[Path, set[str]] = {}

  def run(state, args, kwargs):
    record: list = []
    token = _RECORD.set(record)
    try:
      out = nnx.merge(graphdef, state)(*args, **kwargs)
    finally:
      _RECORD.reset(token)
    leaves = jax.tree.leaves(out)
    for path, y, eq in record:
      if any(y is leaf for leaf in leaves):
        heads.add(path)
      if eq is not None:
        called.setdefault(path, set()).add(eq)
    return out

  jax.eval_shape(lambda state: run(state, args, kwargs), state)  # inputs closed over: flags stay Python values
  return heads, called
