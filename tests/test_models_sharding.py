"""Sharding the reference models: logical axis names, mesh shardings, and init / load straight into shards.

The single-process tests read abstract trees (`jax.eval_shape`, nothing compiled). The
multi-device checks run once, in one 8-device subprocess (`tests/multidevice.py`), which
reports numbers that the tests below assert on.
"""

import json

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType, PartitionSpec

import jlora
from jlora import models
from jlora.core.tree import flatten
from jlora.models import _load
from tests.models.helpers import CONFIGS
from tests.multidevice import once_per_session, run_devices

NAMES = {"vocab", "embed", "heads", "kv", "mlp", "layers", "norm", "lora_rank", None}
MODELS = [  # (config name, options): every architecture, task head and layout
  ("gpt2", {}),
  ("llama", {}),
  ("llama", {"scan_layers": True}),
  ("llama3_tied_bias", {"scan_layers": True, "remat": True}),
  ("mistral", {}),
  ("qwen2", {}),
  ("bert", {}),
  ("bert", {"task": "HIDDEN_STATES"}),
  ("bert", {"task": "HIDDEN_STATES", "add_pooling_layer": False}),
  ("bert_seq_cls", {}),
  ("bert_token_cls", {}),
  ("t5", {}),
  ("t5_gated", {}),
]


def _abstract(name, **options):
  """`(model, params as jax.ShapeDtypeStruct)` of `CONFIGS[name]`; nothing compiled."""
  config = CONFIGS[name]
  model = _load._architecture(config).model(config, dtype=None, options=options)
  return model, _load._param_shapes(model)


def _axes(name, path, **options):
  model, shapes = _abstract(name, **options)
  return flatten(models.logical_axes(model, shapes))[tuple(path.split("/"))]


@pytest.mark.parametrize("name,options", MODELS, ids=[f"{n}-{'-'.join(map(str, o.values()))}" for n, o in MODELS])
def test_every_leaf_has_one_logical_name_per_axis(name, options):
  model, shapes = _abstract(name, **options)
  axes = models.logical_axes(model, shapes)
  assert jax.tree.structure(axes, is_leaf=lambda x: isinstance(x, PartitionSpec)) == jax.tree.structure(shapes)
  for path, spec in flatten(axes).items():
    leaf = flatten(shapes)[path]
    assert isinstance(spec, PartitionSpec) and len(spec) == leaf.ndim, (path, spec, leaf.shape)
    assert set(spec) <= NAMES, (path, spec)


def test_arrays_and_shapes_give_the_same_axes():
  model, shapes = _abstract("gpt2")
  arrays = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  assert models.logical_axes(model, arrays) == models.logical_axes(model, shapes)


@pytest.mark.parametrize(
  "name,path,expected",
  [
    ("gpt2", "transformer/wte/embedding", ("vocab", "embed")),
    ("gpt2", "transformer/wpe/embedding", (None, "embed")),
    ("gpt2", "transformer/h_1/attn/c_attn/kernel", ("embed", "heads")),
    ("gpt2", "transformer/h_1/attn/c_attn/bias", ("heads",)),
    ("gpt2", "transformer/h_0/attn/c_proj/kernel", ("heads", "embed")),
    ("gpt2", "transformer/h_0/mlp/c_proj/kernel", ("mlp", "embed")),
    ("gpt2", "transformer/h_0/mlp/c_proj/bias", ("embed",)),
    ("gpt2", "transformer/ln_f/bias", ("norm",)),
    ("llama", "model/embed_tokens/embedding", ("vocab", "embed")),
    ("llama", "lm_head/kernel", ("embed", "vocab")),
    ("llama", "model/layers_1/self_attn/q_proj/kernel", ("embed", "heads")),
    ("llama", "model/layers_1/self_attn/k_proj/kernel", ("embed", "kv")),
    ("llama", "model/layers_1/self_attn/v_proj/kernel", ("embed", "kv")),
    ("llama", "model/layers_1/self_attn/o_proj/kernel", ("heads", "embed")),
    ("llama", "model/layers_0/mlp/down_proj/kernel", ("mlp", "embed")),
    ("llama", "model/norm/scale", ("norm",)),
    ("qwen2", "model/layers_0/self_attn/k_proj/bias", ("kv",)),
    ("llama3_tied_bias", "model/layers_0/self_attn/o_proj/bias", ("embed",)),
    ("llama3_tied_bias", "model/layers_0/mlp/up_proj/bias", ("mlp",)),
    ("bert_seq_cls", "bert/embeddings/word_embeddings/embedding", ("vocab", "embed")),
    ("bert_seq_cls", "bert/embeddings/token_type_embeddings/embedding", (None, "embed")),
    ("bert_seq_cls", "bert/encoder/layer_1/attention/self/value/kernel", ("embed", "kv")),
    ("bert_seq_cls", "bert/encoder/layer_1/attention/output/dense/kernel", ("heads", "embed")),
    ("bert_seq_cls", "bert/encoder/layer_1/output/dense/kernel", ("mlp", "embed")),
    ("bert_seq_cls", "bert/encoder/layer_1/intermediate/dense/bias", ("mlp",)),
    ("bert_seq_cls", "bert/pooler/dense/kernel", ("embed", None)),
    ("bert_seq_cls", "classifier/kernel", ("embed", None)),
    ("bert", "encoder/layer_0/output/LayerNorm/scale", ("norm",)),
    ("t5", "shared/embedding", ("vocab", "embed")),
    ("t5", "decoder/block_1/layer_1/EncDecAttention/k/kernel", ("embed", "kv")),
    ("t5", "encoder/block_0/layer_0/SelfAttention/o/kernel", ("heads", "embed")),
    ("t5", "encoder/block_0/layer_0/SelfAttention/relative_attention_bias/embedding", (None, "heads")),
    ("t5", "decoder/block_0/layer_2/DenseReluDense/wo/kernel", ("mlp", "embed")),
    ("t5_gated", "decoder/block_2/layer_2/DenseReluDense/wi_1/kernel", ("embed", "mlp")),
    ("t5_gated", "lm_head/kernel", ("embed", "vocab")),
    ("t5_gated", "encoder/final_layer_norm/scale", ("norm",)),
  ],
)
def test_logical_axes_of_each_architecture(name, path, expected):
  assert _axes(name, path) == PartitionSpec(*expected)


