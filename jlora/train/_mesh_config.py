"""The `mesh` section of a `jlora train` config: device-mesh axis sizes, sharding rules, multi-process start.

Without a `mesh` section a run uses one device, as it always did. With one (even
`mesh: {}`), the run spreads over a `("data", "fsdp", "tensor")` device mesh
(`jlora.train._mesh`):

* `data`, `fsdp`, `tensor`: the axis sizes; their product must be the number of
  devices (`jax.device_count()`, over all processes). One of them may be -1: the
  devices left over. `train.batch_size` is the global batch, split over
  `data × fsdp`; the frozen base is sharded by `jlora.models.mesh_shardings`
  (`embed` over `fsdp`: FSDP; `heads`/`kv`/`mlp`/`vocab` over `tensor`), adapters
  follow their kernels.
* `rules`: logical-axis rules placed before the models' `DEFAULT_RULES`, so that
  they override them: a list of `[logical_name, mesh_axis | [mesh_axes] | null]`.
* `distributed`: whether to call `jax.distributed.initialize()` first (null: when
  the environment says this process is one of several; see `jlora.train._mesh`).

Only what cannot depend on the machine is checked here; the sizes against the
device count, and the batch against `data × fsdp`, are checked when the run starts.

Examples:
  >>> MeshConfig(data=-1, fsdp=2).fsdp
  2
  >>> MeshConfig(data=0)
  Traceback (most recent call last):
  ...
  ValueError: `mesh.data` must be -1 (the devices left over) or an integer >= 1, got 0.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["AXES", "MeshConfig"]

AXES: tuple[str, ...] = ("data", "fsdp", "tensor")
EXAMPLE_RULES = "e.g. [[mlp, null], [heads, [fsdp, tensor]]]"


def _field(default: Any, help: str) -> Any:
  return dataclasses.field(default=default, metadata={"help": help, "choices": None, "range": None})


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """The device mesh (absent: one device); `data × fsdp × tensor` = the devices of all processes."""

  data: int = _field(-1, "data-parallel axis size (-1: the devices left over by the other axes)")
  fsdp: int = _field(1, "FSDP axis size: the batch and the base's `embed` axis are split over it")
  tensor: int = _field(1, "tensor-parallel axis size: the base's heads, kv, mlp and vocab axes are split over it")
  rules: list | None = dataclasses.field(default=None, metadata={
    "help": "logical-axis rules before the models' DEFAULT_RULES (so they win): a list of [logical_name, mesh axis "
            f"| list of mesh axes | null], {EXAMPLE_RULES}", "choices": None, "range": None})
  distributed: bool | None = _field(
    None, "call jax.distributed.initialize() first (null, auto: when the environment shows several processes: "
    "JAX_COORDINATOR_ADDRESS, srun with several tasks, a TPU pod, mpirun)")

  def __post_init__(self) -> None:
    sizes = {axis: getattr(self, axis) for axis in AXES}
    for axis, size in sizes.items():
      if isinstance(size, bool) or not isinstance(size, int) or (size != -1 and size < 1):
        raise ValueError(f"`mesh.{axis}` must be -1 (the devices left over) or an integer >= 1, got {size!r}.")
    rest = [axis for axis, size in sizes.items() if size == -1]
    if len(rest) > 1:
      raise ValueError(f"`mesh`: only one axis size may be -1 (the devices left over), got {rest}; give the "
                       f"others, e.g. `mesh.{rest[1]}=1`.")
    if self.rules is not None:
      object.__setattr__(self, "rules", [_rule(r, i) for i, r in enumerate(self.rules)])

  @property
  def logical_rules(self) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
    """`rules` in `jlora.models` form: `(name, axis | (axes...) | None)` pairs (without the defaults)."""
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in self.rules or ())


def _rule(rule: Any, i: int) -> list:
  """One `[logical_name, mesh axes]` rule, checked; a one-element list of axes is kept as given."""
  where = f"`mesh.rules[{i}]`"
  if not isinstance(rule, list | tuple) or len(rule) != 2:
    raise ValueError(f"{where} must be a pair [logical_name, mesh axis | list of mesh axes | null], got {rule!r}; "
                     f"{EXAMPLE_RULES}.")
  name, axes = rule
  if not isinstance(name, str) or not name:
    raise ValueError(f"{where}: the logical name must be a non-empty string (e.g. mlp, heads, embed), got {name!r}.")
  listed = axes if isinstance(axes, list | tuple) else [axes]
  if axes is not None and (not listed or not all(a in AXES for a in listed) or len(set(listed)) != len(listed)):
    raise ValueError(f"{where}: the mesh axes of {name!r} must be one of {list(AXES)}, a list of distinct ones, or "
                     f"null (replicated), got {axes!r}.")
  return [name, list(axes) if isinstance(axes, list | tuple) else axes]
