"""Many adapters on one base: `jlora.apply` with a bank vs with one adapter's config, side by side.

For each model size (the reference Llama decoder, random init, r = 8 on every
attention and MLP projection), in one process, jitted, after warm-up, in
interleaved rounds (medians of per-round ratios, see `_timing.py`):
  1. mixed forward: n = 1, 4, 16 adapters in one batch (ids spread evenly) /
     `jlora.apply` of one adapter on the same batch (goal ≤ 1.15 at n = 16);
  2. mixed batch of n = 8 (one bank `jlora.apply` call) / a loop of 8 jitted
     `jlora.apply` calls, one sub-batch per adapter (goal ≤ 0.5), for the
     whole batch and for 8 rows of one token each (a decode step's shape);
  3. adapter switch: (a) new compiles when switching among 8 adapters by a
     scalar id through one jitted bank `jlora.apply` (goal 0), and through a jitted
     `jlora.apply` with each adapter's tree and config, the configs differing
     only in `lora_alpha` (a static argument: one compile per config), or all
     equal; (b) a switched step (scalar id, a different adapter each call) /
     a plain `jlora.apply` step;
  4. multi-task train step (grad of `bank.task_mean` of per-example losses
     wrt the bank, adam) with n = 4 / a single-adapter train step, same batch.

Run: python benchmarks/adapters.py [--quick] [--sizes small,medium] [--repeats N]
  [--out benchmarks/results/adapters.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _timing import measure_side_by_side, paired_ratio, write_report

import jlora
from jlora import models

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SIZES = {  # the shapes of `run.py`; a batch of 16 sequences so that 16 adapters each get one
    "tiny": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4, vocab_size=512,
                 batch=16, seq=8),
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                  vocab_size=4096, batch=16, seq=64),
    "medium": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=12,
                   vocab_size=8192, batch=16, seq=64),
}
MIXED_NS, LOOP_N, TRAIN_N, R = (1, 4, 16), 8, 4, 8


def build(size: str) -> tuple[Any, dict, jax.Array, jax.Array]:
  """The reference Llama of `size`, its params, and a batch of inputs and next-token targets."""
  spec = dict(SIZES[size])
  batch, seq = spec.pop("batch"), spec.pop("seq")
  config = {"model_type": "llama", "max_position_embeddings": max(seq, 64), **spec}
  model, params = models.from_config(config, key=jax.random.key(0))
  tok = jax.random.randint(jax.random.key(1), (batch, seq + 1), 0, spec["vocab_size"])
  return model, params, tok[:, :-1], tok[:, 1:]


def config(alpha: float = 16.0) -> jlora.LoraConfig:
  """r = 8 on every attention and MLP projection; random (nonzero) B, so every LoRA term is computed for real."""
  return jlora.LoraConfig(r=R, lora_alpha=alpha, target_modules=ALL_LINEAR, init_lora_weights=False)


def make_sets(model, base, x, ns) -> dict[int, jlora.AdapterSet]:
  """Per n in `ns`, the set of adapters `a0..a{n-1}`, each with its own random A and B.

  Adapter `a0` comes from `jlora.init`; the others are drawn like it (same
  shapes and spread) by one jitted function, which is much faster than an init each.
  """
  first = jlora.split(jlora.init(jax.random.key(10), model, base, config(), x[:1]), config())[0]
  leaves, treedef = jax.tree.flatten(first)
  redraw = jax.jit(lambda key: treedef.unflatten(
      [jax.random.normal(k, v.shape, v.dtype) * jnp.std(v) for k, v in zip(jax.random.split(key, len(leaves)), leaves)]))
  trees = [first] + [redraw(jax.random.key(11 + k)) for k in range(max(ns) - 1)]
  return {n: jlora.AdapterSet({f"a{k}": (trees[k], config()) for k in range(n)}) for n in ns}


def spread(n: int, batch: int) -> jax.Array:
  """Ids 0..n-1 spread evenly over the batch: example i gets adapter i mod n."""
  return jnp.arange(batch, dtype=jnp.int32) % n


def per_example_xent(logits: jax.Array, y: jax.Array) -> jax.Array:
  """`(batch,)` next-token cross-entropy, averaged over each sequence."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y).mean(-1)


def looped(step, state, *fixed):
  """A thunk that runs one step, feeding its outputs back (donated buffers stay valid)."""
  box = [state]

  def run():
    box[0] = step(*box[0], *fixed)
    return box[0]

  return run


