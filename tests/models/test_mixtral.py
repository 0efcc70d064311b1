"""The reference Mixtral against `transformers`' `MixtralForCausalLM` (torch, CPU, float32) and PEFT: logits with
and without `scan_layers`, checkpoints both ways (transformers' per-expert files), LoRA on the experts
(`target_parameters`) factored, PEFT files both ways, a mesh, and the config's refusals."""

import dataclasses
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import jlora
from jlora import models
from jlora.models import mixtral
from tests.models.helpers import forward, lora_forward, tokens

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ATOL = 1e-4
E, K, D, F, V = 4, 2, 32, 24, 37
CONFIG = dict(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, num_local_experts=E, num_experts_per_tok=K, max_position_embeddings=64,
              rms_norm_eps=1e-5)
TARGETS = ["experts.gate_up_proj", "experts.down_proj"]


def _randomize(model):
  """Every parameter random at a scale where routing and logits are far from uniform (norm weights around 1)."""
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.3 * noise)
  return model


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
  """`(path, torch model)`: a tiny random Mixtral written by transformers' `save_pretrained`."""
  path = tmp_path_factory.mktemp("mixtral") / "base"
  config = transformers.MixtralConfig(**CONFIG)
  model = _randomize(transformers.MixtralForCausalLM(config)).eval()
  model.save_pretrained(path)
  return path, model


def _mask(b, t):
  mask = np.ones((b, t), np.int32)
  mask[1, t - 3:] = 0
  return mask


def _torch_logits(model, ids, mask):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits.numpy()


def _close(ours, theirs, mask, atol=ATOL):
  keep = mask.astype(bool)  # padded query positions are unspecified
  np.testing.assert_allclose(np.asarray(ours)[keep], np.asarray(theirs)[keep], atol=atol, rtol=0)


@pytest.mark.parametrize("scan", [False, True])
def test_logits_equal_transformers(hf, scan):
  path, tmodel = hf
  on_disk = safetensors.numpy.load_file(str(path / "model.safetensors"))
  assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in on_disk  # transformers writes one tensor per expert
  model, params = models.from_pretrained(path, scan_layers=scan)
  assert isinstance(model, mixtral.MixtralForCausalLM) and model.config.num_local_experts == E
  layer = params["model"]["layers"]["mlp"] if scan else params["model"]["layers_1"]["mlp"]
  lead = (2,) if scan else ()
  assert layer["experts"]["gate_up_proj"].shape == (*lead, E, D, 2 * F)
  assert layer["experts"]["down_proj"].shape == (*lead, E, F, D)
  ids, mask = tokens((2, 9)), _mask(2, 9)
  theirs = _torch_logits(tmodel, ids, mask)
  assert np.abs(theirs).max() > 1.0
  _close(forward(model, params, ids, mask), theirs, mask)


def test_checkpoints_both_ways(hf, tmp_path):
  path, tmodel = hf
  model, params = models.from_pretrained(path)
  fused = models.to_hf_state_dict(model, params)  # transformers 5's in-memory names
  state = {k: v.numpy() for k, v in tmodel.state_dict().items()}
  assert set(fused) == set(state)
  for name, value in state.items():
    np.testing.assert_array_equal(fused[name], value, err_msg=name)
  models.save_pretrained(tmp_path / "out", model, params)
  ours = safetensors.numpy.load_file(str(tmp_path / "out" / "model.safetensors"))
  theirs = safetensors.numpy.load_file(str(path / "model.safetensors"))
  assert set(ours) == set(theirs)  # the per-expert layout transformers saves
  for name, value in theirs.items():
    np.testing.assert_array_equal(ours[name], value, err_msg=name)
  config = json.loads((tmp_path / "out" / "config.json").read_text())
  assert config["architectures"] == ["MixtralForCausalLM"] and config["num_local_experts"] == E
  assert transformers.MixtralConfig(**config).num_experts_per_tok == K
  again, _ = models.from_pretrained(tmp_path / "out")  # and the fused names load too
  assert again.config.to_hf() == model.config.to_hf()
  back = models.from_hf_state_dict(model, fused)
  for u, v in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_incomplete_experts_are_named():
  tensors = {f"model.layers.0.block_sparse_moe.experts.{j}.{w}.weight": np.zeros((2, 2), np.float32)
             for j in range(2) for w in ("w1", "w2", "w3")}
  del tensors["model.layers.0.block_sparse_moe.experts.0.w3.weight"]
  with pytest.raises(ValueError, match=r"missing tensors \['model\.layers\.0\.block_sparse_moe\.experts\.0\.w3"):
    mixtral.per_expert_to_fused(tensors)


