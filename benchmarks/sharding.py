"""LoRA on a mesh of devices: time, collective bytes and per-device memory, side by side in one process.

The reference Llama (`scan_layers=True`, all-linear LoRA r=8, adamw) on meshes
with axes ("data", "fsdp", "tensor"): the base placed by
`models.mesh_shardings` (FSDP on `embed`, tensor parallelism on heads, kv, mlp
and vocab), adapters by jlora's rule, the global batch split over data × fsdp.
For each mesh, in interleaved rounds with the single-device step
(`_timing.py`):

* sharded LoRA step / single-device LoRA step of the same global batch (on
  virtual CPU devices all "devices" share the host's cores: this measures the
  overhead of partitioning, not a speed-up);
* LoRA step / frozen-base bound on that mesh (gradient wrt activations only);
* collective bytes per device per step, from the compiled HLO (`_hlo.py`):
  reductions (all-reduce + reduce-scatter) and everything, LoRA / full
  fine-tuning (goal: about the trainable fraction for the reductions of a
  data-parallel step); and the reductions beyond those of the frozen-base
  bound (the activations' reductions of tensor parallelism are in both), i.e.
  the gradients, / the adapter bytes (goal ≤ 1.1);
* per-device argument bytes of the LoRA step (XLA's buffer assignment) /
  the single-device step's (goal: about 1/(fsdp·tensor) for the frozen base).

Writes JSON and a markdown table. Without `--devices 0` the script fakes 8 CPU
devices (`XLA_FLAGS=--xla_force_host_platform_device_count=8`) before JAX starts.

Run: python benchmarks/sharding.py [--quick] [--sizes small,medium] [--out benchmarks/results/sharding.json]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import sys

if __name__ == "__main__" and "--devices" not in sys.argv[1:] and "jax" not in sys.modules:
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _hlo import collective_bytes
from _timing import measure_side_by_side, paired_ratio, write_report
from run import ALL_LINEAR, SIZES, xent

import jlora
from jlora import models

MESHES = {"dp (8,1,1)": (8, 1, 1), "fsdp (2,4,1)": (2, 4, 1), "dp·fsdp·tp (2,2,2)": (2, 2, 2)}
SHAPES = {"tiny": dict(SIZES["tiny"], batch=8, seq=32), "small": dict(SIZES["small"], batch=8, seq=128),
          "medium": dict(SIZES["medium"], batch=8, seq=128)}


def build(size: str):
  spec = dict(SHAPES[size])
  batch, seq = spec.pop("batch"), spec.pop("seq")
  config = {"model_type": "llama", "max_position_embeddings": max(seq, 64), **spec}
  model, base = models.from_config(config, key=jax.random.key(0), scan_layers=True)
  ids = jax.random.randint(jax.random.key(1), (batch, seq + 1), 0, spec["vocab_size"])
  return model, base, ids[:, :-1], ids[:, 1:]


def steps(model, config):
  """The jitted LoRA, full fine-tuning and frozen-base-bound steps; the batch is an argument."""
  tx = optax.adamw(1e-4)

  def lora(t, s, frozen, x, y):
    g = jax.grad(lambda t: xent(jlora.apply(model, jlora.combine(t, frozen), config, x), y))(t)
    u, s = tx.update(g, s, t)
    return optax.apply_updates(t, u), s

  def full(p, s, x, y):
    g = jax.grad(lambda p: xent(model.apply({"params": p}, x), y))(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  def bound(p, zero, x, y):  # backward wrt activations only: a zero added to the embedding output
    def loss(delta):
      def add(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        return out + delta if isinstance(context.module, nn.Embed) and context.method_name == "__call__" else out

      with nn.intercept_methods(add):
        return xent(model.apply({"params": p}, x), y)

    return jax.grad(loss)(zero)

  return tx, jax.jit(lora, donate_argnums=(0, 1)), jax.jit(full), jax.jit(bound)


def on(mesh):
  """The context to trace a step in: the mesh and the models' logical axis rules (activation constraints)."""
  return contextlib.nullcontext() if mesh is None else models.on_mesh(mesh)


