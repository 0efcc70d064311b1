"""jlora.nnx: LoRA on Flax NNX models by module surgery, against the linen path, flax's LoRALinear and itself."""

import math
import pathlib
import re
import subprocess
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jlora
from jlora import nnx as lnnx
from jlora.quant.array import QuantizedArray
from tests.test_structure import D_IN, D_OUT, R, _dots, _kernel_sized_dots

ROOT = pathlib.Path(__file__).resolve().parent.parent
KEY = jax.random.key(1)


def _x(*shape, key=42):
  return jax.random.normal(jax.random.key(key), (math.prod(shape),)).reshape(shape)  # flat: see `_normal`


IDS = jax.random.randint(jax.random.key(7), (2, 6), 0, 30)


def _normal(key, shape, dtype=jnp.float32):
  """N(0, 0.3²) drawn flat: XLA on CPU takes seconds to compile multi-axis draws, one per kernel shape."""
  return (0.3 * jax.random.normal(key, (math.prod(shape),), jnp.float32)).reshape(shape).astype(dtype)


K = {"kernel_init": _normal}


# ----------------------------------------------------------------------------- models
class MLP(nnx.Module):
  def __init__(self, rngs, d=16, dtype=jnp.float32):
    self.layers = nnx.List([nnx.Linear(d, 32, param_dtype=dtype, dtype=dtype, **K, rngs=rngs),
                            nnx.Linear(32, 32, param_dtype=dtype, dtype=dtype, **K, rngs=rngs)])
    self.head = nnx.Linear(32, 8, param_dtype=dtype, dtype=dtype, **K, rngs=rngs)

  def __call__(self, x):
    for layer in self.layers:
      x = nnx.gelu(layer(x))
    return self.head(x)


class Block(nnx.Module):
  def __init__(self, rngs, d=16):
    self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=d, qkv_features=16, decode=False, **K, rngs=rngs)
    self.up = nnx.Linear(d, 32, **K, rngs=rngs)
    self.down = nnx.Linear(32, d, **K, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(x)
    return x + self.down(nnx.gelu(self.up(x)))


class Transformer(nnx.Module):
  """Embedding, a list of blocks, and an output projection not named like a head (`proj`)."""

  def __init__(self, rngs, layers=2):
    self.embed = nnx.Embed(30, 16, embedding_init=_normal, rngs=rngs)
    self.layers = nnx.List([Block(rngs) for _ in range(layers)])
    self.proj = nnx.Linear(16, 30, **K, rngs=rngs)

  def __call__(self, ids):
    x = self.embed(ids)
    for layer in self.layers:
      x = layer(x)
    return self.proj(x)


class EinsumNet(nnx.Module):
  """Gemma-style einsums: a fused kernel with interleaved axes, and a per-head kernel whose equation the call gives."""

  def __init__(self, rngs):
    self.qkv = nnx.Einsum("btd,snhd->sbtnh", (3, 2, 4, 16), **K, rngs=rngs)
    self.out = nnx.Einsum("btnh,nhd->btd", (2, 4, 16), **K, rngs=rngs)

  def __call__(self, x):
    return self.out(self.qkv(x).sum(0), "btnh,nhd->btnd").sum(2)  # the call's equation keeps n: per-head kernels


class ConvNet(nnx.Module):
  def __init__(self, rngs):
    self.conv1 = nnx.Conv(4, 4, (3, 3), strides=2, padding="SAME", **K, rngs=rngs)
    self.conv2 = nnx.Conv(4, 6, (3, 3), padding="CIRCULAR", kernel_dilation=2, **K, rngs=rngs)
    self.head = nnx.Linear(6, 3, **K, rngs=rngs)

  def __call__(self, x):
    return self.head(self.conv2(nnx.relu(self.conv1(x))).mean((1, 2)))


class EmbedLM(nnx.Module):
  """Embedding with a tied output head (`attend`)."""

  def __init__(self, rngs):
    self.embed = nnx.Embed(30, 16, embedding_init=_normal, rngs=rngs)
    self.mix = nnx.Linear(16, 16, **K, rngs=rngs)

  def __call__(self, ids):
    return self.embed.attend(nnx.tanh(self.mix(self.embed(ids))))


L = 3


class ScanBlock(nnx.Module):
  def __init__(self, rngs):  # square layers: one adapter shape to draw (XLA compiles each draw shape on CPU)
    self.up = nnx.Linear(16, 16, **K, rngs=rngs)
    self.down = nnx.Linear(16, 16, **K, rngs=rngs)

  def __call__(self, x):
    return x + self.down(nnx.gelu(self.up(x)))


class ScanStack(nnx.Module):
  """Layers made by `nnx.vmap` (params stacked on axis 0), run by `nnx.scan` over `nnx.remat`."""

  def __init__(self, rngs):
    @nnx.split_rngs(splits=L)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
      return ScanBlock(rngs)

    self.layers = create(rngs)
    self.head = nnx.Linear(16, 4, **K, rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    @nnx.remat
    def run(x, block):
      return block(x)

    return self.head(run(x, self.layers))


class LoopStack(nnx.Module):
  """The same stack as an nnx.List of layers."""

  def __init__(self, rngs):
    self.layers = nnx.List([ScanBlock(rngs) for _ in range(L)])
    self.head = nnx.Linear(16, 4, **K, rngs=rngs)

  def __call__(self, x):
    for layer in self.layers:
      x = layer(x)
    return self.head(x)


CASES = {  # name: (constructor, inputs, targets, adapted paths)
    "linear": (MLP, _x(4, 16), r"layers\.\d+|head", {"layers/0", "layers/1", "head"}),
    "attention": (Transformer, IDS, ("query", "value", "out"),
                  {f"layers/{i}/attn/{n}" for i in range(2) for n in ("query", "value", "out")}),
    "einsum": (EinsumNet, _x(2, 5, 16), ("qkv", "out"), {"qkv", "out"}),
    "conv": (ConvNet, _x(2, 12, 12, 4), ("conv1", "conv2"), {"conv1", "conv2"}),
    "embed": (EmbedLM, IDS, ("embed", "mix"), {"embed", "mix"}),
    "scan": (ScanStack, _x(2, 5, 16), "all-linear", {"layers/up", "layers/down"}),
}


def _build(name, **cfg):
  make, x, targets, _ = CASES[name]
  base = make(nnx.Rngs(0))
  cfg.setdefault("r", 4)
  cfg.setdefault("lora_alpha", 8)
  cfg.setdefault("target_modules", targets)
  return base, x, jlora.LoraConfig(**cfg)


def _call(jit):
  return nnx.jit(lambda m, x: m(x)) if jit else (lambda m, x: m(x))


def _adapted_paths(model):
  return {"/".join(map(str, p)) for p, m in nnx.iter_modules(model) if type(m).__name__.startswith("Lora")}


def _rel_err(a, b):
  return float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-12))


