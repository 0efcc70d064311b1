"""Structural guard of the speed: the factored LoRA step never forms a d_in×d_out weight gradient.

Not a timing test: it reads the optimized HLO of the jitted train step. If a later
change fell back to materializing W0 + s·A·B (or differentiated the frozen
kernels), a dot with a (d_in, d_out) result would appear, as it does for the
materializing path checked alongside.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest

import jlora

D_IN, D_OUT = 48, 80  # distinctive sizes, so a (48, 80) result can only be a kernel-sized product


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(D_OUT, name="up")(x)
    return nn.Dense(D_IN, name="down")(nn.gelu(h))


def _step_hlo(materialize: bool) -> str:
  model, x = Net(), jnp.ones((4, 7, D_IN))
  cfg = jlora.LoraConfig(r=4, target_modules=["up", "down"], init_lora_weights=False)
  params = jlora.init(jax.random.key(0), model, model.init(jax.random.key(1), x)["params"], cfg, x)
  trainable, frozen = jlora.split(params, cfg)
  tx = optax.adam(1e-3)

  def loss(t):
    p = jlora.combine(t, frozen)
    if materialize:
      y = jlora.apply_merged(lambda q, x: model.apply({"params": q}, x), p, cfg, x)
    else:
      y = jlora.apply(model, p, cfg, x)
    return jnp.mean(y**2)

  def step(t, s):
    g = jax.grad(loss)(t)
    u, s = tx.update(g, s, t)
    return optax.apply_updates(t, u), s

  return jax.jit(step).lower(trainable, tx.init(trainable)).compile().as_text()


def _kernel_sized_dots(hlo: str) -> list[str]:
  sizes = rf"(?:{D_IN},{D_OUT}|{D_OUT},{D_IN})"
  return [line for line in hlo.splitlines()
          if re.search(rf"= f32\[{sizes}\]\S* (dot|convolution|custom-call)\(", line)]


@pytest.mark.parametrize("materialize,expect_dots", [(False, False), (True, True)])
def test_no_weight_sized_gradient_in_factored_step(materialize, expect_dots):
  dots = _kernel_sized_dots(_step_hlo(materialize))
  assert bool(dots) == expect_dots, "\n".join(dots)
