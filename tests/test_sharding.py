"""Adapters on meshes: the sharding rule, sharded init, partitioning boxes, sharded merge and LoRA steps.

The rule's expectations are written out by hand per layer kind (not derived from
the code under test). Multi-device checks run in one subprocess with 8 virtual
CPU devices (`tests/multidevice.py`).
"""

import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

import jlora
from tests.multidevice import run_devices
from tests.sharding_model import EXPECTED, SPECS, Model


def _node(tree, where):
  for key in where.split("/"):
    tree = tree[key]
  return tree


def _same(got, want):
  return tuple(got) + (None,) * (len(want) - len(got)) == tuple(want) + (None,) * (len(got) - len(want))


@pytest.mark.parametrize("dora", [False, True])
def test_the_rule_per_layer_kind_on_partition_specs(dora):
  model, ids = Model(), jnp.zeros((2, 5), jnp.int32)
  config = jlora.LoraConfig(r=2, target_modules=".*", use_dora=dora)
  base = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
  abstract = jax.eval_shape(lambda p: jlora.init(jax.random.key(1), model, p, config, ids), base)
  out = jlora.adapter_shardings(abstract, SPECS)
  assert out["qkv"]["kernel"] == SPECS["qkv"]["kernel"] and out["o"]["bias"] == P()
  for where, (a, b, m) in EXPECTED.items():
    node = _node(out, where)
    assert _same(node["lora_a"], a) and _same(node["lora_b"], b), (where, node)
    if dora:
      assert _same(node["lora_magnitude"], m), (where, node["lora_magnitude"])
    assert len(node["lora_a"]) <= _node(abstract, where)["lora_a"].ndim  # never more entries than axes (tunix's bug)
  named = jlora.adapter_shardings(abstract, SPECS, rank_axis="lora_rank")
  assert named["layers"]["up"]["lora_a"] == P(None, "data", "lora_rank")
  # A mesh axis as the rank axis: only where the leaf does not use it already (ZeRO-style adapters under FSDP).
  zero = jlora.adapter_shardings(abstract, SPECS, rank_axis="data")
  want = {"embed": (P("model", "data"), P(None, "data")), "qkv": (P("data", None), P("data", "model", None)),
          "o": (P("model", "data", None), P("data", None)),
          "ein": (P(None, "data", None, None), P("model", None, None, "data")),
          "layers/up": (P(None, "data", None), P(None, "data", "model"))}
  for where, (a, b) in want.items():
    node = _node(zero, where)
    assert _same(node["lora_a"], a) and _same(node["lora_b"], b), (where, node)


def test_adapter_shardings_errors_name_the_leaf():
  abstract = {"fc": {"kernel": jax.ShapeDtypeStruct((4, 8), jnp.float32),
                     "lora_a": jax.ShapeDtypeStruct((4, 2), jnp.float32),
                     "lora_b": jax.ShapeDtypeStruct((2, 8), jnp.float32)}}
  with pytest.raises(ValueError, match=r"no sharding for 'fc/kernel' \(it has no `.sharding`\)\. Pass `shardings`"):
    jlora.adapter_shardings(abstract)
  with pytest.raises(ValueError, match=r"no sharding for 'fc/kernel' \(`shardings` has no entry for it\)"):
    jlora.adapter_shardings(abstract, {"other": P()})
  with pytest.raises(TypeError, match=r"`shardings` at 'fc/kernel' must be a jax.sharding.Sharding or PartitionSpec, "
                                      r"got str"):
    jlora.adapter_shardings(abstract, {"fc": {"kernel": "data"}})
  with pytest.raises(TypeError, match="`params` must be a nested dict"):
    jlora.adapter_shardings([abstract])