def _leaves_equal(a, b):
  return jax.tree.structure(a) == jax.tree.structure(b) and all(
      bool(jnp.array_equal(u, v)) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ---------------------------------------------------------------------- every layer kind
@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("name", list(CASES))
def test_identity_at_init_factored_equals_merged(name, jit):
  base, x, cfg = _build(name)
  y_base = base(x)
  lora = lnnx.init(KEY, base, cfg, x)
  assert _adapted_paths(lora) == CASES[name][3]
  frozen = {tuple(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(lora, lnnx.Frozen))}
  assert all(frozen[p] is v for p, v in jlora.core.tree.flatten(lnnx.to_params(base)).items()), "shared, not copied"
  np.testing.assert_allclose(_call(jit)(lora, x), y_base, rtol=1e-5, atol=1e-5)

  base, x, cfg = _build(name, init_lora_weights=False)
  lora = lnnx.init(KEY, base, cfg, x)
  y_lora = _call(jit)(lora, x)
  merged = lnnx.merge(lora)
  assert _rel_err(y_lora, y_base) > 1e-3, "a non-zero adapter must change the output"
  assert _rel_err(y_lora, _call(jit)(merged, x)) <= 1e-5
  # The merged model is the base's: same classes, Param types, structure, shapes and dtypes; the base is untouched.
  assert nnx.graphdef(merged) == nnx.graphdef(base)
  chex.assert_trees_all_equal_shapes_and_dtypes(lnnx.to_params(merged), lnnx.to_params(base))
  np.testing.assert_array_equal(base(x), y_base)
  assert not _adapted_paths(base) and not nnx.state(base, lnnx.Trainable)


def test_nnx_state_reads_like_the_linen_tree_and_nothing_is_a_param():
  base, _, cfg = _build("attention")
  lora = lnnx.init(KEY, base, cfg)
  q = lnnx.to_params(lora)["layers"]["0"]["attn"]["query"]
  chex.assert_shape([q["kernel"], q["lora_a"], q["lora_b"]], [(16, 2, 8), (16, 4), (4, 2, 8)])
  assert isinstance(lora.layers[0].attn.query, nnx.LinearGeneral)  # still one, with a LoRA subclass
  assert type(lora.layers[0].attn.query).__name__ == "LoraLinearGeneral"
  assert not nnx.state(lora, nnx.Param), "no nnx.Param is left to train by accident"
  trainable = nnx.to_flat_state(nnx.state(lora, lnnx.Trainable))
  assert {p[-1] for p, _ in trainable} == {"lora_a", "lora_b"} and len(trainable) == 12
  assert not issubclass(lnnx.Trainable, nnx.Param) and not issubclass(lnnx.Frozen, nnx.Param)


# ---------------------------------------------------------------- the same house as linen
class LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=16, **K, name="attn")(x)
    return nn.Dense(4, **K, name="head")(nn.gelu(nn.Dense(32, **K, name="up")(x)))


