"""How to compute a mixed-adapter batch's LoRA term: an op-level benchmark of one dense layer.

Example i of the batch uses adapter ids[i] of a stacked bank (A: (n, d_in, R),
B: (n, R, d_out), scales: (n,)); id -1 means no adapter (the term is exactly 0):
  y = x·W0 + s[ids[i]]·(x_i·A[ids[i]])·B[ids[i]],  x: (batch, T, d_in).
Methods (each checked against a loop over examples, forward and gradients):
  single   baseline: one A, B on the whole batch (plain factored LoRA, 2-D matmuls)
  gather   A[ids], B[ids] gathered per example, then batched einsums
  vmap     the same as `jax.vmap` over examples of a 2-D path x_i·A_i·B_i
  onehot   x·A for all n adapters, masked by one_hot(ids)·scale, then summed through B
  ragged   examples sorted by adapter, `jax.lax.ragged_dot` with group sizes, unsorted
Jitted, timed in interleaved rounds (see `_timing.py`), three modes: fwd (y: the
term + the base matmul x·W0); fwd_bwd (sum(y) and its gradient wrt x, A, B: a
layer inside a network); grad_ab (grad of sum(y) wrt A, B only, where XLA drops
x·W0 as dead code: the term's own forward+backward). Ratios are medians of
per-round ratios to `single`. Compile seconds and XLA temp bytes per method.

Run: python benchmarks/mixed_methods.py [--quick] [--out benchmarks/results/mixed_methods.json]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _timing import measure_side_by_side, paired_ratio, write_report

METHODS = ("single", "gather", "vmap", "onehot", "ragged")


def _scale(scales, ids):
  """Per-example scale, 0 where ids == -1, and the ids clamped for gathering."""
  safe = jnp.maximum(ids, 0)
  return jnp.where(ids >= 0, scales[safe], 0.0), safe


def single(x, a, b, s, _ids):
  b_, t, d = x.shape
  return (s * (x.reshape(b_ * t, d) @ a) @ b).reshape(b_, t, -1)


def gather(x, a, b, scales, ids):
  s, safe = _scale(scales, ids)
  u = jnp.einsum("btd,bdr->btr", x, a[safe]) * s[:, None, None]
  return jnp.einsum("btr,bro->bto", u, b[safe])


def vmapped(x, a, b, scales, ids):
  s, safe = _scale(scales, ids)
  return jax.vmap(lambda xi, ai, bi, si: (si * (xi @ ai)) @ bi)(x, a[safe], b[safe], s)


def onehot(x, a, b, scales, ids):
  mask = jax.nn.one_hot(ids, a.shape[0], dtype=x.dtype) * scales  # one_hot(-1) is all zeros
  u = jnp.einsum("btd,ndr->btnr", x, a) * mask[:, None, :, None]
  return jnp.einsum("btnr,nro->bto", u, b)


def ragged(x, a, b, scales, ids):
  b_, t, d = x.shape
  n = a.shape[0]
  order = jnp.argsort(jnp.where(ids >= 0, ids, n))  # -1 last: rows past sum(sizes) come out 0
  sizes = (jnp.bincount(jnp.where(ids >= 0, ids, n), length=n + 1)[:n] * t).astype(jnp.int32)
  s, _ = _scale(scales, ids)
  xs = x[order].reshape(b_ * t, d)
  u = jax.lax.ragged_dot(xs, a, sizes) * jnp.repeat(s[order], t)[:, None]
  ys = jax.lax.ragged_dot(u, b, sizes).reshape(b_, t, -1)
  return ys[jnp.argsort(order)]


FNS = {"single": single, "gather": gather, "vmap": vmapped, "onehot": onehot, "ragged": ragged}


def reference(x, a, b, scales, ids):
  """The LoRA term by a Python loop over examples."""
  rows = [jnp.zeros((x.shape[1], b.shape[-1])) if i < 0 else scales[i] * (x[k] @ a[i]) @ b[i]
          for k, i in enumerate(np.asarray(ids).tolist())]
  return jnp.stack(rows)


def layer(term):
  return lambda w0, x, a, b, s, ids: x @ w0 + term(x, a, b, s, ids)


def loss(term):
  return lambda w0, x, a, b, s, ids: layer(term)(w0, x, a, b, s, ids).sum()


MODES = {  # each jitted as f(w0, x, a, b, scales, ids)
    "fwd": layer,
    # a layer inside a network: sum(y), and its gradient wrt x, A, B (x·W0 and g·W0ᵀ are computed)
    "fwd_bwd": lambda term: jax.value_and_grad(loss(term), argnums=(1, 2, 3)),
    # grad wrt A, B only: XLA drops x·W0 (dead), so this is the LoRA term's forward+backward alone
    "grad_ab": lambda term: jax.grad(loss(term), argnums=(2, 3)),
}


def make_inputs(n, batch, t, d, r, key=0):
  k = jax.random.split(jax.random.key(key), 7)
  x = jax.random.normal(k[0], (batch, t, d))
  w0 = jax.random.normal(k[1], (d, d)) / np.sqrt(d)
  a = jax.random.normal(k[2], (n, d, r)) / np.sqrt(d)
  b = jax.random.normal(k[3], (n, r, d)) / np.sqrt(r)
  scales = jax.random.uniform(k[4], (n,), minval=0.5, maxval=2.0)
  ids = jax.random.randint(k[5], (batch,), -1, n).at[0].set(-1).at[-1].set(n - 1).astype(jnp.int32)
  return w0, x, a, b, scales, ids


def check(n, batch, t, d, r):
  """Every method's term and gradients agree with the loop (1e-5 of the largest value); -1 rows are exactly 0."""
  _, x, a, b, scales, ids = make_inputs(n, batch, t, d, r, key=1)
  want = reference(x, a, b, scales, ids)
  gwant = jax.grad(lambda a, b: reference(x, a, b, scales, ids).sum(), argnums=(0, 1))(a, b)
  for name, fn in FNS.items():
    if name == "single":
      continue
    got = jax.jit(fn)(x, a, b, scales, ids)
    grads = jax.jit(jax.grad(lambda x, a, b, s, i, fn=fn: fn(x, a, b, s, i).sum(), argnums=(1, 2)))(x, a, b, scales, ids)
    for w, g in zip((want, *gwant), (got, *grads)):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(jnp.abs(w).max()), err_msg=name)
    assert not np.asarray(got)[np.asarray(ids) < 0].any(), f"{name}: term of id -1 is not exactly 0"


