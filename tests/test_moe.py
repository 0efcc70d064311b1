"""`target_parameters`: LoRA on weights named by their parameter (PEFT's ParamWrapper), one adapter per expert of a
3-D `(experts, in, out)` weight: config checks, init, the factored forward (einsum and ragged_dot layers) against the
merged model, the refusal of a parameter the forward cannot reach, and PEFT files both ways against the real PEFT."""

import dataclasses
import json
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import jlora

pytestmark = pytest.mark.usefixtures("float32_matmuls")  # tests/conftest.py

E, C, D, F = 3, 4, 6, 5  # experts, tokens per expert, model width, expert width


class Experts(nn.Module):
  """Expert weights `(E, D, F)` contracted with tokens dispatched per expert `(E, C, D)`."""

  @nn.compact
  def __call__(self, x):
    return jnp.einsum("ecd,edf->ecf", x, self.param("w", nn.initializers.normal(1.0), (E, D, F)))


class Ragged(nn.Module):
  """Expert weights `(E, F, D)` applied to tokens sorted by expert (`jax.lax.ragged_dot`)."""

  @nn.compact
  def __call__(self, x, group_sizes):
    return jax.lax.ragged_dot(x, self.param("w", nn.initializers.normal(1.0), (E, F, D)), group_sizes)


jlora.register_layer(Experts, jlora.Layer(weight="w", input="x", equation="ecd,edf->ecf"))
jlora.register_layer(Ragged, jlora.Layer(weight="w", input="x", group_sizes="group_sizes"))


class MoE(nn.Module):
  """An einsum expert layer, a ragged_dot one over unequal groups, and a weight the module uses by hand."""

  @nn.compact
  def __call__(self, x):
    h = Experts(name="up")(x).reshape(E * C, F)
    y = Ragged(name="down")(h, jnp.array([C + 2, C - 1, C - 1], jnp.int32)).reshape(E, C, D)
    return jnp.einsum("ecd,edk->eck", y, self.param("hand", nn.initializers.normal(0.3), (E, D, D)))


X = jax.random.normal(jax.random.key(0), (E, C, D))
MODEL = MoE()
BASE = MODEL.init(jax.random.key(1), X)["params"]


def _close(a, b, rtol=1e-5):
  a, b = np.asarray(a), np.asarray(b)
  np.testing.assert_allclose(a, b, rtol=0, atol=rtol * float(np.abs(b).max()))


# -------------------------------------------------------------------------------------------- config
def test_config_refuses_what_peft_refuses_and_round_trips():
  with pytest.raises(TypeError, match="target_parameters"):
    jlora.LoraConfig(target_parameters="experts.w")
  for field, value in (("lora_dropout", 0.1), ("use_dora", True), ("fan_in_fan_out", True)):
    with pytest.raises(ValueError, match=rf"`{field}`=.* cannot be combined with `target_parameters`"):
      jlora.LoraConfig(target_parameters=["w"], **{field: value})
  cfg = jlora.LoraConfig(r=2, target_parameters=["up.w", "down/w"])
  assert cfg.target_parameters == ("up.w", "down/w")
  back = jlora.LoraConfig.from_json(cfg.to_json())
  assert back == cfg and json.loads(cfg.to_json())["target_parameters"] == ["up.w", "down/w"]


def test_init_errors_name_the_parameters():
  with pytest.raises(ValueError, match=r"entry 'nope' matched no parameter.*\n  up/w  \(3, 6, 5\)"):
    jlora.init(jax.random.key(2), MODEL, BASE, jlora.LoraConfig(r=2, target_parameters=["nope"]), X)
  tree = {"moe": {"w": jnp.ones((2, E, D, F, 2)), "gate": jnp.ones((D,))}}
  with pytest.raises(ValueError, match=r"matched 'moe/w' of shape \(2, 3, 6, 5, 2\)"):
    jlora.init_tree(jax.random.key(2), tree, jlora.LoraConfig(r=2, target_parameters=["moe.w"]))
  with pytest.raises(ValueError, match=r"matched 'moe/gate' of shape \(6,\)"):
    jlora.init_tree(jax.random.key(2), tree, jlora.LoraConfig(r=2, target_parameters=["gate"]))
  keyed = jlora.LoraConfig(r=2, target_parameters=["up.w"], rank_pattern={"up.w": 3})
  with pytest.raises(ValueError, match=r"`rank_pattern` key 'up.w' names the parameter 'up/w'.*e.g. 'up'"):
    jlora.init(jax.random.key(2), MODEL, BASE, keyed, X)
  both = jlora.LoraConfig(r=2, target_modules=["up"], target_parameters=["up.w"])
  with pytest.raises(ValueError, match="matched both by `target_modules` and by `target_parameters`"):
    jlora.init(jax.random.key(2), MODEL, BASE, both, X)
  linear = jlora.LoraConfig(r=2, target_modules="all-linear", target_parameters=["up.w"])
  with pytest.warns(UserWarning, match=r"hand \(3, 6, 6\): MoE is not a layer class.*`target_parameters`"):
    assert jlora.init(jax.random.key(2), MODEL, BASE, linear, X)["up"]["lora_a"].shape == (E, D, 1, 2)