class NNXNet(nnx.Module):
  def __init__(self, rngs):
    self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=16, qkv_features=16, decode=False, **K, rngs=rngs)
    self.up = nnx.Linear(16, 32, **K, rngs=rngs)
    self.head = nnx.Linear(32, 4, **K, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(x)
    return self.head(nnx.gelu(self.up(x)))


def test_same_weights_as_linen_give_the_same_adapters_outputs_and_gradients():
  x = _x(2, 5, 16)
  linen = LinenNet()
  base = linen.init(jax.random.key(0), x)["params"]
  cfg = jlora.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
  params = jlora.init(KEY, linen, base, cfg, x)
  model = NNXNet(nnx.Rngs(5))
  nnx.update(model, base)  # the linen weights, at the same paths
  lora = lnnx.init(KEY, model, cfg, x)
  assert _leaves_equal(lnnx.to_params(lora), params), "the same draws per module path, the head left alone"
  y_linen = jax.jit(lambda p: jlora.apply(linen, p, cfg, x))(params)
  np.testing.assert_allclose(_call(True)(lora, x), y_linen, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(_call(True)(lnnx.merge(lora), x), jax.jit(linen.apply)({"params": jlora.merge(params, cfg)}, x),
                             atol=1e-5, rtol=1e-5)
  # The linen tree goes in as it is (the PEFT / orbax route), and the gradients agree too.
  again = lnnx.from_params(NNXNet(nnx.Rngs(6)), params, cfg)
  np.testing.assert_allclose(again(x), y_linen, rtol=1e-5, atol=1e-5)
  _assert_grads_equal_linen(lora, linen, cfg, params, x)


def test_matches_flax_lora_linear():
  """flax's nnx.LoRALinear has no alpha (s = 1): jlora with lora_alpha = r computes the same."""
  x = _x(4, 16)
  theirs = nnx.LoRALinear(16, 8, lora_rank=4, rngs=nnx.Rngs(0))
  theirs.lora.lora_b[...] = jax.random.normal(jax.random.key(3), (4, 8))
  cfg = jlora.LoraConfig(r=4, lora_alpha=4, target_modules=".*")
  base = nnx.Linear(16, 8, **K, rngs=nnx.Rngs(9))
  base.kernel[...], base.bias[...] = theirs.kernel[...], theirs.bias[...]
  params = lnnx.to_params(base)
  params.update(lora_a=theirs.lora.lora_a[...], lora_b=theirs.lora.lora_b[...])
  ours = lnnx.from_params(base, params, cfg)
  np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------- training
def _loss(model, x):
  return jnp.mean(model(x) ** 2)


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_optimizer_trains_only_trainable_and_base_stays_bit_identical(bias):
  base, x, cfg = _build("linear", bias=bias, modules_to_save=None, target_modules=r"layers\.\d+")
  lora = lnnx.init(KEY, base, cfg)
  biases = {"none": set(), "all": {"layers/0", "layers/1", "head"}, "lora_only": {"layers/0", "layers/1"}}[bias]
  trained = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(lora, lnnx.Trainable))}
  assert trained == {f"{m}/{leaf}" for m in ("layers/0", "layers/1") for leaf in ("lora_a", "lora_b")} | {
      f"{m}/bias" for m in biases}
  assert {p for p, label in jlora.core.tree.flatten(jlora.labels(lnnx.to_params(lora), cfg)).items()
          if label != "frozen"} == {tuple(p.split("/")) for p in trained}, "the same rule as jlora.labels"
  frozen_before = jax.tree.leaves(nnx.state(lora, lnnx.Frozen))  # the arrays now (Variables are updated in place)
  trainable_before = jax.tree.leaves(nnx.state(lora, lnnx.Trainable))
  opt = lnnx.optimizer(lora, optax.adam(1e-2))

  @nnx.jit
  def step(model, opt, x):
    loss, grads = nnx.value_and_grad(_loss, argnums=nnx.DiffState(0, lnnx.Trainable))(model, x)
    opt.update(model, grads)
    return loss

  losses = [float(step(lora, opt, x)) for _ in range(8)]
  assert losses[-1] < 0.8 * losses[0]
  assert _leaves_equal(jax.tree.leaves(nnx.state(lora, lnnx.Frozen)), frozen_before), "the base is bit-identical"
  after = jax.tree.leaves(nnx.state(lora, lnnx.Trainable))
  assert all(not jnp.array_equal(a, b) for a, b in zip(after, trainable_before, strict=True))


def test_modules_to_save_train_in_full():
  base, _, cfg = _build("linear", target_modules=r"layers\.\d+", modules_to_save=("head",))
  lora = lnnx.init(KEY, base, cfg)
  assert isinstance(lora.head.kernel, lnnx.Trainable) and isinstance(lora.head.bias, lnnx.Trainable)
  assert isinstance(lora.layers[0].kernel, lnnx.Frozen) and isinstance(lora.layers[0].bias, lnnx.Frozen)
  merged = lnnx.merge(lora)
  assert type(merged.head.kernel) is nnx.Param and type(merged.layers[0].kernel) is nnx.Param


