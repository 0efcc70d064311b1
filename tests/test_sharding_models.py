"""LoRA on the reference models over meshes (data, fsdp, tensor): sharded steps equal one device's; HLO checks.

One subprocess with 8 virtual CPU devices runs every check (`tests/multidevice.py`)
and prints one JSON line per check, which the tests read. The base is placed by
`models.mesh_shardings` (FSDP on `embed`, tensor parallelism on heads, kv, mlp,
vocab), adapters by jlora's rule, the batch split over (data, fsdp), and the
step traced under the mesh and the models' logical axis rules (so the residual
stream is constrained to the batch split).
"""

import json

import pytest

from tests.multidevice import once_per_session, run_devices

_CHECKS = r"""
import json, os, sys
os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
import flax.linen as nn, jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import jlora
from jlora import models
from tests.models.helpers import CONFIGS, random_model
sys.path.insert(0, "benchmarks")
from _hlo import collectives

TARGETS = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"],
           "gpt2": ["c_attn", "c_proj", "c_fc"], "t5": ["q", "k", "v", "o", "wi", "wo"]}
tx = optax.sgd(0.1, momentum=0.9)  # Adam's first step is lr·sign(g): it would amplify rounding in near-zero gradients

def reduced(hlo):
  return sum(n for op, n, _ in collectives(hlo) if op in ("all-reduce", "reduce-scatter"))

for name, options, meshes in (("llama", {"scan_layers": True}, [(8, 1, 1), (2, 4, 1), (2, 2, 2)]),
                              ("gpt2", {}, [(2, 2, 2)]), ("t5", {}, [(2, 2, 2)])):
  model, base = random_model(CONFIGS[name], **options)
  config = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[name], init_lora_weights="gaussian")
  key = jax.random.key(3)
  inputs = tuple(None if a is None else jax.random.randint(jax.random.fold_in(key, i), (8, 8), 0, 37)
                 for i, a in enumerate(model.example_inputs()))

  def loss(t, f, inputs):
    out = jlora.apply(model, jlora.combine(t, f), config, *inputs)
    return sum(jnp.mean(jnp.square(y.astype(jnp.float32))) for y in jax.tree.leaves(out))

  def step(t, o, f, inputs):
    value, g = jax.value_and_grad(loss)(t, f, inputs)
    u, o = tx.update(g, o, t)
    return optax.apply_updates(t, u), o, value

  def bound(f, zero, inputs):  # backward wrt activations only: a zero added to the first embedding's output
    def of(delta):
      def add(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        embeds = isinstance(context.module, nn.Embed) and context.method_name == "__call__"
        return y + delta if embeds else y
      with nn.intercept_methods(add):
        out = model.apply({"params": f}, *inputs)
      return sum(jnp.mean(jnp.square(y.astype(jnp.float32))) for y in jax.tree.leaves(out))
    return jax.grad(of)(zero)

  params = jlora.init(jax.random.key(1), model, base, config, *inputs)
  params = jax.tree_util.tree_map_with_path(lambda p, x: x + 0.05 if p[-1].key == "lora_b" else x, params)
  t0, f0 = jlora.split(params, config)
  want = jax.jit(step)(t0, tx.init(t0), f0, inputs)
  for shape in meshes:
    mesh = jax.make_mesh(shape, ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    placed_base = jax.device_put(base, models.mesh_shardings(model, base, mesh))
    lora = jlora.init(jax.random.key(1), model, placed_base, config, *inputs)
    lora = jax.tree_util.tree_map_with_path(lambda p, x: x + 0.05 if p[-1].key == "lora_b" else x, lora)
    t, f = jlora.split(lora, config)
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    x = tuple(None if a is None else jax.device_put(a, rows) for a in inputs)
    with models.on_mesh(mesh):
      jitted = jax.jit(step)
      o = jax.jit(tx.init)(t)
      hlo = jitted.lower(t, o, f, x).compile().as_text()
      got = jitted(t, o, f, x)
      d = f["model"]["embed_tokens"]["embedding"].shape[-1] if name == "llama" else None
      bound_bytes = 0
      if d is not None:
        zero = jax.device_put(jnp.zeros((8, 8, d)), rows)
        bound_bytes = reduced(jax.jit(bound).lower(f, zero, x).compile().as_text())
      merge = jax.jit(jlora.merge, static_argnums=1)
      merge_hlo = merge.lower(lora, config).compile().as_text()
      merged = merge(lora, config)
    diff = max(float(np.max(np.abs(np.asarray(u) - np.asarray(v)))) for u, v in
               zip(jax.tree.leaves(got), jax.tree.leaves(want)))
    kept = all(m.sharding.is_equivalent_to(k.sharding, k.ndim) for m, k in
               zip(jax.tree.leaves(merged), jax.tree.leaves(placed_base)))
    print(json.dumps({"model": name, "mesh": list(shape), "diff": diff, "kept": kept,
                      "adapter_bytes": sum(v.nbytes for v in jax.tree.leaves(t)),
                      "reduced": reduced(hlo), "bound_reduced": bound_bytes,
                      "merge_gathers": [c for c in collectives(merge_hlo) if c[0] == "all-gather"]}), flush=True)
"""


@pytest.fixture(scope="module")
def checks():
  out = once_per_session("sharding_models", lambda: run_devices(_CHECKS, 8, timeout=900))
  return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


CASES = [("llama", [8, 1, 1]), ("llama", [2, 4, 1]), ("llama", [2, 2, 2]), ("gpt2", [2, 2, 2]), ("t5", [2, 2, 2])]


def _case(checks, model, mesh):
  found = [c for c in checks if c["model"] == model and c["mesh"] == mesh]
  assert len(found) == 1, checks
  return found[0]


@pytest.mark.parametrize("model,mesh", CASES)
def test_sharded_lora_step_equals_one_device(checks, model, mesh):
  assert _case(checks, model, mesh)["diff"] <= 1e-5


@pytest.mark.parametrize("model,mesh", CASES)
def test_sharded_merge_gathers_no_kernel_and_keeps_shardings(checks, model, mesh):
  c = _case(checks, model, mesh)
  assert c["merge_gathers"] == [] and c["kept"], c


@pytest.mark.parametrize("mesh", [[8, 1, 1], [2, 4, 1], [2, 2, 2]])
def test_gradient_collectives_move_adapter_sized_bytes(checks, mesh):
  """Reductions of the LoRA step beyond those of the frozen-base bound (the same forward and backward wrt
  activations, which tensor parallelism reduces too) are the adapters' gradients: at most 1.1 × their bytes."""
  c = _case(checks, "llama", mesh)
  grads = c["reduced"] - c["bound_reduced"]
  assert 0 < grads <= 1.1 * c["adapter_bytes"], c