# -------------------------------------------------------------------------------------------- linen
CFG = jlora.LoraConfig(r=2, lora_alpha=6, target_parameters=["up.w", "down.w"], rank_pattern={"down": 3},
                       init_lora_weights=False)


@pytest.fixture(scope="module")
def adapted():
  return jlora.init(jax.random.key(2), MODEL, BASE, CFG, X)


def test_one_adapter_per_expert_zero_b_at_init_and_merge_per_expert(adapted):
  up, down = adapted["up"], adapted["down"]
  assert up["lora_a"].shape == (E, D, 1, 2) and up["lora_b"].shape == (E, 1, F, 2)
  assert down["lora_a"].shape == (E, F, 1, 3) and down["lora_b"].shape == (E, 1, D, 3)
  zero_b = jlora.init(jax.random.key(2), MODEL, BASE, dataclasses.replace(CFG, init_lora_weights=True), X)
  assert not np.any(np.asarray(zero_b["up"]["lora_b"])) and np.any(np.asarray(zero_b["up"]["lora_a"]))
  merged = jlora.merge(adapted, CFG)
  for name, r in (("up", 2), ("down", 3)):
    a, b = np.asarray(adapted[name]["lora_a"])[:, :, 0], np.asarray(adapted[name]["lora_b"])[:, 0]
    want = np.stack([np.asarray(BASE[name]["w"][e]) + 6 / r * a[e] @ b[e].T for e in range(E)])
    _close(merged[name]["w"], want)
  _close(jlora.unmerge(merged, adapted, CFG)["up"]["w"], BASE["up"]["w"])


def test_factored_forward_equals_the_merged_model_outputs_and_gradients(adapted):
  y = jlora.apply(MODEL, adapted, CFG, X)
  merged = MODEL.apply({"params": jlora.merge(adapted, CFG)}, X)
  _close(y, merged)
  assert float(np.abs(np.asarray(merged) - np.asarray(MODEL.apply({"params": BASE}, X))).max()) > 1e-2
  trainable, frozen = jlora.split(adapted, CFG)
  g = jax.grad(lambda t: jnp.sum(jlora.apply(MODEL, jlora.combine(t, frozen), CFG, X) ** 2))(trainable)
  gm = jax.grad(lambda t: jnp.sum(jlora.apply_merged(lambda p, x: MODEL.apply({"params": p}, x),
                                                     jlora.combine(t, frozen), CFG, X) ** 2))(trainable)
  for u, v in zip(jax.tree.leaves(g), jax.tree.leaves(gm)):
    _close(u, v, 1e-4)


def test_a_parameter_used_by_hand_is_refused_by_apply_and_merged_by_apply_merged():
  cfg = jlora.LoraConfig(r=2, target_parameters=["hand"], init_lora_weights=False)
  params = jlora.init(jax.random.key(3), MODEL, BASE, cfg, X)
  assert params["hand_lora_a"].shape == (E, D, 1, 2)
  with pytest.raises(ValueError, match=r"adapter of 'hand' \(`target_parameters`\) was not used.*register_layer.*"
                                       r"jlora.apply_merged"):
    jlora.apply(MODEL, params, cfg, X)
  y = jlora.apply_merged(lambda p, x: MODEL.apply({"params": p}, x), params, cfg, X)
  a, b = np.asarray(params["hand_lora_a"])[:, :, 0], np.asarray(params["hand_lora_b"])[:, 0]
  w = np.asarray(BASE["hand"]) + 4.0 * np.einsum("eir,eor->eio", a, b)  # s = lora_alpha / r = 8 / 2
  merged = {**BASE, "hand": jnp.asarray(w)}
  _close(y, MODEL.apply({"params": merged}, X))


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return x + 0.1 * jnp.pad(Experts(name="experts")(x), ((0, 0), (0, 0), (0, D - F))), None


class Scanned(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)(name="layers")(x, None)[0]


