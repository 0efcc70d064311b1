"""Convolutions as PEFT adapts them: grouped convolutions (`feature_group_count > 1`, PEFT's `groups > 1`) and
conv adapters in PEFT's file layout, both ways, against PyTorch PEFT with the same weights (NCHW there, NHWC here)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import jlora

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

FLAX_NAMES = jlora.NameMap(lambda path: ".".join(path))


class Convs(nn.Module):
  """A grouped 3×3 convolution (2 groups) and a plain strided 2×2 one, as `TorchConvs`."""

  @nn.compact
  def __call__(self, x):
    h = nn.Conv(6, (3, 3), feature_group_count=2, padding=1, name="grouped")(x)
    return nn.Conv(4, (2, 2), strides=2, padding="VALID", name="plain")(jnp.tanh(h))


class TorchConvs(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.grouped = torch.nn.Conv2d(4, 6, 3, padding=1, groups=2)
    self.plain = torch.nn.Conv2d(6, 4, 2, stride=2)

  def forward(self, x):
    return self.plain(torch.tanh(self.grouped(x)))


class Conv1(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Conv(5, (3,), padding=1, kernel_dilation=1, name="c")(x)


class TorchConv1(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.c = torch.nn.Conv1d(3, 5, 3, padding=1)

  def forward(self, x):
    return self.c(x)


def _base(torch_model) -> dict:
  """The Flax params of a PyTorch model's convolutions (before PEFT wraps them): `(out, in/g) + window` ->
  `window + (in/g, out)`."""
  out = {}
  for name, module in torch_model.named_children():
    w = module.weight.detach().numpy()
    out[name] = {"kernel": jnp.asarray(np.moveaxis(w, (0, 1), (-1, -2))),
                 "bias": jnp.asarray(module.bias.detach().numpy())}
  return out


def _torch_out(model, x: np.ndarray) -> np.ndarray:
  """`model` on channels-last `x`, channels last."""
  with torch.no_grad():
    y = model(torch.from_numpy(np.moveaxis(x, -1, 1).copy())).numpy()
  return np.moveaxis(y, 1, -1)


def _close(got, want):
  got, want = np.asarray(got), np.asarray(want)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


@pytest.fixture(scope="module")
def x2():
  return np.asarray(jax.random.normal(jax.random.key(0), (2, 6, 6, 4)), np.float32)


def test_a_peft_grouped_and_plain_conv_adapter_loads_and_equals_peft(tmp_path, x2):
  torch.manual_seed(0)
  tm = TorchConvs()
  base = _base(tm)
  with pytest.warns(UserWarning, match="groups > 1"):
    pm = peft.get_peft_model(tm, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["grouped", "plain"],
                                                 init_lora_weights=False))
  pm.save_pretrained(tmp_path)
  shapes = {k: v.shape for k, v in safetensors.numpy.load_file(tmp_path / "adapter_model.safetensors").items()}
  assert shapes["base_model.model.grouped.lora_A.weight"] == (4, 4, 3, 3)  # A: all 4 input features
  assert shapes["base_model.model.grouped.lora_B.weight"] == (6, 2, 1, 1)  # B: 1×1, 2 groups of r/2
  params, config = jlora.load_peft(tmp_path, None, base, name_map=FLAX_NAMES)
  assert params["grouped"]["lora_a"].shape == (3, 3, 4, 4) and params["grouped"]["lora_b"].shape == (2, 6)
  y = jlora.apply(Convs(), params, config, jnp.asarray(x2))
  want = _torch_out(pm, x2)
  assert np.abs(want - np.asarray(Convs().apply({"params": base}, jnp.asarray(x2)))).max() > 1e-2  # it adapts
  _close(y, want)
  # factored, as PEFT's: no array of the dense delta's shape (3, 3, 4, 6) is formed
  shapes = set()
  _shapes(jax.make_jaxpr(lambda p: jlora.apply(Convs(), p, config, jnp.asarray(x2)))(params).jaxpr, shapes)
  assert (3, 3, 4, 6) not in shapes and (2, 6, 6, 4) in shapes  # but x·A, r = 4 wide


def _shapes(jaxpr, out: set) -> None:
  """The shapes of every value a jaxpr (and the jaxprs inside it) computes."""
  for eqn in jaxpr.eqns:
    out.update(tuple(v.aval.shape) for v in eqn.outvars)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else (param,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          _shapes(inner, out)


def test_a_jlora_conv_adapter_saved_as_peft_loads_in_peft_and_equals(tmp_path, x2):
  torch.manual_seed(1)
  tm = TorchConvs()
  base = _base(tm)
  config = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=["grouped", "plain"], init_lora_weights=False)
  params = jlora.init(jax.random.key(3), Convs(), base, config, jnp.asarray(x2))
  y = jlora.apply(Convs(), params, config, jnp.asarray(x2))
  assert np.abs(np.asarray(y) - np.asarray(Convs().apply({"params": base}, jnp.asarray(x2)))).max() > 1e-2
  names = jlora.NameMap(lambda path: ".".join(path), conv=frozenset({"plain"}))  # `grouped` is a conv by its shapes
  jlora.save_peft(tmp_path, None, params, config, name_map=names)
  shapes = {k: v.shape for k, v in safetensors.numpy.load_file(tmp_path / "adapter_model.safetensors").items()}
  assert shapes == {"base_model.model.grouped.lora_A.weight": (4, 4, 3, 3),
                    "base_model.model.grouped.lora_B.weight": (6, 2, 1, 1),
                    "base_model.model.plain.lora_A.weight": (4, 6, 2, 2),
                    "base_model.model.plain.lora_B.weight": (4, 4, 1, 1)}
  with pytest.warns(UserWarning, match="groups > 1"):
    pm = peft.PeftModel.from_pretrained(tm, tmp_path)
  _close(_torch_out(pm, x2), y)
  back, _ = jlora.load_peft(tmp_path, None, base, name_map=FLAX_NAMES)  # and back: the same leaves
  for module in ("grouped", "plain"):
    for leaf in ("lora_a", "lora_b"):
      np.testing.assert_array_equal(back[module][leaf], params[module][leaf])


def test_a_conv1d_dora_adapter_goes_both_ways(tmp_path):
  """PEFT's Conv1d DoRA adapter (magnitude `(1, out, 1)`) loads and equals PEFT; saved again by jlora, PEFT loads
  it and computes the same."""
  x = np.asarray(jax.random.normal(jax.random.key(1), (2, 7, 3)), np.float32)
  torch.manual_seed(2)
  tm = TorchConv1()
  base = _base(tm)
  pm = peft.get_peft_model(tm, peft.LoraConfig(r=2, target_modules=["c"], use_dora=True,
                                                          init_lora_weights=False))
  with torch.no_grad():
    pm.base_model.model.c.lora_magnitude_vector["default"].weight.mul_(1.5)  # a trained magnitude, not the norm
  pm.save_pretrained(tmp_path / "peft")
  params, config = jlora.load_peft(tmp_path / "peft", None, base, name_map=FLAX_NAMES)
  want = _torch_out(pm, x)
  y = jlora.apply(Conv1(), params, config, jnp.asarray(x))
  _close(y, want)
  jlora.save_peft(tmp_path / "jlora", None, params, config,
                  name_map=jlora.NameMap(lambda path: ".".join(path), conv=frozenset({"c"})))
  saved = safetensors.numpy.load_file(tmp_path / "jlora" / "adapter_model.safetensors")
  assert saved["base_model.model.c.lora_magnitude_vector"].shape == (1, 5, 1)
  fresh = TorchConv1()
  fresh.c.load_state_dict(pm.base_model.model.c.base_layer.state_dict())
  again = peft.PeftModel.from_pretrained(fresh, tmp_path / "jlora")
  _close(_torch_out(again, x), want)


def test_grouped_conv_rules_are_peft_s_and_refusals_name_the_layer(x2):
  torch.manual_seed(0)
  base = _base(TorchConvs())
  x = jnp.asarray(x2)
  with pytest.raises(ValueError, match=r"`r`=3 at 'grouped'.*feature_group_count=2.*rank_pattern=\{'grouped': 2\}"):
    jlora.init(jax.random.key(0), Convs(), base, jlora.LoraConfig(r=3, target_modules=["grouped"]), x)
  config = jlora.LoraConfig(r=3, rank_pattern={"grouped": 2}, target_modules=["grouped", "plain"])
  assert jlora.init(jax.random.key(0), Convs(), base, config, x)["grouped"]["lora_b"].shape == (1, 6)
  with pytest.raises(ValueError, match=r"DoRA at 'grouped'.*use_dora=False"):
    jlora.init(jax.random.key(0), Convs(), base, jlora.LoraConfig(r=2, target_modules=["grouped"], use_dora=True), x)
  with pytest.raises(ValueError, match=r"init_lora_weights='olora'.*'grouped'"):
    jlora.init(jax.random.key(0), Convs(), base,
               jlora.LoraConfig(r=2, target_modules=["grouped"], init_lora_weights="olora"), x)
  config = jlora.LoraConfig(r=2, target_modules=["grouped"], init_lora_weights=False)
  params = jlora.init(jax.random.key(0), Convs(), base, config, x)
  with pytest.raises(ValueError, match=r"'grouped' belongs to a grouped convolution .*cannot be merged"):
    jlora.merge(params, config)
  with pytest.raises(ValueError, match=r"'grouped' belongs to a grouped convolution"):
    jlora.unmerge(base, jlora.split(params, config)[0], config)


def test_nnx_grouped_conv_equals_linen(x2):
  from flax import nnx

  from jlora import nnx as lnnx

  class N(nnx.Module):
    def __init__(self, rngs):
      self.grouped = nnx.Conv(4, 6, (3, 3), feature_group_count=2, padding=1, rngs=rngs)
      self.plain = nnx.Conv(6, 4, (2, 2), strides=2, padding="VALID", rngs=rngs)

    def __call__(self, x):
      return self.plain(jnp.tanh(self.grouped(x)))

  config = jlora.LoraConfig(r=4, target_modules=["grouped"], init_lora_weights=False)
  lora = lnnx.init(jax.random.key(0), N(nnx.Rngs(0)), config)
  params = lnnx.to_params(lora)
  assert params["grouped"]["lora_a"].shape == (3, 3, 4, 4) and params["grouped"]["lora_b"].shape == (2, 6)
  x = jnp.asarray(x2)
  want = jlora.apply(Convs(), params, config, x)
  assert float(jnp.abs(want - Convs().apply({"params": jlora.split(params, config)[1]}, x)).max()) > 1e-2
  _close(lora(x), want)
  with pytest.raises(ValueError, match=r"'grouped' belongs to a grouped convolution"):
    lnnx.merge(lora)
