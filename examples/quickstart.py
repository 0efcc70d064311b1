"""Fine-tune a small pretrained linen model with LoRA and show what changed.

A tiny transformer (nn.scan over remat'd blocks) is first trained in full on one
task (predict the next token of sequences counting up by 1 mod V); that is the
"pretrained base". LoRA then adapts it to a new task (counting up by 3) with the
settings in configs/quickstart.yaml. The script prints the adapter summary, the
held-out loss and accuracy before and after, that every base leaf is
bit-identical, and that the merged model equals the factored one.

Run: python examples/quickstart.py [--steps N]
"""

from __future__ import annotations

import argparse
import pathlib
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora

VOCAB, SEQ, DIM = 32, 16, 64
CONFIG = pathlib.Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    h = nn.LayerNorm(name="ln1")(x)
    heads = lambda name: nn.DenseGeneral((4, DIM // 4), name=name)  # noqa: E731
    q, k, v = heads("query")(h), heads("key")(h), heads("value")(h)
    mask = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))
    w = jnp.where(mask, jnp.einsum("bqhd,bkhd->bhqk", q, k) / (DIM // 4) ** 0.5, -1e9)
    x = x + nn.DenseGeneral(DIM, axis=(-2, -1), name="out")(jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(w), v))
    h = nn.gelu(nn.Dense(4 * DIM, name="up")(nn.LayerNorm(name="ln2")(x)))
    return x + nn.Dense(DIM, name="down")(h), None


class TinyLM(nn.Module):
  @nn.compact
  def __call__(self, ids):
    x = nn.Embed(VOCAB, DIM, name="embed")(ids) + self.param("pos", nn.initializers.normal(0.02), (SEQ, DIM))
    stack = nn.scan(nn.remat(Block), variable_axes={"params": 0}, split_rngs={"params": True, "lora_dropout": True},
                    length=2)
    x, _ = stack(name="layers")(x, None)
    return nn.Dense(VOCAB, name="lm_head")(nn.LayerNorm(name="ln_f")(x))


def batch(key, stride, size=32):
  start = jax.random.randint(key, (size, 1), 0, VOCAB)
  seq = (start + stride * jnp.arange(SEQ + 1)) % VOCAB
  return seq[:, :-1], seq[:, 1:]


def metrics(logits, targets):
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
  return loss, (logits.argmax(-1) == targets).mean()


def main(steps: int = 150) -> dict:
  model = TinyLM()
  key = jax.random.key(0)
  ids, _ = batch(key, 1)
  base = jax.jit(model.init)(key, ids)["params"]  # jitted: one compile instead of one per op

  # 1. "Pretrain" the base on the stride-1 task (full fine-tuning).
  tx = optax.adam(3e-3)

  @jax.jit
  def full_step(p, s, k):
    x, y = batch(k, 1)
    loss, g = jax.value_and_grad(lambda p: metrics(model.apply({"params": p}, x), y)[0])(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  state = tx.init(base)
  for i in range(150):
    base, state, _ = full_step(base, state, jax.random.fold_in(key, i))

  # 2. LoRA-adapt it to the stride-3 task.
  config = jlora.LoraConfig.from_yaml(CONFIG)
  params = jlora.init(jax.random.key(1), model, base, config, ids)
  print(jlora.summary(params, config), "\n")
  trainable, frozen = jlora.split(params, config)
  tx = optax.adamw(1e-2)
  opt_state = tx.init(trainable)

  # `frozen` is an argument of every jitted function: closed over, it would be compiled in as constants.
  @jax.jit
  def lora_step(t, frozen, s, k):
    x, y = batch(k, 3)
    def loss_fn(t):
      logits = jlora.apply(model, jlora.combine(t, frozen), config, x, rngs={"lora_dropout": jax.random.fold_in(k, 1)})
      return metrics(logits, y)[0]
    loss, g = jax.value_and_grad(loss_fn)(t)
    u, s = tx.update(g, s, t)
    return optax.apply_updates(t, u), s, loss

  held_out = batch(jax.random.key(123), 3, size=256)
  apply_fn = jlora.apply_fn(model, config)  # model.apply's signature: {"params": ...} in, logits out
  evaluate = jax.jit(lambda t, frozen, x, y: metrics(apply_fn({"params": jlora.combine(t, frozen)}, x), y))
  loss0, acc0 = evaluate(trainable, frozen, *held_out)
  t0 = time.perf_counter()
  for i in range(steps):
    trainable, opt_state, _ = lora_step(trainable, frozen, opt_state, jax.random.fold_in(key, 10_000 + i))
  jax.block_until_ready(trainable)
  seconds = time.perf_counter() - t0
  loss1, acc1 = evaluate(trainable, frozen, *held_out)

  # 3. What changed, and what did not.
  params = jlora.combine(trainable, frozen)
  base_same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(frozen)))
  merged = jlora.merge(params, config)
  y_factored = jax.jit(apply_fn)({"params": params}, held_out[0])
  y_merged = jax.jit(model.apply)({"params": merged}, held_out[0])
  diff = float(jnp.max(jnp.abs(y_factored - y_merged)))
  print(f"held-out (stride-3 task)  loss {float(loss0):.3f} -> {float(loss1):.3f}   "
        f"next-token accuracy {float(acc0):.1%} -> {float(acc1):.1%}   ({steps} LoRA steps, {seconds:.1f}s)")
  print(f"base leaves bit-identical after training: {base_same}")
  print(f"merged vs factored logits, max |diff|: {diff:.2e}")
  return {"loss_before": float(loss0), "loss_after": float(loss1), "acc_before": float(acc0),
          "acc_after": float(acc1), "base_identical": base_same, "merge_diff": diff}


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=150, help="LoRA training steps")
  main(parser.parse_args().steps)
