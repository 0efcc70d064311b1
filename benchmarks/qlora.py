"""QLoRA against LoRA and full fine-tuning: the compiled step's memory, and step time, side by side in one process.

A weight-dominated shape (the reference Llama with `scan_layers=True, remat=True`,
random init, small batch), r = 8 on all seven projections, adamw:
  * full: full fine-tuning, float32 params and adamw state;
  * lora_bf16: LoRA over a bf16 base (float32 adapters and state);
  * qlora_nf4: LoRA over the same base quantized to NF4 (block 64, double
    quantization), dequantized to bf16 where each layer reads it;
  * qlora_int4: the same with int4 blocks (15 evenly spaced levels);
  * qlora_int8: the same with int8 per-channel kernels.
Memory is XLA's buffer assignment of the compiled step (arguments + outputs +
temporaries − aliased, with donated state): what the step needs on a device.
Scan and remat matter: inside a scanned, rematerialized block each kernel is
dequantized per layer and recomputed in the backward pass; without them XLA
keeps every layer's dequantized (and, on CPU, float32-converted) kernel alive
at once, so the step's peak matches the bf16 base's even though the stored
base is 0.39 of it.
Time: interleaved rounds, median of per-round ratios (`_timing.py`).

Run: python benchmarks/qlora.py [--quick] [--sizes medium] [--repeats N] [--out benchmarks/results/qlora.json]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _timing import measure_side_by_side, paired_ratio, write_report
from adapters import ALL_LINEAR, R, looped, per_example_xent

import jlora
from jlora import models

SIZES = {  # weights dominate: a small batch over wide layers
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, vocab_size=512,
                 batch=2, seq=16),
    "medium": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                   vocab_size=8192, batch=2, seq=64),
}


def _step_bytes(step, *args) -> tuple[int, int]:
  """`(step bytes, argument bytes)` of XLA's buffer assignment."""
  mem = step.lower(*args).compile().memory_analysis()
  return int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
             - mem.alias_size_in_bytes), int(mem.argument_size_in_bytes)


def bench_size(size: str, repeats: int) -> dict:
  spec = dict(SIZES[size])
  batch, seq = spec.pop("batch"), spec.pop("seq")
  model, base = models.from_config({"model_type": "llama", "max_position_embeddings": 128, **spec},
                                   key=jax.random.key(0), scan_layers=True, remat=True)
  tok = jax.random.randint(jax.random.key(1), (batch, seq + 1), 0, spec["vocab_size"])
  x, y = tok[:, :-1], tok[:, 1:]
  tx = optax.adamw(1e-4)
  cfg = jlora.LoraConfig(r=R, lora_alpha=16, target_modules=ALL_LINEAR, init_lora_weights="gaussian")

  def full_step(p, s):
    grads = jax.grad(lambda p: per_example_xent(model.apply({"params": p}, x), y).mean())(p)
    u, s = tx.update(grads, s, p)
    return optax.apply_updates(p, u), s

  def lora_step(t, s, frozen):
    loss = lambda t: per_example_xent(jlora.apply(model, jlora.combine(t, frozen), cfg, x), y).mean()  # noqa: E731
    u, s = tx.update(jax.grad(loss)(t), s, t)
    return optax.apply_updates(t, u), s

  bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), base)
  frozen = {"lora_bf16": bf16, "qlora_nf4": jlora.quantize(bf16, "nf4"), "qlora_int4": jlora.quantize(bf16, "int4"),
            "qlora_int8": jlora.quantize(bf16, "int8", stack=lambda path, leaf: int("layers" in path))}
  trainable = jlora.split(jlora.init(jax.random.key(2), model, bf16, cfg, x), cfg)[0]
  full = jax.jit(full_step, donate_argnums=(0, 1))
  lora = jax.jit(lora_step, donate_argnums=(0, 1))
  copy = lambda t: jax.tree.map(jnp.copy, t)  # noqa: E731
  out = {"bytes": {}, "argument_bytes": {}, "frozen_bytes": {}}
  out["bytes"]["full"], out["argument_bytes"]["full"] = _step_bytes(full, base, tx.init(base))
  timed = {"full": looped(full, (copy(base), tx.init(base)))}
  for name, f in frozen.items():
    out["bytes"][name], out["argument_bytes"][name] = _step_bytes(lora, trainable, tx.init(trainable), f)
    out["frozen_bytes"][name] = sum(int(a.nbytes) for a in jax.tree.leaves(f))
    timed[name] = looped(lora, (copy(trainable), tx.init(trainable)), f)
  timings = measure_side_by_side(timed, repeats=repeats)
  ratio = lambda a, b: paired_ratio(timings, a, b)  # noqa: E731
  b = out["bytes"]
  out.update({
      "ms": {k: t.median_ms for k, t in timings.items()},
      "ratio/memory_nf4_to_lora_bf16": b["qlora_nf4"] / b["lora_bf16"],
      "ratio/memory_int4_to_lora_bf16": b["qlora_int4"] / b["lora_bf16"],
      "ratio/memory_int8_to_lora_bf16": b["qlora_int8"] / b["lora_bf16"],
      "ratio/memory_nf4_to_full": b["qlora_nf4"] / b["full"],
      "ratio/memory_lora_bf16_to_full": b["lora_bf16"] / b["full"],
      "ratio/frozen_bytes_nf4_to_bf16": out["frozen_bytes"]["qlora_nf4"] / out["frozen_bytes"]["lora_bf16"],
      "ratio/time_nf4_to_lora_bf16": ratio("qlora_nf4", "lora_bf16"),
      "ratio/time_int4_to_lora_bf16": ratio("qlora_int4", "lora_bf16"),
      "ratio/time_int4_to_nf4": ratio("qlora_int4", "qlora_nf4"),
      "ratio/time_int8_to_lora_bf16": ratio("qlora_int8", "lora_bf16"),
      "ratio/time_lora_bf16_to_full": ratio("lora_bf16", "full"),
  })
  print(f"  {size}: step bytes " + ", ".join(f"{k} {v / 2**20:,.1f} MiB" for k, v in b.items()), flush=True)
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="the tiny size, few rounds (a smoke run)")
  parser.add_argument("--out", default="benchmarks/results/qlora.json")
  parser.add_argument("--sizes", default=None, help="comma-separated, from " + ",".join(SIZES))
  parser.add_argument("--repeats", type=int, default=None)
  args = parser.parse_args()
  sizes = (args.sizes or ("tiny" if args.quick else "medium")).split(",")
  unknown = [s for s in sizes if s not in SIZES]
  if unknown:
    parser.error(f"--sizes: unknown size(s) {unknown}; choose from {list(SIZES)}")
  repeats = args.repeats or (3 if args.quick else 6)
  report = {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
            "jax": jax.__version__, "repeats": repeats, "sizes": {s: bench_size(s, repeats) for s in sizes}}
  keys = [k for k in report["sizes"][sizes[0]] if k.startswith("ratio/")]
  rows = ["| measure | " + " | ".join(sizes) + " |", "|---|" + "---|" * len(sizes)]
  rows += [f"| {k[6:]} | " + " | ".join(f"{report['sizes'][s][k]:.2f}" for s in sizes) + " |" for k in keys]
  report["markdown"] = "\n".join(rows)
  print(report["markdown"])
  write_report(report, args.out)


if __name__ == "__main__":
  main()
