"""jlora benchmark suite: LoRA vs full fine-tuning on the reference Llama decoder, side by side.

For each model size, in one process, jitted, after warm-up, in interleaved
rounds (each round runs every step once; calls another process disturbed are
redone; ratios are medians of per-round ratios, see `_timing.py`):
  train step: full fine-tuning (adamw) · frozen-base bound (gradient wrt
  activations only, no weight gradient at all) · LoRA q,v · LoRA all-linear ·
  LoRA all-linear by materializing W0 + s·A·B;
  forward: base · unmerged LoRA (all-linear, r=8) · merged;
  compile time of the LoRA step vs the full step; adapter vs full checkpoint bytes.
Peak memory of training (full adamw vs LoRA) is measured in separate processes,
on a small batch so that weights dominate.

Writes JSON and a markdown table of the ratios.

Run: python benchmarks/run.py [--quick] [--out benchmarks/results/cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import safetensors.numpy

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _timing import measure_side_by_side, paired_ratio, write_report

import jlora
from jlora import models

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4, vocab_size=512,
                 batch=2, seq=32),
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                  vocab_size=4096, batch=4, seq=256),
    "small-deep": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=4,
                       vocab_size=4096, batch=4, seq=256),
    "medium": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=12,
                   vocab_size=8192, batch=4, seq=256),
    # weights dominate: the peak-memory comparison
    "memory": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
                   vocab_size=8192, batch=1, seq=32),
}


def build(size: str, dtype=None, **options):
  """The reference Llama of `size` (params and compute in `dtype`, float32 by default) and a batch."""
  spec = dict(SIZES[size])
  batch, seq = spec.pop("batch"), spec.pop("seq")
  config = {"model_type": "llama", "max_position_embeddings": max(seq, 64), **spec}
  model, params = models.from_config(config, key=jax.random.key(0), dtype=dtype, **options)
  ids = jax.random.randint(jax.random.key(1), (batch, seq + 1), 0, spec["vocab_size"])
  return model, params, ids[:, :-1], ids[:, 1:]


def xent(logits, targets):
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets).mean()


class LoraStep(NamedTuple):
  step: Any
  state: tuple
  fixed: tuple
  params: dict
  config: jlora.LoraConfig
  forward: Any  # (trainable, frozen) -> logits


class Steps:
  """The jitted steps of one model, all with adamw."""

  def __init__(self, model, base, x, y):
    self.model, self.base, self.x, self.y = model, base, x, y
    self.tx = optax.adamw(1e-4)

  def full(self):
    model, x, y, tx = self.model, self.x, self.y, self.tx

    def step(p, s):
      g = jax.grad(lambda p: xent(model.apply({"params": p}, x), y))(p)
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    return jax.jit(step, donate_argnums=(0, 1)), (self.base, tx.init(self.base)), ()

  def bound(self):
    """Backward wrt activations only: a zero added to the embedding output is all that is differentiated."""
    model, x, y = self.model, self.x, self.y

    def step(p, zero):
      def loss(delta):
        def with_delta(next_fun, args, kwargs, context):
          out = next_fun(*args, **kwargs)
          if isinstance(context.module, nn.Embed) and context.method_name == "__call__":
            out = out + delta
          return out

        with nn.intercept_methods(with_delta):
          return xent(model.apply({"params": p}, x), y)

      return jax.grad(loss)(zero)

    d = self.base["model"]["embed_tokens"]["embedding"].shape[-1]
    return jax.jit(step), (self.base, jnp.zeros(x.shape + (d,)))

  def lora(self, targets, materialize=False, *, interceptor=None, donate=True):
    """The jitted LoRA step `(trainable, opt_state, frozen)`, its state, fixed args, params, config and forward.

    `interceptor(config)`, if given, is a flax method interceptor that computes the
    LoRA term in place of `jlora.apply` (`benchmarks/variants.py`).
    """
    model, x, y, tx = self.model, self.x, self.y, self.tx
    config = jlora.LoraConfig(r=8, lora_alpha=16, target_modules=targets)
    params = jlora.init(jax.random.key(2), model, self.base, config, x)
    trainable, frozen = jlora.split(params, config)

    def forward(t, frozen):
      p = jlora.combine(t, frozen)
      if materialize:
        return jlora.apply_merged(lambda q, x: model.apply({"params": q}, x), p, config, x)
      if interceptor is not None:
        with nn.intercept_methods(interceptor(config)):
          return model.apply({"params": p}, x)
      return jlora.apply(model, p, config, x)

    def step(t, s, frozen):  # the frozen base is an argument (not a baked-in constant), never donated
      g = jax.grad(lambda t: xent(forward(t, frozen), y))(t)
      u, s = tx.update(g, s, t)
      return optax.apply_updates(t, u), s

    jitted = jax.jit(step, donate_argnums=(0, 1) if donate else ())
    return LoraStep(jitted, (trainable, tx.init(trainable)), (frozen,), params, config, forward)


def _looped(step, state, fixed=()):
  """A thunk that runs one step, feeding its outputs back (donated buffers stay valid)."""
  box = [state]

  def run():
    box[0] = step(*box[0], *fixed)
    return box[0]

  return run


def compile_seconds(step, args) -> float:
  t0 = time.perf_counter()
  step.lower(*args).compile()
  return time.perf_counter() - t0


def checkpoint_bytes(tree) -> int:
  flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "t.safetensors")
    safetensors.numpy.save_file(flat, path)
    return os.path.getsize(path)


def bench_size(size: str, repeats: int) -> dict:
  model, base, x, y = build(size)
  steps = Steps(model, base, x, y)
  ms, info = {}, {}
  full_step, full_args, _ = steps.full()
  info["compile_s/full"] = compile_seconds(full_step, full_args)
  copy = lambda t: jax.tree.map(jnp.copy, t)  # noqa: E731  (donation consumes the inputs)
  timed = {"train/full_ft": _looped(full_step, copy(full_args))}
  bound_step, bound_args = steps.bound()
  timed["train/frozen_base_bound"] = lambda: bound_step(*bound_args)
  qv_step, qv_args, qv_fixed, *_ = steps.lora(["q_proj", "v_proj"])
  all_step, all_args, all_fixed, p_all, c_all, _ = steps.lora(ALL_LINEAR)
  mat_step, mat_args, mat_fixed, *_ = steps.lora(ALL_LINEAR, materialize=True)
  info["compile_s/lora_all"] = compile_seconds(all_step, all_args + all_fixed)
  timed["train/lora_qv"] = _looped(qv_step, qv_args, qv_fixed)
  timed["train/lora_all_linear"] = _looped(all_step, copy(all_args), all_fixed)
  timed["train/lora_all_materialized"] = _looped(mat_step, mat_args, mat_fixed)
  fwd = jax.jit(lambda p, x: model.apply({"params": p}, x))
  fwd_lora = jax.jit(lambda p, x: jlora.apply(model, p, c_all, x))
  merged = jlora.merge(p_all, c_all)
  timed["forward/base"] = lambda: fwd(base, x)
  timed["forward/lora_unmerged"] = lambda: fwd_lora(p_all, x)
  timed["forward/lora_merged"] = lambda: fwd(merged, x)
  timings = measure_side_by_side(timed, repeats=repeats)
  disturbed = {}
  for name, t in timings.items():
    ms[name], disturbed[name] = t.median_ms, t.disturbed
    print(f"  {size:10s} {name:30s} median {t.median_ms:9.1f} ms  min {t.min_ms:9.1f} ms  ({t.disturbed} calls redone)",
          flush=True)
  ratio = lambda a, b: paired_ratio(timings, a, b)  # noqa: E731
  trainable, _ = jlora.split(p_all, c_all)
  info["adapter_bytes/all_linear"] = checkpoint_bytes(trainable)
  info["checkpoint_bytes/full"] = checkpoint_bytes(base)
  return {
      "shape": {**SIZES[size], "r": 8, "params": int(sum(v.size for v in jax.tree.leaves(base)))},
      "ms": ms, "min_ms": {n: t.min_ms for n, t in timings.items()}, "disturbed_calls": disturbed, **info,
      "tokens": int(x.size),
      "ratio/lora_all_linear_to_bound": ratio("train/lora_all_linear", "train/frozen_base_bound"),
      "ratio/lora_qv_to_bound": ratio("train/lora_qv", "train/frozen_base_bound"),
      "ratio/lora_all_linear_to_full": ratio("train/lora_all_linear", "train/full_ft"),
      "ratio/lora_qv_to_full": ratio("train/lora_qv", "train/full_ft"),
      "ratio/materialized_to_factored": ratio("train/lora_all_materialized", "train/lora_all_linear"),
      "ratio/unmerged_forward_to_base": ratio("forward/lora_unmerged", "forward/base"),
      "ratio/merged_forward_to_base": ratio("forward/lora_merged", "forward/base"),
      "ratio/compile_lora_to_full": info["compile_s/lora_all"] / info["compile_s/full"],
      "ratio/adapter_to_full_bytes": info["adapter_bytes/all_linear"] / info["checkpoint_bytes/full"],
  }


def memory_child(kind: str, size: str) -> None:
  """In a fresh process: a few training steps; prints XLA's step buffers and the live arrays (bytes)."""
  model, base, x, y = build(size)
  steps = Steps(model, base, x, y)
  step, state, fixed = steps.full() if kind == "full" else steps.lora(ALL_LINEAR)[:3]
  mem = step.lower(*state, *fixed).compile().memory_analysis()
  for _ in range(3):
    state = step(*state, *fixed)
  jax.block_until_ready(state)
  xla = None
  if mem is not None:
    xla = int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
              - mem.alias_size_in_bytes)
  # Weights and optimizer state live outside the step too: count the live arrays once.
  live = sum(a.nbytes for a in jax.live_arrays())
  # (Process RSS is not reported: its peak is set by the model's init, before any step.)
  print(json.dumps({"xla_step_bytes": xla, "live_bytes": live}))


