"""QLoRA quantization primitives: NF4 levels, packing, round trips against a NumPy reference, layout, trees, errors."""

import os
import re
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jlora.quant.array import (
  NF4_LEVELS,
  QuantizedArray,
  _pack,
  _unpack,
  dequantize,
  partition_specs,
  quantize,
)
from jlora.quant.tree import dequantize as dequantize_params
from jlora.quant.tree import quantize as quantize_params

# The NF4 table published with QLoRA (Dettmers et al. 2023, appendix E; bitsandbytes' NF4 constants).
PUBLISHED_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]


def ref_nf4(x: np.ndarray, bs: int) -> np.ndarray:
  """NumPy NF4 round trip without double quantization: nearest level by argmin, per block of the last axis."""
  x = np.asarray(x, np.float32)
  d = x.shape[-1]
  nb = -(-d // bs)
  xb = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, nb * bs - d)]).reshape(x.shape[:-1] + (nb, bs))
  absmax = np.abs(xb).max(-1, keepdims=True)
  y = xb / np.where(absmax > 0, absmax, 1)
  idx = np.argmin(np.abs(y[..., None] - NF4_LEVELS), -1)
  return (NF4_LEVELS[idx] * absmax).reshape(x.shape[:-1] + (-1,))[..., :d]


def normal(seed: int, shape: tuple[int, ...]) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def rel_err(w, q) -> float:
  w = np.asarray(w, np.float32)
  return float(np.linalg.norm(w - np.asarray(dequantize(q, jnp.float32))) / np.linalg.norm(w))


def test_nf4_levels_follow_the_paper_and_match_the_published_table():
  assert NF4_LEVELS.dtype == np.float32 and NF4_LEVELS.shape == (16,)
  np.testing.assert_allclose(NF4_LEVELS, PUBLISHED_NF4, rtol=0, atol=1e-6)
  assert NF4_LEVELS[0] == -1 and NF4_LEVELS[15] == 1 and NF4_LEVELS[7] == 0 and np.all(np.diff(NF4_LEVELS) > 0)
  assert (NF4_LEVELS > 0).sum() == 8 and (NF4_LEVELS < 0).sum() == 7  # asymmetric: 8 positive, 7 negative, exact 0


def test_packing_is_lossless_for_every_pair_of_codes():
  hi, lo = np.divmod(np.arange(256), 16)
  idx = jnp.asarray(np.stack([hi, lo], -1).reshape(1, 512), jnp.uint8)
  packed = _pack(idx)
  assert packed.dtype == jnp.uint8 and packed.shape == (1, 256)
  np.testing.assert_array_equal(packed[0], np.arange(256))  # element 2j in the high nibble
  np.testing.assert_array_equal(_unpack(packed), idx)


