"""DoRA against LoRA, side by side in one process: the training step, and the unmerged forward against the merged one.

On the reference Llama decoder (random init; r = 8 on every attention and MLP
projection; the shapes of `adapters.py`), jitted, interleaved rounds, medians
of per-round ratios (`_timing.py`):
  1. DoRA train step / LoRA train step (adamw, donated state);
  2. DoRA unmerged forward / the merged forward (plain `model.apply` of
     `jlora.merge`: what inference costs after merging, for either), the same
     with the norms computed once (`jlora.apply(..., dora_norms=...)`), both
     also for one token per row (a decode step's shape, where forming
     `W0 + s·A·B` for the norm is not amortized over many tokens), and LoRA
     unmerged forward / merged, for reference.
DoRA's extra cost is the per-layer norm `‖W0 + s·A·B‖` (which forms `W0 + s·A·B`,
as PEFT does) and, in training, its backward through the magnitude.

Run: python benchmarks/dora.py [--quick] [--sizes small,medium] [--repeats N] [--out benchmarks/results/dora.json]
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
from adapters import ALL_LINEAR, SIZES, R, build, looped, per_example_xent

import jlora


def bench_size(size: str, repeats: int) -> dict:
  model, base, x, y = build(size)
  timed, out = {}, {}
  for name, dora in (("lora", False), ("dora", True)):
    cfg = jlora.LoraConfig(r=R, lora_alpha=16, target_modules=ALL_LINEAR, use_dora=dora, init_lora_weights="gaussian")
    params = jlora.init(jax.random.key(1), model, base, cfg, x[:1])
    trainable, frozen = jlora.split(params, cfg)
    trainable = jax.tree.map(lambda t: t + 0.01, trainable)  # B away from 0, the magnitude away from the norm
    tx = optax.adamw(1e-4)

    def step(t, s, frozen, cfg=cfg, tx=tx):
      loss = lambda t: per_example_xent(jlora.apply(model, jlora.combine(t, frozen), cfg, x), y).mean()  # noqa: E731
      u, s = tx.update(jax.grad(loss)(t), s, t)
      return optax.apply_updates(t, u), s

    state = (jax.tree.map(jnp.copy, trainable), tx.init(trainable))
    timed[f"train/{name}"] = looped(jax.jit(step, donate_argnums=(0, 1)), state, frozen)
    fwd = jax.jit(lambda t, f, cfg=cfg: jlora.apply(model, jlora.combine(t, f), cfg, x))
    timed[f"fwd/{name}"] = lambda fwd=fwd, t=trainable, f=frozen: fwd(t, f)
    merged = jlora.merge(jlora.combine(trainable, frozen), cfg)
    diff = jnp.abs(fwd(trainable, frozen) - model.apply({"params": merged}, x)).max()
    out[f"merge_diff/{name}"] = float(diff)
    if name == "dora":  # serving unmerged with the norms computed once; a full batch, and one token per row
      norms = jlora.dora_norms(jlora.combine(trainable, frozen), cfg)
      for shape, inp in (("fwd", x), ("token", x[:, :1])):
        cached = jax.jit(lambda t, f, n, cfg=cfg, inp=inp: jlora.apply(model, jlora.combine(t, f), cfg, inp,
                                                                        dora_norms=n))
        timed[f"{shape}/dora_cached"] = lambda t=trainable, f=frozen, n=norms, cached=cached: cached(t, f, n)
      token = jax.jit(lambda t, f, cfg=cfg: jlora.apply(model, jlora.combine(t, f), cfg, x[:, :1]))
      timed["token/dora"] = lambda t=trainable, f=frozen, token=token: token(t, f)
    if name == "lora":
      for shape, inp in (("fwd", x), ("token", x[:, :1])):
        plain = jax.jit(lambda p, inp=inp: model.apply({"params": p}, inp))
        timed[f"{shape}/merged"] = lambda p=merged, plain=plain: plain(p)
  timings = measure_side_by_side(timed, repeats=repeats)
  for key, t in timings.items():
    print(f"  {size:7s} {key:12s} median {t.median_ms:9.2f} ms  ({t.disturbed} calls redone)", flush=True)
  ratio = lambda a, b: paired_ratio(timings, a, b)  # noqa: E731
  return {
      **out, "ms": {k: t.median_ms for k, t in timings.items()},
      "ratio/dora_to_lora_train": ratio("train/dora", "train/lora"),
      "ratio/dora_unmerged_to_merged_fwd": ratio("fwd/dora", "fwd/merged"),
      "ratio/dora_cached_to_merged_fwd": ratio("fwd/dora_cached", "fwd/merged"),
      "ratio/dora_unmerged_to_merged_token": ratio("token/dora", "token/merged"),
      "ratio/dora_cached_to_merged_token": ratio("token/dora_cached", "token/merged"),
      "ratio/lora_unmerged_to_merged_fwd": ratio("fwd/lora", "fwd/merged"),
      "ratio/dora_to_lora_fwd": ratio("fwd/dora", "fwd/lora"),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="the tiny size, few rounds (a smoke run)")
  parser.add_argument("--out", default="benchmarks/results/dora.json")
  parser.add_argument("--sizes", default=None, help="comma-separated, from " + ",".join(SIZES))
  parser.add_argument("--repeats", type=int, default=None)
  args = parser.parse_args()
  sizes = (args.sizes or ("tiny" if args.quick else "small,medium")).split(",")
  repeats = args.repeats or (3 if args.quick else 10)
  report = {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
            "jax": jax.__version__, "repeats": repeats, "sizes": {s: bench_size(s, repeats) for s in sizes}}
  rows = ["| measure | " + " | ".join(sizes) + " |", "|---|" + "---|" * len(sizes)]
  for key in ("ratio/dora_to_lora_train", "ratio/dora_to_lora_fwd", "ratio/dora_unmerged_to_merged_fwd",
              "ratio/dora_cached_to_merged_fwd", "ratio/dora_unmerged_to_merged_token",
              "ratio/dora_cached_to_merged_token", "ratio/lora_unmerged_to_merged_fwd"):
    rows.append(f"| {key[6:]} | " + " | ".join(f"{report['sizes'][s][key]:.2f}" for s in sizes) + " |")
  report["markdown"] = "\n".join(rows)
  print(report["markdown"])
  write_report(report, args.out)


if __name__ == "__main__":
  main()