def test_scan_puts_layers_first_and_keeps_the_layer_axes():
  model, scanned = _abstract("llama3_tied_bias", scan_layers=True)
  per_layer = flatten(models.logical_axes(*_abstract("llama3_tied_bias")))
  for path, spec in flatten(models.logical_axes(model, scanned)).items():
    if path[:2] == ("model", "layers"):
      assert spec == PartitionSpec("layers", *per_layer[("model", "layers_0", *path[2:])]), path
    else:
      assert spec == per_layer[path], path


def test_adapters_take_their_kernels_axes_and_the_rank():
  model, shapes = _abstract("llama", scan_layers=True)
  cfg = jlora.LoraConfig(r=4, target_modules=["q_proj", "down_proj", "embed_tokens"], use_dora=True)
  adapted = jax.eval_shape(lambda p: jlora.init(jax.random.key(0), model, p, cfg, jnp.zeros((1, 2), jnp.int32)),
                           shapes)
  axes = flatten(models.logical_axes(model, adapted))
  q, down = ("model", "layers", "self_attn", "q_proj"), ("model", "layers", "mlp", "down_proj")
  assert axes[(*q, "lora_a")] == PartitionSpec("layers", "embed", "lora_rank")
  assert axes[(*q, "lora_b")] == PartitionSpec("layers", "lora_rank", "heads")
  assert axes[(*down, "lora_b")] == PartitionSpec("layers", "lora_rank", "embed")
  assert axes[(*q, "lora_magnitude")] == PartitionSpec("layers", None, "heads")
  assert axes[("model", "embed_tokens", "lora_a")] == PartitionSpec("vocab", "lora_rank")


def test_an_adapter_without_a_matching_kernel_is_an_error():
  model, shapes = _abstract("llama")
  shapes["model"]["layers_0"]["mlp"]["up_proj"]["lora_a"] = jax.ShapeDtypeStruct((3, 32, 4), jnp.float32)
  with pytest.raises(ValueError, match=r"'model/layers_0/mlp/up_proj' has only one of lora_a / lora_b"):
    models.logical_axes(model, shapes)


def test_a_parameter_no_rule_covers_is_an_error_naming_its_path():
  model, shapes = _abstract("llama")
  shapes["model"]["layers_1"]["self_attn"]["rotary"] = {"kernel": jax.ShapeDtypeStruct((4, 4), jnp.float32)}
  with pytest.raises(ValueError, match=r"`model/layers_1/self_attn/rotary/kernel` of LlamaForCausalLM.*param_axes"):
    models.logical_axes(model, shapes)


def test_a_rule_with_the_wrong_rank_is_an_error():
  model, shapes = _abstract("gpt2")
  shapes["transformer"]["wpe"]["embedding"] = jax.ShapeDtypeStruct((2, 32, 16), jnp.float32)
  with pytest.raises(ValueError, match=r"names 2 axes .* `transformer/wpe/embedding`, which has 3"):
    models.logical_axes(model, shapes)


