"""Other ways to compute the LoRA term, timed against jlora's in one process: the optimization log.

Each variant trains LoRA on all linear layers of the reference Llama decoder
(r=8, adamw), jitted, in interleaved rounds with the frozen-base bound (see
`_timing.py`); the ratio to the bound is the median of per-round ratios. The
variants are written here as flax interceptors over `jlora.init`'s params, so
the library keeps only the one that the numbers justified (`jlora`):

  jlora       the library: 2-D matmuls on the flattened input, the scale on x·A
  dot3d       (x·A)·B on the 3-D activations (the first implementation)
  scale_out   2-D, the scale on the (N, d_out) term instead of x·A
  vjp         2-D, with a hand-written custom VJP for the LoRA path
  concat      x·[W0 | A] as one matmul, so x is read once (plain autodiff)
  concat_vjp  the same with a custom VJP: dx = [g | g_u]·[W0 | A]ᵀ as one matmul
  concat_jvp  the same as a custom JVP (forward-mode AD keeps working)
  bf16_path   over a bf16 base: the LoRA path in bf16 instead of float32 (`--bf16`)
and two settings of the step itself, with XLA's buffer bytes beside the time:
  no_donate   jlora without donating the trainable params and optimizer state to the step
  remat       jlora on the model built with `remat=True` (`nn.remat` around each block)

Run: python benchmarks/variants.py [--sizes small,medium] [--rounds 12] [--bf16]
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import run
from _timing import measure_side_by_side, paired_ratio, write_report

VARIANTS = ("jlora", "dot3d", "scale_out", "vjp", "concat", "concat_vjp", "concat_jvp", "no_donate", "remat")


def _concat_forward(x2, k, a, b, s):
  c = x2 @ jnp.concatenate([k, a], axis=1)
  u = c[:, k.shape[1]:]
  return c[:, :k.shape[1]] + (s * u) @ b, u


@jax.custom_vjp
def concat_vjp(x2, k, a, b, s):
  return _concat_forward(x2, k, a, b, s)[0]


def _concat_fwd(x2, k, a, b, s):
  y, u = _concat_forward(x2, k, a, b, s)
  return y, (x2, k, a, b, s, u)


def _concat_bwd(res, g):
  x2, k, a, b, s, u = res
  gu = s * (g @ b.T)
  dx = jnp.concatenate([g, gu], axis=1) @ jnp.concatenate([k, a], axis=1).T
  return dx, jnp.zeros_like(k), x2.T @ gu, (s * u).T @ g, jnp.zeros_like(s)


concat_vjp.defvjp(_concat_fwd, _concat_bwd)


@jax.custom_jvp
def concat_jvp(x2, k, a, b, s):
  return _concat_forward(x2, k, a, b, s)[0]


@concat_jvp.defjvp
def _concat_jvp_rule(primals, tangents):
  x2, k, a, b, s = primals
  tx, _, ta, tb, _ = tangents  # the kernel is frozen and s a constant
  w = jnp.concatenate([k, a], axis=1)
  c, tc = x2 @ w, tx @ w
  d = k.shape[1]
  u, tu = c[:, d:], tc[:, d:] + x2 @ ta
  return c[:, :d] + (s * u) @ b, tc[:, :d] + (s * tu) @ b + (s * u) @ tb


@jax.custom_vjp
def lora_vjp(x2, a, b, s):
  return (s * (x2 @ a)) @ b


def _lora_fwd(x2, a, b, s):
  u = s * (x2 @ a)
  return u @ b, (x2, a, b, s, u)


def _lora_bwd(res, g):
  x2, a, b, s, u = res
  gu = s * (g @ b.T)
  return gu @ a.T, x2.T @ gu, u.T @ g, jnp.zeros_like(s)


lora_vjp.defvjp(_lora_fwd, _lora_bwd)


def interceptor(variant: str, s: float):
  """Adds the LoRA term of `variant` to every `nn.Dense` that holds an adapter."""
  s32 = jnp.float32(s)

  def icpt(next_fun, args, kwargs, context):
    m = context.module
    if not isinstance(m, nn.Dense) or context.method_name != "__call__" or not m.has_variable("params", "lora_a"):
      return next_fun(*args, **kwargs)
    x = args[0]
    a, b = m.get_variable("params", "lora_a"), m.get_variable("params", "lora_b")
    lead, x2 = x.shape[:-1], x.reshape(-1, x.shape[-1])
    if variant.startswith("concat"):
      k = m.get_variable("params", "kernel")
      if variant == "concat":
        y = _concat_forward(x2, k, a, b, s)[0]
      else:
        y = (concat_vjp if variant == "concat_vjp" else concat_jvp)(x2, k, a, b, s32)
      bias = m.get_variable("params", "bias") if m.use_bias else 0.0
      return (y + bias).reshape(lead + (-1,))
    y = next_fun(*args, **kwargs)
    if variant == "dot3d":
      return y + s * ((x @ a) @ b)
    if variant == "scale_out":
      return y + (s * ((x2 @ a) @ b)).reshape(lead + (-1,))
    if variant == "vjp":
      return y + lora_vjp(x2, a, b, s32).reshape(lead + (-1,))
    if variant == "bf16_path":
      dt = x.dtype
      return y + ((s * (x2 @ a.astype(dt))) @ b.astype(dt)).reshape(lead + (-1,))
    raise ValueError(f"unknown variant {variant!r}; known: {VARIANTS + ('bf16_path',)}")

  return icpt


def lora_step(steps: run.Steps, variant: str):
  """A looped thunk of the LoRA all-linear step computed by `variant`, its logits, and XLA's step buffer bytes."""
  library = variant in ("jlora", "no_donate", "remat")
  icpt = None if library else (lambda config: interceptor(variant, config.scale_for("")))
  lora = steps.lora(run.ALL_LINEAR, interceptor=icpt, donate=variant != "no_donate")
  trainable, frozen = lora.state[0], lora.fixed[0]
  mem = lora.step.lower(*lora.state, *lora.fixed).compile().memory_analysis()
  buffer_bytes = mem.temp_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes if mem else None
  perturbed = jax.tree.map(lambda v: v + 0.01, trainable)  # B = 0 at init would hide a wrong term
  return run._looped(lora.step, lora.state, lora.fixed), jax.jit(lora.forward)(perturbed, frozen), buffer_bytes