def test_functional_split_step_under_jax_jit():
  base, x, cfg = _build("attention", init_lora_weights=False)
  lora = lnnx.init(KEY, base, cfg)
  graphdef, trainable, rest = nnx.split(lora, lnnx.Trainable, ...)
  tx = optax.adam(1e-2)

  @jax.jit
  def step(trainable, opt_state, rest, x):  # the frozen rest is an argument, never closed over
    loss, grads = jax.value_and_grad(lambda t: _loss(nnx.merge(graphdef, t, rest), x))(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  state = (trainable, tx.init(trainable))
  losses = []
  for _ in range(5):
    *state, loss = step(*state, rest, x)
    losses.append(float(loss))
  assert losses[-1] < losses[0]
  nnx.update(lora, state[0])
  np.testing.assert_allclose(lora(x), nnx.merge(graphdef, state[0], rest)(x), rtol=1e-6)
  _, rest_after = nnx.state(lora, lnnx.Trainable, ...)
  assert _leaves_equal(rest_after, rest)


# ------------------------------------------------------------------------ scanned stacks
def test_scan_stack_adapters_are_stacked_train_and_match_a_loop():
  base, x, cfg = _build("scan", init_lora_weights=False)
  lora = lnnx.init(KEY, base, cfg)
  up = lnnx.to_params(lora)["layers"]["up"]
  chex.assert_shape([up["kernel"], up["lora_a"], up["lora_b"]], [(L, 16, 16), (L, 16, 4), (L, 4, 16)])
  assert not np.allclose(up["lora_a"][0], up["lora_a"][1]), "a different draw per layer"
  assert "lora_a" not in lnnx.to_params(lora)["head"], "all-linear leaves the head alone"
  y = nnx.jit(lambda m, x: m(x))(lora, x)
  np.testing.assert_allclose(y, lnnx.merge(lora)(x), rtol=1e-5, atol=1e-5)
  # The same weights as an unrolled nnx.List of layers: paths layers/0/up, ... with the stacks sliced.
  params = lnnx.to_params(lora)
  loop_params = {"head": params["head"],
                 "layers": {str(i): jax.tree.map(lambda a, i=i: a[i], params["layers"]) for i in range(L)}}
  loop = lnnx.from_params(LoopStack(nnx.Rngs(1)), loop_params, cfg)
  np.testing.assert_allclose(loop(x), y, rtol=1e-5, atol=1e-5)
  opt = lnnx.optimizer(lora, optax.sgd(1e-2))
  grads = nnx.jit(nnx.grad(_loss, argnums=nnx.DiffState(0, lnnx.Trainable)))(lora, x)
  opt.update(lora, grads)
  assert not jnp.array_equal(lora.layers.up.lora_b[...], up["lora_b"])
  with pytest.raises(ValueError, match=r"`layers_to_transform` cannot pick layers inside the scanned stack"):
    lnnx.init(KEY, base, jlora.LoraConfig(r=2, target_modules=["up"], layers_to_transform=[0]))


# --------------------------------------------------------------------------- dropout
def _dropout_acts(drop, plain, x):
  """`drop` (LoRA dropout on) draws a new mask per call, equals `plain` in eval mode; returns its gradients."""
  d1, d2 = drop(x), drop(x)
  assert not np.allclose(d1, d2) and not np.allclose(d1, plain(x)), "a new mask per call"
  drop.eval()
  np.testing.assert_allclose(drop(x), plain(x), rtol=1e-6)
  drop.train()
  grads = nnx.jit(nnx.grad(_loss, argnums=nnx.DiffState(0, lnnx.Trainable)))(drop, x)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  return grads


def test_lora_dropout_needs_its_stream_and_eval_turns_it_off():
  base, x, cfg = _build("linear", init_lora_weights=False, lora_dropout=0.5)
  plain = lnnx.init(KEY, base, cfg)
  np.testing.assert_array_equal(plain(x), plain(x))  # no stream: deterministic
  _dropout_acts(lnnx.init(KEY, base, cfg, rngs=nnx.Rngs(lora_dropout=3)), plain, x)
  # Dropout acts on the LoRA input only: with B = 0 it changes nothing.
  base, x, cfg = _build("linear", lora_dropout=0.5)
  np.testing.assert_allclose(lnnx.init(KEY, base, cfg, rngs=nnx.Rngs(lora_dropout=3))(x), base(x), rtol=1e-6)
  # Stacked layers get one key per layer, sliced by nnx.scan.
  base, x, cfg = _build("scan", init_lora_weights=False, lora_dropout=0.3)
  scan = lnnx.init(KEY, base, cfg, rngs=nnx.Rngs(lora_dropout=0))
  assert scan.layers.up.lora_dropout.rngs.key.shape == (L,)
  assert not np.allclose(scan(x), scan(x))


# -------------------------------------------------------------------------- targeting
@pytest.mark.parametrize("targets,layers,pattern,expected", [
    (["query", "value"], None, None, {f"layers/{i}/attn/{n}" for i in range(2) for n in ("query", "value")}),
    (r"layers\.1\.attn\.(query|key)", None, None, {"layers/1/attn/query", "layers/1/attn/key"}),
    (["attn.out", "up"], [1], None, {"layers/1/attn/out", "layers/1/up"}),
    (["down"], [0], ("layers",), {"layers/0/down"}),
    ("all-linear", None, None, {f"layers/{i}/{n}" for i in range(2)
                                for n in ("attn/query", "attn/key", "attn/value", "attn/out", "up", "down")}),
])
def test_targets_match_string_paths(targets, layers, pattern, expected):
  base = Transformer(nnx.Rngs(0))
  cfg = jlora.LoraConfig(r=2, target_modules=targets, layers_to_transform=layers, layers_pattern=pattern)
  assert _adapted_paths(lnnx.init(KEY, base, cfg, IDS)) == expected


def test_all_linear_skips_the_head_by_name_or_by_returned_output():
  base = Transformer(nnx.Rngs(0))
  cfg = jlora.LoraConfig(r=2, target_modules="all-linear")
  assert "proj" in _adapted_paths(lnnx.init(KEY, base, cfg)), "without inputs only head names are known"
  assert "proj" not in _adapted_paths(lnnx.init(KEY, base, cfg, IDS)), "its output is the model's output"
  mlp = MLP(nnx.Rngs(0))
  assert _adapted_paths(lnnx.init(KEY, mlp, cfg)) == {"layers/0", "layers/1"}, "`head` is a head name"


def test_rank_alpha_patterns_and_rslora():
  base = Transformer(nnx.Rngs(0))
  cfg = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"], rank_pattern={"layers.1.up": 2},
                         alpha_pattern={"down": 2}, use_rslora=True)
  lora = lnnx.init(KEY, base, cfg)
  assert lora.layers[1].up.lora_a.shape == (16, 2) and lora.layers[0].up.lora_a.shape == (16, 4)
  assert lora.layers[1].up.lora_scale == cfg.scale_for("layers/1/up") == pytest.approx(8 / 2**0.5)
  assert lora.layers[0].down.lora_scale == pytest.approx(2 / 2)