def bench_memory() -> dict:
  out = {}
  for kind in ("full", "lora"):
    proc = subprocess.run([sys.executable, __file__, "--memory-child", kind], capture_output=True, text=True,
                          check=True)
    out[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
  ratio = {k: out["lora"][k] / out["full"][k] for k in out["full"] if out["full"][k]}
  return {"size": SIZES["memory"], "full": out["full"], "lora_all_linear": out["lora"], "ratio_lora_to_full": ratio}


def markdown(report: dict) -> str:
  rows = ["| size | LoRA all-linear / bound | LoRA q,v / bound | LoRA all / full FT | materialized / factored "
          "| unmerged fwd / base | merged fwd / base | compile LoRA / full | adapter / full bytes |",
          "|---|---|---|---|---|---|---|---|---|"]
  for size, r in report["sizes"].items():
    rows.append(
        f"| {size} (d={r['shape']['hidden_size']}, L={r['shape']['num_hidden_layers']}) "
        f"| {r['ratio/lora_all_linear_to_bound']:.2f} | {r['ratio/lora_qv_to_bound']:.2f} "
        f"| {r['ratio/lora_all_linear_to_full']:.2f} | {r['ratio/materialized_to_factored']:.2f} "
        f"| {r['ratio/unmerged_forward_to_base']:.2f} | {r['ratio/merged_forward_to_base']:.2f} "
        f"| {r['ratio/compile_lora_to_full']:.2f} | {r['ratio/adapter_to_full_bytes']:.4f} |")
  if "memory" in report:
    m = report["memory"]["ratio_lora_to_full"]
    rows.append("")
    rows.append(f"Peak memory of training, LoRA all-linear / full adamw (weights dominate): XLA step buffers "
                f"{m.get('xla_step_bytes', float('nan')):.2f}, live arrays after the steps {m.get('live_bytes', float('nan')):.2f}.")
  return "\n".join(rows)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="tiny sizes, few rounds (a smoke run)")
  parser.add_argument("--out", default="benchmarks/results/cpu.json")
  parser.add_argument("--sizes", default=None, help="comma-separated, from " + ",".join(SIZES))
  parser.add_argument("--repeats", type=int, default=None)
  parser.add_argument("--memory-child", choices=["full", "lora"], help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.memory_child:
    memory_child(args.memory_child, "tiny" if os.environ.get("JLORA_BENCH_QUICK") else "memory")
    return
  sizes = (args.sizes or ("tiny" if args.quick else "small,small-deep,medium")).split(",")
  repeats = args.repeats or (3 if args.quick else 10)
  report = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
            "jax": jax.__version__, "sizes": {}}
  for size in sizes:
    report["sizes"][size] = bench_size(size, repeats)
  if args.quick:
    os.environ["JLORA_BENCH_QUICK"] = "1"
  report["memory"] = bench_memory()
  report["markdown"] = markdown(report)
  print(report["markdown"])
  write_report(report, args.out)


if __name__ == "__main__":
  main()
