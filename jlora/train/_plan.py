"""`jlora plan`: compile a `jlora train` config's training step for a TPU slice on any host, and read the figures.

Will it fit, and how fast? `plan(config, "v5e:2x4")` builds the step `jlora train` would
run for the config — the same model, adapters (`_setup.adapted_trees`), optimizer
(`_setup.make_optimizer`), mesh layout (`_mesh.layout`, the config's `mesh` section
over the slice's chips; without one, data parallel over all of them) and jitted step
(`_loop.make_train_step`) — from shapes alone (`jax.ShapeDtypeStruct`s with their
shardings: no weight is read, nothing is allocated), compiles it for the slice with
libtpu (`_tpu.devices`; no TPU and no network needed) and reports per chip:

* **memory** (compiler figures, `memory_analysis()`): the arguments (the frozen base,
  the trainable adapters, the optimizer state, the batch), the temporaries, the
  outputs not aliased to arguments (the trainable tree and optimizer state are
  donated), their total against the chip's HBM;
* **work** (compiler figures, from the compiled program): FLOPs and memory traffic
  (`cost_analysis()`, corrected for loops: XLA counts a `while` body once, and a
  scanned layer stack is one; `jlora.parallel.hlo.costs` counts every iteration) and
  the bytes of each kind of collective (`jlora.parallel.hlo.collectives`);
* **an estimate, not a measurement**: step seconds = the largest of FLOPs / peak bf16
  FLOP/s, traffic / HBM bandwidth and collective bytes / the chip's all-reduce
  bandwidth (half its bidirectional ICI bandwidth); tokens/s = tokens of a full batch /
  step seconds. With `bound=True`, the same for the frozen-base bound (the step's
  forward and backward with the gradient taken only through a zero added to the
  embeddings' output: no weight gradient, no optimizer; `benchmarks/run.py`'s definition),
  and the ratio of the two estimates.

Every figure is the compiler's or an estimate from it: no TPU ran anything.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

import jlora
from jlora.core.tree import flatten, unflatten
from jlora.formats import atomic
from jlora.parallel import hlo
from jlora.quant.array import QuantizedArray
from jlora.quant.tree import shardings_like
from jlora.train import _data, _loop, _mesh, _model, _setup, _tasks, _tpu
from jlora.train._mesh_config import MeshConfig
from jlora.train._schema import Config

__all__ = ["Plan", "plan"]

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Plan:
  """What `plan` found; `to_dict()` is the `--json` output, `text()` the table."""

  topology: str
  chip: _tpu.Chip
  mesh: dict[str, int]
  method: str
  memory: dict[str, float]  # bytes per chip
  work: dict[str, float]  # per chip per step
  collectives: dict[str, float]  # bytes per chip per step, by kind
  estimate: dict[str, float] | None  # None: the compiler refused the step (out of HBM)
  bound: dict[str, float] | None
  compile_s: float
  notes: tuple[str, ...] = ()

  @property
  def fits(self) -> bool:
    """Whether the compiler built the step and its total fits the chip's HBM."""
    return self.estimate is not None and self.memory["total"] <= self.chip.hbm_bytes

  def to_dict(self) -> dict[str, Any]:
    """A JSON-ready dict of every figure (bytes, FLOPs, seconds) and the chip's published figures."""
    return {"topology": self.topology, "chips": math.prod(self.mesh.values()), "mesh": self.mesh,
            "method": self.method, "fits": self.fits, "hbm_bytes": self.chip.hbm_bytes,
            "memory_bytes": self.memory, "work": self.work, "collective_bytes": self.collectives,
            "estimate": self.estimate, "frozen_base_bound": self.bound, "compile_s": self.compile_s,
            "chip": self.chip._asdict(), "notes": list(self.notes),
            "caveat": "compiler figures and a roofline estimate for a TPU slice, not measurements"}

  def text(self) -> str:
    """The human-readable report."""
    m, w, e, chip = self.memory, self.work, self.estimate, self.chip
    free = chip.hbm_bytes - m["total"]
    mesh = " x ".join(f"{k}={v}" for k, v in self.mesh.items())
    done = "compiled for TPU" if e is not None else "the TPU compiler REFUSED the step"
    trained = "weights" if self.method == "full fine-tuning" else "adapters"  # what trains
    lines = [f"jlora plan: {self.method} on {self.topology} ({math.prod(self.mesh.values())} chips, mesh {mesh}); "
             f"{done} in {self.compile_s:.0f} s. Compiler figures and estimates, not measurements.",
             "", "Memory per chip (compiler):",
             f"  arguments        {_gib(m['arguments'])}  (base {_gib(m['base'])}, {trained} {_gib(m['adapters'])}, "
             f"optimizer state {_gib(m['optimizer'])}, batch {_gib(m['batch'])}, layout padding {_gib(m['padding'])})",
             f"  temporaries      {_gib(m['temporaries'])}",
             f"  outputs          {_gib(m['outputs'])}  (not aliased to the donated arguments)",
             f"  total            {_gib(m['total'])} of {_gib(chip.hbm_bytes)} HBM: "
             + (f"fits, {_gib(free)} to spare" if free >= 0 and e is not None else
                f"does NOT fit, {_gib(-free)} over" if free < 0 else "does NOT fit (see the note)")]
    if e is not None:
      lines += ["", "Work per chip per step (compiler; loops counted in full):",
                f"  FLOPs            {w['flops']:.3e}   memory traffic {w['bytes'] / 1e9:,.1f} GB",
                "  collectives      " + (", ".join(f"{k} {v / 1e9:,.2f} GB" for k, v in self.collectives.items())
                                         or "none"),
                "", f"Estimate (roofline with {chip.name}'s published peaks: {chip.peak_flops / 1e12:.0f} TFLOP/s "
                f"bf16, {chip.hbm_bandwidth / 1e9:,.0f} GB/s HBM, {chip.ici_bandwidth / 2e9:,.0f} GB/s all-reduce per "
                "chip):",
                f"  compute {_ms(e['compute_s'])}, memory {_ms(e['memory_s'])}, collectives "
                f"{_ms(e['collective_s'])} -> step ~{_ms(e['step_s'])} ({e['limit']}-bound), "
                f"~{e['tokens_per_s']:,.0f} tokens/s for {e['tokens']:,.0f} tokens per step"]
    if self.bound is not None and e is not None:
      b = self.bound
      lines.append(f"  frozen-base bound ~{_ms(b['step_s'])} ({b['limit']}-bound); estimated step / bound = "
                   f"{e['step_s'] / b['step_s']:.3f} (FLOPs {w['flops'] / b['flops']:.3f}x, collective bytes "
                   f"{sum(self.collectives.values()) / max(b['collective_bytes'], 1):.2f}x)")
    lines += [f"  note: {n}" for n in self.notes]
    return "\n".join(lines)


