"""`jlora train` on a device mesh: the distributed start, the mesh, and where every array of a run lives.

With a `mesh` section (`jlora.train._mesh_config`), `start` runs first, before any
other JAX call:

1. **Processes.** `jax.distributed.initialize()` when `mesh.distributed` is true, or
   (null, the default) when the environment shows that this process is one of several:
   `JAX_COORDINATOR_ADDRESS` (with `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID`, read here),
   `srun` with more than one task (`SLURM_STEP_NUM_TASKS`; the batch script itself is one
   process), a TPU pod slice with more than one host (`TPU_WORKER_HOSTNAMES` or
   `TPU_PROCESS_ADDRESSES`), or `mpirun` (`OMPI_COMM_WORLD_SIZE`). A process where JAX's
   distributed runtime is already up is left as it is.
2. **Mesh.** `jax.make_mesh((data, fsdp, tensor), ("data", "fsdp", "tensor"))` over the
   devices of all processes; the sizes must multiply to `jax.device_count()`.

A `Layout` then says where each array goes:

* the frozen base: `jlora.models.mesh_shardings` with `mesh.rules` before the models'
  `DEFAULT_RULES` (`from_config` / `from_pretrained` load straight into it);
* adapters: by `jlora.init`'s rule (they follow their kernel's sharding, rank replicated);
* the optimizer state: each moment like its parameter, counters replicated;
* a batch (`train.batch_size` is the global batch): rows split over `("data", "fsdp")`.
  The batch indices of a step are those of the one-device run; each process takes only
  the rows its devices hold and the global array is assembled with
  `jax.make_array_from_process_local_data`, so a run on any mesh computes the same steps.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import jlora
from jlora import models
from jlora.core.targets import is_pair_key
from jlora.train._mesh_config import AXES, MeshConfig

__all__ = ["Layout", "launcher", "layout", "shardings", "start"]

BATCH_AXES = ("data", "fsdp")  # the data-parallel axes: batch rows are split over both


def launcher(env: Mapping[str, str]) -> str | None:
  """What in `env` says this process is one of several (for `mesh.distributed: null`), or None."""

  def count(name: str) -> int:
    try:
      return int(env.get(name) or 1)
    except ValueError:
      return 1

  if env.get("JAX_COORDINATOR_ADDRESS"):
    return "JAX_COORDINATOR_ADDRESS"
  if count("SLURM_STEP_NUM_TASKS") > 1:
    return "SLURM_STEP_NUM_TASKS"
  for name in ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES"):
    if len([h for h in env.get(name, "").split(",") if h.strip()]) > 1:
      return name
  if count("OMPI_COMM_WORLD_SIZE") > 1:
    return "OMPI_COMM_WORLD_SIZE"
  return None


def _initialize(setting: bool | None, env: Mapping[str, str]) -> None:
  """`jax.distributed.initialize()` when `mesh.distributed` (or, for None, the environment) asks for it."""
  if jax.distributed.is_initialized():
    return
  why = launcher(env) if setting is None else "mesh.distributed: true" if setting else None
  if why is None:
    return
  kwargs: dict[str, Any] = {}
  if env.get("JAX_COORDINATOR_ADDRESS"):
    kwargs["coordinator_address"] = env["JAX_COORDINATOR_ADDRESS"]
    for key, name in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
      if env.get(name):
        try:
          kwargs[key] = int(env[name])
        except ValueError:
          raise ValueError(f"`mesh.distributed`: {name}={env[name]!r} must be an integer.") from None
  try:
    jax.distributed.initialize(**kwargs)
  except RuntimeError as e:
    if "before any JAX" not in str(e):
      raise
    raise ValueError(f"`mesh.distributed` ({why}): jax.distributed.initialize() must run before any other JAX call, "
                     "but this process already used JAX. Start `jlora train` as its own process, or call "
                     "jax.distributed.initialize() yourself first (or set `mesh.distributed=false`).") from None


def _sizes(cfg: MeshConfig, devices: int) -> tuple[int, ...]:
  """The axis sizes `(data, fsdp, tensor)` with -1 resolved; raises a ValueError if they do not fit `devices`."""
  given = {axis: getattr(cfg, axis) for axis in AXES}
  shown = ", ".join(f"{a}={s}" for a, s in given.items())
  known = math.prod(s for s in given.values() if s != -1)
  if -1 in given.values():
    rest = next(a for a, s in given.items() if s == -1)
    if devices % known:
      raise ValueError(f"`mesh.{rest}: -1` takes the devices left over, but the other axes ({shown}) use {known}, "
                       f"which does not divide the {devices} devices (jax.device_count()); give axis sizes whose "
                       f"product divides {devices}.")
    given[rest] = devices // known
  elif known != devices:
    raise ValueError(f"`mesh`: the axis sizes ({shown}) multiply to {known}, but there are {devices} devices "
                     f"(jax.device_count(), all processes); expected a product of {devices}: set one axis to -1 "
                     "(the devices left over), e.g. `mesh.data=-1`.")
  return tuple(given[a] for a in AXES)


def shardings(tree: Any) -> Any:
  """The `.sharding` of every leaf of a tree of arrays."""
  return jax.tree.map(lambda x: x.sharding, tree)


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where a run's arrays live on `mesh`; `rules` are the logical-axis rules the base is sharded by.

  Attributes:
    mesh: the `("data", "fsdp", "tensor")` mesh.
    rules: `mesh.rules` followed by `jlora.models.DEFAULT_RULES`.
  """

  mesh: Mesh
  rules: tuple

  @property
  def data_parallel(self) -> int:
    """How many ways a batch is split: `data × fsdp`."""
    return math.prod(self.mesh.shape[a] for a in BATCH_AXES)

  @property
  def rank_axis(self) -> str | None:
    """The mesh axis that splits adapters along their rank (`jlora.adapter_shardings`): `fsdp` when it spans devices.

    The rule places `A` like its kernel's input axis and `B` like its output axis; under FSDP
    one of the two is whole on every chip (with its optimizer moments). Splitting its rank over
    `fsdp` too keeps ~1/fsdp of every adapter leaf per chip (ZeRO-style), as FSDP does for the base.
    """
    return "fsdp" if self.mesh.shape["fsdp"] > 1 else None

  def place_adapters(self, trainable: Any, base: Any, lora: Any) -> Any:
    """`trainable` (the adapters of `jlora.split`) moved to the rule's shardings with `rank_axis`.

    Args:
      trainable: the trainable half, on the mesh.
      base: the frozen half as loaded (unquantized), on the mesh: its kernels' shardings.
      lora: the run's `jlora.LoraConfig`.
    """
    if self.rank_axis is None:
      return trainable
    placed = jlora.adapter_shardings(jlora.combine(trainable, base), rank_axis=self.rank_axis)
    return jax.device_put(trainable, jlora.split(placed, lora)[0])

  def gathered(self, stored: Any) -> Any:
    """The shardings the step computes with, from those the trainable tree is stored with: the `A` and `B`
    leaves without `rank_axis`; every other leaf as stored.

    An adapter split along its rank is stored 1/fsdp per chip but gathered whole for the step's matmuls, as
    FSDP gathers the base's weights: `B` is a few hundred KB per layer, whereas a matmul contracting a split
    rank makes the TPU compiler accumulate the `(tokens, d_out)` output piece by piece (a collective-permute
    loop), in float32 for float32 adapters: ~40% more HBM traffic per step for Qwen2.5-7B on v5e-8. (An `A` or
    `B` whose other axis used `fsdp` is gathered too: it is as small. Trained biases, `modules_to_save` and
    token rows keep their sharding.)
    """
    def entry(e: Any) -> Any:  # one entry of a PartitionSpec: an axis name, a tuple of them, or None
      if isinstance(e, tuple):
        return tuple(a for a in e if a != self.rank_axis) or None
      return None if e == self.rank_axis else e

    def drop(path: tuple, s: Any) -> Any:
      if self.rank_axis is None or not isinstance(s, NamedSharding) or not is_pair_key(getattr(path[-1], "key", "")):
        return s
      return NamedSharding(s.mesh, PartitionSpec(*map(entry, s.spec)))

    return jax.tree_util.tree_map_with_path(drop, stored)

  @property
  def replicated(self) -> NamedSharding:
    """A copy on every device (scalars, keys, counters)."""
    return NamedSharding(self.mesh, PartitionSpec())

  def traced(self, fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` (a jitted step) called, hence traced, inside `models.on_mesh`: the models pin their activations.

    `.lower(*args)` lowers it there too (ahead-of-time compilation).
    """

    @functools.wraps(fn)
    def call(*args: Any) -> Any:
      with models.on_mesh(self.mesh, self.rules):
        return fn(*args)

    def lower(*args: Any) -> Any:  # ahead of time (`jlora plan`): traced the same way
      with models.on_mesh(self.mesh, self.rules):
        return fn.lower(*args)

    call.lower = lower
    return call

  def batch_sharding(self, ndim: int) -> NamedSharding:
    """Rows over `("data", "fsdp")`, the other axes whole."""
    return NamedSharding(self.mesh, PartitionSpec(BATCH_AXES, *(None,) * (ndim - 1)))

  def check_batch(self, batch_size: int) -> None:
    """Raises a ValueError unless `batch_size` divides over the data-parallel devices."""
    n, shape = self.data_parallel, dict(self.mesh.shape)
    if batch_size % n:
      fix = n * max(1, round(batch_size / n))
      raise ValueError(f"`train.batch_size` is {batch_size}, the global batch, which must split evenly over the "
                       f"data-parallel devices: data × fsdp = {shape['data']} × {shape['fsdp']} = {n}. Use a "
                       f"multiple of {n} (e.g. train.batch_size={fix}), or change `mesh.data` / `mesh.fsdp`.")

  def eval_size(self, batch_size: int) -> int:
    """`train.eval_batch_size` rounded up to split evenly (the added rows are padding of weight 0)."""
    return -(-batch_size // self.data_parallel) * self.data_parallel

  @functools.lru_cache(maxsize=8)  # noqa: B019 (a handful of batch sizes per run, and layouts live as long as runs)
  def local_rows(self, n: int) -> np.ndarray:
    """The rows of a global batch of `n` that this process's devices hold, in order (what it loads)."""
    index = self.batch_sharding(1).addressable_devices_indices_map((n,)).values()
    spans = sorted({(s.start or 0, n if s.stop is None else s.stop) for (s,) in index})
    return np.concatenate([np.arange(lo, hi) for lo, hi in spans])

  def batch(self, arrays: Mapping[str, np.ndarray], idx: np.ndarray) -> dict[str, jax.Array]:
    """The global batch of rows `idx` of `arrays`, built from this process's rows only.

    Args:
      arrays: `{name: (N, ...)}` host arrays (the encoded dataset, or one eval batch).
      idx: (B,) the global batch's row indices; B divisible by `data_parallel`.
    """
    mine = np.asarray(idx)[self.local_rows(len(idx))]
    return {k: jax.make_array_from_process_local_data(self.batch_sharding(v.ndim), v[mine], (len(idx), *v.shape[1:]))
            for k, v in arrays.items()}

  def any(self, flag: bool) -> bool:
    """Whether `flag` is set on any process (collective in a run of several processes)."""
    if jax.process_count() == 1:
      return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))

  def opt_state(self, tx: Any, trainable: Any) -> Any:
    """`tx.init(trainable)`, created on the mesh: each moment sharded like its parameter, counters replicated."""
    return jax.jit(tx.init, out_shardings=self.opt_shardings(tx, trainable))(trainable)

  def opt_shardings(self, tx: Any, trainable: Any) -> Any:
    """Where `opt_state` puts each leaf of `tx.init(trainable)` (`trainable`: arrays or shapes with shardings)."""
    own = {tuple(getattr(k, "key", None) for k in path): x for path, x in
           jax.tree_util.tree_flatten_with_path(trainable)[0]}

    def place(path: tuple, leaf: jax.ShapeDtypeStruct) -> NamedSharding:
      keys = tuple(getattr(k, "key", None) for k in path)
      for start in range(len(keys)):  # the parameter whose path ends this leaf's path (optax mirrors the tree)
        param = own.get(keys[start:])
        if param is not None and param.shape == leaf.shape:
          return param.sharding
      return self.replicated

    return jax.tree_util.tree_map_with_path(place, jax.eval_shape(tx.init, trainable))


def start(cfg: MeshConfig | None, env: Mapping[str, str] | None = None) -> Layout | None:
  """Starts the run's processes and builds its mesh; None without a `mesh` section (one device, as before).

  Call it before any other JAX call of the process (`jax.distributed.initialize` must be first).

  Raises:
    ValueError: the axis sizes do not fit the devices, JAX was already used where
      `jax.distributed.initialize()` is needed, or a process of several has no `mesh` section.
  """
  if cfg is None:
    if jax.distributed.is_initialized() and jax.process_count() > 1:
      raise ValueError(f"This process is one of {jax.process_count()} (jax.distributed is initialized), but the "
                       "config has no `mesh` section, which runs on one device; add one, e.g. `mesh: {}` (data "
                       "parallel over all devices) or the override `mesh.data=-1`.")
    return None
  _initialize(cfg.distributed, os.environ if env is None else env)
  return layout(cfg, jax.devices())


def layout(cfg: MeshConfig, devices: Sequence[Any]) -> Layout:
  """The `Layout` of a `mesh` section over `devices` (all processes' devices, or a TPU slice's for `jlora plan`).

  Raises:
    ValueError: the axis sizes do not fit the number of devices.
  """
  sizes = _sizes(cfg, len(devices))
  mesh = jax.make_mesh(sizes, AXES, devices=devices, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))
  return Layout(mesh, (*cfg.logical_rules, *models.DEFAULT_RULES))
