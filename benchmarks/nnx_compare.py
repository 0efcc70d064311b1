"""The NNX front-end against the linen one: the same Llama, the same weights, the same adapters, side by side.

For each size, in one process, jitted, after warm-up, in interleaved rounds (see
`_timing.py`), every step with adamw:
  linen: frozen-base bound · LoRA all-linear (`jlora.apply`), as in `run.py`;
  NNX:   frozen-base bound · LoRA all-linear as a pure `jax.jit` step over
         `nnx.split(model, jlora.nnx.Trainable, ...)` · the same LoRA step as
         `nnx.jit` + `jlora.nnx.optimizer` (NNX's stateful style: per-call
         Python graph traversal included).
The NNX model is an `nnx.Module` twin of `jlora.models`' linen Llama (the same
math, `nnx.Linear` / `nnx.Embed` / `nnx.RMSNorm`) loaded with the linen weights;
the NNX LoRA models get the linen step's adapters (`jlora.nnx.from_params`). The
report gives the max |logits difference| of the two base models.

Run: python benchmarks/nnx_compare.py [--sizes small,medium] [--repeats 10] [--out benchmarks/results/nnx_cpu.json]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import optax
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import run
from _timing import measure_side_by_side, paired_ratio, write_report

from jlora import nnx as lnnx
from jlora.models._layers import activation, attention
from jlora.models._layers import attention_mask as make_mask
from jlora.models.llama import apply_rope, rope_frequencies


# ------------------------------------------------------------------- the NNX twin
class Attention(nnx.Module):
  def __init__(self, c, rngs):
    d, qkv_bias = c.hidden_size, c.attention_bias or c.qkv_bias
    self.c = c
    self.q_proj = nnx.Linear(d, c.num_attention_heads * c.dim_head, use_bias=qkv_bias, rngs=rngs)
    self.k_proj = nnx.Linear(d, c.kv_heads * c.dim_head, use_bias=qkv_bias, rngs=rngs)
    self.v_proj = nnx.Linear(d, c.kv_heads * c.dim_head, use_bias=qkv_bias, rngs=rngs)
    self.o_proj = nnx.Linear(c.num_attention_heads * c.dim_head, d, use_bias=c.attention_bias, rngs=rngs)

  def __call__(self, x, mask, positions):
    c = self.c
    b, t, _ = x.shape
    q = self.q_proj(x).reshape(b, t, c.num_attention_heads, c.dim_head)
    k, v = (p(x).reshape(b, t, c.kv_heads, c.dim_head) for p in (self.k_proj, self.v_proj))
    inv_freq = rope_frequencies(c)
    q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
    y = attention(q, k, v, mask, scale=c.dim_head**-0.5)
    return self.o_proj(y.reshape(b, t, c.num_attention_heads * c.dim_head))


class MLP(nnx.Module):
  def __init__(self, c, rngs):
    self.act = activation(c.hidden_act)
    self.gate_proj = nnx.Linear(c.hidden_size, c.intermediate_size, use_bias=c.mlp_bias, rngs=rngs)
    self.up_proj = nnx.Linear(c.hidden_size, c.intermediate_size, use_bias=c.mlp_bias, rngs=rngs)
    self.down_proj = nnx.Linear(c.intermediate_size, c.hidden_size, use_bias=c.mlp_bias, rngs=rngs)

  def __call__(self, x):
    return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
  def __init__(self, c, rngs):
    self.input_layernorm = nnx.RMSNorm(c.hidden_size, epsilon=c.rms_norm_eps, rngs=rngs)
    self.self_attn = Attention(c, rngs)
    self.post_attention_layernorm = nnx.RMSNorm(c.hidden_size, epsilon=c.rms_norm_eps, rngs=rngs)
    self.mlp = MLP(c, rngs)

  def __call__(self, h, mask, positions):
    h = h + self.self_attn(self.input_layernorm(h), mask, positions)
    return h + self.mlp(self.post_attention_layernorm(h))


class Trunk(nnx.Module):
  def __init__(self, c, rngs):
    self.embed_tokens = nnx.Embed(c.vocab_size, c.hidden_size, rngs=rngs)
    self.layers = nnx.List([Block(c, rngs) for _ in range(c.num_hidden_layers)])
    self.norm = nnx.RMSNorm(c.hidden_size, epsilon=c.rms_norm_eps, rngs=rngs)


class Llama(nnx.Module):
  """`LlamaForCausalLM` (untied, no cache) as an NNX module: `model(ids, delta=None) -> logits`."""

  def __init__(self, c, rngs):
    self.model = Trunk(c, rngs)
    self.lm_head = nnx.Linear(c.hidden_size, c.vocab_size, use_bias=False, rngs=rngs)

  def __call__(self, ids, delta=None):
    b, t = ids.shape
    mask, slots, _ = make_mask(None, b, t)
    positions = jnp.broadcast_to(slots, (b, t))
    h = self.model.embed_tokens(ids)
    if delta is not None:  # the frozen-base bound differentiates this zero only
      h = h + delta
    for block in self.model.layers:
      h = block(h, mask, positions)
    return self.lm_head(self.model.norm(h))


def nnx_twin(linen_model, params) -> Llama:
  """The NNX Llama holding the linen params (`model/layers_3/...` -> `model/layers/3/...`)."""
  c = linen_model.config
  if c.tie_word_embeddings:
    raise ValueError("the NNX twin has an untied lm_head")
  twin = nnx.eval_shape(lambda: Llama(c, nnx.Rngs(0)))
  tree = _nnx_paths(params)
  tree["model"]["layers"] = {int(k): v for k, v in tree["model"]["layers"].items()}  # nnx.List keys are ints
  nnx.update(twin, tree)
  return twin


# ------------------------------------------------------------------------- steps
def _nnx_paths(params: dict) -> dict:
  """A linen Llama tree in the twin's paths: `model/layers_3/...` -> `model/layers/3/...`."""
  trunk = {k: v for k, v in params["model"].items() if not k.startswith("layers_")}
  trunk["layers"] = {k.removeprefix("layers_"): v for k, v in params["model"].items() if k.startswith("layers_")}
  return {**params, "model": trunk}