def _ms(seconds: float) -> str:
  return f"{seconds * 1e3:,.1f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:,.1f} µs"


def _gib(n: float) -> str:
  return f"{n / GiB:8.2f} GiB" if abs(n) >= GiB / 10 else f"{n / 2**20:8.2f} MiB"


def _method(config: Config) -> str:
  if config.train.method == "full":
    return "full fine-tuning"
  lora = config.lora
  name = "DoRA" if lora.use_dora else "LoRA"
  quant = f" over an {config.model.quantize.upper()} base (QLoRA)" if config.model.quantize else ""
  return f"{name} r={lora.r}{quant}"


def _sharded(tree: Any, shardings: dict) -> Any:
  """`tree` of shapes with each leaf's sharding from `shardings` (`{path: sharding}`)."""
  return unflatten({p: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[p]) for p, v in flatten(tree).items()})


def _frozen_shardings(frozen: Any, base: dict, replicated: NamedSharding) -> dict:
  """`{path: sharding}` of the frozen half: each leaf like the base's (a quantized kernel's children like it)."""
  out = {}
  for path, leaf in flatten(frozen).items():
    kernel = base.get(path, replicated)
    if isinstance(leaf, QuantizedArray):
      placed = shardings_like(leaf, kernel)
      out[path] = placed if placed is not None else jax.tree.map(lambda _: replicated, leaf)
    else:
      out[path] = kernel
  return out


def _abstract_quantized(frozen: Any, shardings: dict) -> Any:
  """`frozen` with shardings; a `QuantizedArray`'s children each get theirs."""
  out = {}
  for path, leaf in flatten(frozen).items():
    if isinstance(leaf, QuantizedArray):
      out[path] = jax.tree.map(lambda c, s: jax.ShapeDtypeStruct(c.shape, c.dtype, sharding=s), leaf, shardings[path])
    else:
      out[path] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=shardings[path])
  return unflatten(out)


def _shard_bytes(tree: Any) -> float:
  """Bytes per device of a tree of sharded shapes (the largest shard of each leaf; a PRNG key is 2 uint32)."""
  total = 0.0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    key = jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)
    total += math.prod(shape) * (8 if key else np.dtype(leaf.dtype).itemsize)
  return total