def test_shared_module_is_adapted_once():
  class Shared(nnx.Module):
    def __init__(self, rngs):
      self.a = nnx.Linear(16, 16, **K, rngs=rngs)
      self.b = self.a

    def __call__(self, x):
      return self.b(nnx.relu(self.a(x)))

  x = _x(2, 16)
  lora = lnnx.init(KEY, Shared(nnx.Rngs(0)), jlora.LoraConfig(r=2, target_modules=".*", init_lora_weights=False))
  assert lora.a is lora.b and type(lora.a).__name__ == "LoraLinear"
  np.testing.assert_allclose(lora(x), lnnx.merge(lora)(x), rtol=1e-5, atol=1e-5)


def test_bf16_base_fp32_adapters():
  base = MLP(nnx.Rngs(0), dtype=jnp.bfloat16)
  x = jnp.ones((4, 16), jnp.bfloat16)
  cfg = jlora.LoraConfig(r=4, target_modules=r"layers\.\d+", init_lora_weights=False)
  lora = lnnx.init(KEY, base, cfg)
  assert lora.layers[0].lora_a.dtype == jnp.float32 and lora.layers[0].kernel.dtype == jnp.bfloat16
  y = lora(x)
  assert y.dtype == jnp.bfloat16
  merged = lnnx.merge(lora)
  assert merged.layers[0].kernel.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(merged(x), np.float32), rtol=5e-2, atol=5e-2)


def test_unmerge_restores_the_base():
  base, _, cfg = _build("attention", init_lora_weights=False)
  lora = lnnx.init(KEY, base, cfg)
  back = lnnx.unmerge(lnnx.merge(lora), lora)
  for a, b in zip(jax.tree.leaves(lnnx.to_params(back)), jax.tree.leaves(lnnx.to_params(lora))):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)
  with pytest.raises(ValueError, match=r"`merged` still holds LoRA adapters"):
    lnnx.unmerge(lora, lora)


# ----------------------------------------------------------------------- files and interop
def test_save_and_load_adapter_round_trip(tmp_path):
  base, x, cfg = _build("attention", init_lora_weights=False, bias="lora_only")
  lora = lnnx.init(KEY, base, cfg)
  jlora.save_adapter(tmp_path / "adapter", lnnx.to_params(lora), cfg)
  params, cfg2 = jlora.load_adapter(tmp_path / "adapter", lnnx.to_params(base))
  assert cfg2 == cfg
  again = lnnx.from_params(base, params, cfg2)
  np.testing.assert_array_equal(again(x), lora(x))
  assert _leaves_equal(nnx.state(again, lnnx.Trainable), nnx.state(lora, lnnx.Trainable))


@pytest.mark.parametrize("name", ["attention", "scan"])
def test_peft_round_trip(tmp_path, name):
  base, x, cfg = _build(name, init_lora_weights=False)
  lora = lnnx.init(KEY, base, cfg)
  names = "flax" if name == "attention" else (lambda path: ".".join(path).replace("layers", "layers.{i}"))
  jlora.save_peft(tmp_path, None, lnnx.to_params(lora), cfg, name_map=names)
  params, cfg2 = jlora.load_peft(tmp_path, None, lnnx.to_params(base), name_map=names)
  np.testing.assert_array_equal(lnnx.from_params(base, params, cfg2)(x), lora(x))