def nnx_steps(linen_model, base, x, y, tx, linen_lora):
  """(bound step + args, functional LoRA step + state + fixed, nnx.jit LoRA thunk, base logits diff).

  The NNX LoRA models hold the linen step's adapters (`from_params`), so both start from the same numbers.
  """
  twin = nnx_twin(linen_model, base)
  graphdef, state = nnx.split(twin)
  logits_diff = float(jnp.max(jnp.abs(twin(x) - linen_model.apply({"params": base}, x))))

  def bound(state, zero):
    return jax.grad(lambda d: run.xent(nnx.merge(graphdef, state)(x, d), y))(zero)

  zero = jnp.zeros(x.shape + (linen_model.config.hidden_size,))
  config = linen_lora.config
  copied = lambda: jax.tree.map(jnp.copy, _nnx_paths(linen_lora.params))  # noqa: E731  (the linen step donates its own)
  lora = lnnx.from_params(twin, copied(), config)
  lgraph, trainable, rest = lnnx.split(lora)

  def step(t, s, rest):  # the frozen rest is an argument, never donated
    g = jax.grad(lambda t: run.xent(nnx.merge(lgraph, t, rest)(x), y))(t)
    u, s = tx.update(g, s, t)
    return optax.apply_updates(t, u), s

  stateful = lnnx.from_params(twin, copied(), config)
  opt = lnnx.optimizer(stateful, tx)

  @nnx.jit
  def nnx_step(model, opt):
    grads = nnx.grad(lambda m: run.xent(m(x), y), argnums=nnx.DiffState(0, lnnx.Trainable))(model)
    opt.update(model, grads)

  return ((jax.jit(bound), (state, zero)),
          (jax.jit(step, donate_argnums=(0, 1)), (trainable, tx.init(trainable)), (rest,)),
          lambda: (nnx_step(stateful, opt), opt.step[...])[1],
          logits_diff)