def _batch(config: Config, task: _tasks.Task, model: _model.Model, layout: _mesh.Layout) -> tuple[dict, dict, int]:
  """`(abstract batch, one encoded example, tokens of a full batch)` of the task's real encoder."""
  tc = config.train
  row = {f: (0 if f == "label" else "a") for f in task.fields}
  one = task.encode([row], model.tokenizer, tc.seq_len, tc.target_len)
  batch = {k: jax.ShapeDtypeStruct((tc.batch_size, *v.shape[1:]), v.dtype, sharding=layout.batch_sharding(v.ndim))
           for k, v in one.items()}
  full = {k: np.ones((tc.batch_size, *v.shape[1:]), v.dtype) for k, v in one.items()}  # every position a token
  return batch, one, task.tokens(full)


def _figures(compiled: Any) -> tuple[dict, dict, dict, Any]:
  """`(memory, work, collectives, hlo text)` of a compiled step (per chip)."""
  text = compiled.as_text()
  module = hlo.parse(text)
  c = hlo.costs(module)
  cost = compiled.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, list) else cost
  flops = float(cost.get("flops", c.matmul_flops_once)) + c.matmul_flops - c.matmul_flops_once
  traffic = float(cost.get("bytes accessed", c.bytes_once)) + c.bytes - c.bytes_once  # XLA's, plus loop iterations
  mem = compiled.memory_analysis()
  memory = {"arguments": float(mem.argument_size_in_bytes), "temporaries": float(mem.temp_size_in_bytes),
            "outputs": float(mem.output_size_in_bytes - mem.alias_size_in_bytes)}
  memory["total"] = memory["arguments"] + memory["temporaries"] + memory["outputs"]
  memory["arguments_in_layout"] = float(sum(hlo.argument_bytes(text)))  # the parameters as the program lays them out
  work = {"flops": flops, "bytes": traffic, "matmul_flops": c.matmul_flops,
          "xla_cost_analysis_flops": float(cost.get("flops", 0.0))}
  return memory, work, {k: float(v) for k, v in sorted(hlo.collective_bytes(module).items())}, text


def _out_of_memory(error: Exception, parts: dict[str, float]) -> dict[str, float]:
  """The memory figures of a step libtpu refused for HBM (its message: temporaries and usable HBM), else re-raises.

  libtpu says e.g. `RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO
  temporaries (17.38G) exceeds available HBM (15.75G)`; the arguments are the arrays' shards.
  """
  text = str(error)
  if "RESOURCE_EXHAUSTED" not in text:
    raise error
  m = re.search(r"temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)", text)
  memory = {**parts, "arguments": sum(parts.values()), "outputs": 0.0, "padding": 0.0,
            "temporaries": float(m.group(1)) * GiB if m else float("nan")}
  memory["total"] = memory["arguments"] + memory["temporaries"]
  memory["usable_hbm"] = float(m.group(2)) * GiB if m else float("nan")
  return memory


def _estimate(chip: _tpu.Chip, work: dict, collectives: dict, tokens: int) -> dict:
  terms = {"compute": work["flops"] / chip.peak_flops, "memory": work["bytes"] / chip.hbm_bandwidth,
           "collective": sum(collectives.values()) / (chip.ici_bandwidth / 2)}
  limit = max(terms, key=terms.get)
  step = terms[limit]
  return {**{f"{k}_s": v for k, v in terms.items()}, "step_s": step, "limit": limit, "tokens": tokens,
          "tokens_per_s": tokens / step if step > 0 else 0.0}


def _bound_step(setup: _setup.Setup, config: Config) -> Any:
  """The frozen-base bound: the task's loss through the frozen half only, differentiated wrt a zero on the embeddings."""
  task, model = setup.task, setup.base.model

  def step(frozen, batch, zero):
    def loss(delta):
      def add(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, nn.Embed) and context.method_name == "__call__":
          out = out + delta.astype(out.dtype)
        return out

      with nn.intercept_methods(add):
        return task.loss(_loop._bind(model.apply, frozen, None), batch, model, config.train.temperature)

    return jax.grad(loss)(zero)

  return setup.layout.traced(jax.jit(step))