# ------------------------------------------------------------------------------ errors
def test_errors_name_the_argument_and_the_fix():
  base, _, cfg = _build("attention")
  with pytest.raises(TypeError, match=r"`model` is a flax\.linen Module \(Dense\).*use jlora\.init"):
    lnnx.init(KEY, nn.Dense(4), cfg)
  with pytest.raises(TypeError, match=r"`model` must be a flax\.nnx Module, got dict"):
    lnnx.init(KEY, {"w": jnp.ones(2)}, cfg)
  with pytest.raises(TypeError, match=r"`config` must be a jlora\.LoraConfig, got dict"):
    lnnx.init(KEY, base, {"r": 2})
  with pytest.raises(ValueError, match=r"(?s)matched no module.*embed  \(embed\).*layers/0/attn/query  \(dense_general\)"):
    lnnx.init(KEY, base, jlora.LoraConfig(target_modules=["q_proj"]))
  lora = lnnx.init(KEY, base, cfg)
  with pytest.raises(ValueError, match=r"already holds LoRA adapters .*layers/0/attn/out.*merge it first"):
    lnnx.init(KEY, lora, cfg)
  for fn in (lnnx.merge, lnnx.split, lambda m: lnnx.optimizer(m, optax.sgd(1.0))):
    with pytest.raises(ValueError, match=r"`model` holds no LoRA adapter.*jlora\.nnx\.init\(key, model, config\)"):
      fn(base)
  params = lnnx.to_params(lora)
  with pytest.raises(ValueError, match=r"holds an adapter at 'layers/0/attn/query', which the config"):
    lnnx.from_params(base, params, jlora.LoraConfig(r=4, target_modules=["value", "out"]))
  with pytest.raises(ValueError, match=r"`params` holds no LoRA adapter"):
    lnnx.from_params(base, lnnx.to_params(base), cfg)
  with pytest.raises(ValueError, match=r"where the model has no layer jlora\.nnx adapts"):
    lnnx.from_params(MLP(nnx.Rngs(0)), params, cfg)
  blind = lnnx.init(KEY, EinsumNet(nnx.Rngs(0)), jlora.LoraConfig(r=2, target_modules=["out"]))  # no inputs
  with pytest.raises(ValueError, match=r"made for the equation 'btnh,nhd->btd', but it is called with 'btnh,nhd->btnd'"):
    blind(_x(2, 5, 16))
  with pytest.raises(ValueError, match=r"`r`=40 is larger than the dimensions of 'mix'"):
    lnnx.init(KEY, EmbedLM(nnx.Rngs(0)), jlora.LoraConfig(r=40, target_modules=["mix"]))


def test_docstring_example_runs():
  import doctest

  import jlora.frontends.nnx.init
  import jlora.frontends.nnx.quant

  for module in (jlora.frontends.nnx.init, jlora.frontends.nnx.quant):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_import_jlora_does_not_import_nnx():
  code = "import sys, jlora; print('flax.nnx' in sys.modules, 'jlora.nnx' in sys.modules)"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
  assert out.split() == ["False", "False"]


# ------------------------------------------------------- structure of the training step


class UpDown(nnx.Module):
  def __init__(self, rngs):
    self.up = nnx.Linear(D_IN, D_OUT, **K, rngs=rngs)
    self.down = nnx.Linear(D_OUT, D_IN, **K, rngs=rngs)

  def __call__(self, x):
    return self.down(nnx.gelu(self.up(x)))


def _functional_step():
  x = jnp.ones((4, 7, D_IN))
  cfg = jlora.LoraConfig(r=R, target_modules=["up", "down"], init_lora_weights=False)
  graphdef, trainable, rest = lnnx.split(lnnx.init(KEY, UpDown(nnx.Rngs(0)), cfg))
  tx = optax.adam(1e-3)

  def step(t, s, rest):
    g = jax.grad(lambda t: _loss(nnx.merge(graphdef, t, rest), x))(t)
    u, s = tx.update(g, s, t)
    return optax.apply_updates(t, u), s

  return step, (trainable, tx.init(trainable), rest)


def test_step_structure_no_weight_sized_gradient_and_2d_rank_r_matmuls():
  step, args = _functional_step()
  kernel_sized = _kernel_sized_dots(jax.jit(step).lower(*args).compile().as_text())
  assert not kernel_sized, "\n".join(kernel_sized)
  lora = [e for e in _dots(jax.make_jaxpr(step)(*args).jaxpr) if any(R in v.aval.shape for v in e.invars)]
  assert len(lora) == 11, "\n".join(map(str, lora))  # as linen: x·A, u·B forward; gB, gu, gA, dx backward
  assert all(v.aval.ndim == 2 for e in lora for v in e.invars)


# --------------------------------------------------- variants (LoRA, DoRA) × bases (plain, NF4, int8)
def _close(got, want, rel=2e-5):
  """Equal to a tolerance that scales with the values compared."""
  want = np.asarray(want, np.float32)
  np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=rel, atol=rel * max(1.0, float(np.abs(want).max())))


