"""Sharding the reference models over a device mesh: logical axis names, and rules that map them to mesh axes.

Two steps, as in flax's logical partitioning:

1. :func:`logical_axes` names every axis of every parameter with a **logical** name, from the
   model's declarative table `param_axes` (a class attribute of each model, module-path suffix ->
   names; see :class:`jlora.models._arch.HFModel`). The names:

   * `vocab`: the vocabulary axis of token embeddings and LM heads;
   * `embed`: the model width (d_model / hidden_size);
   * `heads`: the fused `heads * head_dim` axis of query and attention-output projections
     (GPT-2's fused `c_attn` q|k|v axis too; T5's relative-bias heads);
   * `kv`: the fused `kv_heads * head_dim` axis of key and value projections;
   * `mlp`: the feed-forward width;
   * `layers`: the leading layer axis `L` of a scanned stack (`scan_layers=True`);
   * `norm`: norm scales and LayerNorm biases; `None`: small tables (positions, token types,
     relative-position buckets) and classifier labels;
   * `lora_rank`: the rank `r` of `lora_a` (in…, r) / `lora_b` (r, out…), which take the other
     axes from their kernel.

   Biases take the name of their kernel's output axis.

2. :func:`mesh_shardings` maps logical names to mesh axes with `rules`, flax's format: a sequence
   of `(logical_name, mesh_axis | tuple_of_mesh_axes | None)` pairs; the first pair for a name
   whose mesh axes are not yet used by another axis of the same parameter wins, unnamed axes are
   replicated. :data:`DEFAULT_RULES` shard a `("data", "fsdp", "tensor")` mesh.

`models.from_config(..., mesh=)` / `models.from_pretrained(..., mesh=)` create the params in
these shardings. The models carry no sharding annotations (XLA's GSPMD propagates shardings
through them), so their mesh needs `AxisType.Auto` axes: `jax.make_mesh(shape, names,
axis_types=(AxisType.Auto,) * len(names))`; `jax.make_mesh`'s default `Explicit` axes make
the forward raise on its first ambiguous matmul.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jlora.core.sharding import LOGICAL_RANK, adapter_specs
from jlora.core.tree import flatten
from jlora.models._arch import HFModel, checked_model

__all__ = ["DEFAULT_RULES", "LogicalRules", "check_mesh", "logical_axes", "mesh_shardings", "on_mesh"]

LogicalRules = Sequence[tuple[str, str | tuple[str, ...] | None]]

DEFAULT_RULES: LogicalRules = (
  ("batch", ("data", "fsdp")),
  ("embed", "fsdp"),
  ("experts", "fsdp"),
  ("vocab", "tensor"),
  ("heads", "tensor"),
  ("kv", "tensor"),
  ("mlp", "tensor"),
  ("act_mlp", "tensor"),
  ("act_embed", None),
  ("length", None),
  ("layers", None),
  ("lora_rank", None),
  ("norm", None),
)
"""Logical -> mesh axis rules for a mesh with axes `("data", "fsdp", "tensor")`.

