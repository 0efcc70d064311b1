"""One adapter protocol: every front-end × variant × quantized base × single/bank either works or is refused.

Works means: the factored forward equals the merged model's output (to a tolerance scaled by the output's
magnitude), the gradients wrt the adapters equal those through the merged weights (DoRA's norm a constant), every
adapter leaf gets a gradient, the frozen base gets none (it is not an argument of the gradient), and the new paths
keep the structure of the fast step (rank-r dots 2-D; the backward adds no kernel-sized dot). Refused means one
rule in one place raises with a message; `RULES` below states which rule each refused combination meets.

A front-end is an entry of `FRONTENDS`: a function `(variant, quant) -> Case`. The NNX front-end adds its entry
with `FRONTENDS["nnx"] = ...` (same `Case` contract) from its own test module, or here.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from tests.test_structure import _dots

D_IN, D_HID, D_OUT, R = 12, 20, 6, 3  # distinctive sizes: a dot with an operand dim of R is on the LoRA path
VARIANTS = ("lora", "dora")
QUANTS = (None, "nf4", "int8")


@dataclasses.dataclass
class Case:
  """One front-end's model with adapters, as pure functions of the trainable half.

  Attributes:
    trainable: the adapter leaves (a pytree; what is differentiated).
    factored: `factored(trainable) -> y`, the front-end's own (factored) forward on a fixed batch.
    merged: `merged(trainable) -> y`, the merged model's output (the adapters folded into the weights).
    base: the base model's output.
  """

  trainable: Any
  factored: Callable[[Any], jax.Array]
  merged: Callable[[Any], jax.Array]
  base: jax.Array


def _config(variant: str, **kw) -> jlora.LoraConfig:
  kw = {"r": R, "lora_alpha": 5, "target_modules": ["up", "down"], "init_lora_weights": False, **kw}
  return jlora.LoraConfig(use_dora=variant == "dora", **kw)


def _x(n: int = 4) -> jax.Array:
  return jax.random.normal(jax.random.key(42), (n, D_IN))


def _moved(trainable: Any) -> Any:
  """Adapters as if trained: every leaf moved away from its init (DoRA's magnitude too)."""
  leaves, treedef = jax.tree.flatten(trainable)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  return treedef.unflatten([x + 0.3 * jax.random.normal(k, x.shape) * (jnp.std(x) + 0.1) for x, k in
                            zip(leaves, keys)])


# ------------------------------------------------------------------ front-ends
class Mlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(D_OUT, name="down")(jax.nn.gelu(nn.Dense(D_HID, name="up")(x)))


def _linen(variant: str, quant: str | None) -> Case:
  model, x = Mlp(), _x()
  base = model.init(jax.random.key(0), x)["params"]
  base = jlora.quantize(base, quant, block_size=4) if quant else base
  cfg = _config(variant)
  trainable, frozen = jlora.split(jlora.init(jax.random.key(1), model, base, cfg, x), cfg)
  return Case(_moved(trainable), lambda t: jlora.apply(model, jlora.combine(t, frozen), cfg, x),
              lambda t: model.apply({"params": jlora.merge(jlora.combine(t, frozen), cfg)}, x),
              model.apply({"params": frozen}, x))


def _equinox(variant: str, quant: str | None) -> Case:
  eqx = pytest.importorskip("equinox")
  import jlora.equinox as leqx

  class EMlp(eqx.Module):
    up: eqx.nn.Linear
    down: eqx.nn.Linear

    def __call__(self, x):
      return self.down(jax.nn.gelu(self.up(x)))

  k1, k2 = jax.random.split(jax.random.key(0))
  model = EMlp(eqx.nn.Linear(D_IN, D_HID, key=k1), eqx.nn.Linear(D_HID, D_OUT, key=k2))
  if quant:
    model = jlora.quantize(model, quant, block_size=4, select=lambda path, leaf: path[-1] == "weight")
  x = _x()
  lora = leqx.init(jax.random.key(1), model, _config(variant))
  mask = leqx.trainable_mask(lora)
  trainable, frozen = eqx.partition(lora, mask)
  run = lambda m: jax.vmap(m)(x)  # noqa: E731
  return Case(_moved(trainable), lambda t: run(eqx.combine(t, frozen)),
              lambda t: run(leqx.merge(eqx.combine(t, frozen))), run(model))


def _haiku(variant: str, quant: str | None) -> Case:
  hk = pytest.importorskip("haiku")
  import jlora.haiku as lhk

  f = hk.without_apply_rng(hk.transform(
      lambda x: hk.Linear(D_OUT, name="down")(jax.nn.gelu(hk.Linear(D_HID, name="up")(x)))))
  x = _x()
  base = f.init(jax.random.key(0), x)
  base = jlora.quantize(base, quant, block_size=4, select=lambda path, leaf: path[-1] == "w") if quant else base
  cfg = _config(variant)
  trainable, frozen = jlora.split(jlora.init_tree(jax.random.key(1), base, cfg), cfg)
  return Case(_moved(trainable), lambda t: lhk.apply(f.apply, jlora.combine(t, frozen), cfg, x),
              lambda t: f.apply(jlora.merge(jlora.combine(t, frozen), cfg), x), f.apply(frozen, x))


def _tree(variant: str, quant: str | None) -> Case:
  """A plain function of a param tree: `init_tree` + `apply_merged` (its only forward materializes the merge)."""

  def fn(p, x):
    return jax.nn.gelu(x @ jnp.asarray(p["up"]["kernel"])) @ jnp.asarray(p["down"]["kernel"])

  k1, k2 = jax.random.split(jax.random.key(0))
  base = {"up": {"kernel": jax.random.normal(k1, (D_IN, D_HID)) / 4},
          "down": {"kernel": jax.random.normal(k2, (D_HID, D_OUT)) / 4}}
  base = jlora.quantize(base, quant, block_size=4) if quant else base
  x, cfg = _x(), _config(variant)
  trainable, frozen = jlora.split(jlora.init_tree(jax.random.key(1), base, cfg), cfg)
  return Case(_moved(trainable), lambda t: jlora.apply_merged(fn, jlora.combine(t, frozen), cfg, x),
              lambda t: fn(jlora.merge(jlora.combine(t, frozen), cfg), x), fn(frozen, x))


def _nnx(variant: str, quant: str | None) -> Case:
  """NNX module surgery: `jlora.nnx.init` (over `jlora.nnx.quantize` for QLoRA); the trainable half as a pure dict."""
  from flax import nnx

  import jlora.nnx as lnnx

  class NMlp(nnx.Module):
    def __init__(self, rngs):
      self.up = nnx.Linear(D_IN, D_HID, rngs=rngs)
      self.down = nnx.Linear(D_HID, D_OUT, rngs=rngs)

    def __call__(self, x):
      return self.down(jax.nn.gelu(self.up(x)))

  model, x = NMlp(nnx.Rngs(0)), _x()
  model = lnnx.quantize(model, quant, block_size=4) if quant else model
  graphdef, trainable, rest = lnnx.split(lnnx.init(jax.random.key(1), model, _config(variant)))

  def lora(t):
    state = jax.tree.map(lambda v: v, trainable)  # a fresh State: the pure dict `t` goes into a copy
    nnx.replace_by_pure_dict(state, t)
    return nnx.merge(graphdef, state, rest)

  return Case(_moved(nnx.to_pure_dict(trainable)), lambda t: lora(t)(x), lambda t: lnnx.merge(lora(t))(x), model(x))


# The front-ends, each a `(variant, quant) -> Case` function.
FRONTENDS: dict[str, Callable[[str, str | None], Case]] = {
    "linen": _linen, "equinox": _equinox, "haiku": _haiku, "tree": _tree, "nnx": _nnx,
}
# Front-ends whose forward is factored (the plain tree's `apply_merged` materializes W0 + s·A·B by design).
FACTORED = {"linen", "equinox", "haiku", "nnx"}


def _close(got, want, rel=2e-5):
  np.testing.assert_allclose(got, want, rtol=rel, atol=rel * max(1.0, float(jnp.abs(want).max())))


# ------------------------------------------------------------------ single adapters
@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("frontend", list(FRONTENDS))
def test_single_adapter_equals_the_merged_model_and_gradients_reach_only_adapters(frontend, variant, quant):
  case = FRONTENDS[frontend](variant, quant)
  out = jax.jit(case.factored)(case.trainable)
  want = case.merged(case.trainable)
  _close(out, want)
  assert not np.allclose(out, case.base, atol=1e-3)  # the adapter acts
  probe = jax.random.normal(jax.random.key(9), out.shape)
  factored = jax.grad(lambda t: jnp.sum(case.factored(t) * probe))(case.trainable)
  merged = jax.grad(lambda t: jnp.sum(case.merged(t) * probe))(case.trainable)
  grads = jax.tree.leaves(factored)
  assert grads and len(grads) == len(jax.tree.leaves(case.trainable))  # only adapter leaves are differentiated
  roles = {str(getattr(p[-1], "key", getattr(p[-1], "name", p[-1])))
           for p, _ in jax.tree_util.tree_flatten_with_path(case.trainable)[0]}
  assert ("lora_magnitude" in roles) == (variant == "dora")
  for g, w in zip(grads, jax.tree.leaves(merged)):
    assert float(jnp.abs(g).max()) > 0
    _close(g, w, rel=1e-4)


# ------------------------------------------------------------------ structure of the new paths


def _kernel_sized(eqns) -> int:
  sizes = {(D_IN, D_HID), (D_HID, D_IN), (D_HID, D_OUT), (D_OUT, D_HID)}
  return sum(tuple(e.outvars[0].aval.shape) in sizes for e in eqns)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("frontend", sorted(FACTORED & set(FRONTENDS)))
def test_rank_r_dots_are_2d_and_the_backward_adds_no_kernel_sized_dot(frontend, variant):
  case = FRONTENDS[frontend](variant, None)
  forward = list(_dots(jax.make_jaxpr(case.factored)(case.trainable).jaxpr))
  step = list(_dots(jax.make_jaxpr(jax.grad(lambda t: jnp.sum(case.factored(t) ** 2)))(case.trainable).jaxpr))
  lora = [e for e in step if any(R in v.aval.shape for v in e.invars)]
  assert lora, "no rank-r dot: the LoRA path is not factored"
  for eqn in lora:
    assert all(v.aval.ndim <= 2 for v in eqn.invars), str(eqn)
  # DoRA forms W0 + s·A·B for its (constant) norm in the forward, once per layer; the backward adds none
  assert _kernel_sized(forward) == (2 if variant == "dora" else 0)
  assert _kernel_sized(step) == _kernel_sized(forward), "\n".join(map(str, step))


# ------------------------------------------------------------------ banks (mixed batches)
def _bank_case(variants: tuple[str, ...], quant: str | None):
  model, x = Mlp(), _x(5)
  base = model.init(jax.random.key(0), x)["params"]
  base = jlora.quantize(base, quant, block_size=4) if quant else base
  adapters = jlora.AdapterSet()
  for k, variant in enumerate(variants):
    cfg = _config(variant, lora_alpha=3 + k, target_modules=["up", "down"] if k % 2 == 0 else ["down"])
    trainable, _ = jlora.split(jlora.init(jax.random.key(k + 1), model, base, cfg, x), cfg)
    adapters = adapters.add(f"a{k}", _moved(trainable), cfg)
  return model, x, base, adapters


@pytest.mark.parametrize("quant", [None, "nf4"])
@pytest.mark.parametrize("variants", [("dora", "dora"), ("lora", "dora"), ("dora", "lora", "dora")])
def test_bank_each_example_equals_its_adapter_alone_and_gradients_too(variants, quant):
  model, x, base, adapters = _bank_case(variants, quant)
  bank = jlora.stack_adapters(adapters, base)
  ids = jnp.asarray([0, 1, -1, len(variants) - 1, 0], jnp.int32)  # -1: the base model
  run = jax.jit(lambda b, f, i: jlora.apply(model, f, b, x, adapter_ids=i))
  out = run(bank, base, ids)
  alone = {k: jlora.apply(model, adapters.params(n, base), adapters.config(n), x) for k, n in enumerate(bank.names)}
  for i, k in enumerate(np.asarray(ids)):
    want = model.apply({"params": base}, x)[i] if k < 0 else alone[int(k)][i]
    _close(out[i], want)
  # one id for the whole batch is the single-adapter path, magnitude and norm from that adapter
  _close(run(bank, base, jnp.int32(1)), alone[1])
  # gradients: each adapter's slice of the bank's gradient is the gradient of that adapter alone on its examples
  probe = jax.random.normal(jax.random.key(3), out.shape)
  grads = jax.grad(lambda b: jnp.sum(jlora.apply(model, base, b, x, adapter_ids=ids) * probe))(bank).unstack()
  for k, name in enumerate(bank.names):
    rows = (np.asarray(ids) == k).astype(np.float32)[:, None]

    def alone_loss(t, name=name, rows=rows):
      return jnp.sum(jlora.apply(model, jlora.combine(t, base), adapters.config(name), x) * probe * rows)

    own = jax.grad(alone_loss)(adapters[name])
    jax.tree.map(lambda g, w: _close(g, w, rel=1e-4), grads[name], own)
    assert ("lora_magnitude" in grads[name]["down"]) == (variants[k] == "dora")
  # the bank unstacks to the very adapters it was stacked from
  back = bank.unstack()
  jax.tree.map(np.testing.assert_array_equal, back["a0"], adapters["a0"])


def test_banks_are_refused_for_non_linen_front_ends_by_one_rule():
  """Banks run through `jlora.apply(..., adapter_ids=)`, which takes linen modules: for Equinox, Haiku, NNX and
  plain functions (`FRONTENDS` other than linen) `check_model` refuses and says which door to use."""
  _, x, base, adapters = _bank_case(("lora",), None)
  bank = jlora.stack_adapters(adapters, base)
  with pytest.raises(TypeError, match=r"`model` must be a flax.linen Module"):
    jlora.apply(lambda p, x: x, base, bank, x, adapter_ids=jnp.int32(0))


# ------------------------------------------------------------------ the refusals
RULES = {
    "weighted DoRA": "jlora.add_weighted_adapter: a DoRA magnitude has no weighted combination (adapters/weighted.py)",
    "svd rank": "jlora.add_weighted_adapter: svd_rank <= a layer's min(fan_in, fan_out), as jlora.init; capped per "
                "layer, refused above every layer's (adapters/weighted.py)",
    "unselected leaf": "AdapterSet.add: every adapter is selected by its config, jlora.apply's rule (adapter_set.py)",
}


def test_weighted_combination_of_dora_adapters_is_refused_in_one_place():
  adapters = _bank_case(("dora", "lora"), None)[3]
  with pytest.raises(ValueError, match=r"add_weighted_adapter: adapters\[0\] has use_dora=True\. .*no well-defined "
                                       r"magnitude"):
    jlora.add_weighted_adapter(adapters.pairs(), [0.5, 0.5], "cat")
  lora_only = adapters.pairs(["a1"])
  tree, cfg = jlora.add_weighted_adapter(lora_only, [2.0], "cat")
  assert not cfg.use_dora and "lora_magnitude" not in tree["down"]


def test_svd_rank_beyond_the_layer_is_refused_like_init():
  """Before: svd_rank=100000 on a 32×96 layer built a (32, 100000) A of zero columns; `init` refuses such r."""
  model = nn.Dense(96)
  x = jnp.ones((2, 32))
  base = model.init(jax.random.key(0), x)["params"]
  cfg = jlora.LoraConfig(r=4, target_modules=".*", init_lora_weights=False)
  trainable, _ = jlora.split(jlora.init(jax.random.key(1), model, base, cfg, x), cfg)
  with pytest.raises(ValueError, match=r"`svd_rank`=100000 is larger than the dimensions of every adapted layer "
                                       r"\(the widest, '', allows min\(fan_in, fan_out\) = 32\).*svd_rank <= 32"):
    jlora.add_weighted_adapter([(trainable, cfg)], [1.0], "svd", svd_rank=100000)
  tree, out = jlora.add_weighted_adapter([(trainable, cfg)], [1.0], "svd", svd_rank=32)
  assert tree["lora_a"].shape == (32, 32) and out.r == 32
  with pytest.raises(ValueError, match=r"`r`=33 is larger than the dimensions"):
    jlora.init(jax.random.key(1), model, base, jlora.LoraConfig(r=33, target_modules=".*"), x)


def test_adapter_set_refuses_leaves_its_config_does_not_select():
  """Before: `add` kept them; `jlora.apply` then refused the adapter while a bank silently ran it."""
  model, x = Mlp(), _x()
  base = model.init(jax.random.key(0), x)["params"]
  wide = _config("lora", target_modules=["up", "down"])
  params = jlora.init(jax.random.key(1), model, base, wide, x)
  narrow = dataclasses.replace(wide, target_modules=("down",))
  with pytest.raises(ValueError, match=re.escape("Adapter 'n': `params` holds an adapter at 'up' (lora_a / lora_b), "
                                                 "which its config (target_modules=('down',)")):
    jlora.AdapterSet().add("n", params, narrow)
  with pytest.raises(ValueError, match=r"does not select"):
    jlora.apply(model, params, narrow, x)  # the same rule in jlora.apply
  assert jlora.AdapterSet().add("w", params, wide).names == ("w",)
