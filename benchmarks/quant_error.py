"""QLoRA quantization of a frozen kernel: round-trip error, bits per parameter, and the cost of dequantizing.

For W ~ N(0, 0.02²) of shape (768, 3072) (a d = 768 MLP up-projection):
  1. relative Frobenius error ‖W − deq(q(W))‖ / ‖W‖ for NF4 (block 64, with and
     without double quantization), int4 (block 64, double quantization) and int8
     (per output channel), over a few seeds;
  2. bits per parameter (`QuantizedArray.bits_per_param`), also for a row long
     enough to fill a whole second-level group of 256 blocks;
  3. jitted times (interleaved rounds, `_timing.py`) of `dequantize` to bf16
     against the matmul it feeds, `(32·64, 768) @ (768, 3072)` in bf16, and of
     that matmul with the kernel dequantized inside the same jitted function.

Run: python benchmarks/quant_error.py [--repeats N] [--out benchmarks/results/quant.json]
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _timing import measure_side_by_side, paired_ratio, write_report

from jlora.quant.array import dequantize, quantize

SHAPE = (768, 3072)
TOKENS = 32 * 64
SETTINGS = {"nf4_dq": ("nf4", True), "nf4": ("nf4", False), "int4_dq": ("int4", True), "int8": ("int8", False)}


def errors(seeds: int = 5) -> dict:
  out = {}
  for name, (method, dq) in SETTINGS.items():
    errs = []
    for seed in range(seeds):
      w = 0.02 * jax.random.normal(jax.random.key(seed), SHAPE)
      q = quantize(w, method, block_size=64, double_quant=dq)
      errs.append(float(jnp.linalg.norm(w - dequantize(q, jnp.float32)) / jnp.linalg.norm(w)))
    out[name] = {"rel_error_min": min(errs), "rel_error_max": max(errs), "bits_per_param": q.bits_per_param}
  long_row = quantize(jnp.ones((8, 256 * 64)), "nf4", block_size=64, double_quant=True)
  out["nf4_dq"]["bits_per_param_rows_of_16384"] = long_row.bits_per_param
  return out


def timings(repeats: int) -> dict:
  w = 0.02 * jax.random.normal(jax.random.key(0), SHAPE)
  x = jax.random.normal(jax.random.key(1), (TOKENS, SHAPE[0]), jnp.bfloat16)
  wb = w.astype(jnp.bfloat16)
  qs = {name: quantize(w, m, block_size=64, double_quant=dq) for name, (m, dq) in SETTINGS.items()}
  deq = jax.jit(dequantize)
  mm = jax.jit(lambda x, k: x @ k)
  fused = jax.jit(lambda x, q: x @ dequantize(q))
  fns = {"matmul_bf16": lambda: mm(x, wb)}
  for name, q in qs.items():
    fns[f"dequant/{name}"] = lambda q=q: deq(q)
  fns["matmul_dequant_inside/nf4_dq"] = lambda: fused(x, qs["nf4_dq"])
  quant = jax.jit(lambda w: quantize(w, "nf4"))
  fns["quantize/nf4_dq"] = lambda: quant(w)
  t = measure_side_by_side(fns, repeats=repeats)
  for k, v in t.items():
    print(f"  {k:32s} median {v.median_ms:9.3f} ms")
  return {"ms": {k: v.median_ms for k, v in t.items()},
          **{f"ratio/{k}_to_matmul": paired_ratio(t, k, "matmul_bf16") for k in fns if k != "matmul_bf16"}}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--repeats", type=int, default=15)
  p.add_argument("--out", default="benchmarks/results/quant.json")
  args = p.parse_args()
  report = {"shape": SHAPE, "tokens": TOKENS, "backend": jax.default_backend(), "errors": errors()}
  print(report["errors"])
  report["timing"] = timings(args.repeats)
  write_report(report, args.out)


if __name__ == "__main__":
  main()