def bench_size(size: str, repeats: int) -> dict:
  model, base, x, y = run.build(size)
  steps = run.Steps(model, base, x, y)
  bound_step, bound_args = steps.bound()
  linen = steps.lora(run.ALL_LINEAR)
  (nb_step, nb_args), (n_step, n_state, n_fixed), stateful, diff = nnx_steps(model, base, x, y, steps.tx, linen)
  timed = {
      "train/linen_frozen_base_bound": lambda: bound_step(*bound_args),
      "train/linen_lora_all_linear": run._looped(linen.step, linen.state, linen.fixed),
      "train/nnx_frozen_base_bound": lambda: nb_step(*nb_args),
      "train/nnx_lora_all_linear": run._looped(n_step, n_state, n_fixed),
      "train/nnx_lora_all_linear_nnx_jit": stateful,
  }
  timings = measure_side_by_side(timed, repeats=repeats)
  for name, t in timings.items():
    print(f"  {size:10s} {name:36s} median {t.median_ms:9.1f} ms  min {t.min_ms:9.1f} ms  ({t.disturbed} calls redone)",
          flush=True)
  ratio = lambda a, b: paired_ratio(timings, a, b)  # noqa: E731
  return {
      "shape": {**run.SIZES[size], "r": 8}, "tokens": int(x.size),
      "check/max_abs_logits_diff_nnx_vs_linen_base": diff,
      "ms": {n: t.median_ms for n, t in timings.items()}, "min_ms": {n: t.min_ms for n, t in timings.items()},
      "disturbed_calls": {n: t.disturbed for n, t in timings.items()},
      "ratio/nnx_lora_to_linen_lora": ratio("train/nnx_lora_all_linear", "train/linen_lora_all_linear"),
      "ratio/nnx_lora_to_nnx_bound": ratio("train/nnx_lora_all_linear", "train/nnx_frozen_base_bound"),
      "ratio/linen_lora_to_linen_bound": ratio("train/linen_lora_all_linear", "train/linen_frozen_base_bound"),
      "ratio/nnx_bound_to_linen_bound": ratio("train/nnx_frozen_base_bound", "train/linen_frozen_base_bound"),
      "ratio/nnx_jit_lora_to_linen_lora": ratio("train/nnx_lora_all_linear_nnx_jit", "train/linen_lora_all_linear"),
  }


def markdown(report: dict) -> str:
  rows = ["| size | NNX LoRA / linen LoRA | NNX LoRA / NNX bound | linen LoRA / linen bound | NNX bound / linen bound "
          "| nnx.jit LoRA / linen LoRA |", "|---|---|---|---|---|---|"]
  for size, r in report["sizes"].items():
    rows.append(f"| {size} (d={r['shape']['hidden_size']}, L={r['shape']['num_hidden_layers']}) "
                f"| {r['ratio/nnx_lora_to_linen_lora']:.3f} | {r['ratio/nnx_lora_to_nnx_bound']:.3f} "
                f"| {r['ratio/linen_lora_to_linen_bound']:.3f} | {r['ratio/nnx_bound_to_linen_bound']:.3f} "
                f"| {r['ratio/nnx_jit_lora_to_linen_lora']:.3f} |")
  return "\n".join(rows)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="small,medium", help="comma-separated, from " + ",".join(run.SIZES))
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--out", default="benchmarks/results/nnx_cpu.json")
  args = parser.parse_args()
  report = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
            "jax": jax.__version__, "sizes": {}}
  for size in args.sizes.split(","):
    report["sizes"][size] = bench_size(size, args.repeats)
  report["markdown"] = markdown(report)
  print(report["markdown"])
  write_report(report, args.out)


if __name__ == "__main__":
  main()