def bench(size: str, variants: list[str], rounds: int, dtype) -> dict:
  model, base, x, y = run.build(size, dtype=dtype)
  steps = run.Steps(model, base, x, y)
  bound, bound_args = steps.bound()
  fns, logits, buffers = {"bound": lambda: bound(*bound_args)}, {}, {}
  for v in variants:
    on = run.Steps(run.build(size, dtype=dtype, remat=True)[0], base, x, y) if v == "remat" else steps
    fns[v], logits[v], buffers[v] = lora_step(on, v)
  timings = measure_side_by_side(fns, repeats=rounds)
  out = {"ms": {n: t.median_ms for n, t in timings.items()}, "ratio_to_bound": {}, "max_abs_logit_diff": {},
         "xla_step_buffer_bytes": buffers}
  for v in variants:
    out["ratio_to_bound"][v] = paired_ratio(timings, v, "bound")
    diff = float(jnp.abs(logits[v].astype(jnp.float32) - logits[variants[0]].astype(jnp.float32)).max())
    out["max_abs_logit_diff"][v] = diff
    print(f"  {size:10s} {v:11s} {timings[v].median_ms:8.1f} ms  / bound {out['ratio_to_bound'][v]:.3f}  "
          f"|Δ logits| vs {variants[0]} {diff:.1e}  step buffers {buffers[v] / 2**20:.0f} MiB", flush=True)
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="small,medium")
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--rounds", type=int, default=12)
  parser.add_argument("--bf16", action="store_true", help="a bf16 base; compares jlora with bf16_path")
  parser.add_argument("--out", default="benchmarks/results/variants_cpu.json")
  args = parser.parse_args()
  variants = ["jlora", "bf16_path"] if args.bf16 else args.variants.split(",")
  dtype = jnp.bfloat16 if args.bf16 else jnp.float32
  report = {"device": jax.devices()[0].device_kind, "dtype": jnp.dtype(dtype).name, "sizes": {}}
  for size in args.sizes.split(","):
    report["sizes"][size] = bench(size, variants, args.rounds, dtype)
  write_report(report, args.out)


if __name__ == "__main__":
  main()