* `batch` -> `("data", "fsdp")`: inputs are split over both data-parallel axes;
* `embed` -> `"fsdp"`: every weight is split along its model-width axis over `fsdp` (FSDP /
  ZeRO-3: XLA all-gathers a layer's weights where it runs, and reduce-scatters its gradients);
* activations (`models._layers.constrain`, active only when a step is traced under
  `jax.set_mesh(mesh)` and `nn.logical_axis_rules(rules)`): the residual stream
  `(batch, length, act_embed)` stays split by batch and whole in width, so XLA gathers each
  FSDP-sharded weight where it is used instead of reducing activations; the feed-forward
  hidden `act_mlp` follows `mlp`;
* `experts` -> `"fsdp"`: a mixture-of-experts weight `(experts, embed, mlp)` is split by expert
  over `fsdp` (each device holds whole experts, the model width then left whole: one mesh axis
  per array), its `mlp` axis over `tensor`; its per-expert adapters follow;
* `vocab`, `heads`, `kv`, `mlp` -> `"tensor"`: Megatron-style tensor parallelism (q/k/v/up
  projections column-parallel, o/down projections row-parallel, embeddings and LM head by vocab);
* `layers`, `lora_rank`, `norm` and any other name -> replicated.

A mesh without some of these axes works: a missing mesh axis counts as size 1 (a `("data",)`
mesh replicates every parameter). A parameter axis whose size is not divisible by the product of
its mesh axes' sizes is replicated instead (e.g. GPT-2's vocabulary of 50257 over `tensor=2`).
"""

def _table_axes(model: HFModel, path: tuple[str, ...], ndim: int, scan_name: str | None) -> tuple[str | None, ...]:
  """The logical axes of one base parameter, from the longest suffix of `model.param_axes` that matches `path`."""
  where = "/".join(path)
  best: tuple[str, ...] = ()
  for suffix in model.param_axes:
    parts = tuple(suffix.split("/"))
    if len(parts) > len(best) and path[-len(parts) :] == parts:
      best = parts
  if not best:
    raise ValueError(
      f"No logical axes for parameter `{where}` of {type(model).__name__}: no entry of "
      f"`{type(model).__name__}.param_axes` is a suffix of its path. Add one (e.g. `'{'/'.join(path[-2:])}': "
      "('embed', 'mlp')`) so that the parameter is sharded on purpose."
    )
  axes = tuple(model.param_axes["/".join(best)])
  if scan_name is not None and scan_name in path[:-1]:
    axes = ("layers", *axes)
  if len(axes) != ndim:
    raise ValueError(
      f"`{type(model).__name__}.param_axes['{'/'.join(best)}']` names {len(axes)} axes {axes} for parameter "
      f"`{where}`, which has {ndim}; give one name per axis."
    )
  return axes


def logical_axes(model: HFModel, params: Mapping) -> Any:
  """The logical axis names of every parameter of a reference model.

  Args:
    model: a jlora reference model (`models.from_config` / `models.from_pretrained`).
    params: its `'params'` tree (arrays or `jax.ShapeDtypeStruct`s, e.g. from `jax.eval_shape`),
      optionally with LoRA leaves `lora_a` (in, r), `lora_b` (r, out) and DoRA magnitudes.

  Returns:
    A tree shaped like `params` whose leaves are `PartitionSpec`s of logical names, one per array
    axis: e.g. `model/layers/self_attn/q_proj/kernel` (L, d, H*D) -> `P('layers', 'embed', 'heads')`.

  Raises:
    ValueError: for a parameter that no entry of the model's `param_axes` table covers (naming its
      path), or an entry with the wrong number of names.
  """
  model = checked_model(model)
  flat = flatten(params)
  scan_name = model.hf_spec().scan_name
  base = functools.cache(lambda path: _table_axes(model, path, len(flat[path].shape), scan_name))
  adapters = adapter_specs(params, base, rank_axis=LOGICAL_RANK)  # jlora's rule: adapters follow their kernel
  axes = {path: adapters[path] if path in adapters else base(path) for path in flat}
  return jax.tree_util.tree_map_with_path(lambda p, _: PartitionSpec(*axes[tuple(str(k.key) for k in p)]), params)


def check_mesh(mesh: Any, rules: Any, *, auto: bool = False) -> LogicalRules:
  """`rules` (default :data:`DEFAULT_RULES`) after checking both; `mesh` may be None only without rules.

  Args:
    mesh: the mesh given (or None).
    rules: the rules given (or None).
    auto: also require `AxisType.Auto` mesh axes, which the reference models need to run on the
      params: they carry no sharding annotations, so XLA (GSPMD) propagates shardings through them,
      while `Explicit` axes (`jax.make_mesh`'s default) make every ambiguous matmul an error.

  Raises:
    TypeError: `mesh` is not a `jax.sharding.Mesh`, or `rules` not a sequence of `(name, mesh axes)` pairs.
    ValueError: `rules` given without a `mesh`; with `auto`, a mesh with `Explicit` axes.
  """
  if mesh is None:
    if rules is not None:
      raise ValueError("`rules` apply to a `mesh`; pass `mesh=jax.make_mesh(...)` too, or drop `rules`.")
    return DEFAULT_RULES
  if not isinstance(mesh, Mesh):
    raise TypeError(
      f"`mesh` must be a jax.sharding.Mesh (e.g. `jax.make_mesh((2, 2, 2), ('data', 'fsdp', 'tensor'))`), "
      f"got {type(mesh).__name__}."
    )
  explicit = [n for n, t in zip(mesh.axis_names, mesh.axis_types) if t == AxisType.Explicit]
  if auto and explicit:
    raise ValueError(
      f"`mesh` has Explicit axes {explicit}; the reference models run under automatic (GSPMD) sharding, "
      "so build the mesh with Auto axes: `jax.make_mesh(shape, names, "
      "axis_types=(jax.sharding.AxisType.Auto,) * len(names))`."
    )
  if rules is None:
    return DEFAULT_RULES
  ok = isinstance(rules, (list, tuple)) and all(
    isinstance(r, (list, tuple))
    and len(r) == 2
    and isinstance(r[0], str)
    and (r[1] is None or isinstance(r[1], str) or (isinstance(r[1], tuple) and all(isinstance(a, str) for a in r[1])))
    for r in rules
  )
  if not ok:
    raise TypeError(
      "`rules` must be a sequence of (logical_name, mesh_axis | tuple_of_mesh_axes | None) pairs, e.g. "
      f"`(('embed', 'fsdp'), ('mlp', 'tensor'))` (see `models.DEFAULT_RULES`), got {rules!r}."
    )
  return tuple(rules)


def _mesh_spec(logical: Sequence[str | None], shape: Sequence[int], sizes: Mapping[str, int], rules) -> PartitionSpec:
  """Mesh axes for each array axis: first usable rule, missing mesh axes dropped, indivisible axes replicated."""
  used: set[str] = set()
  out: list[str | tuple[str, ...] | None] = []
  for name, n in zip(logical, shape):
    pick = None
    for rule_name, target in rules:
      if name is None or rule_name != name:
        continue
      axes = tuple(a for a in ((target,) if isinstance(target, str) else target or ()) if a in sizes)
      if used & set(axes):
        continue
      if axes and n % math.prod(sizes[a] for a in axes) == 0:
        pick = axes
      break
    used.update(pick or ())
    out.append(None if not pick else pick[0] if len(pick) == 1 else pick)
  return PartitionSpec(*out)


def mesh_shardings(model: HFModel, params: Mapping, mesh: Mesh, *, rules: LogicalRules = DEFAULT_RULES) -> Any:
  """The `NamedSharding` of every parameter of a reference model on `mesh`.

  Args:
    model: a jlora reference model.
    params: its `'params'` tree (arrays or `jax.ShapeDtypeStruct`s), as for :func:`logical_axes`.
    mesh: the device mesh, e.g. `jax.make_mesh((2, 2, 2), ('data', 'fsdp', 'tensor'))`.
    rules: logical -> mesh axis pairs (see :data:`DEFAULT_RULES`). Mesh axes that `mesh` lacks
      count as size 1; an array axis not divisible by the product of its mesh axes' sizes is
      replicated.

  Returns:
    A tree shaped like `params` of `jax.sharding.NamedSharding` (for `jax.device_put`,
    `jax.jit(out_shardings=...)`).

  Raises:
    TypeError: for a `mesh` or `rules` of the wrong type.
    ValueError: as :func:`logical_axes`.
  """
  rules = check_mesh(mesh, rules)
  specs = logical_axes(model, params)
  sizes = dict(mesh.shape)
  return jax.tree.map(
    lambda spec, leaf: NamedSharding(mesh, _mesh_spec(tuple(spec), leaf.shape, sizes, rules)),
    specs,
    params,
    is_leaf=lambda x: isinstance(x, PartitionSpec),
  )


@contextlib.contextmanager
def on_mesh(mesh: Mesh, rules: LogicalRules | None = None) -> Iterator[None]:
  """The context to trace (jit) a step of a reference model on `mesh` in: the mesh and the logical axis rules.

  Inside it the models pin their activations with sharding constraints: the
  residual stream stays split by batch over `("data", "fsdp")`, so XLA gathers
  each FSDP-sharded weight where a layer uses it and the gradient collectives
  of a LoRA step move adapter-sized bytes (outside it XLA may reduce
  activations instead). Outside any such context the constraints are no-ops.

  Args:
    mesh: the device mesh (Auto axes).
    rules: logical -> mesh axis pairs (default :data:`DEFAULT_RULES`).

  Example:
    >>> with models.on_mesh(mesh):  # doctest: +SKIP
    ...   state = step(state, batch)
  """
  rules = check_mesh(mesh, rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield
