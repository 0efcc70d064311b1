"""PEFT's `ParamWrapper` tensors (`target_parameters`): names and per-expert layouts, both ways.

PEFT wraps the module holding a targeted parameter; its tensors are named after
the module, not the parameter: `<module>.lora_A.weight`. A second targeted
parameter of the same module wraps the first wrapper, so its tensors sit one
`.base_layer` deeper: the parameter the PyTorch module registers last is
outermost (`<module>.lora_A.weight`), the one before it `<module>.base_layer.lora_A.weight`,
and so on. jlora takes the PyTorch order to be the name map's `param_order` for the
names it lists, then the order of the parameters in the Flax module's dict (the
order the module creates them).

The name map is asked for the parameter's path (`('moe', 'experts', 'w')`) and
must return `<PyTorch module>.<parameter>` (`"flax"` joins the path with `.`).

Layouts (per layer; PEFT's `in` / `out` are the weight's input and output
features, whatever the PyTorch parameter's axis order: `(E, out, in)` by default,
`(E, in, out)` on a module with `is_transposed = True`, the same file either way):

| jlora (broadcast layout of a 3-D weight)   | PEFT                                            |
|--------------------------------------------|-------------------------------------------------|
| `A: (E, in, 1, r)`, `A[e, :, 0, k]`        | `lora_A.weight: (r·E, in)`, row `e·r + k`       |
| `B: (E, 1, out, r)`, `B[e, 0, :, k]`       | `lora_B.weight: (out, r·E)`, column `k·E + e`   |

`ΔW[e] = s·A[e]·B[e]` here is `s·(B[:, :, e] @ A[e])ᵀ` there. A 2-D parameter's
tensors are those of a plain layer (`lora_A: (r, in)`, `lora_B: (out, r)`).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora.core import ops as _ops
from jlora.core.config import LoraConfig
from jlora.core.fields import pattern_lookup
from jlora.core.parameters import own_site
from jlora.core.plain import LayoutLike
from jlora.core.targets import Slot, is_lora_key
from jlora.core.tree import Adapter
from jlora.formats.peft import layout as peft_layout
from jlora.formats.peft.layout import PREFIX
from jlora.formats.peft.names import module_name, per_layer
from jlora.formats.peft.torch_names import NameMap

__all__ = ["peft_matches", "split_name", "torch_order", "depths", "experts_to_peft", "experts_from_peft", "param_table",
           "strip_wrappers", "export", "param_leaf", "assign"]

Path = tuple[str, ...]
_WRAP = ".base_layer"


def peft_matches(targets: Sequence[str] | None, name: str) -> bool:
  """PEFT's rule: `name` (`module.param`) equals an entry or ends with `.` + entry."""
  return bool(targets) and any(name == t or name.endswith("." + t) for t in targets)


def split_name(name: str, where: str) -> tuple[str, str]:
  """`(PyTorch module, parameter)` of a parameter's PEFT name.

  Raises:
    ValueError: the name has no `.` (the name map returned a module name, not `module.param`).
  """
  module, _, param = name.rpartition(".")
  if not module or not param:
    raise ValueError(f"PEFT: the name map gives {name!r} for the target parameter {where!r}; a parameter's name is "
                     "'<PyTorch module>.<parameter>', e.g. 'model.layers.0.mlp.experts.gate_up_proj'.")
  return module, param


def torch_order(names: NameMap, params: Sequence[Path]) -> list[Path]:
  """One module's parameter paths in the PyTorch module's order: `names.param_order` first, then dict order."""
  listed = names.param_order
  return sorted(params, key=lambda p: listed.index(p[-1]) if p[-1] in listed else len(listed))


def depths(params: Sequence[Path]) -> dict[Path, int]:
  """`{param path: .base_layer nesting}` of the targeted parameters of one module, in the module's order: the last
  is outermost (0)."""
  return {p: len(params) - 1 - i for i, p in enumerate(params)}


def strip_wrappers(module: str) -> tuple[str, int]:
  """A PEFT module name without its trailing `.base_layer`s, and how many there were."""
  depth = 0
  while module.endswith(_WRAP):
    module, depth = module[: -len(_WRAP)], depth + 1
  return module, depth