def _assert_grads_equal_linen(lora, linen, cfg, params, x):
  """The gradients of `mean(y²)` wrt the trainable leaves: NNX (`lnnx.split`) equal linen's (`jlora.split`)."""
  trainable, frozen = jlora.split(params, cfg)
  g_linen = jax.jit(jax.grad(lambda t, f: jnp.mean(jlora.apply(linen, jlora.combine(t, f), cfg, x) ** 2)))(
      trainable, frozen)
  graphdef, t, rest = lnnx.split(lora)
  g_nnx = jax.jit(jax.grad(lambda t, rest: jnp.mean(nnx.merge(graphdef, t, rest)(x) ** 2)))(t, rest)
  flat = {tuple(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(g_nnx)}
  assert set(flat) == set(jlora.core.tree.flatten(g_linen))
  for path, g in jlora.core.tree.flatten(g_linen).items():
    _close(flat[path], g, rel=1e-4)


def _move_magnitudes(model, key=3):
  """DoRA's magnitudes moved off their init `‖W0 + s·A·B‖`, so that `g = m/‖·‖ ≠ 1` and the magnitude acts."""
  for i, (_, module) in enumerate(nnx.iter_modules(model)):
    if "lora_magnitude" in vars(module):
      m = module.lora_magnitude[...]
      module.lora_magnitude[...] = m * (1 + 0.3 * jax.random.normal(jax.random.key(key + i), m.shape))
  return model


def _is_quantized(x):
  return isinstance(x, QuantizedArray)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("quant", [None, "nf4", "int8"])
@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_lora_and_dora_over_plain_and_quantized_bases(variant, quant, jit):
  base, _, cfg = _build("attention", init_lora_weights=False, use_dora=variant == "dora", bias="lora_only")
  if quant:
    base = lnnx.quantize(base, quant)
    kernel = base.layers[0].attn.query.kernel
    assert type(kernel) is lnnx.Frozen and _is_quantized(kernel.get_value()) and kernel.get_value().method == quant
    assert kernel[...].shape == (16, 2, 8) and kernel[...].dtype == jnp.float32, "read dequantized, as layers do"
  lora = _move_magnitudes(lnnx.init(KEY, base, cfg, IDS))
  run = _call(jit)
  y = run(lora, IDS)
  assert _rel_err(y, base(IDS)) > 1e-3, "the adapter acts"
  packed = [leaf for leaf in jax.tree.leaves(lnnx.to_params(lora), is_leaf=_is_quantized) if _is_quantized(leaf)]
  assert len(packed) == (13 if quant else 0), "every linear kernel stays packed in the LoRA model (adapted or not)"
  merged = lnnx.merge(lora)
  assert not any(_is_quantized(v) for v in jax.tree.leaves(lnnx.to_params(merged), is_leaf=_is_quantized))
  assert type(merged.layers[1].attn.key.kernel) is nnx.Param, "a plain, full-precision model"
  _close(y, run(merged, IDS))

  # Gradients reach exactly the trainable leaves; an optimizer step moves them and nothing else.
  roles = {"lora_a", "lora_b", "bias"} | ({"lora_magnitude"} if variant == "dora" else set())
  grad = nnx.grad(_loss, argnums=nnx.DiffState(0, lnnx.Trainable))
  grads = (nnx.jit(grad) if jit else grad)(lora, IDS)
  flat = nnx.to_flat_state(grads)
  assert {p[-1] for p, _ in flat} == roles and len(flat) == 6 * len(roles)  # 6 adapted layers
  assert all(float(jnp.abs(g.get_value()).max()) > 0 for _, g in flat)
  frozen_before = jax.tree.leaves(nnx.state(lora, lnnx.Frozen))
  trainable_before = jax.tree.leaves(nnx.state(lora, lnnx.Trainable))
  opt = lnnx.optimizer(lora, optax.sgd(0.05))

  def step(model, opt, x):
    opt.update(model, grad(model, x))

  (nnx.jit(step) if jit else step)(lora, opt, IDS)
  assert _leaves_equal(jax.tree.leaves(nnx.state(lora, lnnx.Frozen)), frozen_before), "the base (codes) is bit-identical"
  after = jax.tree.leaves(nnx.state(lora, lnnx.Trainable))
  assert all(not jnp.array_equal(a, b) for a, b in zip(after, trainable_before, strict=True))
  _close(run(lora, IDS), run(lnnx.merge(lora), IDS))


@pytest.mark.parametrize("name", list(CASES))
def test_dora_on_every_layer_kind(name):
  base, x, cfg = _build(name, init_lora_weights=False, use_dora=True)
  lora = lnnx.init(KEY, base, cfg, x)
  plain = lnnx.init(KEY, base, jlora.LoraConfig(**{**vars(cfg), "use_dora": False}), x)
  _close(lora(x), plain(x), rel=1e-5)  # m = ‖W0 + s·A·B‖ at init: DoRA starts as the LoRA of the same A, B
  params = lnnx.to_params(lora)
  for path, ad in ((p, n) for p, n in jlora.core.tree.adapted_modules(params)):
    kernel = ad.get("kernel", ad.get("embedding"))
    want = jlora.core.ops.column_norm(kernel, ad["lora_a"], ad["lora_b"], cfg.scale_for("/".join(path)))
    _close(ad["lora_magnitude"], want, rel=1e-6)
  _move_magnitudes(lora)
  y = lora(x)
  assert _rel_err(y, plain(x)) > 1e-3, "the magnitude acts"
  _close(y, lnnx.merge(lora)(x))
  back = lnnx.unmerge(lnnx.merge(lora), lora)
  jax.tree.map(lambda a, b: _close(a, b, rel=1e-5), lnnx.to_params(back), lnnx.to_params(lora))
  again = lnnx.from_params(base, lnnx.to_params(lora), cfg, x)
  np.testing.assert_array_equal(again(x), y)
  assert _leaves_equal(nnx.state(again, lnnx.Trainable), nnx.state(lora, lnnx.Trainable))


@pytest.mark.parametrize("quant", [None, "nf4"])
def test_dora_and_qlora_match_the_linen_path(quant):
  """Same weights, same draws: adapters, outputs, merged outputs and gradients equal `jlora.apply`'s."""
  x = _x(2, 5, 16)
  linen = LinenNet()
  base = linen.init(jax.random.key(0), x)["params"]
  cfg = jlora.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, use_dora=True)
  params = jlora.init(KEY, linen, jlora.quantize(base, quant) if quant else base, cfg, x)
  model = NNXNet(nnx.Rngs(5))
  nnx.update(model, base)
  lora = lnnx.init(KEY, lnnx.quantize(model, quant) if quant else model, cfg, x)
  assert _leaves_equal(lnnx.to_params(lora), params), "the same packed kernels, draws and magnitudes"
  # Adapters as if trained, in the linen tree; the NNX model takes them through from_params (quantized tree too).
  trainable, frozen = jlora.split(params, cfg)
  trainable = jax.tree.map(lambda v: v * (1 + 0.3 * jax.random.normal(jax.random.key(2), v.shape)), trainable)
  params = jlora.combine(trainable, frozen)
  lora = lnnx.from_params(model, params, cfg)
  y_linen = jax.jit(lambda p: jlora.apply(linen, p, cfg, x))(params)
  _close(_call(True)(lora, x), y_linen)
  _close(lnnx.merge(lora)(x), linen.apply({"params": jlora.merge(params, cfg)}, x))
  _assert_grads_equal_linen(lora, linen, cfg, params, x)