def placed(model, base, x, y, shape):
  """Base, batch and LoRA params on a (data, fsdp, tensor) mesh of `shape` (None: one device)."""
  if shape is None:
    return base, x, y
  mesh = jax.make_mesh(shape, ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
  base = jax.device_put(base, models.mesh_shardings(model, base, mesh))
  rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
  return base, jax.device_put(x, rows), jax.device_put(y, rows)


def bench(size: str, repeats: int) -> dict:
  model, base0, x0, y0 = build(size)
  config = jlora.LoraConfig(r=8, lora_alpha=16, target_modules=ALL_LINEAR)
  timed, info = {}, {}
  for name, shape in {"single": None, **MESHES}.items():
    base, x, y = placed(model, base0, x0, y0, shape)
    mesh = None if shape is None else x.sharding.mesh
    tx, lora_step, full_step, bound_step = steps(model, config)  # traced in this mesh's context only
    trainable, frozen = jlora.split(jlora.init(jax.random.key(2), model, base, config, x), config)
    state = [(trainable, tx.init(trainable))]  # eager: each moment sharded like its parameter
    zero = jnp.zeros(x.shape + (base["model"]["embed_tokens"]["embedding"].shape[-1],))
    if shape is not None:
      zero = jax.device_put(zero, NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
    with on(mesh):
      compiled = lora_step.lower(*state[0], frozen, x, y).compile()
      full_hlo = full_step.lower(base, jax.eval_shape(tx.init, base), x, y).compile().as_text()
      bound_hlo = bound_step.lower(base, zero, x, y).compile().as_text()
    lora_bytes, full_bytes = collective_bytes(compiled.as_text()), collective_bytes(full_hlo)
    bound_bytes = collective_bytes(bound_hlo)
    reduce = lambda c: c["all-reduce"] + c["reduce-scatter"]  # noqa: E731
    info[name] = {
        "mesh": shape, "adapter_bytes": sum(v.nbytes for v in jax.tree.leaves(trainable)),
        "base_bytes": sum(v.nbytes for v in jax.tree.leaves(base)),
        "collective_bytes/lora": dict(lora_bytes), "collective_bytes/full": dict(full_bytes),
        "argument_bytes_per_device/lora": compiled.memory_analysis().argument_size_in_bytes,
    }
    if shape is not None:
      info[name]["ratio/reduce_bytes_lora_to_full"] = reduce(lora_bytes) / max(reduce(full_bytes), 1)
      # reductions beyond the frozen-base bound's (tensor parallelism reduces activations in both): the gradients
      info[name]["ratio/grad_reduce_bytes_to_adapter"] = ((reduce(lora_bytes) - reduce(bound_bytes))
                                                          / info[name]["adapter_bytes"])
      info[name]["ratio/collective_bytes_lora_to_full"] = sum(lora_bytes.values()) / max(sum(full_bytes.values()), 1)

    def run(state=state, frozen=frozen, x=x, y=y, mesh=mesh, lora_step=lora_step):
      with on(mesh):
        state[0] = lora_step(*state[0], frozen, x, y)
      return state[0]

    def bound(base=base, zero=zero, x=x, y=y, mesh=mesh, bound_step=bound_step):
      with on(mesh):
        return bound_step(base, zero, x, y)
    timed[f"lora/{name}"] = run
    timed[f"bound/{name}"] = bound
  timings = measure_side_by_side(timed, repeats=repeats)
  for n, t in timings.items():
    print(f"  {size:6s} {n:28s} median {t.median_ms:8.1f} ms ({t.disturbed} calls redone)", flush=True)
  single_args = info["single"]["argument_bytes_per_device/lora"]
  for name in MESHES:
    info[name]["ratio/step_to_single_device"] = paired_ratio(timings, f"lora/{name}", "lora/single")
    info[name]["ratio/lora_to_bound"] = paired_ratio(timings, f"lora/{name}", f"bound/{name}")
    info[name]["ratio/argument_bytes_to_single"] = info[name]["argument_bytes_per_device/lora"] / single_args
  info["single"]["ratio/lora_to_bound"] = paired_ratio(timings, "lora/single", "bound/single")
  return {"shape": SHAPES[size], "ms": {n: t.median_ms for n, t in timings.items()}, "meshes": info}


def markdown(report: dict) -> str:
  rows = ["| size | mesh (data, fsdp, tensor) | step / 1-device step | LoRA / bound | grad-reduce bytes LoRA / full FT "
          "| grad-reduce bytes beyond the bound / adapter bytes | all collective bytes LoRA / full FT | per-device arg bytes / 1 device |",
          "|---|---|---|---|---|---|---|---|"]
  for size, r in report["sizes"].items():
    rows.append(f"| {size} | single device | 1.00 | {r['meshes']['single']['ratio/lora_to_bound']:.2f} | – | – | – | 1.00 |")
    for name in MESHES:
      m = r["meshes"][name]
      rows.append(f"| {size} | {name} | {m['ratio/step_to_single_device']:.2f} | {m['ratio/lora_to_bound']:.2f} "
                  f"| {m['ratio/reduce_bytes_lora_to_full']:.4f} | {m['ratio/grad_reduce_bytes_to_adapter']:.2f} "
                  f"| {m['ratio/collective_bytes_lora_to_full']:.3f} | {m['ratio/argument_bytes_to_single']:.2f} |")
  return "\n".join(rows)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="the tiny size, few rounds (a smoke run)")
  parser.add_argument("--out", default="benchmarks/results/sharding.json")
  parser.add_argument("--repeats", type=int, default=None)
  parser.add_argument("--sizes", default=None, help="comma-separated, from " + ",".join(SHAPES) + " (default: small)")
  parser.add_argument("--devices", type=int, help="use the machine's devices as they are (no virtual CPU devices)")
  args = parser.parse_args()
  if jax.device_count() < 8:
    raise SystemExit(f"benchmarks/sharding.py needs 8 devices, found {jax.device_count()}; run it without --devices "
                     "to fake 8 CPU devices.")
  report = {"device": jax.devices()[0].device_kind, "devices": jax.device_count(), "backend": jax.default_backend(),
            "cpu_count": os.cpu_count(), "jax": jax.__version__, "sizes": {}}
  for size in (args.sizes or ("tiny" if args.quick else "small")).split(","):
    report["sizes"][size] = bench(size, args.repeats or (2 if args.quick else 10))
  report["markdown"] = markdown(report)
  print(report["markdown"])
  write_report(report, args.out)


if __name__ == "__main__":
  main()