def experts_to_peft(name: str, depth: int, a: np.ndarray, b: np.ndarray, r: int) -> dict[str, np.ndarray]:
  """One layer's per-expert `A` (`(E, in, 1, r)` or any shape `(E, ..., r)` holding `in`), `B` (`(E, ..., r)`
  holding `out`) -> PEFT's `lora_A.weight (r·E, in)`, `lora_B.weight (out, r·E)` under `name` (the module's)."""
  e = a.shape[0]
  a3, b3 = a.reshape(e, -1, r), b.reshape(e, -1, r)  # (E, in, r), (E, out, r)
  key = f"{PREFIX}{name}{_WRAP * depth}"
  return {f"{key}.lora_A.weight": np.transpose(a3, (0, 2, 1)).reshape(e * r, -1),
          f"{key}.lora_B.weight": np.transpose(b3, (1, 2, 0)).reshape(b3.shape[1], r * e)}


def experts_from_peft(leaf: str, value: np.ndarray, shape: tuple[int, ...], n_experts: int, key: str) -> tuple[np.ndarray, int]:
  """The inverse of `experts_to_peft` for one tensor: `(array in the adapter's shape, r)`.

  Args:
    leaf: `"lora_a"` or `"lora_b"`.
    value: `lora_A.weight (r·E, in)` or `lora_B.weight (out, r·E)`.
    shape: the adapter's per-layer shape for rank 1 (`(E, in, 1, 1)` / `(E, 1, out, 1)`), whose last axis becomes r.
    n_experts: E.
    key: the tensor's key, for messages.

  Raises:
    ValueError: the tensor is not 2-D, or its sizes do not fit E experts of this weight.
  """
  size = int(np.prod(shape[1:-1]))
  rows = value.shape[0] if leaf == "lora_a" else value.shape[-1]
  feats = value.shape[-1] if leaf == "lora_a" else value.shape[0]
  if value.ndim != 2 or rows % n_experts or feats != size:
    want = f"(r·{n_experts}, {size})" if leaf == "lora_a" else f"({size}, r·{n_experts})"
    raise ValueError(f"load_peft: {key!r} has shape {tuple(value.shape)}; the model's weight of {n_experts} experts "
                     f"needs {want}. Was the adapter made for another base model?")
  r = rows // n_experts
  if leaf == "lora_a":
    per = np.transpose(value.reshape(n_experts, r, size), (0, 2, 1))  # (E, in, r)
  else:
    per = np.transpose(value.reshape(size, r, n_experts), (2, 0, 1))  # (E, out, r)
  return per.reshape(tuple(shape[:-1]) + (r,)), r


def param_table(base: Mapping[Path, Any], names: NameMap,
                config: LoraConfig) -> dict[str, list[tuple[Path, int | None, str]]]:
  """`{PyTorch module: [(param path, layer index or None, PEFT param name)]}` of the parameters that the config's
  `target_parameters` (PEFT's names) select, each module's in the PyTorch module's order (`torch_order`)."""
  out: dict[str, list[tuple[Path, int | None, str]]] = {}
  for path, leaf in base.items():
    if is_lora_key(path[-1]) or np.ndim(leaf) < 2:
      continue
    name = module_name(names, path)
    layers = [(name.format(i=i), i) for i in range(np.shape(leaf)[0])] if "{i}" in name else [(name, None)]
    for n, layer in layers:
      if peft_matches(config.target_parameters, n):
        out.setdefault(split_name(n, "/".join(path))[0], []).append((path, layer, n))
  for held in out.values():
    rank = {p: i for i, p in enumerate(torch_order(names, list(dict.fromkeys(p for p, _, _ in held))))}
    held.sort(key=lambda h: rank[h[0]])
  return out


