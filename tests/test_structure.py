"""Structural guards of the speed of the factored LoRA step (not timing tests).

1. It never forms a d_in×d_out weight gradient: the optimized HLO of the jitted
   train step is read. If a later change fell back to materializing W0 + s·A·B
   (or differentiated the frozen kernels), a dot with a (d_in, d_out) result would
   appear, as it does for the materializing path checked alongside.
2. Its rank-r matmuls are 2-D: on 3-D activations XLA's CPU dots with an r-wide
   operand (and their transposes in the backward pass) made the all-linear step
   1.45x the frozen-base bound instead of 1.13x (docs/performance.md).
"""

import re

import flax.linen as nn
import jax
import jax.extend as jex
import jax.numpy as jnp
import optax
import pytest

import jlora

D_IN, D_OUT = 48, 80  # distinctive sizes, so a (48, 80) result can only be a kernel-sized product
R = 5  # distinctive too: a dot with an operand dim of 5 is on the LoRA path


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(D_OUT, name="up")(x)
    return nn.Dense(D_IN, name="down")(nn.gelu(h))


class OwnDense(nn.Module):
  """A layer class of a user's own (weight `w`), described to jlora: the same factored path as nn.Dense."""

  features: int

  @nn.compact
  def __call__(self, x):
    return x @ self.param("w", nn.initializers.lecun_normal(), (x.shape[-1], self.features))


jlora.register_layer(OwnDense, jlora.Layer(weight="w", input="x"))


class OwnNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    return OwnDense(D_IN, name="down")(nn.gelu(OwnDense(D_OUT, name="up")(x)))


NETS = {"linen": Net, "described": OwnNet}


def _step(materialize: bool, net: str = "linen"):
  model, x = NETS[net](), jnp.ones((4, 7, D_IN))
  cfg = jlora.LoraConfig(r=R, target_modules=["up", "down"], init_lora_weights=False)
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

  return step, (trainable, tx.init(trainable))


def _step_hlo(materialize: bool, net: str = "linen") -> str:
  step, args = _step(materialize, net)
  return jax.jit(step).lower(*args).compile().as_text()


def _kernel_sized_dots(hlo: str) -> list[str]:
  sizes = rf"(?:{D_IN},{D_OUT}|{D_OUT},{D_IN})"
  return [line for line in hlo.splitlines()
          if re.search(rf"= f32\[{sizes}\]\S* (dot|convolution|custom-call)\(", line)]


@pytest.mark.parametrize("materialize,expect_dots,net", [(False, False, "linen"), (True, True, "linen"),
                                                        (False, False, "described")])
def test_no_weight_sized_gradient_in_factored_step(materialize, expect_dots, net):
  dots = _kernel_sized_dots(_step_hlo(materialize, net))
  assert bool(dots) == expect_dots, "\n".join(dots)


def _dots(jaxpr):
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      yield eqn
    for sub in jex.core.jaxprs_in_params(eqn.params):
      yield from _dots(sub)


@pytest.mark.parametrize("net", list(NETS))
def _dot_shapes(jaxpr):
  """Output shapes of every dot_general in a jaxpr and the jaxprs nested in its equations."""
  return [tuple(e.outvars[0].aval.shape) for e in _dots(jaxpr)]


@pytest.mark.parametrize("net", list(NETS))
def test_rank_r_matmuls_are_2d(net):
  step, args = _step(materialize=False, net=net)
  lora = [e for e in _dots(jax.make_jaxpr(step)(*args).jaxpr) if any(R in v.aval.shape for v in e.invars)]
  # per adapted layer: x·A and u·B forward; gB, gu, gA and dx backward (no dx for the first layer: x is data)
  assert len(lora) == 11, "\n".join(map(str, lora))
  for eqn in lora:
    assert all(v.aval.ndim == 2 for v in eqn.invars), str(eqn)