def test_boxed_init_names_the_rank_axis():
  init = nn.initializers.lecun_normal()

  class Boxed(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(8, kernel_init=nn.with_logical_partitioning(init, ("embed", "mlp")), name="up")(x)

  model, x = Boxed(), jnp.ones((2, 4))
  config = jlora.LoraConfig(r=2, target_modules=["up"])
  params = jlora.init(jax.random.key(1), model, model.init(jax.random.key(0), x)["params"], config, x)
  specs = nn.get_partition_spec(params)
  assert specs["up"] == {"bias": P(), "kernel": P("embed", "mlp"), "lora_a": P("embed", "lora_rank"),
                         "lora_b": P("lora_rank", "mlp")}
  assert isinstance(params["up"]["lora_a"], nn.LogicallyPartitioned)
  y = jlora.apply(model, params, config, x)
  merged = jlora.merge(params, config)
  assert isinstance(merged["up"]["kernel"], nn.LogicallyPartitioned) and "lora_a" not in merged["up"]
  assert jnp.allclose(model.apply({"params": merged}, x), y, atol=1e-6)


_MESH = '''
import sys
import flax.linen as nn, jax, jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from tests.sharding_model import EXPECTED, SPECS, Model
import numpy as np
import optax
from jax.sharding import NamedSharding
import jlora
sys.path.insert(0, "benchmarks")
from _hlo import collectives

AUTO = jax.sharding.AxisType.Auto
mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AUTO, AUTO))
model, ids = Model(), jnp.zeros((8, 5), jnp.int32)
params = model.init(jax.random.key(0), ids)["params"]
sharded = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params, SPECS)

def same(got, want):
  return tuple(got) + (None,) * (len(want) - len(got)) == tuple(want) + (None,) * (len(got) - len(want))

# 1. jlora.init on a sharded base: every adapter created on its devices by the rule, equal to the unsharded init.
for method, dora in ((False, False), (True, True), ("pissa", False)):
  config = jlora.LoraConfig(r=2, target_modules=".*", init_lora_weights=method, use_dora=dora)
  plain = jlora.init(jax.random.key(1), model, params, config, ids)
  got = jlora.init(jax.random.key(1), model, sharded, config, ids)
  for where, (a, b, m) in EXPECTED.items():
    node = got
    for key in where.split("/"):
      node = node[key]
    for leaf, want in (("lora_a", a), ("lora_b", b)) + ((("lora_magnitude", m),) if dora else ()):
      s = node[leaf].sharding
      assert isinstance(s, NamedSharding) and s.mesh == mesh and same(s.spec, want), (method, where, leaf, s)
      assert s.is_fully_replicated == (set(want) <= {None}), (where, leaf)  # replicated only where the kernel is
  tol = {False: 0, True: 1e-6, "pissa": 2e-5}[method]  # DoRA's norms and PiSSA's SVD reduce sharded: float32 rounding
  for x, y in zip(jax.tree.leaves(plain), jax.tree.leaves(got)):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=tol, rtol=tol)
  if method != "pissa":  # the base leaves are the very arrays passed in: nothing restacked or copied
    assert all(x is y for x, y in zip(jax.tree.leaves(sharded), jax.tree.leaves(jlora.split(got, config)[1])))
  if method == "pissa":
    assert got["qkv"]["kernel"].sharding.spec == SPECS["qkv"]["kernel"]  # the residual keeps the kernel's place
print("init ok")

# 2. A user's jitted init with out_shardings from jlora.adapter_shardings on ShapeDtypeStructs.
config = jlora.LoraConfig(r=2, target_modules=".*", init_lora_weights=False)
make = lambda p: jlora.init(jax.random.key(1), model, p, config, ids)
abstract = jax.eval_shape(make, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                             sharded))
out = jlora.adapter_shardings(abstract, jax.tree.map(lambda x: x.sharding, sharded))
got = jax.jit(make, out_shardings=out)(sharded)
assert got["o"]["lora_a"].sharding.spec == P("model", "data")
lora = jlora.init(jax.random.key(1), model, sharded, config, ids)
for x, y in zip(jax.tree.leaves(lora), jax.tree.leaves(got)):
  np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
# A mesh axis as `rank_axis` splits the rank of the leaves that leave that axis free, where it divides r = 2.
kernels = jax.tree.map(lambda x: x.sharding, sharded)
over_data = jlora.adapter_shardings(abstract, kernels, rank_axis="data")  # 2 devices
assert over_data["o"]["lora_b"].spec == P("data") and over_data["layers"]["up"]["lora_b"].spec == P(None, "data", "model")
assert over_data["qkv"]["lora_a"].spec == P("data")  # A of qkv uses `data` for its input axis: the rank stays whole
assert jlora.adapter_shardings(abstract, kernels, rank_axis="model")["o"]["lora_b"].spec == P()  # 4 devices, r = 2
print("jit init ok")

# 3. Merge keeps every kernel's sharding and gathers no kernel; unmerge round-trips.
merge = jax.jit(jlora.merge, static_argnums=1)
hlo = merge.lower(lora, config).compile().as_text()
assert not [c for c in collectives(hlo) if c[0] == "all-gather"], collectives(hlo)
merged = merge(lora, config)
for path, kernel in jax.tree_util.tree_flatten_with_path(sharded)[0]:
  got = merged
  for k in path:
    got = got[k.key]
  assert got.sharding.is_equivalent_to(kernel.sharding, kernel.ndim), (path, got.sharding, kernel.sharding)
back = jax.jit(jlora.unmerge, static_argnums=2)(merged, lora, config)
np.testing.assert_allclose(np.asarray(back["layers"]["up"]["kernel"]), np.asarray(params["layers"]["up"]["kernel"]),
                           atol=1e-5, rtol=1e-5)
assert back["layers"]["up"]["lora_a"].sharding.is_equivalent_to(lora["layers"]["up"]["lora_a"].sharding, 3), \
    back["layers"]["up"]["lora_a"].sharding
unsharded = jlora.merge(jlora.init(jax.random.key(1), model, params, config, ids), config)
np.testing.assert_allclose(model.apply({"params": merged}, ids), model.apply({"params": unsharded}, ids), rtol=1e-5)
print("merge ok")

# 4. A data-parallel LoRA step equals the single-device one, and its only collectives reduce adapter gradients.
dp = jax.make_mesh((8,), ("data",), axis_types=(AUTO,))
place = lambda t, spec: jax.tree.map(lambda x: jax.device_put(x, NamedSharding(dp, spec)), t)
trainable, frozen = jax.device_get(jlora.split(lora, config))
trainable = jax.tree_util.tree_map_with_path(lambda p, x: x * 1e-2 if p[-1].key == "lora_b" else x, trainable)
tx = optax.adam(1e-2)
target = jax.random.normal(jax.random.key(2), (8, 5, 16))

def step(t, o, f, ids, target):
  loss, g = jax.value_and_grad(lambda t: jnp.mean((jlora.apply(model, jlora.combine(t, f), config, ids) - target) ** 2))(t)
  u, o = tx.update(g, o, t)
  return optax.apply_updates(t, u), o, loss

ids = jax.random.randint(jax.random.key(3), (8, 5), 0, 32)
want = jax.jit(step)(trainable, tx.init(trainable), frozen, ids, target)
args = (place(trainable, P()), None, place(frozen, P()), place(ids, P("data")), place(target, P("data")))
args = (args[0], jax.jit(tx.init)(args[0]), *args[2:])
step_dp = jax.jit(step)
got = step_dp(*args)
for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
  np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-5, rtol=1e-5)
reduced = sum(n for op, n, _ in collectives(step_dp.lower(*args).compile().as_text()) if op in ("all-reduce",
                                                                                                  "reduce-scatter"))
adapter = sum(x.nbytes for x in jax.tree.leaves(trainable))
assert 0 < reduced <= 1.1 * adapter + 64, (reduced, adapter)  # + the loss scalar
print("step ok", reduced, adapter)

# 5. Flax partitioning boxes: nn.get_partition_spec covers the adapters; jit init into the mesh; apply; merge.
init = nn.initializers.lecun_normal()
class BoxBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    h = nn.Dense(32, kernel_init=nn.with_logical_partitioning(init, ("embed", "mlp")), name="up")(x)
    return x + nn.Dense(16, kernel_init=nn.with_logical_partitioning(init, ("mlp", "embed")), name="down")(h), None
class Boxed(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.scan(BoxBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=3,
                   metadata_params={nn.PARTITION_NAME: "layers"})(name="layers")(x, None)[0]
boxed, x = Boxed(), jnp.ones((8, 16))
config = jlora.LoraConfig(r=4, target_modules=["up", "down"], init_lora_weights=False)
make = lambda key: jlora.init(jax.random.key(1), boxed, boxed.init(key, x)["params"], config, x)
specs = nn.get_partition_spec(jax.eval_shape(make, jax.random.key(0)))
assert specs["layers"]["up"] == {"bias": P(), "kernel": P("layers", "embed", "mlp"),
                                 "lora_a": P("layers", "embed", "lora_rank"), "lora_b": P("layers", "lora_rank", "mlp")}
rules = (("embed", "data"), ("mlp", "model"))
p = jax.jit(make, out_shardings=nn.logical_to_mesh_sharding(specs, mesh, rules))(jax.random.key(0))
assert p["layers"]["down"]["lora_a"].value.sharding.spec == P(None, "model", None)
assert p["layers"]["down"]["lora_b"].value.sharding.spec == P(None, None, "data")
y = jax.jit(lambda p: jlora.apply(boxed, p, config, x))(p)
ref = jlora.apply(boxed, jax.device_get(nn.meta.unbox(p)), config, x)
np.testing.assert_allclose(np.asarray(y), np.asarray(ref), atol=1e-5, rtol=1e-5)
merged = jax.jit(jlora.merge, static_argnums=1)(p, config)
assert isinstance(merged["layers"]["up"]["kernel"], nn.LogicallyPartitioned)
assert merged["layers"]["up"]["kernel"].value.sharding.spec == P(None, "data", "model")
np.testing.assert_allclose(np.asarray(boxed.apply({"params": merged}, x)), np.asarray(y), atol=1e-5, rtol=1e-5)
print("boxes ok")

# 6. QLoRA on the mesh: codes and scales sharded like their kernel, adapters by the rule, the step equal to one device.

class QBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return x + nn.Dense(512, name="up")(x)[..., :16], None

class QModel(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.scan(QBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)(name="layers")(x, None)[0]

qmodel, x = QModel(), jax.random.normal(jax.random.key(7), (8, 16))
qbase = qmodel.init(jax.random.key(4), x)["params"]
qbase["layers"]["up"]["kernel"] = jax.device_put(qbase["layers"]["up"]["kernel"],
                                                 NamedSharding(mesh, P(None, "data", "model")))
q = jlora.quantize(qbase, "nf4")  # codes and scales follow the kernel's sharding
kernel = q["layers"]["up"]["kernel"]
assert kernel.codes.sharding.spec == P(None, "data", "model") == kernel.scale.sharding.spec  # 8 blocks over 4
odd = jlora.quantize({"kernel": jax.device_put(jnp.ones((16, 128)), NamedSharding(mesh, P("data", "model")))}, "nf4")
assert odd["kernel"].codes.sharding.spec == P("data", "model")  # 64 bytes over 4: split; 2 blocks over 4: replicated
assert odd["kernel"].scale.sharding.spec == P("data")
config = jlora.LoraConfig(r=2, target_modules=["up"], init_lora_weights="gaussian")
lora_q = jlora.init(jax.random.key(5), qmodel, q, config, x)
assert lora_q["layers"]["up"]["lora_a"].sharding.spec == P(None, "data")
assert lora_q["layers"]["up"]["lora_b"].sharding.spec == P(None, None, "model")
t, f = jlora.split(lora_q, config)
t = jax.tree.map(lambda v: v + 0.01, t)
loss = lambda t, f, x: jnp.mean(jlora.apply(qmodel, jlora.combine(t, f), config, x) ** 2)
got = jax.jit(jax.value_and_grad(loss))(t, f, jax.device_put(x, NamedSharding(mesh, P("data"))))
want = jax.jit(jax.value_and_grad(loss))(*jax.device_get((t, f)), x)
for u, v in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
  np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-5, atol=1e-6)
print("qlora ok")
'''


def test_on_eight_devices():
  out = run_devices(_MESH, 8)
  for line in ("init ok", "jit init ok", "merge ok", "step ok", "boxes ok", "qlora ok"):
    assert line in out, out


def test_docs_mesh_example_runs_on_eight_devices():
  text = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "meshes.md").read_text()
  blocks = re.findall(r"<!-- test: mesh -->\n```python\n(.*?)```", text, flags=re.S)
  assert len(blocks) == 1
  out = run_devices(blocks[0], 8).splitlines()
  assert out[:2] == ["P(None, 'fsdp', 'tensor')", "P(None, 'fsdp') P(None, None, 'tensor')"], out
  loss, spec = out[2].split(" ", 1)
  assert 0 < float(loss) < 10 and spec == "P(None, 'fsdp', 'tensor')", out