def test_config_refusals():
  with pytest.raises(ValueError, match=r"`num_experts_per_tok` must be in 1\.\.num_local_experts \(4\), got 5"):
    models.param_shapes({"model_type": "mixtral", **CONFIG, "num_experts_per_tok": 5})
  with pytest.raises(ValueError, match=r"`router_jitter_noise`=0\.1 is not supported.*set it to 0\.0"):
    models.param_shapes({"model_type": "mixtral", **CONFIG, "router_jitter_noise": 0.1})


@pytest.fixture(scope="module")
def peft_dir(hf):
  """A PEFT adapter on the torch model: every expert's weights and the router (`target_parameters`) and q_proj."""
  peft = pytest.importorskip("peft")
  path = hf[0]  # a fresh torch model: get_peft_model changes the one it wraps
  torch.manual_seed(1)
  config = peft.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj"], target_parameters=[*TARGETS, "gate.weight"],
                           init_lora_weights=False)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    pmodel = peft.get_peft_model(transformers.MixtralForCausalLM.from_pretrained(path).eval(), config)
  pmodel.save_pretrained(path.parent / "peft")
  ids, mask = tokens((2, 9)), _mask(2, 9)
  return path.parent / "peft", _torch_logits(pmodel.eval(), ids, mask)


def _without_router(tree):
  """The params without the router's adapter leaves."""
  if isinstance(tree, dict):
    return {k: {"weight": v["weight"]} if k == "gate" else _without_router(v) for k, v in tree.items()}
  return tree


@pytest.mark.parametrize("scan", [False, True])
def test_peft_target_parameters_both_ways(hf, peft_dir, tmp_path, scan):
  peft = pytest.importorskip("peft")
  path, _ = hf
  adapter, want = peft_dir
  model, base = models.from_pretrained(path, scan_layers=scan)
  params, cfg = jlora.load_peft(adapter, model, base)
  lead = (2,) if scan else ()
  mlp = params["model"]["layers" if scan else "layers_0"]["mlp"]
  assert mlp["experts"]["gate_up_proj_lora_a"].shape == (*lead, E, D, 1, 2)
  assert mlp["gate"]["lora_b"].shape == (*lead, E, 1, 2)  # the router's (E, d) weight, read (out, in)
  ids, mask = tokens((2, 9)), _mask(2, 9)
  merged = jax.jit(lambda p: jlora.apply_merged(lambda q, *x: model.apply({"params": q}, *x), p, cfg, ids, mask))
  _close(merged(params), want, mask)
  # The experts' adapters are factored (the router, used by hand as in transformers, is merged only).
  experts = dataclasses.replace(cfg, target_parameters=tuple(t for t in cfg.target_parameters if "gate/" not in t))
  no_router = _without_router(params)
  factored = np.asarray(lora_forward(model, no_router, experts, ids, mask))
  _close(factored, forward(model, jlora.merge(no_router, experts), ids, mask), mask, atol=1e-5 * np.abs(want).max())
  if scan:
    return
  jlora.save_peft(tmp_path / "again", model, params, cfg)
  saved = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
  assert saved["target_modules"] == ["q_proj"] and "model.layers.1.mlp.gate.weight" in saved["target_parameters"]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    tm = peft.PeftModel.from_pretrained(transformers.MixtralForCausalLM.from_pretrained(path), tmp_path / "again")
  _close(_torch_logits(tm.eval(), ids, mask), want, mask)


def test_lora_on_experts_trains_factored_on_a_mesh():
  """From a config on a 1-device mesh: adapters get logical axes, and the factored forward's gradient reaches
  every expert's adapter."""
  mesh = jax.make_mesh((1,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
  model, base = models.from_config({"model_type": "mixtral", **CONFIG}, key=jax.random.key(0), mesh=mesh)
  cfg = jlora.LoraConfig(r=2, target_modules=["v_proj"], target_parameters=TARGETS, init_lora_weights=False)
  ids = jnp.asarray(tokens((2, 9)))
  params = jlora.init(jax.random.key(1), model, base, cfg, ids)
  axes = models.logical_axes(model, params)["model"]["layers_0"]["mlp"]["experts"]
  assert tuple(axes["gate_up_proj"]) == ("experts", "embed", "mlp")
  assert tuple(axes["down_proj_lora_b"]) == ("experts", None, "embed", "lora_rank")
  lora, frozen = jlora.split(params, cfg)
  grads = jax.jit(jax.grad(lambda p: jnp.mean(jlora.apply(model, jlora.combine(p, frozen), cfg, ids) ** 2)))(lora)
  g = grads["model"]["layers_0"]["mlp"]["experts"]["gate_up_proj_lora_b"]
  assert g.shape == (E, 1, 2 * F, 2) and bool(jnp.all(jnp.any(g != 0, axis=(1, 2, 3))))  # every expert used