def test_dora_with_lora_dropout_computes_x_w0_from_the_dropped_input():
  base, x, cfg = _build("linear", init_lora_weights=False, use_dora=True, lora_dropout=0.5)
  plain = _move_magnitudes(lnnx.init(KEY, base, cfg))
  drop = lnnx.from_params(base, lnnx.to_params(plain), cfg, rngs=nnx.Rngs(lora_dropout=3))
  grads = _dropout_acts(drop, plain, x)
  assert {p[-1] for p, _ in nnx.to_flat_state(grads)} == {"lora_a", "lora_b", "lora_magnitude"}


def test_quantized_scan_stack_keeps_a_scale_per_layer():
  base, x, cfg = _build("scan", init_lora_weights=False, use_dora=True)
  q = lnnx.quantize(base, "int8")
  scale = q.layers.up.kernel.get_value().scale
  assert scale.shape == (L, 1, 16), "int8: one scale per output channel of each layer of the nnx.vmap stack"
  assert q.head.kernel.get_value().scale.shape == (1, 4)
  _close(q(x), base(x), rel=2e-2)
  lora = _move_magnitudes(lnnx.init(KEY, q, cfg))
  y = nnx.jit(lambda m, x: m(x))(lora, x)
  _close(y, lnnx.merge(lora)(x))


def test_qlora_and_dora_errors_name_the_argument_and_the_fix():
  base, _, cfg = _build("linear", init_lora_weights=False, target_modules=r"layers\.\d+", modules_to_save=("head",))
  with pytest.raises(ValueError, match=r"kernel at 'head/kernel' is quantized .*modules_to_save=\('head',\).*select"):
    lnnx.init(KEY, lnnx.quantize(base), cfg)
  with pytest.raises(ValueError, match=r"`method` must be one of \('nf4', 'int4', 'int8'\), got 'fp4'"):
    lnnx.quantize(base, "fp4")
  with pytest.raises(TypeError, match=r"`model` is a flax\.linen Module"):
    lnnx.quantize(nn.Dense(4))
  lora = lnnx.init(KEY, base, jlora.LoraConfig(r=4, target_modules=r"layers\.\d+"))
  with pytest.raises(ValueError, match=r"use_dora=True but the adapter at 'layers/0' has no DoRA magnitude"):
    lnnx.from_params(base, lnnx.to_params(lora), jlora.LoraConfig(r=4, target_modules=r"layers\.\d+", use_dora=True))


def _dora_step():
  x = jnp.ones((4, 7, D_IN))
  cfg = jlora.LoraConfig(r=R, target_modules=["up", "down"], init_lora_weights=False, use_dora=True)
  graphdef, trainable, rest = lnnx.split(lnnx.init(KEY, UpDown(nnx.Rngs(0)), cfg))
  return (lambda t, rest: _loss(nnx.merge(graphdef, t, rest), x)), trainable, rest


def test_dora_step_structure_2d_rank_r_dots_and_no_kernel_sized_dot_in_the_backward():
  loss, t, rest = _dora_step()
  sizes = {(D_IN, D_OUT), (D_OUT, D_IN)}
  forward = list(_dots(jax.make_jaxpr(loss)(t, rest).jaxpr))
  step = list(_dots(jax.make_jaxpr(jax.grad(loss))(t, rest).jaxpr))
  lora = [e for e in step if any(R in v.aval.shape for v in e.invars)]
  assert lora and all(v.aval.ndim == 2 for e in lora for v in e.invars), "\n".join(map(str, lora))
  kernel_sized = [e for e in step if tuple(e.outvars[0].aval.shape) in sizes]
  # W0 + s·A·B is formed once per layer for DoRA's (constant) norm, as in PEFT; the backward adds none
  assert len(kernel_sized) == 2 == sum(tuple(e.outvars[0].aval.shape) in sizes for e in forward)


# ---------------------------------------------------------------------------- notebook
def test_notebook_is_committed_executed_and_still_runs():
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  nb = nbformat.read(ROOT / "notebooks" / "nnx.ipynb", as_version=4)

  def outputs(nb):
    return "\n".join(out.get("text", "") + str(out.get("data", {}).get("text/plain", ""))
                     for cell in nb.cells for out in cell.get("outputs", []))

  for text in ("trainable params:", "base bit-identical: True", "max |merged - factored| =",
               "reloaded adapter gives identical outputs: True"):
    assert text in outputs(nb), text
  nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
  fresh = outputs(nb)
  (diff,) = re.findall(r"max \|merged - factored\| = (\S+)", fresh)
  assert float(diff) < 1e-4
  assert "reloaded adapter gives identical outputs: True" in fresh and "base bit-identical: True" in fresh