@pytest.mark.parametrize("d", [1, 65, 130])
def test_every_level_times_absmax_comes_back_exactly(d):
  """Values `level · absmax` (all 16 codes, at even and odd positions) round-trip bit-exactly without double quant."""
  rng = np.random.default_rng(d)
  codes = rng.integers(0, 16, (5, d))
  codes[:, 0] = 15  # every block's absmax is 3.0 ...
  codes[:, 64::64] = 0  # ... reached at +1 or -1
  x = NF4_LEVELS[codes] * np.float32(3.0)
  q = quantize(x, block_size=64, double_quant=False)
  assert q.codes.shape == (5, -(-d // 2)) and q.scale.shape == (5, -(-d // 64))
  np.testing.assert_array_equal(_unpack(q.codes)[:, :d], codes)
  np.testing.assert_array_equal(dequantize(q, jnp.float32), x)


@pytest.mark.parametrize("double_quant", [False, True])
def test_zero_stays_zero_and_absmax_maps_to_the_end_levels(double_quant):
  x = normal(0, (4, 256))
  x[:, ::3] = 0.0
  x[1, 64:128] = 0.0  # a whole zero block
  x[2, 5], x[3, 70] = 50.0, -50.0  # a block whose absmax is positive, one whose absmax is negative
  q = quantize(x, block_size=64, double_quant=double_quant)
  w = np.asarray(dequantize(q, jnp.float32))
  assert np.all(w[x == 0] == 0)
  idx = np.asarray(_unpack(q.codes))
  assert idx[2, 5] == 15 and idx[3, 70] == 0
  if double_quant:
    np.testing.assert_allclose([w[2, 5], w[3, 70]], [50.0, -50.0], rtol=1e-2)
  else:
    assert w[2, 5] == 50.0 and w[3, 70] == -50.0


@pytest.mark.parametrize("shape,bs", [((3, 5), 64), ((7, 65), 64), ((2, 3, 130), 16), ((6, 63), 2)])
def test_nf4_matches_a_numpy_reference_for_any_last_dim(shape, bs):
  x = normal(1, shape)
  q = quantize(x, block_size=bs, double_quant=False)
  assert q.shape == shape and q.ndim == len(shape) and q.size == np.prod(shape)
  np.testing.assert_allclose(dequantize(q, jnp.float32), ref_nf4(x, bs), rtol=0, atol=1e-6)
  dq = dequantize(quantize(x, block_size=bs, double_quant=True), jnp.float32)  # close to the same, scales 8-bit
  np.testing.assert_allclose(dq, ref_nf4(x, bs), atol=0.02 * np.abs(x).max())


@pytest.mark.parametrize("shape,bs", [((3, 5), 64), ((7, 65), 64), ((2, 3, 130), 16)])
def test_int4_is_round_to_nearest_of_seven_steps_per_block_absmax(shape, bs):
  """int4: per block of the last axis, `round(7·x / absmax)` in -7..7 (halves away from zero never arise from
  normal draws), decoded as `code · absmax / 7`; the codes are the 4-bit `code + 8`."""
  x = normal(7, shape)
  q = quantize(x, "int4", block_size=bs, double_quant=False)
  d = shape[-1]
  nb = -(-d // bs)
  xb = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, nb * bs - d)]).reshape(x.shape[:-1] + (nb, bs))
  absmax = np.abs(xb).max(-1, keepdims=True)
  code = np.round(7 * xb / absmax)
  ref = (code * absmax / 7).reshape(x.shape[:-1] + (-1,))[..., :d]
  assert q.method == "int4" and q.shape == shape and q.codes.shape == shape[:-1] + (-(-d // 2),)
  np.testing.assert_allclose(dequantize(q, jnp.float32), ref, rtol=1e-6, atol=1e-7)
  nibbles = np.asarray(_unpack(q.codes))[..., :d]
  np.testing.assert_array_equal(nibbles, code.reshape(x.shape[:-1] + (-1,))[..., :d] + 8)
  assert nibbles.min() >= 1  # symmetric: level -8/7 is never used
  assert "QuantizedArray(int4, shape=" in repr(q) and "block_size=" in repr(q)


def test_round_trip_error_and_bits_per_param_of_a_768_by_3072_kernel():
  """Measured (5 seeds): NF4 0.0919-0.0921 with or without double quant, int8 0.0077 (benchmarks/quant_error.py)."""
  w = 0.02 * normal(0, (768, 3072))
  nf4, nf4_dq, i8 = quantize(w, double_quant=False), quantize(w), quantize(w, "int8")
  assert 0.088 < rel_err(w, nf4) < 0.095 and 0.088 < rel_err(w, nf4_dq) < 0.095
  assert rel_err(w, nf4_dq) - rel_err(w, nf4) < 1e-4  # double quantization costs next to nothing
  assert 0.006 < rel_err(w, i8) < 0.009
  i4 = quantize(w, "int4")  # uniform levels: a little worse than NF4 on Gaussian weights
  assert 0.095 < rel_err(w, i4) < 0.12 and i4.bits_per_param == nf4_dq.bits_per_param
  assert nf4.bits_per_param == 4 + 32 / 64
  assert nf4_dq.bits_per_param == 4 + 8 / 64 + 2 * 32 / 3072  # one (scale2, offset) pair per row of 48 blocks
  assert quantize(jnp.ones((2, 256 * 64))).bits_per_param == 4 + 8 / 64 + 2 * 32 / (256 * 64)  # ≈ paper's 4.127
  assert i8.bits_per_param == 8 + 32 / 768
  assert nf4_dq.nbytes == 768 * 1536 + 768 * 48 + 2 * 4 * 768
  assert [c.shape for c in jax.tree.leaves(nf4_dq)] == [(768, 1536), (768, 48), (768, 1), (768, 1)]
  assert [c.dtype for c in jax.tree.leaves(nf4_dq)] == [jnp.uint8, jnp.int8, jnp.float32, jnp.float32]


def test_double_quant_groups_of_256_blocks_and_a_ragged_last_group():
  x = np.random.default_rng(2).uniform(-1, 1, (3, 300 * 4)).astype(np.float32) * np.arange(1, 301).repeat(4)
  q = quantize(x, block_size=4)
  assert q.scale.shape == (3, 300) and q.scale2.shape == q.offset.shape == (3, 2)
  ref = quantize(x, block_size=4, double_quant=False)
  np.testing.assert_allclose(dequantize(q, jnp.float32), dequantize(ref, jnp.float32), atol=1.0, rtol=0.02)


def test_int8_has_one_scale_per_output_channel_and_per_stacked_layer():
  x = normal(3, (3, 4, 5, 6)) * np.arange(1, 7, dtype=np.float32)
  q = quantize(x, "int8", stack=1)
  assert q.codes.dtype == jnp.int8 and q.codes.shape == x.shape and q.scale.shape == (3, 1, 1, 6)
  np.testing.assert_allclose(q.scale, np.abs(x).max((1, 2), keepdims=True) / 127)
  np.testing.assert_allclose(dequantize(q, jnp.float32), x, atol=float(q.scale.max()) / 2 + 1e-6)
  assert quantize(x, "int8").scale.shape == (1, 1, 1, 6)
  z = np.zeros((4, 3), np.float32)
  z[1, 2] = -2.0
  np.testing.assert_allclose(dequantize(quantize(z, "int8"), jnp.float32), z, rtol=1e-7)


@pytest.mark.parametrize("method", ["nf4", "int4", "int8"])
def test_bf16_kernels_keep_their_dtype(method):
  w = jnp.asarray(0.02 * normal(4, (96, 320)), jnp.bfloat16)
  q = quantize(w, method)
  assert q.dtype == jnp.bfloat16 and dequantize(q, None).dtype == jnp.bfloat16
  assert dequantize(q).dtype == jnp.bfloat16 and dequantize(q, jnp.float32).dtype == jnp.float32
  assert rel_err(w, q) < (0.01 if method == "int8" else 0.12)


@pytest.mark.parametrize("method", ["nf4", "int4", "int8"])
def test_quantize_and_dequantize_under_jit_equal_eager(method):
  w = normal(5, (2, 40, 130))
  q = quantize(w, method, block_size=32, stack=1)
  qj = jax.jit(lambda w: quantize(w, method, block_size=32, stack=1))(w)
  assert jax.tree.structure(qj) == jax.tree.structure(q)
  jax.tree.map(np.testing.assert_array_equal, qj, q)
  np.testing.assert_array_equal(jax.jit(dequantize)(q), dequantize(q))
  assert jax.eval_shape(dequantize, q) == jax.ShapeDtypeStruct(w.shape, jnp.bfloat16)


@pytest.mark.parametrize("method", ["nf4", "int4", "int8"])
def test_slicing_the_leading_axis_of_every_child_gives_the_slice(method):
  w = normal(6, (3, 16, 70))
  q = quantize(w, method, block_size=16, stack=1)
  full = dequantize(q, jnp.float32)
  for i in range(3):
    qi = jax.tree.map(lambda c, i=i: c[i], q)
    assert isinstance(qi, QuantizedArray) and qi.shape == (16, 70)
    np.testing.assert_array_equal(dequantize(qi, jnp.float32), full[i])
  np.testing.assert_array_equal(
      dequantize(jax.tree.map(lambda c: jax.lax.dynamic_index_in_dim(c, 2, keepdims=False), q), jnp.float32), full[2])
  _, ys = jax.lax.scan(lambda c, qi: (c, dequantize(qi, jnp.float32)), None, q)
  np.testing.assert_allclose(ys, full, rtol=1e-6)  # fused differently inside the loop (FMA): 1 ulp


class _QDense(nn.Module):
  """A dense layer that reads its kernel itself (flax's `self.param` compares the first leaf's shape: codes ≠ kernel)."""

  @nn.compact
  def __call__(self, x, _):
    if self.has_variable("params", "kernel"):
      k = self.get_variable("params", "kernel")
      k = dequantize(k, jnp.float32) if isinstance(k, QuantizedArray) else k
    else:
      k = self.param("kernel", nn.initializers.normal(0.1), (x.shape[-1], x.shape[-1]))
    return jnp.tanh(x @ k), None


class _Stack(nn.Module):
  @nn.compact
  def __call__(self, x):
    layers = nn.scan(nn.remat(_QDense), variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    return layers(name="layers")(x, None)[0]


def test_a_quantized_stack_runs_under_nn_scan_and_remat():
  x = normal(7, (4, 48))
  params = _Stack().init(jax.random.key(8), x)["params"]
  qp = quantize_params(params, block_size=16)
  assert qp["layers"]["kernel"].shape == (3, 48, 48)
  want = _Stack().apply({"params": dequantize_params(qp, jnp.float32)}, x)
  got = jax.jit(lambda p, x: _Stack().apply({"params": p}, x))(qp, x)
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-5)
  grad = jax.jit(jax.grad(lambda x, p: _Stack().apply({"params": p}, x).sum()))(x, qp)
  assert grad.shape == x.shape and bool(jnp.all(jnp.isfinite(grad)))


def test_trees_quantize_only_kernels_and_keep_everything_else():
  k = lambda *s: jnp.ones(s)  # noqa: E731
  params = {"embed": {"embedding": k(10, 8)}, "dense": {"kernel": k(8, 8), "bias": k(8), "lora_a": k(8, 2),
            "lora_b": k(2, 8)}, "norm": {"scale": k(8)}, "head": {"kernel": k(8, 10)}, "odd": {"kernel": k(8)}}
  q = quantize_params(params)
  assert isinstance(q["dense"]["kernel"], QuantizedArray) and isinstance(q["head"]["kernel"], QuantizedArray)
  for path in [("embed", "embedding"), ("dense", "bias"), ("dense", "lora_a"), ("dense", "lora_b"),
               ("norm", "scale"), ("odd", "kernel")]:
    assert q[path[0]][path[1]] is params[path[0]][path[1]]
  seen = []
  only_head = quantize_params(params, "int8", select=lambda path, leaf: seen.append(path) or path == ("head", "kernel"))
  assert ("dense", "lora_a") in seen and only_head["dense"]["kernel"] is params["dense"]["kernel"]
  assert only_head["head"]["kernel"].method == "int8"
  assert quantize_params(q)["dense"]["kernel"] is q["dense"]["kernel"]  # already quantized: kept
  back = dequantize_params(q, None)
  assert jax.tree.structure(back) == jax.tree.structure(params) and back["dense"]["bias"] is params["dense"]["bias"]
  np.testing.assert_array_equal(back["head"]["kernel"], params["head"]["kernel"])
  stacked = quantize_params({"s": {"kernel": k(2, 8, 8)}}, "int8", stack=lambda path, leaf: leaf.ndim - 2)
  assert stacked["s"]["kernel"].scale.shape == (2, 1, 8)


def test_pytree_node_has_named_children_and_hashable_static_metadata():
  q = quantize(jnp.ones((4, 128)))
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path({"kernel": q})]
  assert paths == ["['kernel'].codes", "['kernel'].scale", "['kernel'].scale2", "['kernel'].offset"]
  leaves, treedef = jax.tree.flatten(q)
  assert hash(treedef) == hash(jax.tree.structure(quantize(jnp.zeros((4, 128)))))
  assert jax.tree.unflatten(treedef, leaves).shape == (4, 128)
  assert jax.tree.structure(quantize(jnp.ones((4, 128)), block_size=32)) != treedef
  assert "nf4, shape=(4, 128), dtype=float32, block_size=64" in repr(q)
  assert "nf4, shape=?, dtype=float32" in repr(jax.tree.map(type, q))  # children without shapes print, not raise


def test_partition_specs_follow_the_kernel():
  q = quantize(jnp.ones((2, 8, 128)))
  specs = partition_specs(q, P(None, "fsdp", "tp"))
  assert jax.tree.structure(specs) == jax.tree.structure(q)
  assert jax.tree.leaves(specs) == [P(None, "fsdp", "tp"), P(None, "fsdp", "tp"), P(None, "fsdp", None),
                                    P(None, "fsdp", None)]
  s8 = partition_specs(quantize(jnp.ones((2, 8, 128)), "int8", stack=1), P("x", "fsdp"))
  assert jax.tree.leaves(s8) == [P("x", "fsdp", None), P("x", None, None)]


def test_quantize_and_dequantize_on_a_mesh_keep_the_kernel_sharding():
  code = textwrap.dedent("""
      import jax, jax.numpy as jnp, numpy as np
      from jax.sharding import NamedSharding, PartitionSpec as P
      from jlora.quant.array import dequantize, partition_specs, quantize
      from jax.sharding import AxisType
      w = np.random.default_rng(0).normal(size=(2, 64, 256)).astype(np.float32)
      for kind, method in [(k, m) for k in (AxisType.Explicit, AxisType.Auto) for m in ("nf4", "int8")]:
        mesh = jax.make_mesh((2, 2), ("fsdp", "tp"), axis_types=(kind, kind))
        q = quantize(w, method, block_size=64, stack=1)
        spec = P(None, "fsdp", "tp")
        shard = jax.tree.map(lambda s: NamedSharding(mesh, s), partition_specs(q, spec))
        qs = jax.device_put(q, shard)
        out = jax.jit(dequantize, out_shardings=NamedSharding(mesh, spec))(qs)
        np.testing.assert_array_equal(out, dequantize(q))
        text = jax.jit(dequantize).lower(qs).compile().as_text()
        assert "all-gather" not in text and "all-to-all" not in text, (kind, method)
        y = jax.jit(lambda q, x: jnp.einsum("bi,lio->blo", x, dequantize(q)))(qs, jnp.ones((4, 64), jnp.bfloat16))
        assert y.shape == (4, 2, 256)
        qw = quantize(jax.device_put(w, NamedSharding(mesh, spec)), method, block_size=64, stack=1)  # on the mesh
        np.testing.assert_array_equal(qw.codes, q.codes)
        assert qw.codes.sharding.is_equivalent_to(NamedSharding(mesh, spec), 3)
        np.testing.assert_allclose(dequantize(qw, jnp.float32), dequantize(q, jnp.float32), atol=1e-6, rtol=1e-5)  # sum order
      print("ok")
  """)
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
  r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="fp4"), r"`method` must be one of \('nf4', 'int4', 'int8'\), got 'fp4'; e\.g\. quantize\(w, 'nf4'\)"),
    (dict(block_size=0), r"`block_size` must be an even int in \[2, 4096\] .*got 0; QLoRA uses block_size=64"),
    (dict(block_size=2**40), r"`block_size` .*bitsandbytes' largest NF4 block is 4096\), got 1099511627776"),
    (dict(block_size=-64), r"`block_size` .*got -64"),
    (dict(block_size=63), r"`block_size` .*two 4-bit codes share a byte.*got 63"),
    (dict(block_size=64.0), r"`block_size` .*got 64\.0"),
    (dict(method="int8", stack=1), r"`stack` must be an int in \[0, 0\] for a kernel of shape \(4, 8\).*got 1"),
])
def test_bad_arguments_raise_naming_the_argument(kwargs, match):
  with pytest.raises(ValueError, match=match):
    quantize(jnp.ones((4, 8)), **kwargs)


