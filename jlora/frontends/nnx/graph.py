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
from typing import Any, NamedTuple

import flax.linen as nn
import jax
from flax import nnx
from flax.core.meta import AxisMetadata

from jlora.core.config import LoraConfig
from jlora.core.targets import Site, path_str
from jlora.core.tree import unflatten
from jlora.frontends import flow as _flow
from jlora.frontends import layer_check
from jlora.frontends.layers import Call
from jlora.frontends.nnx.layer import described_equation, description, is_adapted, kind_of, site_of
from jlora.frontends.nnx.vars import PARAM_TYPES, Frozen, Trainable, retype

__all__ = ["Path", "Seen", "check_model", "check_config", "walk", "to_params", "adapted", "require_adapters", "sites"]

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
class Seen(NamedTuple):
  """What the abstract run saw of one registered (described) layer's first call, for its site and its check.

  Attributes:
    kernel_shape: its weight's shape inside the call (one layer's, inside `nnx.scan`).
    args, kwargs: the call's arguments, the input replaced by `layer_check.INPUT`.
    x: the input's shape and dtype.
    y_dtype: the output's dtype.
  """

  kernel_shape: tuple[int, ...]
  args: tuple
  kwargs: dict
  x: jax.ShapeDtypeStruct
  y_dtype: Any


def sites(model: nnx.Module, args: tuple, kwargs: dict) -> tuple[list[Site], dict[Path, str], dict[Path, Seen]]:
  """Every adaptable module of the model as a `Site`, the equation of each einsum layer, and each described layer's
  call.

  Args:
    model: the NNX model (not modified).
    args: example inputs of `model(*args, **kwargs)`, or `()` for none.
    kwargs: example keyword inputs.

  Returns:
    `(sites, equations, seen)`: a `Site` per adaptable module, list indices in numeric
    order (`is_head` by name, and with inputs by what the model returns, `jlora.frontends.flow`;
    `unsupported` set where jlora cannot adapt it), `{path: equation}` of each einsum layer
    (from the call when inputs are given, else its `einsum_str` / described equation), and
    `{path: Seen}` of the registered layers the model called (empty without inputs).

  Raises:
    ValueError: an einsum layer is called with two different equations.
  """
  modules, _ = walk(model)
  found = {p: (m, k) for p, m in modules.items() if (k := kind_of(m)) is not None}
  heads: set[Path] = set()
  eqs = {p: eq for p, (m, k) in found.items() if k == "einsum" and (eq := described_equation(m, (), {}))}
  seen: dict[Path, Seen] = {}
  if args or kwargs:
    heads, called, seen = _trace(model, args, kwargs)
    for p, eqs_seen in called.items():
      if len(eqs_seen) > 1:
        raise ValueError(f"The einsum layer at {path_str(p)!r} is called with two equations {sorted(eqs_seen)}; jlora "
                         "adapts one kernel layout per module.")
      eqs[p] = next(iter(eqs_seen))
  out = [site_of(p, m, k, eqs.get(p), p in heads, seen[p].kernel_shape if p in seen else None)
         for p, (m, k) in sorted(found.items(), key=_natural)]
  return out, eqs, seen


def _natural(item: tuple[Path, Any]) -> tuple:
  """Sort key of a path: list indices in numeric order (`layers/2` before `layers/10`)."""
  return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in item[0])


_RECORD: contextvars.ContextVar[Any] = contextvars.ContextVar("jlora_nnx_probe", default=None)


class _Probe(nnx.Module):
  """Mixin of the discovery clone's layers: records each call (output, einsum equation, a described layer's call)."""

  def _jlora_probe(self, method: str, args: tuple, kwargs: dict) -> Any:
    y = getattr(super(), method)(*args, **kwargs)
    record = _RECORD.get()
    if record is not None:
      record(self, method, args, kwargs, y)
    return y


_PROBES: dict[tuple[type, str], type] = {}


def _probe_class(base: type, method: str) -> type:
  if (base, method) not in _PROBES:
    def body(ns: dict) -> None:
      ns.update(__module__=__name__, jlora_base=base)
      ns[method] = lambda self, *args, **kwargs: self._jlora_probe(method, args, kwargs)

    _PROBES[(base, method)] = types.new_class(f"Probe{base.__name__}", (_Probe, base),
                                              {"pytree": base._pytree__is_pytree}, body)
  return _PROBES[(base, method)]


def _trace(model: nnx.Module, args: tuple, kwargs: dict) -> tuple[set[Path], dict[Path, set[str]], dict[Path, Seen]]:
  """Runs a probed clone abstractly: the paths whose output the model returns, each einsum layer's equations, and
  each described layer's first call."""
  probe = nnx.clone(model)
  modules, variables = walk(probe)
  for var in variables.values():  # a quantized kernel (QuantizedArray) is read dequantized through `Frozen`
    if isinstance(var, nnx.Param) and isinstance(var.get_value(), AxisMetadata):
      retype(var, Frozen)
  for path, module in modules.items():
    found = description(module)
    if found is not None:
      module.jlora_probe_path = path
      object.__setattr__(module, "__class__", _probe_class(type(module), found[0].method if not found[1] else
                                                           "__call__"))
  graphdef, state = nnx.split(probe)
  called: dict[Path, set[str]] = {}
  seen: dict[Path, Seen] = {}
  recorder = _flow.Recorder()

  def record(module, method, call_args, call_kwargs, y):
    path = module.jlora_probe_path
    recorder.add(path, y)
    layer, stock = description(module)
    base = type(module).jlora_base
    eq = described_equation(module, call_args if not stock else call_args[1:], call_kwargs)
    if eq is not None:
      called.setdefault(path, set()).add(eq)
    if not stock and path not in seen:
      call = Call(module, layer, call_args, call_kwargs, cls=base)
      x = call.input
      weight = getattr(module, layer.weight_name(module), None)
      if hasattr(x, "shape") and hasattr(y, "dtype") and hasattr(weight, "shape"):
        seen[path] = Seen(tuple(weight.shape), tuple(layer_check.INPUT if a is x else a for a in call_args),
                          {k: layer_check.INPUT if v is x else v for k, v in call_kwargs.items()},
                          jax.ShapeDtypeStruct(x.shape, x.dtype), y.dtype)

  def run(state):
    token = _RECORD.set(record)
    try:
      return nnx.merge(graphdef, state)(*args, **kwargs)  # inputs closed over: flags stay Python values
    finally:
      _RECORD.reset(token)

  _, flow = _flow.trace(run, state, recorder)
  return set(flow.returned), called, seen