def test_not_a_model_is_an_error():
  with pytest.raises(ValueError, match=r"`model` must be a jlora\.models model"):
    models.logical_axes(object(), {})


def test_missing_mesh_axes_count_as_size_one():
  model, shapes = _abstract("llama", scan_layers=True)
  mesh = jax.make_mesh((1,), ("data",), axis_types=(AxisType.Auto,))
  for sharding in jax.tree.leaves(models.mesh_shardings(model, shapes, mesh)):
    assert sharding.mesh is mesh and all(a is None for a in sharding.spec)


def test_custom_rules_and_conflicting_mesh_axes():
  model, shapes = _abstract("bert_seq_cls")
  mesh = jax.make_mesh((1, 1), ("fsdp", "tensor"), axis_types=(AxisType.Auto,) * 2)
  rules = (("embed", "tensor"), ("mlp", "tensor"), ("mlp", "fsdp"))  # mlp falls back when embed took tensor
  got = flatten(models.mesh_shardings(model, shapes, mesh, rules=rules))
  assert got[("bert", "encoder", "layer_0", "intermediate", "dense", "kernel")].spec == PartitionSpec("tensor", "fsdp")
  assert got[("bert", "encoder", "layer_0", "intermediate", "dense", "bias")].spec == PartitionSpec("tensor")
  assert got[("bert", "encoder", "layer_0", "attention", "self", "query", "kernel")].spec == PartitionSpec("tensor", None)


def test_default_rules():
  assert dict(models.DEFAULT_RULES) == {"batch": ("data", "fsdp"), "embed": "fsdp", "experts": "fsdp", "vocab": "tensor",
                                        "heads": "tensor", "kv": "tensor", "mlp": "tensor", "act_mlp": "tensor",
                                        "act_embed": None, "length": None, "layers": None, "lora_rank": None,
                                        "norm": None}


def test_bad_mesh_and_rules():
  model, shapes = _abstract("gpt2")
  mesh = jax.make_mesh((1,), ("data",), axis_types=(AxisType.Auto,))
  with pytest.raises(TypeError, match=r"`mesh` must be a jax.sharding.Mesh .*got str"):
    models.mesh_shardings(model, shapes, "data")
  with pytest.raises(TypeError, match=r"`rules` must be a sequence of \(logical_name, mesh_axis"):
    models.mesh_shardings(model, shapes, mesh, rules={"embed": "fsdp"})
  with pytest.raises(TypeError, match="`rules` must be"):
    models.mesh_shardings(model, shapes, mesh, rules=[("embed", 3)])
  with pytest.raises(TypeError, match=r"`mesh` must be"):
    models.from_config("gpt2", key=jax.random.key(0), mesh=[0])
  with pytest.raises(TypeError, match=r"`mesh` must be"):
    models.from_pretrained("/nonexistent", mesh=object())
  with pytest.raises(ValueError, match="`rules` apply to a `mesh`"):
    models.from_config("gpt2", key=jax.random.key(0), rules=models.DEFAULT_RULES)
  explicit = jax.make_mesh((1,), ("data",), axis_types=(AxisType.Explicit,))
  with pytest.raises(ValueError, match=r"`mesh` has Explicit axes \['data'\].*AxisType.Auto"):
    models.from_config("gpt2", key=jax.random.key(0), mesh=explicit)