def test_bad_inputs_raise():
  for x in (jnp.float32(1.0), jnp.ones(8)):
    with pytest.raises(ValueError, match=r"`x` must be a kernel with at least 2 dimensions, got shape \(.*\); leave"):
      quantize(x)
  with pytest.raises(TypeError, match=r"`x` must be floating .*int32"):
    quantize(jnp.ones((4, 8), jnp.int32))
  with pytest.raises(ValueError, match=r"NaN or inf values in 1 block\(s\)"):
    quantize(jnp.ones((4, 128)).at[2, 100].set(jnp.nan))
  with pytest.raises(ValueError, match=r"At 'a/kernel': `x` \(shape \(4, 8\)\) has NaN or inf values in 1 channel"):
    quantize_params({"a": {"kernel": jnp.ones((4, 8)).at[0, 0].set(jnp.inf)}}, "int8")
  with pytest.raises(TypeError, match="`q` must be a QuantizedArray"):
    dequantize(jnp.ones((4, 8)))
  with pytest.raises(TypeError, match="`double_quant` must be a bool"):
    quantize(jnp.ones((4, 8)), double_quant=1)


@pytest.mark.parametrize("method", ["nf4", "int4", "int8"])
@pytest.mark.parametrize("shape", [(0, 8), (8, 0), (3, 0, 8)])
def test_kernels_with_no_elements_are_refused_alone_and_kept_in_a_tree(method, shape):
  with pytest.raises(ValueError, match=re.escape(f"`x` has shape {shape}, with no elements: there is nothing")):
    quantize(jnp.ones(shape), method)
  tree = {"empty": {"kernel": jnp.ones(shape)}, "full": {"kernel": jnp.ones((4, 8))}}
  out = quantize_params(tree, method)
  assert out["empty"]["kernel"] is tree["empty"]["kernel"] and isinstance(out["full"]["kernel"], QuantizedArray)
