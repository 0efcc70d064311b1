"""jlora.equinox: LoRA by module surgery on real Equinox models; the `(out, in)` roles, the factored forward against
the merge, gradients, checkpoints, and PEFT files against PyTorch PEFT."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.core.targets import is_lora_key
from tests.test_structure import _dot_shapes

eqx = pytest.importorskip("equinox", reason="equinox (the dev extra) is needed for jlora.equinox")
import jlora.equinox as jeqx  # noqa: E402  (after the importorskip)

ATOL = 2e-5
run = eqx.filter_jit(lambda model, ids: model(ids))  # one compile per model structure, not one per op


pytestmark = pytest.mark.usefixtures("float32_matmuls")  # tests/conftest.py


class Net(eqx.Module):
  embed: eqx.nn.Embedding
  attn: eqx.nn.MultiheadAttention
  mlp: eqx.nn.MLP
  head: eqx.nn.Linear

  def __init__(self, key):
    k = jax.random.split(key, 4)
    self.embed = eqx.nn.Embedding(11, 8, key=k[0])
    self.attn = eqx.nn.MultiheadAttention(2, 8, key=k[1])
    self.mlp = eqx.nn.MLP(8, 8, 16, 1, key=k[2])
    self.head = eqx.nn.Linear(8, 3, key=k[3])

  def __call__(self, ids):
    h = jax.vmap(self.embed)(ids)
    h = h + self.attn(h, h, h)
    return jax.vmap(self.head)(jax.vmap(self.mlp)(h))


@pytest.fixture(scope="module")
def net():
  return eqx.filter_jit(Net)(jax.random.key(0)), jnp.arange(6, dtype=jnp.int32) * 2 % 11


def _trained(model, config, seed=1):
  """Every adapter factor refilled with N(0, 0.5²) values (through to_params / from_params), as if trained."""
  rng = np.random.default_rng(seed)
  flat = jlora.core.tree.flatten(jeqx.to_params(model))
  flat = {p: jnp.asarray(0.5 * rng.standard_normal(v.shape), v.dtype) if is_lora_key(p[-1]) else v
          for p, v in flat.items()}
  return jeqx.from_params(model, jlora.core.tree.unflatten(flat), config)


CONFIG = jlora.LoraConfig(r=2, lora_alpha=4, target_modules=["query_proj", "value_proj", "layers.0", "embed"])


def test_targets_roles_and_init(net):
  base, ids = net
  model = jeqx.init(jax.random.key(1), base, CONFIG)
  assert isinstance(model.attn.query_proj, jeqx.LoraLinear) and isinstance(model.embed, jeqx.LoraEmbedding)
  assert type(model.attn.key_proj) is eqx.nn.Linear and type(model.head) is eqx.nn.Linear
  fc = model.mlp.layers[0]  # Linear(8 -> 16): weight (16, 8)
  assert fc.base.weight.shape == (16, 8) and fc.lora_a.shape == (1, 8, 2) and fc.lora_b.shape == (16, 1, 2)
  assert 0 < float(jnp.abs(fc.lora_a).max()) <= 1 / np.sqrt(8)  # kaiming-uniform over fan_in = 8: the input side
  np.testing.assert_array_equal(fc.lora_b, 0)
  assert model.embed.lora_a.shape == (11, 2) and model.embed.lora_b.shape == (2, 8)  # PEFT's embedding roles
  np.testing.assert_array_equal(model.embed.lora_a, 0)
  np.testing.assert_array_equal(run(model, ids), run(base, ids))  # B = 0 (A = 0 for the embedding): the base model
  assert fc.base.weight is base.mlp.layers[0].weight  # base arrays are the same objects
  # The same adapters as the plain-dict path on to_params (same key, same config).
  plain = jlora.core.tree.flatten(jlora.init_tree(jax.random.key(1), jeqx.to_params(base), CONFIG))
  ours = jlora.core.tree.flatten(jeqx.to_params(model))
  assert set(ours) - set(plain) == {("embed", "lora_a"), ("embed", "lora_b")}  # init_tree adapts no embedding
  for p, v in plain.items():
    np.testing.assert_array_equal(v, ours[p])
  every = jeqx.init(jax.random.key(1), base, jlora.LoraConfig(r=2, target_modules="all-linear"))
  adapted = sorted("/".join(p[:-1]) for p in jlora.core.tree.flatten(jeqx.to_params(every)) if p[-1] == "lora_a")
  assert adapted == ["attn/key_proj", "attn/output_proj", "attn/query_proj", "attn/value_proj", "mlp/layers/0",
                     "mlp/layers/1"]  # not the head, not the embedding
  with pytest.raises(ValueError, match=r"(?s)matched no module.*mlp/layers/1"):
    jeqx.init(jax.random.key(1), base, jlora.LoraConfig(r=2, target_modules=["nope"]))
  with pytest.raises(ValueError, match="already holds LoRA adapters"):
    jeqx.init(jax.random.key(1), model, CONFIG)


def test_delta_is_in_the_weight_layout_and_factored_equals_merged(net):
  base, ids = net
  model = _trained(jeqx.init(jax.random.key(1), base, CONFIG), CONFIG)
  merged = jeqx.merge(model)
  assert jax.tree.structure(merged) == jax.tree.structure(base)  # plain modules again
  s = CONFIG.scale_for("mlp/layers/0")
  fc = model.mlp.layers[0]
  a, b = np.asarray(fc.lora_a[0]), np.asarray(fc.lora_b[:, 0])  # (in, r), (out, r)
  np.testing.assert_allclose(merged.mlp.layers[0].weight - base.mlp.layers[0].weight, s * (a @ b.T).T, atol=1e-6, rtol=1e-5)
  emb = model.embed
  np.testing.assert_allclose(merged.embed.weight - base.embed.weight, s * emb.lora_a @ emb.lora_b, atol=1e-6, rtol=1e-5)
  y = run(model, ids)
  np.testing.assert_allclose(y, run(merged, ids), atol=ATOL, rtol=0)
  assert np.abs(y - run(base, ids)).max() > 1e-2
  # One layer by hand: W·x + b + s·B(Aᵀ·x).
  x = jnp.linspace(-1.0, 1.0, 8)
  np.testing.assert_allclose(fc(x), fc.base.weight @ x + fc.base.bias + s * b @ (a.T @ x), atol=ATOL)
  # The plain-dict merge of to_params gives the same weights.
  via_dict = jlora.merge(jeqx.to_params(model), CONFIG)
  for p, v in jlora.core.tree.flatten(jeqx.to_params(merged)).items():
    np.testing.assert_allclose(v, jlora.core.tree.get_path(via_dict, p), atol=1e-6, rtol=1e-5)


def test_gradients_reach_only_the_adapters_and_training_moves_them(net):
  base, ids = net
  model = _trained(jeqx.init(jax.random.key(1), base, CONFIG), CONFIG)
  trainable, frozen = eqx.partition(model, jeqx.trainable_mask(model))

  def loss(t, f):
    return jnp.mean(eqx.combine(t, f)(ids) ** 2)

  grad = eqx.filter_jit(eqx.filter_grad(loss))
  grads = grad(trainable, frozen)
  named = jlora.core.tree.flatten(jeqx.to_params(eqx.combine(grads, frozen)))  # grads in the adapters' places
  lora = sorted(p for p in named if is_lora_key(p[-1]))
  assert len(lora) == 8 and len(jax.tree.leaves(grads)) == 8  # 4 adapters x (A, B), nothing else
  for p in lora:
    assert named[p].shape == jlora.core.tree.get_path(jeqx.to_params(model), p).shape and float(jnp.abs(named[p]).max()) > 0
  # Factored: no dot forms a kernel-sized weight gradient.
  jaxpr = jax.make_jaxpr(lambda t: eqx.filter_grad(loss)(t, frozen))(trainable).jaxpr
  kernels = {(16, 8), (8, 16), (8, 8)}
  assert not kernels & set(_dot_shapes(jaxpr))
  step = eqx.filter_jit(lambda t, f: jax.tree.map(lambda p, g: p - 0.1 * g, t, eqx.filter_grad(loss)(t, f)))
  value = eqx.filter_jit(loss)
  before, t = value(trainable, frozen), trainable
  for _ in range(3):
    t = step(t, frozen)
  assert value(t, frozen) < before
  biased = jeqx.trainable_mask(model, jlora.LoraConfig(r=2, target_modules=["query_proj"], bias="all"))
  assert biased.mlp.layers[1].bias is True and biased.mlp.layers[1].weight is False and biased.head.bias is True


def test_save_load_and_from_params(net, tmp_path):
  base, ids = net
  model = _trained(jeqx.init(jax.random.key(1), base, CONFIG), CONFIG)
  jlora.save_adapter(tmp_path / "adapter", jeqx.to_params(model), CONFIG)
  loaded, cfg = jlora.load_adapter(tmp_path / "adapter", jeqx.to_params(base))
  again = jeqx.from_params(base, loaded, cfg)
  assert jax.tree.structure(again) == jax.tree.structure(model)
  for x, y in zip(jax.tree.leaves(again), jax.tree.leaves(model)):
    np.testing.assert_array_equal(x, y)
  np.testing.assert_array_equal(run(again, ids), run(model, ids))
  assert jax.tree.structure(jeqx.from_params(model, jeqx.to_params(base))) == jax.tree.structure(base)  # unwrapped
  trainable = jlora.split(jeqx.to_params(model), CONFIG)[0]  # a part of the tree: the rest stays as in `base`
  for x, y in zip(jax.tree.leaves(jeqx.from_params(base, trainable, CONFIG)), jax.tree.leaves(model)):
    np.testing.assert_array_equal(x, y)
  with pytest.raises(ValueError, match=r"'head' does not fit its kernel \(3, 8\)"):
    jeqx.from_params(base, {"head": {"lora_a": jnp.ones((1, 3, 2)), "lora_b": jnp.ones((8, 1, 2))}}, CONFIG)
  with pytest.raises(ValueError, match="pass the `config`"):
    jeqx.from_params(base, loaded)
  with pytest.raises(ValueError, match="no place for"):
    jeqx.from_params(base, {**loaded, "extra": {"kernel": jnp.ones((2, 2))}}, cfg)
  bad = jeqx.to_params(base)
  bad["head"]["weight"] = jnp.ones((8, 3))
  with pytest.raises(ValueError, match=r"head/weight has shape \(8, 3\)"):
    jeqx.from_params(base, bad)


def test_non_equinox_entry_points_say_what_to_use(net):
  base, ids = net
  params = jeqx.to_params(base)
  with pytest.raises(TypeError, match=r"flax.linen Module.*jlora.init_tree"):
    jlora.init(jax.random.key(0), base, params, CONFIG, ids)
  with pytest.raises(TypeError, match=r"Equinox module.*jlora.equinox"):
    jlora.apply_merged(base, jlora.init_tree(jax.random.key(0), params, CONFIG), CONFIG, ids)


# ------------------------------------------------------------------ PEFT, against PyTorch
class Small(eqx.Module):
  embed: eqx.nn.Embedding
  mlp: eqx.nn.MLP

  def __init__(self, key):
    k1, k2 = jax.random.split(key)
    self.embed = eqx.nn.Embedding(11, 8, key=k1)
    self.mlp = eqx.nn.MLP(8, 3, 16, 2, key=k2)

  def __call__(self, ids):
    return jax.vmap(lambda i: self.mlp(self.embed(i)))(ids)


def _twin(torch, model):
  """The PyTorch module with the same names (`embed`, `mlp.layers.0`, ...) and weights."""

  class Twin(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.embed = torch.nn.Embedding(11, 8)
      self.mlp = torch.nn.Module()
      self.mlp.layers = torch.nn.ModuleList([torch.nn.Linear(8, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 3)])

    def forward(self, ids):
      h = self.embed(ids)
      for i, layer in enumerate(self.mlp.layers):
        h = layer(h) if i == 2 else torch.relu(layer(h))
      return h

  twin = Twin()
  with torch.no_grad():
    twin.embed.weight.copy_(torch.tensor(np.asarray(model.embed.weight)))
    for mine, theirs in zip(model.mlp.layers, twin.mlp.layers):
      theirs.weight.copy_(torch.tensor(np.asarray(mine.weight)))  # (out, in) both sides: no transpose
      theirs.bias.copy_(torch.tensor(np.asarray(mine.bias)))
  return twin.eval()


def test_peft_files_match_pytorch_peft_both_ways(tmp_path):
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  base, ids = eqx.filter_jit(Small)(jax.random.key(3)), jnp.array([1, 4, 7, 10], jnp.int32)
  tids = torch.tensor(np.asarray(ids), dtype=torch.long)
  cfg = jlora.LoraConfig(r=2, lora_alpha=4, target_modules=["embed", "layers.0", "layers.2"])
  model = _trained(jeqx.init(jax.random.key(1), base, cfg), cfg)
  jlora.save_peft(tmp_path / "ours", None, jeqx.to_params(model), cfg, name_map="flax")
  theirs = peft.PeftModel.from_pretrained(_twin(torch, base), tmp_path / "ours").eval()
  with torch.no_grad():
    np.testing.assert_allclose(theirs(tids).numpy(), run(model, ids), atol=ATOL, rtol=0)
    np.testing.assert_allclose(theirs.merge_and_unload()(tids).numpy(), run(jeqx.merge(model), ids), atol=ATOL, rtol=0)
  assert np.abs(run(model, ids) - run(base, ids)).max() > 1e-2
  # PEFT -> jlora: a PyTorch adapter with non-zero factors, loaded onto the Equinox base.
  torch.manual_seed(0)
  pcfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["embed", "mlp.layers.0", "mlp.layers.1"],
                         init_lora_weights=False)
  peft_model = peft.get_peft_model(_twin(torch, base), pcfg).eval()
  peft_model.save_pretrained(tmp_path / "theirs")
  params, cfg2 = jlora.load_peft(tmp_path / "theirs", None, jeqx.to_params(base), name_map="flax")
  loaded = jeqx.from_params(base, params, cfg2)
  assert loaded.mlp.layers[1].lora_a.shape == (1, 16, 2) and loaded.mlp.layers[1].lora_b.shape == (16, 1, 2)
  with torch.no_grad():
    expected = peft_model(tids).numpy()
  np.testing.assert_allclose(run(loaded, ids), expected, atol=ATOL, rtol=0)
  assert np.abs(expected - run(base, ids)).max() > 1e-2


def test_docstring_example_runs():
  import doctest

  result = doctest.testmod(jeqx, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0