def bench_n(n, shape, repeats):
  batch, t, d, r = shape["batch"], shape["T"], shape["d"], shape["R"]
  w0, x, a, b, scales, ids = make_inputs(n, batch, t, d, r)
  bank, one = (w0, x, a, b, scales, ids), (w0, x, a[0], b[0], scales[0], ids)  # single: adapter 0 on all
  timed, info, errors = {}, {}, {}
  for name in METHODS:
    for mode, wrap in MODES.items():
      key = f"{mode}/{name}"
      jitted = jax.jit(wrap(FNS[name]))
      call_args = one if name == "single" else bank
      try:
        t0 = time.perf_counter()
        compiled = jitted.lower(*call_args).compile()
        info[key] = {"compile_s": time.perf_counter() - t0}
        mem = compiled.memory_analysis()
        if mem is not None:
          info[key]["temp_bytes"] = int(mem.temp_size_in_bytes)
        jax.block_until_ready(compiled(*call_args))
      except Exception as e:  # a method the backend cannot run is recorded, not fatal
        errors[key] = f"{type(e).__name__}: {e}"[:2000]
        continue
      timed[key] = lambda c=compiled, xs=call_args: c(*xs)
  timings = measure_side_by_side(timed, repeats=repeats)
  out = {"ms": {k: v.median_ms for k, v in timings.items()}, "min_ms": {k: v.min_ms for k, v in timings.items()},
         "disturbed_calls": {k: v.disturbed for k, v in timings.items()}, "info": info, "errors": errors,
         "ratio_to_single": {}}
  for key in timings:
    mode = key.split("/")[0]
    out["ratio_to_single"][key] = paired_ratio(timings, key, f"{mode}/single")
  return out


def table(report):
  """Per mode: median ms (paired ratio to single); then compile seconds and XLA temp MiB per mode."""
  head = " | ".join(f"{m} ms (×single)" for m in MODES)
  rows = [f"| n | method | {head} | compile s ({', '.join(MODES)}) | temp MiB |", "|---|---|---|---|---|---|---|"]
  for n, res in report["by_n"].items():
    for name in METHODS:
      keys = [f"{m}/{name}" for m in MODES]
      cells = [f"{res['ms'][k]:.2f} ({res['ratio_to_single'][k]:.2f})" if k in res["ms"] else "error" for k in keys]
      inf = [res["info"].get(k, {}) for k in keys]
      comp = ", ".join(f"{i['compile_s']:.2f}" if "compile_s" in i else "-" for i in inf)
      mem = ", ".join(f"{i['temp_bytes'] / 2**20:.1f}" if "temp_bytes" in i else "-" for i in inf)
      rows.append(f"| {n} | {name} | {' | '.join(cells)} | {comp} | {mem} |")
  return "\n".join(rows)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="small sizes, few rounds (a smoke run)")
  parser.add_argument("--out", default="benchmarks/results/mixed_methods.json")
  parser.add_argument("--repeats", type=int, default=None)
  args = parser.parse_args()
  shape = dict(batch=8, T=8, d=64, R=4) if args.quick else dict(batch=32, T=64, d=768, R=8)
  ns = (1, 4) if args.quick else (1, 4, 16)
  repeats = args.repeats or (3 if args.quick else 11)
  for n in ns:  # an odd small shape, and the benchmark's
    check(n, batch=6, t=5, d=24, r=3)
    check(n, shape["batch"], shape["T"], shape["d"], shape["R"])
  print("all methods agree with the loop over examples", flush=True)
  report = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
            "jax": jax.__version__, "shape": shape, "repeats": repeats, "by_n": {},
            # False: this backend lowers ragged_dot to a dense masked product over all groups
            "ragged_dot_native": "ragged_dot" in jax.jit(ragged).lower(*make_inputs(2, 2, 2, 4, 2)[1:]).as_text()}
  for n in ns:
    report["by_n"][str(n)] = bench_n(n, shape, repeats)
    for key, err in report["by_n"][str(n)]["errors"].items():
      print(f"  n={n} {key}: {err.splitlines()[0][:200]}")
  report["markdown"] = table(report)
  print(report["markdown"])
  write_report(report, args.out)


if __name__ == "__main__":
  main()
