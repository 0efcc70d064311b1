"""Train-step and forward timings: LoRA factored vs materialized vs full fine-tuning, in one process.

A stack of transformer blocks (q, k, v, o, up, down Dense layers), jitted steps
with adamw, medians over repeated steps after warm-up. Ratios are against full
fine-tuning measured in the same run.

Run: python benchmarks/train_step.py [--quick] [--out benchmarks/results/train_step.json]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import jlora

ALL = ["q", "k", "v", "o", "up", "down"]


class Block(nn.Module):
  d: int
  heads: int

  @nn.compact
  def __call__(self, x):
    b, t, d = x.shape
    h = nn.LayerNorm(name="ln1")(x)
    split = lambda y: y.reshape(b, t, self.heads, d // self.heads)  # noqa: E731
    q, k, v = (split(nn.Dense(d, name=n)(h)) for n in ("q", "k", "v"))
    w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / (d // self.heads) ** 0.5, axis=-1)
    x = x + nn.Dense(d, name="o")(jnp.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, t, d))
    h = nn.gelu(nn.Dense(4 * d, name="up")(nn.LayerNorm(name="ln2")(x)))
    return x + nn.Dense(d, name="down")(h)


class Stack(nn.Module):
  d: int
  layers: int
  heads: int

  @nn.compact
  def __call__(self, x):
    for i in range(self.layers):
      x = Block(self.d, self.heads, name=f"layers_{i}")(x)
    return x


def timeit(fn, *args, repeats: int) -> float:
  out = fn(*args)
  jax.block_until_ready(out)  # compile + warm-up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return 1000 * statistics.median(times)


def main(quick: bool, out: str) -> dict:
  d, layers, batch, seq = (256, 2, 2, 128) if quick else (768, 4, 4, 256)
  repeats = 5 if quick else 15
  model = Stack(d, layers, heads=max(d // 64, 1))
  x = jax.random.normal(jax.random.key(0), (batch, seq, d))
  base = model.init(jax.random.key(1), x)["params"]
  loss_of = lambda y: jnp.mean(jnp.square(y))  # noqa: E731
  tx = optax.adamw(1e-4)
  results = {}

  @jax.jit
  def full_step(p, s):
    g = jax.grad(lambda p: loss_of(model.apply({"params": p}, x)))(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  results["train/full_ft"] = timeit(full_step, base, tx.init(base), repeats=repeats)

  @jax.jit
  def bound_step(p, x):  # gradient wrt activations only: no weight gradients at all
    return jax.grad(lambda x: loss_of(model.apply({"params": p}, x)))(x)

  results["train/frozen_base_bound"] = timeit(bound_step, base, x, repeats=repeats)

  def lora_step(config, materialize):
    params = jlora.init(jax.random.key(2), model, base, config, x)
    trainable, frozen = jlora.split(params, config)

    def forward(t):
      p = jlora.combine(t, frozen)
      if materialize:
        return jlora.apply_merged(lambda q, x: model.apply({"params": q}, x), p, config, x)
      return jlora.apply(model, p, config, x)

    @jax.jit
    def step(t, s):
      g = jax.grad(lambda t: loss_of(forward(t)))(t)
      u, s = tx.update(g, s, t)
      return optax.apply_updates(t, u), s

    return timeit(step, trainable, tx.init(trainable), repeats=repeats), params

  qv = jlora.LoraConfig(r=8, lora_alpha=16, target_modules=["q", "v"])
  every = jlora.LoraConfig(r=8, lora_alpha=16, target_modules=ALL)
  results["train/lora_qv_factored"], p_qv = lora_step(qv, False)
  results["train/lora_all_factored"], p_all = lora_step(every, False)
  results["train/lora_all_materialized"], _ = lora_step(every, True)

  fwd_base = jax.jit(lambda p, x: model.apply({"params": p}, x))
  results["forward/base"] = timeit(fwd_base, base, x, repeats=repeats)
  results["forward/lora_qv"] = timeit(jax.jit(lambda p, x: jlora.apply(model, p, qv, x)), p_qv, x, repeats=repeats)
  results["forward/lora_all"] = timeit(jax.jit(lambda p, x: jlora.apply(model, p, every, x)), p_all, x,
                                       repeats=repeats)
  results["forward/merged_all"] = timeit(fwd_base, jlora.merge(p_all, every), x, repeats=repeats)

  report = {
      "shape": {"d_model": d, "mlp": 4 * d, "layers": layers, "batch": batch, "seq": seq, "r": 8},
      "device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(), "ms": results,
      "ratio_to_full_ft": {k: v / results["train/full_ft"] for k, v in results.items() if k.startswith("train/")},
      "ratio_to_bound": {k: v / results["train/frozen_base_bound"] for k, v in results.items()
                         if k.startswith("train/")},
      "ratio_to_base_forward": {k: v / results["forward/base"] for k, v in results.items()
                                if k.startswith("forward/")},
  }
  print(f"shape {report['shape']} on {report['device']}")
  print("| step | ms | / full FT | / bound |\n|---|---|---|---|")
  for k, v in results.items():
    if k.startswith("train/"):
      print(f"| {k} | {v:.1f} | {report['ratio_to_full_ft'][k]:.2f} | {report['ratio_to_bound'][k]:.2f} |")
  print("| forward | ms | / base | |\n|---|---|---|---|")
  for k, v in results.items():
    if k.startswith("forward/"):
      print(f"| {k} | {v:.1f} | {report['ratio_to_base_forward'][k]:.2f} | |")
  path = pathlib.Path(out)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(report, indent=2))
  return report


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="a small shape, for a smoke run")
  parser.add_argument("--out", default="benchmarks/results/train_step.json")
  args = parser.parse_args()
  main(args.quick, args.out)