_MULTIDEVICE = r"""
import json, os, sys
# cheaper XLA compiles (sharded and unsharded programs are compiled alike, so comparisons hold)
os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from jlora import models
from jlora.core.tree import flatten
from tests.models.helpers import CONFIGS, tokens

out_dir = sys.argv[1]
mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
key = jax.random.key(3)
report, built = {}, {}

def diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

def same_shardings(params, model, mesh=mesh):
  want = models.mesh_shardings(model, params, mesh)
  return all(a.sharding == s for a, s in zip(jax.tree.leaves(params), jax.tree.leaves(want)))

def device_fraction(params):
  # the largest share of the tree's bytes that one device holds
  per_device = {}
  for a in jax.tree.leaves(params):
    for s in a.addressable_shards:
      per_device[s.device] = per_device.get(s.device, 0) + s.data.nbytes
  return max(per_device.values()) / sum(a.nbytes for a in jax.tree.leaves(params))

for name, options in [("gpt2", {}), ("llama", {"scan_layers": True}), ("bert_seq_cls", {}), ("t5", {})]:
  config = CONFIGS[name]
  model, sharded = models.from_config(config, key=key, mesh=mesh, **options)
  _, plain = models.from_config(config, key=key, **options)
  built[name] = model, sharded, plain
  path = f"{out_dir}/{name}"
  models.save_pretrained(path, model, plain, config=config)
  _, loaded = models.from_pretrained(path, mesh=mesh, **options)
  _, loaded_plain = models.from_pretrained(path, **options)
  ids = tokens((4, 8))
  inputs = (ids, None, ids) if name == "t5" else (ids,)
  batch = NamedSharding(mesh, P(("data", "fsdp")))
  forward = jax.jit(lambda p, *x: model.apply({"params": p}, *x))
  y = forward(loaded, *[None if x is None else jax.device_put(x, batch) for x in inputs])
  y0 = forward(loaded_plain, *inputs)
  report[name] = {
    "init_shardings": same_shardings(sharded, model), "init_diff": diff(sharded, plain),
    "init_fraction": device_fraction(sharded),
    "load_shardings": same_shardings(loaded, model), "load_diff": diff(loaded, loaded_plain),
    "load_fraction": device_fraction(loaded), "forward_diff": diff(y, y0),
  }

# indivisible axes are replicated
gpt2, sharded, plain = built["gpt2"]
report["gpt2_specs"] = {"/".join(p): [list(a) if isinstance(a, tuple) else a for a in s.spec]
                        for p, s in flatten(models.mesh_shardings(gpt2, sharded, mesh)).items()}
# mesh axes that a mesh lacks count as size 1
data_mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
_, on_data = models.from_pretrained(f"{out_dir}/gpt2", mesh=data_mesh)
report["data_mesh"] = {"shardings": same_shardings(on_data, gpt2, data_mesh), "diff": diff(on_data, plain),
                       "replicated": all(a.sharding.is_fully_replicated for a in jax.tree.leaves(on_data))}

# new task heads (pooler, classifier) of a base checkpoint, initialized into their shards
bert, sharded, plain = built["bert_seq_cls"]
base = {k: plain["bert"][k] for k in ("embeddings", "encoder")}
models.save_pretrained(f"{out_dir}/bert", bert, base, config=CONFIGS["bert"])  # a BertModel checkpoint
model, new = models.from_pretrained(f"{out_dir}/bert", task="SEQ_CLS", num_labels=3, key=key, mesh=mesh)
report["new_head"] = {"shardings": same_shardings(new, model), "diff": diff(new, sharded)}
# bfloat16: each slice cast on the host as jnp.asarray casts the whole tensor
_, bf16 = models.from_pretrained(f"{out_dir}/llama", mesh=mesh, dtype=jnp.bfloat16, scan_layers=True)
_, bf16_plain = models.from_pretrained(f"{out_dir}/llama", dtype=jnp.bfloat16, scan_layers=True)
report["bf16"] = {"dtype": str(bf16["lm_head"]["kernel"].dtype), "diff": diff(bf16, bf16_plain)}
print("REPORT" + json.dumps(report))
"""


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  """What the 8-device subprocess measured (one interpreter for every check below)."""
  out = once_per_session("models_sharding",
                         lambda: run_devices(_MULTIDEVICE, 8, str(tmp_path_factory.mktemp("sharded"))))
  return json.loads(out.split("REPORT", 1)[1])


ARCHS = ["gpt2", "llama", "bert_seq_cls", "t5"]


@pytest.mark.parametrize("name", ARCHS)
def test_from_config_on_a_mesh_initializes_into_the_shardings(report, name):
  got = report[name]
  assert got["init_shardings"] and got["init_diff"] <= 1e-6, got
  assert got["init_fraction"] < 0.5, got  # no device holds the whole tree


@pytest.mark.parametrize("name", ARCHS)
def test_from_pretrained_on_a_mesh_equals_the_unsharded_load(report, name):
  got = report[name]
  assert got["load_shardings"] and got["load_diff"] == 0.0 and got["load_fraction"] < 0.5, got


@pytest.mark.parametrize("name", ARCHS)
def test_forward_on_sharded_params_equals_unsharded(report, name):
  assert report[name]["forward_diff"] <= 1e-5, report[name]


def test_indivisible_axes_are_replicated(report):
  specs = report["gpt2_specs"]
  assert specs["transformer/wte/embedding"] == [None, "fsdp"]  # vocab 37 over tensor=2: replicated
  assert specs["transformer/h_0/mlp/c_fc/kernel"] == ["fsdp", "tensor"]
  assert specs["transformer/h_0/attn/c_attn/bias"] == ["tensor"]
  assert specs["transformer/ln_f/scale"] == [None]


def test_a_mesh_without_fsdp_and_tensor_axes_replicates(report):
  assert report["data_mesh"] == {"shardings": True, "replicated": True, "diff": 0.0}


def test_new_head_and_bfloat16_load_into_shards(report):
  assert report["new_head"] == {"shardings": True, "diff": 0.0}
  assert report["bf16"] == {"dtype": "bfloat16", "diff": 0.0}