def test_scanned_experts_get_a_layer_axis():
  model = Scanned()
  base = model.init(jax.random.key(4), X)["params"]
  cfg = jlora.LoraConfig(r=2, target_parameters=["experts.w"], use_rslora=True, init_lora_weights=False)
  params = jlora.init(jax.random.key(5), model, base, cfg, X)
  assert params["layers"]["experts"]["lora_a"].shape == (2, E, D, 1, 2)
  _close(jlora.apply(model, params, cfg, X), model.apply({"params": jlora.merge(params, cfg)}, X))


def test_plain_tree_experts_and_a_2d_weight():
  tree = {"moe": {"experts": {"w": jnp.ones((E, D, F))}, "proj": {"weight": jnp.ones((F, D))}}}
  cfg = jlora.LoraConfig(r=2, target_parameters=["experts.w", "proj.weight"], init_lora_weights=False)
  p = jlora.init_tree(jax.random.key(6), tree, cfg)
  assert p["moe"]["experts"]["lora_a"].shape == (E, D, 1, 2)
  assert p["moe"]["proj"]["lora_a"].shape == (1, D, 2) and p["moe"]["proj"]["lora_b"].shape == (F, 1, 2)
  x = jnp.ones((E, C, D))

  def f(q, x):
    return jnp.einsum("ecd,edf->ecf", x, q["moe"]["experts"]["w"]) @ q["moe"]["proj"]["weight"]

  a, b = p["moe"]["experts"]["lora_a"][:, :, 0], p["moe"]["experts"]["lora_b"][:, 0]
  want = jnp.einsum("ecd,edf->ecf", x, 1 + 4.0 * jnp.einsum("edr,efr->edf", a, b))
  want = want @ (1 + 4.0 * p["moe"]["proj"]["lora_b"][:, 0] @ p["moe"]["proj"]["lora_a"][0].T)
  _close(jlora.apply_merged(f, p, cfg, x), want)
  pytest.importorskip("haiku")
  from jlora import haiku as jhaiku

  with pytest.raises(ValueError, match=r"jlora\.haiku\.apply: the config has target_parameters"):
    jhaiku.apply(lambda q, rng, x: x, p, cfg, None, x)


# -------------------------------------------------------------------------------------------- PEFT (torch)
def test_peft_files_both_ways_against_pytorch_peft(tmp_path):
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  tnn = torch.nn

  class TExperts(tnn.Module):
    def __init__(self):
      super().__init__()
      self.gate = tnn.Parameter(torch.randn(E, F, D))  # PEFT's default layout: (experts, out, in)
      self.down = tnn.Parameter(torch.randn(E, D, F))

    def forward(self, x):
      return torch.einsum("ecf,edf->ecd", torch.einsum("ecd,efd->ecf", x, self.gate), self.down)

  class TProj(tnn.Module):
    def __init__(self):
      super().__init__()
      self.mix = tnn.Parameter(torch.randn(D, D))  # 2-D: (out, in)

    def forward(self, x):
      return x @ self.mix.T

  class TModel(tnn.Module):
    def __init__(self):
      super().__init__()
      self.moe = tnn.Module()
      self.moe.experts = TExperts()
      self.moe.proj = TProj()

    def forward(self, x):
      return self.moe.proj(self.moe.experts(x))

  class FExperts(nn.Module):
    @nn.compact
    def __call__(self, x):
      gate = self.param("gate", nn.initializers.zeros, (E, D, F))
      down = self.param("down", nn.initializers.zeros, (E, F, D))
      return jnp.einsum("ecf,efd->ecd", jnp.einsum("ecd,edf->ecf", x, gate), down)

  def flax_model(p, x):
    return FExperts().apply({"params": p["moe"]["experts"]}, x) @ p["moe"]["proj"]["mix"]

  torch.manual_seed(0)
  tmodel = TModel()
  t = {k: v.detach().numpy() for k, v in tmodel.named_parameters()}
  base = {"moe": {"experts": {"gate": jnp.asarray(t["moe.experts.gate"].transpose(0, 2, 1)),
                              "down": jnp.asarray(t["moe.experts.down"].transpose(0, 2, 1))},
                  "proj": {"mix": jnp.asarray(t["moe.proj.mix"].T)}}}
  x = np.asarray(X)
  _close(flax_model(base, x), tmodel(torch.tensor(x)).detach().numpy())
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    pmodel = peft.get_peft_model(tmodel, peft.LoraConfig(r=2, lora_alpha=6, target_parameters=[
        "experts.gate", "moe.experts.down", "proj.mix"], rank_pattern={"down": 3}, init_lora_weights=False))
  want = pmodel(torch.tensor(x)).detach().numpy()
  pmodel.save_pretrained(tmp_path / "peft")

  params, cfg = jlora.load_peft(tmp_path / "peft", None, base, name_map="flax")
  assert cfg.target_modules is None and set(cfg.target_parameters) == {"moe/experts/gate", "moe/experts/down",
                                                                        "moe/proj/mix"}
  assert params["moe"]["experts"]["down_lora_a"].shape == (E, F, 1, 3)
  _close(jlora.apply_merged(flax_model, params, cfg, x), want)
  merged = jlora.merge(params, cfg)
  layers = {"gate": pmodel.base_model.model.moe.experts.base_layer, "down": pmodel.base_model.model.moe.experts}
  for name, layer in layers.items():  # PEFT's delta (E, out, in) is jlora's (E, in, out) per expert
    delta = layer.get_delta_weight("default").detach().numpy().transpose(0, 2, 1)
    _close(np.asarray(merged["moe"]["experts"][name]) - np.asarray(base["moe"]["experts"][name]), delta)

  jlora.save_peft(tmp_path / "jlora", None, params, cfg, name_map="flax")
  saved = json.loads((tmp_path / "jlora" / "adapter_config.json").read_text())
  assert saved["target_parameters"] == ["moe.experts.down", "moe.experts.gate", "moe.proj.mix"]
  assert saved["target_modules"] is None and saved["rank_pattern"] == {"moe.experts.down": 3}
  torch.manual_seed(0)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    again = peft.PeftModel.from_pretrained(TModel(), tmp_path / "jlora")
  _close(again(torch.tensor(x)).detach().numpy(), want)