def export(ads: Sequence[Adapter], params: Mapping[str, Any], config: LoraConfig,
           names: NameMap) -> tuple[dict[str, np.ndarray], list[str], dict[str, int], dict[str, float]]:
  """`(tensors, PEFT parameter names, ranks, alphas)` of the adapters of `target_parameters` (`ads`).

  `ranks` / `alphas` are keyed by the PEFT parameter names where they differ from `config.r` / `lora_alpha`.

  Raises:
    ValueError: a parameter whose name map gives no `module.param` name, more than one scan axis, or a per-layer
      weight that is neither 2-D nor a 3-D `(experts, ...)` weight in the broadcast layout.
  """
  order: dict[tuple[str, ...], list[Path]] = {}
  for ad in ads:  # each module's targeted parameters, in the order of its dict (PEFT's nesting of wrappers)
    order.setdefault(ad.slot.module, [])
  for module in order:
    node = params
    for k in module:
      node = node[k]
    targeted = {(*module, ad.slot.kernel_name) for ad in ads if ad.slot.module == module}
    order[module] = torch_order(names, [(*module, k) for k in node if (*module, k) in targeted])
  tensors: dict[str, np.ndarray] = {}
  saved: list[str] = []
  ranks: dict[str, int] = {}
  alphas: dict[str, float] = {}
  for ad in ads:
    param = (*ad.slot.module, ad.slot.kernel_name)
    where = "/".join(param)
    name = module_name(names, param)
    depth = depths(order[ad.slot.module])[param]
    stack = 1 if "{i}" in name else 0
    ndim = np.ndim(ad.kernel) - stack
    a, b = np.asarray(jax.device_get(ad.a)), np.asarray(jax.device_get(ad.b))
    if ndim == 2 and ad.layout == "broadcast":
      a, b, s = peft_layout.from_broadcast(a, b, ad.kernel.shape, ad.slot.where)
      ndim = 2 if s == stack else -1
    experts = ndim == 3 and ad.layout == "broadcast" and a.shape[stack] == b.shape[stack] == ad.kernel.shape[stack]
    if ndim != 2 and not experts:
      raise ValueError(
          f"save_peft: the target parameter {where!r} has shape {tuple(ad.kernel.shape)} "
          f"({'one scan axis, ' if stack else ''}adapters {a.shape}, {b.shape}); PEFT's ParamWrapper holds a 2-D "
          "weight or a 3-D (experts, ...) weight with one adapter per expert. Check the name map's '{i}'."
      )
    for (n, a1), (_, b1) in zip(per_layer(name, a, where), per_layer(name, b, where)):
      mod = split_name(n, where)[0]
      if experts:
        tensors.update(experts_to_peft(mod, depth, a1, b1, ad.rank))
      else:
        tensors.update(peft_layout.lora_to_peft(mod + ".base_layer" * depth, a1, b1, ad.rank, embed=False))
      saved.append(n)
      if ad.rank != config.r:
        ranks[n] = ad.rank
      if config.alpha_for(ad.slot.where) != config.lora_alpha:
        alphas[n] = config.alpha_for(ad.slot.where)
  return tensors, saved, ranks, alphas


def param_leaf(param: Path, leaf: str, layers: Mapping[int | None, tuple[str, str, Any]], kernel: Any,
               config: LoraConfig, *, dtype: Any, layout: LayoutLike = None) -> tuple[Path, Any, int, float]:
  """One target parameter's `lora_a` / `lora_b` leaf from its per-layer PEFT tensors.

  Args:
    param: the parameter's path in the Flax tree.
    leaf: `"lora_a"` or `"lora_b"`.
    layers: `{layer index or None: (PEFT parameter name, tensor key, tensor)}`.
    kernel: the base weight.
    config: PEFT's config (`rank_pattern` / `alpha_pattern` keys are PEFT names).
    dtype: the adapter's dtype.
    layout: `load_peft`'s `layout=` (declared axes of the weight).

  Returns:
    `(leaf path, array, r, alpha)`.

  Raises:
    ValueError: layers of a scanned stack are missing, a tensor does not fit the weight, or its rank is not the
      config's.
  """
  where = "/".join(param)
  stacked = next(iter(layers)) is not None
  shape = tuple(np.shape(kernel))
  if stacked:
    missing = sorted(set(range(shape[0])) - set(layers))
    if missing:
      raise ValueError(f"load_peft: {where!r} is a scanned stack of {shape[0]} layers; the adapter lacks layers "
                       f"{missing}.")
  site = own_site(param, kernel, shape[1:] if stacked else shape, layout)
  arrays, rank, alpha = [], None, None
  for layer in sorted(layers, key=lambda x: -1 if x is None else x):
    pname, key, value = layers[layer]
    value = np.asarray(value, np.float32)
    if len(site.kernel_shape) == 3:
      a_shape, b_shape = _ops.adapter_shapes(site, 1)
      arr, r = experts_from_peft(leaf, value, a_shape if leaf == "lora_a" else b_shape, site.kernel_shape[0], key)
    else:
      k_shape = tuple(site.kernel_shape[i] for i in site.in_axes + site.out_axes)
      arr, r = peft_layout.lora_from_peft(leaf, value, k_shape, embed=False, kernel_name=param[-1], key=key)
      arr = peft_layout.to_broadcast(leaf, arr, site) if site.broadcast else arr
    peft_r = pattern_lookup(config.rank_pattern, pname, config.r)
    if r != peft_r:
      raise ValueError(f"load_peft: {key!r} has rank {r}, but adapter_config.json gives r={peft_r} for {pname!r} "
                       "(check `r` and `rank_pattern`); the files do not belong together.")
    a = pattern_lookup(config.alpha_pattern, pname, config.lora_alpha)
    if rank not in (None, r) or alpha not in (None, a):
      raise ValueError(f"load_peft: the layers of the scanned stack {where!r} have different ranks or alphas; "
                       "jlora needs one.")
    rank, alpha = r, a
    arrays.append(arr)
  slot = Slot(param[:-1], param[-1])
  return slot.leaf(leaf), jnp.asarray(np.stack(arrays) if stacked else arrays[0], dtype), rank, alpha