def new_compiles(fn, calls) -> tuple[int, float]:
  """Compiles of jitted `fn` over `calls` (argument tuples) after the first call, and seconds for all calls."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*calls[0]))
  before = fn._cache_size()
  for args in calls[1:]:
    jax.block_until_ready(fn(*args))
  return fn._cache_size() - before, time.perf_counter() - t0


def bench_size(size: str, repeats: int) -> dict:
  """Times every comparison of the module docstring on the model of `size`; returns ms, ratios and compile counts."""
  model, base, x, y = build(size)
  batch = x.shape[0]
  cfg = config()
  sets = make_sets(model, base, x, sorted({*MIXED_NS, LOOP_N, TRAIN_N}))
  banks = {n: jlora.stack_adapters(s, base) for n, s in sets.items()}
  single = sets[1].params("a0", base)
  fwd = jax.jit(lambda p, x: jlora.apply(model, p, cfg, x))
  fwd_bank = jax.jit(lambda base, bank, ids, x: jlora.apply(model, base, bank, x, adapter_ids=ids))
  timed = {"fwd/single": lambda: fwd(single, x)}
  ids = {n: spread(n, batch) for n in MIXED_NS}
  for n in MIXED_NS:
    timed[f"fwd/mixed_n{n}"] = lambda n=n: fwd_bank(base, banks[n], ids[n], x)
  # 2. one mixed call over 8 adapters vs 8 single-adapter calls on their sub-batches
  ids8, set8, bank8 = spread(LOOP_N, batch), sets[LOOP_N], banks[LOOP_N]
  subs = [(set8.params(name, base), x[ids8 == k]) for k, name in enumerate(set8.names)]
  timed["batch/mixed_n8"] = lambda: fwd_bank(base, bank8, ids8, x)
  timed["batch/loop_n8"] = lambda: [fwd(p, xs) for p, xs in subs]
  # ... and in the serving regime: 8 rows of one token each (a decode step's shape), one adapter per row
  one = x[:LOOP_N, :1]
  rows = [(set8.params(name, base), one[k:k + 1]) for k, name in enumerate(set8.names)]
  timed["token/mixed_n8"] = lambda: fwd_bank(base, bank8, jnp.arange(LOOP_N, dtype=jnp.int32), one)
  timed["token/loop_n8"] = lambda: [fwd(p, xs) for p, xs in rows]
  mixed, loop = timed["batch/mixed_n8"](), timed["batch/loop_n8"]()  # the two compute the same logits
  for k, out in enumerate(loop):
    np.testing.assert_allclose(mixed[ids8 == k], out, rtol=1e-4, atol=1e-4 * float(jnp.abs(out).max()))
  # 3a. switching: compiles after the first call
  info: dict[str, Any] = {}
  scalar_ids = [bank8.ids(name) for name in set8.names]
  info["switch/bank_scalar_new_compiles"], info["switch/bank_scalar_s"] = new_compiles(
      fwd_bank, [(base, bank8, i, x) for i in scalar_ids])
  fwd_static = jax.jit(lambda p, c, x: jlora.apply(model, p, c, x), static_argnums=1)
  alphas = [8.0 + 4 * k for k in range(LOOP_N)]
  info["switch/apply_distinct_alpha_new_compiles"], info["switch/apply_distinct_alpha_s"] = new_compiles(
      fwd_static, [(p, dataclasses.replace(cfg, lora_alpha=a), x) for (p, _), a in zip(subs, alphas)])
  info["switch/apply_same_config_new_compiles"], info["switch/apply_same_config_s"] = new_compiles(
      fwd, [(p, x) for p, _ in subs])
  # 3b. a switched step: scalar id, the next adapter each call
  cycle = itertools.cycle(scalar_ids)
  timed["switch/bank_scalar_step"] = lambda: fwd_bank(base, bank8, next(cycle), x)
  # 4. training: multi-task (n = 4, one bank) vs one adapter, adam, same batch
  tx = optax.adam(1e-4)
  ids4 = spread(TRAIN_N, batch)

  def bank_step(bank, s, base, ids):
    loss = lambda b: b.task_mean(  # noqa: E731
        per_example_xent(jlora.apply(model, base, b, x, adapter_ids=ids), y), ids)
    u, s = tx.update(jax.grad(loss)(bank), s, bank)
    return optax.apply_updates(bank, u), s

  def single_step(t, s, frozen):
    loss = lambda t: per_example_xent(jlora.apply(model, jlora.combine(t, frozen), cfg, x), y).mean()  # noqa: E731
    u, s = tx.update(jax.grad(loss)(t), s, t)
    return optax.apply_updates(t, u), s

  copy = lambda t: jax.tree.map(jnp.copy, t)  # noqa: E731  (donation consumes the inputs)
  trainable = copy(sets[1]["a0"])
  timed["train/bank_n4"] = looped(jax.jit(bank_step, donate_argnums=(0, 1)),
                                  (copy(banks[TRAIN_N]), tx.init(banks[TRAIN_N])), base, ids4)
  timed["train/single"] = looped(jax.jit(single_step, donate_argnums=(0, 1)), (trainable, tx.init(trainable)), base)
  timings = measure_side_by_side(timed, repeats=repeats)
  for name, t in timings.items():
    print(f"  {size:7s} {name:24s} median {t.median_ms:9.2f} ms  min {t.min_ms:9.2f} ms  ({t.disturbed} calls redone)",
          flush=True)
  ratio = lambda a, b: paired_ratio(timings, a, b)  # noqa: E731
  out = {
      "shape": {**SIZES[size], "r": R, "targets": ALL_LINEAR,
                "params": int(sum(v.size for v in jax.tree.leaves(base)))},
      "ms": {n: t.median_ms for n, t in timings.items()}, "min_ms": {n: t.min_ms for n, t in timings.items()},
      "disturbed_calls": {n: t.disturbed for n, t in timings.items()}, **info,
  }
  for n in MIXED_NS:
    out[f"ratio/mixed_n{n}_to_single"] = ratio(f"fwd/mixed_n{n}", "fwd/single")
  out["ratio/mixed_n8_to_loop"] = ratio("batch/mixed_n8", "batch/loop_n8")
  out["ratio/token_mixed_n8_to_loop"] = ratio("token/mixed_n8", "token/loop_n8")
  out["ratio/switched_to_plain_step"] = ratio("switch/bank_scalar_step", "fwd/single")
  out["ratio/train_bank_n4_to_single"] = ratio("train/bank_n4", "train/single")
  return out


ROWS = [  # (label, key, goal, format)
    ("mixed fwd n=1 / single apply", "ratio/mixed_n1_to_single", "", ".2f"),
    ("mixed fwd n=4 / single apply", "ratio/mixed_n4_to_single", "", ".2f"),
    ("mixed fwd n=16 / single apply", "ratio/mixed_n16_to_single", "≤ 1.15", ".2f"),
    ("mixed n=8, 1 call / loop of 8 apply calls", "ratio/mixed_n8_to_loop", "≤ 0.5", ".2f"),
    ("8 rows × 1 token, 1 call / loop of 8 one-row calls", "ratio/token_mixed_n8_to_loop", "≤ 0.5", ".2f"),
    ("switch 8 adapters, bank scalar id: new compiles", "switch/bank_scalar_new_compiles", "0", "d"),
    ("switch 8, apply, lora_alpha differs: new compiles", "switch/apply_distinct_alpha_new_compiles", "", "d"),
    ("switch 8, apply, same config: new compiles", "switch/apply_same_config_new_compiles", "", "d"),
    ("switch 8: bank scalar id, s (first incl. compile)", "switch/bank_scalar_s", "", ".2f"),
    ("switch 8: apply, alpha differs, s", "switch/apply_distinct_alpha_s", "", ".2f"),
    ("switched step (scalar id) / plain apply step", "ratio/switched_to_plain_step", "", ".2f"),
    ("train step, bank n=4 / single adapter", "ratio/train_bank_n4_to_single", "", ".2f"),
]


def markdown(report: dict) -> str:
  sizes = report["sizes"]
  head = " | ".join(f"{s} (d={r['shape']['hidden_size']}, L={r['shape']['num_hidden_layers']}, "
                    f"{r['shape']['batch']}×{r['shape']['seq']})" for s, r in sizes.items())
  rows = [f"| measure | goal | {head} |", "|---|---|" + "---|" * len(sizes)]
  for label, key, goal, fmt in ROWS:
    rows.append(f"| {label} | {goal} | " + " | ".join(format(r[key], fmt) for r in sizes.values()) + " |")
  return "\n".join(rows)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="the tiny size, few rounds (a smoke run)")
  parser.add_argument("--out", default="benchmarks/results/adapters.json")
  parser.add_argument("--sizes", default=None, help="comma-separated, from " + ",".join(SIZES))
  parser.add_argument("--repeats", type=int, default=None)
  args = parser.parse_args()
  sizes = (args.sizes or ("tiny" if args.quick else "small,medium")).split(",")
  unknown = [s for s in sizes if s not in SIZES]
  if unknown:
    parser.error(f"unknown sizes {unknown}; choose from {list(SIZES)}")
  repeats = args.repeats or (3 if args.quick else 10)
  report = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
            "jax": jax.__version__, "repeats": repeats, "sizes": {}}
  for size in sizes:
    report["sizes"][size] = bench_size(size, repeats)
  report["markdown"] = markdown(report)
  print(report["markdown"])
  write_report(report, args.out)


if __name__ == "__main__":
  main()