def plan(config: Config, topology: str, *, bound: bool = False, hlo_path: str | None = None, log: Any = None) -> Plan:
  """Compiles `config`'s training step for the TPU slice `topology` (e.g. `v5e:2x4`) and reads its figures.

  Args:
    config: a validated `jlora train` config (`jlora.train.load`); `source: random` models
      take their shapes from `model.config`, checkpoints from their config.json alone.
    topology: `GENERATION:AxB[xC]` (`v4`, `v5e`, `v5p`, `v6e`), one device per chip.
    bound: also compile the frozen-base bound and compare the estimates.
    hlo_path: write the compiled step's HLO text there (to read what the compiler made of it).
    log: `log(text)` for progress lines (None: quiet).

  Returns:
    A `Plan`: per-chip memory, work, collectives and the roofline estimate.

  Raises:
    ValueError: an unknown topology, a `mesh` section that does not fit its chips, a batch
      that does not split over the data-parallel chips, a config `jlora train` refuses, or an
      `hlo_path` that exists.
    ImportError: libtpu is not installed.
  """
  say = log or (lambda text: None)
  if hlo_path is not None and os.path.lexists(hlo_path):
    raise ValueError(f"`--hlo` {hlo_path!r} exists; give a new file name (jlora plan never writes over a file).")
  chip, devices = _tpu.devices(topology)
  task = _tasks.get(config.lora.task_type)
  notes = [] if config.mesh is not None else ["the config has no `mesh` section (one device): planned as data "
                                              "parallel over every chip (`mesh: {}`)"]
  layout = _mesh.layout(config.mesh or MeshConfig(), devices)
  layout.check_batch(config.train.batch_size)
  num_labels = None
  if "label" in task.fields:
    num_labels = config.data.num_labels or _data.examples(config.data, task).num_labels
  base = _model.shapes(config.model, task, num_labels=num_labels, layout=layout)
  batch, one, tokens = _batch(config, task, base, layout)
  keys = _setup.run_keys(config.train.seed)
  inputs = task.inputs(one, base.model)
  full_ft = config.train.method == "full"
  if full_ft:  # every weight trains, sharded as the base; nothing is frozen
    trainable, frozen, original = base.params, {}, {}
  else:
    trainable, frozen, original = jax.eval_shape(
      lambda p: _setup.adapted_trees(config, base.model, p, inputs, keys.adapter)[:3], base.params)
  replicated = layout.replicated
  base_sh = {p: v.sharding for p, v in flatten(base.params).items()}
  full = flatten(jlora.combine(trainable, original))
  base_placed = {p: base_sh.get(p, replicated) for p in full}
  placed = base_placed if full_ft else flatten(jlora.adapter_shardings(unflatten(full), unflatten(base_placed),
                                                                       rank_axis=layout.rank_axis))
  trainable = _sharded(trainable, placed)
  frozen = _abstract_quantized(frozen, _frozen_shardings(frozen, placed, replicated))
  tx, schedule = _setup.make_optimizer(config.optimizer, config.train.steps, None if full_ft else config.lora)
  opt_sh = layout.opt_shardings(tx, trainable)
  opt = jax.tree.map(lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
                     jax.eval_shape(tx.init, trainable), opt_sh)
  apply_fn = base.model.apply if full_ft else jlora.apply_fn(base.model, config.lora)
  setup = _setup.Setup(task, base, apply_fn, trainable, frozen, tx, schedule, {}, {}, keys,
                       method=config.train.method, layout=layout)
  step = _loop.make_train_step(setup, temperature=config.train.temperature,
                               dropout=not full_ft and config.lora.lora_dropout > 0,
                               shardings=(_mesh.shardings(trainable), opt_sh))
  rng = jax.ShapeDtypeStruct((), keys.data.dtype, sharding=replicated)
  say(f"compiling the training step for {topology} ({len(devices)} chips)...")
  t0 = time.perf_counter()
  parts = {"base": _shard_bytes(frozen), "adapters": _shard_bytes(trainable), "optimizer": _shard_bytes(opt),
           "batch": _shard_bytes(batch) + _shard_bytes(rng)}
  try:
    compiled = step.lower(trainable, opt, frozen, batch, rng).compile()
  except Exception as e:  # libtpu refuses a program that does not fit the chip's HBM
    memory = _out_of_memory(e, parts)
    return Plan(topology.strip(), chip, dict(layout.mesh.shape), _method(config), memory, {}, {}, None, None,
                time.perf_counter() - t0, (*notes, "the TPU compiler refused the step: " + " ".join(str(e).split())))
  compile_s = time.perf_counter() - t0
  memory, work, collectives, text = _figures(compiled)
  if hlo_path is not None:
    atomic.write_text(hlo_path, text)
  memory.update(parts, padding=memory["arguments"] - sum(parts.values()))
  estimate = _estimate(chip, work, collectives, tokens)
  bound_figures = None
  if bound:
    say("compiling the frozen-base bound...")
    zero = jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated)
    b_compiled = _bound_step(setup, config).lower(frozen, batch, zero).compile()
    _, b_work, b_coll, _ = _figures(b_compiled)
    bound_figures = {**_estimate(chip, b_work, b_coll, tokens), "flops": b_work["flops"], "bytes": b_work["bytes"],
                     "collective_bytes": sum(b_coll.values())}
  return Plan(topology.strip(), chip, dict(layout.mesh.shape), _method(config), memory, work, collectives, estimate,
              bound_figures, compile_s, tuple(notes))
