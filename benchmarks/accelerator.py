"""The main ratios on whatever accelerator JAX sees (GPU, TPU, or the CPU), in bf16 with float32 adapters.

One script to run the day a device is lent, writing JSON (and a markdown table):

* LoRA all-linear step / frozen-base bound, and / full fine-tuning (`run.py`'s steps, adamw);
* jlora's 2-D form (input flattened to `(N, d_in)` before the rank-r matmuls, a choice
  made on XLA:CPU, whose 3-D backward was ~4x slower) against the 3-D form `(x·A)·B` on
  `(B, T, d)` activations (`variants.py`'s `dot3d`): checked on the device, not assumed;
* the unmerged forward / the base's;
* a mixed batch of 16 adapters (one per example, `adapter_ids=`) / one adapter (`adapters.py`'s sets);
* the QLoRA NF4 step / the bf16 LoRA step, in time and in XLA's step buffer bytes.

The base's weights and activations are bf16 (`run.build(dtype=bfloat16)`), adapters
float32 (jlora's default). Timing and rounds are `_timing.py`'s (interleaved rounds,
median per-round ratios). `--quick` runs the tiny size, to check the script anywhere.

Run: python benchmarks/accelerator.py [--quick] [--sizes small,medium] [--out benchmarks/results/accelerator.json]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import adapters
import run
import variants
from _timing import measure_side_by_side, paired_ratio, write_report

import jlora

MIXED = 16


def _step_bytes(step, *args) -> int:
  """XLA's buffer bytes of one call: arguments + temporaries + outputs not aliased to arguments."""
  mem = step.lower(*args).compile().memory_analysis()
  return int(mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes)


def bench_size(size: str, repeats: int) -> dict:
  model, base, x, y = run.build(size, dtype=jnp.bfloat16)
  steps = run.Steps(model, base, x, y)
  copy = lambda t: jax.tree.map(jnp.copy, t)  # noqa: E731  (donation consumes the inputs)
  full_step, full_args, _ = steps.full()
  bound_step, bound_args = steps.bound()
  lora = steps.lora(run.ALL_LINEAR)
  qlora_frozen = jlora.quantize(lora.fixed[0], "nf4")
  timed = {
    "train/full_ft": run._looped(full_step, copy(full_args)),
    "train/frozen_base_bound": lambda: bound_step(*bound_args),
    "train/lora_all_linear": run._looped(lora.step, copy(lora.state), lora.fixed),
    "train/lora_all_linear_3d": variants.lora_step(steps, "dot3d")[0],
    "train/qlora_nf4": run._looped(lora.step, copy(lora.state), (qlora_frozen,)),
  }
  params = lora.params
  fwd = jax.jit(lambda p, x: model.apply({"params": p}, x))
  fwd_lora = jax.jit(lambda p, x: jlora.apply(model, p, lora.config, x))
  timed["forward/base"] = lambda: fwd(base, x)
  timed["forward/lora_unmerged"] = lambda: fwd_lora(params, x)
  sets = adapters.make_sets(model, base, x, [1, MIXED])
  bank = jlora.stack_adapters(sets[MIXED], base)
  ids = adapters.spread(MIXED, x.shape[0])
  single = sets[1].params("a0", base)
  fwd_single = jax.jit(lambda p, x: jlora.apply(model, p, adapters.config(), x))
  fwd_bank = jax.jit(lambda base, bank, ids, x: jlora.apply(model, base, bank, x, adapter_ids=ids))
  timed["forward/single_adapter"] = lambda: fwd_single(single, x)
  timed[f"forward/mixed_{MIXED}"] = lambda: fwd_bank(base, bank, ids, x)
  timings = measure_side_by_side(timed, repeats=repeats)
  for name, t in timings.items():
    print(f"  {size:8s} {name:28s} median {t.median_ms:9.2f} ms  ({t.disturbed} calls redone)", flush=True)
  ratio = lambda a, b: paired_ratio(timings, a, b)  # noqa: E731
  lora_bytes = _step_bytes(lora.step, *lora.state, *lora.fixed)
  qlora_bytes = _step_bytes(lora.step, *lora.state, qlora_frozen)
  return {
    "shape": {**run.SIZES[size], "r": 8, "dtype": "bfloat16", "adapter_dtype": "float32"},
    "ms": {n: t.median_ms for n, t in timings.items()},
    "disturbed_calls": {n: t.disturbed for n, t in timings.items()},
    "ratio/lora_all_linear_to_bound": ratio("train/lora_all_linear", "train/frozen_base_bound"),
    "ratio/lora_all_linear_to_full": ratio("train/lora_all_linear", "train/full_ft"),
    "ratio/lora_3d_to_2d": ratio("train/lora_all_linear_3d", "train/lora_all_linear"),
    "ratio/unmerged_forward_to_base": ratio("forward/lora_unmerged", "forward/base"),
    f"ratio/mixed_{MIXED}_to_single": ratio(f"forward/mixed_{MIXED}", "forward/single_adapter"),
    "ratio/qlora_nf4_to_lora_time": ratio("train/qlora_nf4", "train/lora_all_linear"),
    "ratio/qlora_nf4_to_lora_bytes": qlora_bytes / lora_bytes,
    "step_bytes": {"lora_bf16": lora_bytes, "qlora_nf4": qlora_bytes},
  }


def markdown(report: dict) -> str:
  rows = [f"Device: {report['device']} ({report['backend']}), jax {report['jax']}.", "",
          "| size | LoRA / bound | LoRA / full FT | 3-D / 2-D LoRA | unmerged fwd / base | "
          f"{MIXED} adapters / one | QLoRA NF4 / LoRA time | QLoRA NF4 / LoRA bytes |", "|---|---|---|---|---|---|---|---|"]
  for size, r in report["sizes"].items():
    rows.append(f"| {size} | {r['ratio/lora_all_linear_to_bound']:.2f} | {r['ratio/lora_all_linear_to_full']:.2f} "
                f"| {r['ratio/lora_3d_to_2d']:.2f} | {r['ratio/unmerged_forward_to_base']:.2f} "
                f"| {r[f'ratio/mixed_{MIXED}_to_single']:.2f} | {r['ratio/qlora_nf4_to_lora_time']:.2f} "
                f"| {r['ratio/qlora_nf4_to_lora_bytes']:.2f} |")
  return "\n".join(rows)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="the tiny size, few rounds (checks the script anywhere)")
  parser.add_argument("--sizes", default=None, help="comma-separated, from " + ",".join(run.SIZES))
  parser.add_argument("--repeats", type=int, default=None)
  parser.add_argument("--out", default="benchmarks/results/accelerator.json")
  args = parser.parse_args()
  sizes = (args.sizes or ("tiny" if args.quick else "small,medium")).split(",")
  report = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "jax": jax.__version__,
            "cpu_count": os.cpu_count(), "sizes": {}}
  for size in sizes:
    report["sizes"][size] = bench_size(size, args.repeats or (3 if args.quick else 10))
  report["markdown"] = markdown(report)
  print(report["markdown"])
  write_report(report, args.out)


if __name__ == "__main__":
  main()