def test_peft_round_trip_of_scanned_and_same_shaped_experts(tmp_path):
  """Without torch: a scanned stack (`{i}` in the name) and two same-shaped weights of one module, whose nested
  wrappers only the module's dict order tells apart (load_peft says so)."""
  tree = {"layers": {"experts": {"gate": jax.random.normal(jax.random.key(7), (2, E, D, F)),
                                 "up": jax.random.normal(jax.random.key(8), (2, E, D, F))}}}
  cfg = jlora.LoraConfig(r=2, target_parameters=["experts.gate", "experts.up"], init_lora_weights=False)
  params = jlora.init_tree(jax.random.key(9), tree, cfg)
  assert params["layers"]["experts"]["gate_lora_a"].shape == (2, E, D, 1, 2)

  def names(path):
    return "model.layers.{i}." + ".".join(path[1:])

  jlora.save_peft(tmp_path, None, params, cfg, name_map=names)
  w = safetensors.numpy.load_file(str(tmp_path / "adapter_model.safetensors"))
  assert sorted(w) == sorted(f"base_model.model.model.layers.{i}.experts{nest}.lora_{ab}.weight" for i in range(2)
                             for nest in ("", ".base_layer") for ab in "AB")
  a = np.asarray(params["layers"]["experts"]["up_lora_a"])[1]  # layer 1, outermost wrapper: the module's last param
  np.testing.assert_array_equal(w["base_model.model.model.layers.1.experts.lora_A.weight"][2 * 2 + 1], a[2, :, 0, 1])  # row e·r + k
  with pytest.warns(UserWarning, match=r"have the same shapes; jlora takes PEFT's nesting"):
    back, back_cfg = jlora.load_peft(tmp_path, None, tree, name_map=names)
  assert set(back_cfg.target_parameters) == {"layers/experts/gate", "layers/experts/up"}
  for u, v in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_name_map_param_order_sets_peft_nesting(tmp_path):
  """`NameMap.param_order` is the PyTorch order of a module's parameters (Flax dicts come sorted): the last listed is
  PEFT's outermost wrapper, in `save_peft` and `load_peft` alike."""
  tree = {"experts": {"gate": jax.random.normal(jax.random.key(7), (E, D, F)),
                      "up": jax.random.normal(jax.random.key(8), (E, D, F))}}
  cfg = jlora.LoraConfig(r=2, target_parameters=["experts.gate", "experts.up"], init_lora_weights=False)
  params = jlora.init_tree(jax.random.key(9), tree, cfg)
  names = jlora.NameMap(lambda path: ".".join(path), param_order=("up", "gate"))  # `gate` registered last
  jlora.save_peft(tmp_path, None, params, cfg, name_map=names)
  w = safetensors.numpy.load_file(str(tmp_path / "adapter_model.safetensors"))
  a = np.asarray(params["experts"]["gate_lora_a"])
  np.testing.assert_array_equal(w["base_model.model.experts.lora_A.weight"][2 * 2 + 1], a[2, :, 0, 1])
  with pytest.warns(UserWarning, match=r"name map's `param_order`.*: \['experts.up', 'experts.gate'\]"):
    back, _ = jlora.load_peft(tmp_path, None, tree, name_map=names)
  for u, v in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
