"""EVA (`init_lora_weights="eva"`): components, rank redistribution and masks against PEFT's `get_eva_state_dict`;
`jlora.init_eva`'s adapters and config; the refusals."""

import dataclasses
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora

pytestmark = pytest.mark.usefixtures("float32_matmuls")  # tests/conftest.py

D = 16


class Chain(nn.Module):
  """a -> tanh -> b -> tanh -> c, as `_torch_chain`."""

  @nn.compact
  def __call__(self, input_ids, attention_mask=None):  # float inputs; PEFT's default mask reads this name
    h = jnp.tanh(nn.Dense(D, name="a")(input_ids)) * 3
    return nn.Dense(4, name="c")(jnp.tanh(nn.Dense(D, name="b")(h)))


def _torch_chain(seed=0):
  torch = pytest.importorskip("torch")
  torch.manual_seed(seed)

  class Chain(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.a, self.b, self.c = torch.nn.Linear(D, D), torch.nn.Linear(D, D), torch.nn.Linear(D, 4)

    def forward(self, input_ids, attention_mask=None, labels=None):
      return self.c(torch.tanh(self.b(torch.tanh(self.a(input_ids)) * 3)))

  net = Chain()
  params = {n: {"kernel": jnp.asarray(getattr(net, n).weight.detach().numpy().T),
                "bias": jnp.asarray(getattr(net, n).bias.detach().numpy())} for n in "abc"}
  return net, params


def _batches(seed=0, n=5, dim=3):
  """Inputs `(4, 8, D)` near a `dim`-dimensional subspace, so the layers' spectra differ and the ranks move."""
  rng = np.random.default_rng(seed)
  basis = rng.normal(size=(dim, D)) * np.linspace(4, 1, dim)[:, None]
  return [(rng.normal(size=(4, 8, dim)) @ basis + 0.01 * rng.normal(size=(4, 8, D))).astype(np.float32)
          for _ in range(n)]


def _peft_state(net, batches, eva_config, r=4, **kw):
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  from peft.tuners.lora.config import EvaConfig
  from peft.tuners.lora.eva import get_eva_state_dict

  config = peft.LoraConfig(r=r, target_modules=["a", "b", "c"], init_lora_weights="eva",
                           eva_config=EvaConfig(**eva_config))
  loader = [{k: torch.tensor(v) for k, v in b.items()} if isinstance(b, dict) else {"input_ids": torch.tensor(b)}
            for b in batches]
  out = get_eva_state_dict(net, loader, peft_config=config, forward_fn=lambda m, i: m(**i),
                           show_progress_bar=False, **kw)
  return {k: v.numpy() for k, v in out.items()}


def _close(mine, ref):
  assert {k: np.shape(v) for k, v in mine.items()} == {k: v.shape for k, v in ref.items()}
  for k, v in ref.items():
    np.testing.assert_allclose(np.asarray(mine[k]), v, atol=1e-4 * np.abs(v).max(), err_msg=k)


# With rho=2 each layer keeps up to 8 = D/2 components, so PEFT's randomized SVD (q = 2·8 = D) is exact and the two
# must agree to float32 rounding.
@pytest.mark.parametrize("whiten", [False, True])
def test_components_and_ranks_equal_peft(whiten):
  net, params = _torch_chain()
  batches = _batches()
  eva = {"rho": 2.0, "whiten": whiten}
  ref = _peft_state(net, batches, eva, prepare_model_inputs_fn=None, prepare_layer_inputs_fn=None)
  config = jlora.LoraConfig(r=4, target_modules=["a", "b", "c"], init_lora_weights="eva", eva_config=eva)
  mine = jlora.get_eva_state_dict(Chain(), params, config, batches)
  assert sorted(len(v) for v in ref.values()) != [4, 4, 4]  # the ranks were redistributed
  _close(mine, ref)


def test_attention_mask_and_labels_leave_rows_out_as_in_peft():
  """PEFT's language-modelling default: rows whose `attention_mask` is 0 or whose label is -100 do not count."""
  net, params = _torch_chain(1)
  rng = np.random.default_rng(1)
  batches = []
  for x in _batches(1):
    attention = (rng.random((4, 8)) > 0.2).astype(np.int64)
    labels = np.where(rng.random((4, 8)) > 0.3, 1, -100)
    x = np.where(attention[..., None] == 1, x, 50.0).astype(np.float32)  # masked rows would dominate the PCA
    batches.append({"input_ids": x, "attention_mask": attention, "labels": labels})
  ref = _peft_state(net, batches, {"rho": 2.0})
  config = jlora.LoraConfig(r=4, target_modules=["a", "b", "c"], init_lora_weights="eva", eva_config={"rho": 2.0})
  _close(jlora.get_eva_state_dict(Chain(), params, config, batches), ref)


@pytest.mark.parametrize("jit", [False, True])
def test_haiku_gets_the_linen_models_adapters(jit):
  """`jlora.haiku.init_eva` on a Haiku model with the linen model's weights: the same components, ranks and config."""
  hk = pytest.importorskip("haiku")
  import jlora.haiku

  _, params = _torch_chain()
  batches = _batches()
  config = jlora.LoraConfig(r=4, target_modules=["a", "b", "c"], init_lora_weights="eva", eva_config={"rho": 2.0})
  want, want_config = jlora.init_eva(jax.random.key(0), Chain(), params, config, batches)

  def chain(x):
    h = jnp.tanh(hk.Linear(D, name="a")(x)) * 3
    return hk.Linear(4, name="c")(jnp.tanh(hk.Linear(D, name="b")(h)))

  f = hk.without_apply_rng(hk.transform(chain))
  hk_params = {n: {"w": params[n]["kernel"], "b": params[n]["bias"]} for n in "abc"}
  got, got_config = jlora.haiku.init_eva(jax.random.key(0), lambda p, rng, x: f.apply(p, x), hk_params, config, batches)
  assert got_config == want_config
  for n in "abc":
    np.testing.assert_allclose(got[n]["lora_a"], want[n]["lora_a"], atol=1e-5)
  run = jax.jit(lambda p, x: jlora.haiku.apply(lambda q, rng, y: f.apply(q, y), p, got_config, None, x)) if jit else (
      lambda p, x: jlora.haiku.apply(lambda q, rng, y: f.apply(q, y), p, got_config, None, x))
  np.testing.assert_allclose(run(got, batches[0]), f.apply(hk_params, batches[0]), rtol=1e-6, atol=1e-6)


class Attention(nn.Module):
  """q, k, v read the same input: one PCA serves the three."""

  @nn.compact
  def __call__(self, x):
    q, k, v = (nn.Dense(D, name=n)(x) for n in ("q", "k", "v"))
    w = jax.nn.softmax(jnp.einsum("btd,bsd->bts", q, k), axis=-1)
    return nn.Dense(D, name="o")(jnp.einsum("bts,bsd->btd", w, v))


@pytest.fixture(scope="module")
def attention():
  model = Attention()
  batches = _batches(2, n=4, dim=5)
  base = model.init(jax.random.key(0), batches[0])["params"]
  config = jlora.LoraConfig(r=2, lora_alpha=4, target_modules=["q", "k", "v", "o"], init_lora_weights="eva",
                            eva_config={"rho": 3.0, "tau": 0.95})
  params, out = jlora.init_eva(jax.random.key(1), model, base, config, batches)
  return types.SimpleNamespace(model=model, base=base, batches=batches, config=config, params=params, out=out)


def test_layers_sharing_an_input_share_components(attention):
  a = attention
  state = jlora.get_eva_state_dict(a.model, a.base, a.config, a.batches)
  ranks = {k: len(v) for k, v in state.items()}
  assert sum(ranks.values()) == 4 * 2  # the budget: every layer's r
  top = max(ranks[n] for n in "qkv")
  for n in "qkv":  # the same PCA: each layer's components are the first of the shared ones
    np.testing.assert_array_equal(state[n], state[max("qkv", key=ranks.get)][: ranks[n]])
  assert top >= 1


@pytest.mark.parametrize("jit", [False, True])
def test_init_eva_gives_the_components_as_a_and_the_base_output(attention, jit):
  model, base, batches, config, params, out = (getattr(attention, k) for k in
                                                 ("model", "base", "batches", "config", "params", "out"))
  state = jlora.get_eva_state_dict(model, base, config, batches)
  for name, comps in state.items():
    if len(comps) == 0:
      assert "lora_a" not in params[name]
      continue
    np.testing.assert_allclose(params[name]["lora_a"], np.asarray(comps).T, atol=1e-6)
    np.testing.assert_array_equal(params[name]["lora_b"], 0)
    assert out.rank_for(name) == len(comps)
    # adjust_scaling_factors: alpha scaled with the rank, so the scale stays lora_alpha / r
    assert out.scale_for(name) == pytest.approx(config.lora_alpha / config.r)
  run = jax.jit(jlora.apply, static_argnums=(0, 2)) if jit else jlora.apply
  np.testing.assert_allclose(run(model, params, out, batches[0]), model.apply({"params": base}, batches[0]),
                             rtol=1e-6, atol=1e-6)
  jlora.summary(params, out)  # the config describes every adapter


def test_a_rank_of_zero_removes_the_adapter_and_narrows_the_targets():
  """Three layers read 3-dimensional inputs, one reads 64-dimensional noise: the budget goes to the first three."""

  class Four(nn.Module):
    @nn.compact
    def __call__(self, *xs):  # a tuple batch is the positional arguments
      return sum(nn.Dense(4, name=f"l{i}")(x) for i, x in enumerate(xs))

  rng = np.random.default_rng(3)
  bases = [np.linalg.qr(rng.normal(size=(D, 3)))[0].T * np.array([[3.0], [2.0], [1.5]]) for _ in range(3)]
  batches = [tuple([(rng.normal(size=(64, 3)) @ b).astype(np.float32) for b in bases]
                   + [rng.normal(size=(64, 64)).astype(np.float32)]) for _ in range(3)]
  model = Four()
  base = model.init(jax.random.key(0), *batches[0])["params"]
  config = jlora.LoraConfig(r=2, target_modules=["l0", "l1", "l2", "l3"], init_lora_weights="eva",
                            eva_config={"rho": 1.5, "tau": 0.9})
  params, out = jlora.init_eva(jax.random.key(1), model, base, config, batches)
  assert "lora_a" not in params["l3"] and params["l3"].keys() == base["l3"].keys()
  assert sorted(params[f"l{i}"]["lora_a"].shape[1] for i in range(3)) == [2, 3, 3]  # 8 = 4 layers × r=2
  assert out.target_modules == ("l0", "l1", "l2")
  np.testing.assert_allclose(jlora.apply(model, params, out, *batches[0]),
                             model.apply({"params": base}, *batches[0]), rtol=1e-6, atol=1e-6)
  loaded = jlora.init(jax.random.key(2), model, base, dataclasses.replace(out, init_lora_weights=True), *batches[0])
  assert jax.tree.map(jnp.shape, loaded) == jax.tree.map(jnp.shape, params)  # the config re-creates the layout


def test_peft_reads_the_eva_adapter(attention, tmp_path):
  """`save_peft` writes the EVA ranks and alphas as `rank_pattern` / `alpha_pattern`: PEFT's model, on the same
  weights, gives jlora's output; `load_peft` reads it back. (Written with `init_lora_weights=True`, as every init
  that PEFT would otherwise run again at load.)"""
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  model, base, batches, params, out = (getattr(attention, k) for k in ("model", "base", "batches", "params", "out"))
  trainable, _ = jlora.split(params, out)
  trained = jlora.combine(jax.tree.map(lambda v: v + 0.01, trainable), base)  # as if trained
  jlora.save_peft(tmp_path, model, trained, out, name_map="flax")
  loaded, cfg = jlora.load_peft(tmp_path, model, base, name_map="flax")
  assert all(cfg.rank_for(n) == out.rank_for(n) and cfg.alpha_for(n) == out.alpha_for(n) for n in "qkvo" if n in loaded)
  want = jlora.apply(model, trained, out, batches[0])
  np.testing.assert_allclose(jlora.apply(model, loaded, cfg, batches[0]), want, rtol=1e-6, atol=1e-6)

  class Torch(torch.nn.Module):
    def __init__(self):
      super().__init__()
      for n in "qkvo":
        setattr(self, n, torch.nn.Linear(D, D))

    def forward(self, x):
      w = torch.softmax(torch.einsum("btd,bsd->bts", self.q(x), self.k(x)), dim=-1)
      return self.o(torch.einsum("bts,bsd->btd", w, self.v(x)))

  net = Torch()
  with torch.no_grad():
    for n in "qkvo":
      getattr(net, n).weight.copy_(torch.tensor(np.asarray(base[n]["kernel"]).T))
      getattr(net, n).bias.copy_(torch.tensor(np.asarray(base[n]["bias"])))
  got = peft.PeftModel.from_pretrained(net, str(tmp_path))(torch.tensor(batches[0])).detach().numpy()
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_refusals(attention):
  model, base, batches, config, params = (getattr(attention, k) for k in ("model", "base", "batches", "config", "params"))
  with pytest.raises(ValueError, match=r"jlora\.init_eva\("):
    jlora.init(jax.random.key(0), model, base, config, batches[0])
  with pytest.raises(TypeError, match="list of batches"):
    jlora.init_eva(jax.random.key(0), model, base, config, iter(batches))
  with pytest.raises(ValueError, match="already holds adapters"):
    jlora.init_eva(jax.random.key(0), model, params, config, batches)
  with pytest.raises(ValueError, match="init_lora_weights='eva'"):
    jlora.init_eva(jax.random.key(0), model, base, dataclasses.replace(config, init_lora_weights=True), batches)
  with pytest.raises(ValueError, match=r"round\(r·rho\) = 24 components, more than its 16"):
    jlora.get_eva_state_dict(model, base, dataclasses.replace(config, eva_config={"rho": 12.0}), batches)
  with pytest.raises(ValueError, match="leading axes"):
    jlora.get_eva_state_dict(model, base, config, batches, mask=lambda b: np.ones((3, 3), bool))
  with pytest.raises(ValueError, match="have not converged"):
    jlora.get_eva_state_dict(model, base, dataclasses.replace(config, eva_config={"tau": 1.0}), batches, max_steps=3)
  poisoned = [np.where(np.arange(8)[None, :, None] == 3, np.nan, batches[0])]  # one token's input is NaN
  with pytest.raises(ValueError, match=r"not finite after batch 0"):
    jlora.get_eva_state_dict(model, base, config, poisoned)
  with pytest.raises(ValueError, match="names layers the config does not adapt"):
    jlora.init_eva(jax.random.key(0), model, base, config, batches, eva_state_dict={"nope": np.zeros((1, D))})
  with pytest.raises(ValueError, match="eva_config\\['rho'\\]"):
    jlora.LoraConfig(init_lora_weights="eva", eva_config={"rho": 0.5})
  with pytest.raises(ValueError, match="PEFT's EvaConfig"):
    jlora.LoraConfig(init_lora_weights="eva", eva_config={"rh0": 2.0})


def test_remat_layers_are_refused():
  class Remat(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.remat(nn.Dense)(D, name="fc")(x)

  x = _batches(5, n=1)[0]
  base = Remat().init(jax.random.key(0), x)["params"]
  config = jlora.LoraConfig(r=2, target_modules=["fc"], init_lora_weights="eva")
  with pytest.raises(ValueError, match="without remat"):
    jlora.init_eva(jax.random.key(0), Remat(), base, config, [x])


def test_scanned_layers_are_refused():
  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      return jnp.tanh(nn.Dense(D, name="fc")(x)), None

  class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)(name="layers")(x, None)[0]

  x = _batches(4, n=1)[0]
  base = Stack().init(jax.random.key(0), x)["params"]
  config = jlora.LoraConfig(r=2, target_modules=["fc"], init_lora_weights="eva")
  with pytest.raises(ValueError, match="unrolled"):
    jlora.init_eva(jax.random.key(0), Stack(), base, config, [x])