def _fits(tensors: Mapping[str, tuple[str, Any]], site_shape: tuple[int, ...], ins: int, outs: int) -> bool:
  """Whether a wrapper's `lora_A` / `lora_B` fit a weight of `ins` inputs, `outs` outputs and `E` experts."""
  e = site_shape[0] if len(site_shape) == 3 else 1
  a, b = tensors.get("lora_a"), tensors.get("lora_b")
  ok_a = a is None or (np.ndim(a[1]) == 2 and a[1].shape[1] == ins and a[1].shape[0] % e == 0)
  ok_b = b is None or (np.ndim(b[1]) == 2 and b[1].shape[0] == outs and b[1].shape[1] % e == 0)
  return ok_a and ok_b


def assign(nested: Mapping[str, Mapping[int, Mapping[str, tuple[str, Any]]]],
           table: Mapping[str, Sequence[tuple[Path, int | None, str]]], base: Mapping[Path, Any],
           layout: LayoutLike) -> dict[tuple[Path, str], dict[int | None, tuple[str, str, Any]]]:
  """Which parameter each PEFT wrapper's tensors belong to: `{(param path, leaf): {layer: (PEFT name, key, tensor)}}`.

  A module's wrappers are nested in the PyTorch module's order of its parameters (the last outermost, depth 0).
  Where the parameters' shapes tell the wrappers apart, shapes decide; where several orders fit, the Flax
  module's dict order decides, with a warning naming the parameters (same-shaped weights, e.g. separate gate and
  up projections, are told apart by that order only).

  Raises:
    ValueError: a module holds more wrappers than targeted parameters, or no order fits the tensors' shapes.
  """
  out: dict[tuple[Path, str], dict[int | None, tuple[str, str, Any]]] = {}
  for tmod, by_depth in nested.items():
    held = list(table[tmod])
    if max(by_depth) >= len(held):
      raise ValueError(f"load_peft: {tmod!r} holds {max(by_depth) + 1} nested ParamWrapper adapters, but "
                       f"`target_parameters` selects only {[n for _, _, n in held]} in it in this model.")
    feats = []
    for param, layer, _ in held:
      kernel = base[param]
      site = own_site(param, kernel, np.shape(kernel)[1:] if layer is not None else np.shape(kernel), layout)
      size = [int(np.prod([site.kernel_shape[i] for i in axes])) for axes in (site.in_axes, site.out_axes)]
      feats.append((site.kernel_shape, *size))
    n = len(held)
    fitting = [order for order in itertools.permutations(range(n))
               if all(_fits(t, *feats[order[n - 1 - d]]) for d, t in by_depth.items())]
    if not fitting:
      raise ValueError(
          f"load_peft: the LoRA tensors of {tmod!r} ({', '.join(f'{k} {tuple(v.shape)}' for t in by_depth.values() for k, v in t.values())}) "
          f"fit no order of the parameters {[n for _, _, n in held]} (weights {[f[0] for f in feats]}). Was the "
          "adapter made for another base model?")
    order = tuple(range(n)) if tuple(range(n)) in fitting else fitting[0]
    if len(fitting) > 1:
      warnings.warn(
          f"load_peft: the adapters of {[n for _, _, n in held]} in {tmod!r} have the same shapes; jlora takes PEFT's "
          "nesting (the PyTorch module's order of its parameters, the last outermost) to be the name map's "
          "`param_order`, then the order of the Flax module's dict: "
          f"{[n for _, _, n in (held[i] for i in order)]}. If the PyTorch module registers them in another order, "
          "list them in that order in the name map's `param_order` (or build the Flax params dict in that order).", UserWarning, stacklevel=4)
    for depth, tensors in by_depth.items():
      param, layer, pname = held[order[n - 1 - depth]]
      for leaf, (key, value) in tensors.items():
        out.setdefault((param, leaf), {})[layer] = (pname, key, value)
  return out
