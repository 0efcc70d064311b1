"""PEFT adapters of any origin: every initialisation loads when the forward is plain LoRA; variants that change
the forward, adapters saved over a rewritten base and pickles are refused with a way out."""

import dataclasses
import json
import os
import re
import warnings

import jax
import numpy as np
import pytest
import safetensors.numpy

import jlora
from jlora.core import config as _config
from tests import zoo

CASE = next(c for c in zoo.cases() if c.name == "mlp")
TARGETS = ["fc_0", "head"]


pytestmark = pytest.mark.usefixtures("float32_matmuls")  # tests/conftest.py


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A jlora adapter of the MLP saved in PEFT's format: `(directory, base, params)`."""
  base = zoo.build(CASE)
  cfg = jlora.LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False)
  params = jlora.init(jax.random.key(1), CASE.model, base, cfg, CASE.inputs)
  path = tmp_path_factory.mktemp("saved")
  jlora.save_peft(path, None, params, cfg, name_map="flax")
  return path, base, params


def _copy_with_config(src, dst, **changes):
  """The adapter at `src` copied to `dst` with `changes` made to its config (as another PEFT run would write it)."""
  os.makedirs(dst)
  data = json.loads((src / "adapter_config.json").read_text())
  data.update(changes)
  (dst / "adapter_config.json").write_text(json.dumps(data))
  safetensors.numpy.save_file(safetensors.numpy.load_file(str(src / "adapter_model.safetensors")),
                              str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
  return dst


# ------------------------------------------------------------------ configs (no torch)
@pytest.mark.parametrize("init, extra", [
    (True, {}), (False, {}), ("gaussian", {}), ("orthogonal", {}), ("mica", {}), ("nora", {}),
    ("eva", {"eva_config": {"rho": 2.0, "tau": 0.99, "whiten": False}}),
    (True, {"corda_config": {"corda_method": "kpm"}}),  # CorDA saved converted: PEFT writes init true, keeps the rest
    (True, {"lora_ga_config": {"direction": "ArB2r"}, "astra_config": {"verbose": False}}),
])
def test_inits_that_only_mattered_at_the_start_load(saved, tmp_path, init, extra):
  path, base, params = saved
  loaded, cfg = jlora.load_peft(_copy_with_config(path, tmp_path / "a", init_lora_weights=init, **extra), None, base,
                                name_map="flax")
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  assert cfg.init_lora_weights == init  # the adapter's history, kept (save_peft writes `true` for PEFT)


def test_loftq_loads_and_warns_that_its_base_is_the_quantized_one(saved, tmp_path):
  path, base, params = saved
  with pytest.warns(UserWarning, match=r"LoftQ adapter .* over that quantized backbone"):
    loaded, cfg = jlora.load_peft(_copy_with_config(path, tmp_path / "a", init_lora_weights="loftq",
                                                    loftq_config={"loftq_bits": 4, "loftq_iter": 1}),
                                  None, base, name_map="flax")
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  assert cfg.init_lora_weights == "loftq"


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_16", "olora", "corda", "astra", "lora_ga"])
def test_adapters_saved_over_a_rewritten_base_are_refused(saved, tmp_path, init):
  path, base, _ = saved
  with pytest.raises(ValueError, match=rf"init_lora_weights='{init}': that init moved part of each base weight .* "
                                       r"path_initial_model_for_weight_conversion=init_dir.*\"init_lora_weights\": "
                                       r"true"):
    jlora.load_peft(_copy_with_config(path, tmp_path / "a", init_lora_weights=init), None, base, name_map="flax")
  # ... and the same file loads when the user says `params` is that residual base
  jlora.load_peft(_copy_with_config(path, tmp_path / "b", init_lora_weights=True), None, base, name_map="flax")


def test_every_peft_field_is_known_and_every_variant_refused_at_config_load(tmp_path):
  """Read from PEFT's own LoraConfig: each field is a jlora field, dropped, or refused; each field PEFT tags as a
  LoRA variant (but DoRA) is refused by `LoraConfig.from_json` with the variant's name."""
  peft = pytest.importorskip("peft")
  from peft.tuners.lora import config as peft_config

  fields = {f.name: f for f in dataclasses.fields(peft.LoraConfig)}
  known = {f.name for f in dataclasses.fields(jlora.LoraConfig)} | set(_config._UNSUPPORTED) | set(
      _config._PEFT_IGNORED) | {"peft_type"}
  assert set(fields) <= known, set(fields) - known
  variants = {n for n, f in fields.items() if f.metadata.get("is_lora_variant")} - {"use_dora"}
  assert variants <= set(_config._UNSUPPORTED), variants - set(_config._UNSUPPORTED)
  enabled = {
      "use_bdlora": peft_config.BdLoraConfig(target_modules_bd_a=["fc"], nblocks=2), "kasa_config":
      peft_config.KasaConfig(), "velora_config": peft_config.VeloraConfig(), "monteclora_config":
      peft_config.MontecloraConfig(), "alora_invocation_tokens": [1, 2], "arrow_config": peft_config.ArrowConfig(),
      "use_qalora": True, "lora_bias": True,
  }
  names = {"use_bdlora": "BD-LoRA", "kasa_config": "KaSA", "velora_config": "VeLoRA", "monteclora_config":
           "MonteCLoRA", "alora_invocation_tokens": "activated LoRA", "arrow_config": "Arrow routing",
           "use_qalora": "QA-LoRA", "lora_bias": "a trainable bias on lora_B"}
  assert variants <= set(enabled)
  for key, value in enabled.items():
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # PEFT's own warnings about experimental variants
      peft.LoraConfig(r=4, target_modules=["fc"], **{key: value}).save_pretrained(tmp_path / key)
    with pytest.raises(ValueError, match=rf"`{key}`=.* asks for .*{re.escape(names[key])}.* does not implement: an "
                                         r"adapter trained with it does not compute plain LoRA"):
      jlora.LoraConfig.from_json(tmp_path / key / "adapter_config.json")


def test_a_pickle_is_refused_with_a_conversion_that_works(saved, tmp_path):
  torch = pytest.importorskip("torch")
  path, base, params = saved
  bin_dir = tmp_path / "bin"
  os.makedirs(bin_dir)
  (bin_dir / "adapter_config.json").write_text((path / "adapter_config.json").read_text())
  tensors = safetensors.numpy.load_file(str(path / "adapter_model.safetensors"))
  torch.save({k: torch.tensor(v) for k, v in tensors.items()}, bin_dir / "adapter_model.bin")  # what PEFT used to write
  with pytest.raises(ValueError, match=r"(?s)holds adapter_model.bin \(a pickle\) .* never unpickles .* weights_only=True")\
      as error:
    jlora.load_peft(bin_dir, None, base, name_map="flax")
  code = "\n".join(line[4:] for line in str(error.value).splitlines() if line.startswith("    "))
  exec(code, {})  # the conversion the message gives, run as written
  loaded, _ = jlora.load_peft(bin_dir, None, base, name_map="flax")
  jax.tree.map(np.testing.assert_array_equal, loaded, params)


# ------------------------------------------------------------------ against PEFT's own adapters
def _peft_trained(torch, peft, base, init, **options):
  """A PEFT model of the MLP made with `init`, its adapter leaves moved as training would: `(model, initial dir)`."""
  model = peft.get_peft_model(zoo.torch_mlp(base), peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init, **options))
  torch.manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_" in name:
        p.add_(0.05 * torch.randn_like(p))
  return model.eval()


def _peft_output(torch, model):
  with torch.no_grad():
    return model(torch.tensor(np.asarray(CASE.inputs))).numpy()


@pytest.mark.parametrize("init", ["orthogonal", "eva", "gaussian"])
def test_peft_adapters_whose_init_left_the_base_alone_equal_peft(tmp_path, init):
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  base = zoo.build(CASE)
  options = {"eva_config": peft.EvaConfig(rho=1.0)} if init == "eva" else {}
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # PEFT's warning that EVA's data-driven step was not run: A, B are trained anyway
    model = _peft_trained(torch, peft, base, init, **options)
  model.save_pretrained(tmp_path)
  params, cfg = jlora.load_peft(tmp_path, None, base, name_map="flax")
  assert cfg.init_lora_weights == init
  theirs = _peft_output(torch, model)
  np.testing.assert_allclose(jlora.apply(CASE.model, params, cfg, CASE.inputs), theirs, rtol=1e-5,
                             atol=1e-5 * np.abs(theirs).max())


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_peft_pissa_and_olora_load_converted_and_are_refused_unconverted(tmp_path, init):
  """Saved with `path_initial_model_for_weight_conversion` (rank 2r, init `true`), the adapter over the original
  weights equals PEFT's trained model over its residual base; saved as is, it is refused."""
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  base = zoo.build(CASE)
  model = peft.get_peft_model(zoo.torch_mlp(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                                    init_lora_weights=init))
  warnings.filterwarnings("ignore", message=".* changes the base weights", category=UserWarning)  # PEFT's, at reload
  model.peft_config["default"].init_lora_weights = True  # PEFT's recipe: the initial adapter, saved before training
  model.save_pretrained(tmp_path / "init")
  model.peft_config["default"].init_lora_weights = init
  torch.manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_" in name:
        p.add_(0.05 * torch.randn_like(p))
  model.eval()
  theirs = _peft_output(torch, model)
  model.save_pretrained(tmp_path / "as_is")
  with pytest.raises(ValueError, match=rf"init_lora_weights='{init}': that init moved part of each base weight"):
    jlora.load_peft(tmp_path / "as_is", None, base, name_map="flax")
  model.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
  params, cfg = jlora.load_peft(tmp_path / "converted", None, base, name_map="flax")
  assert cfg.r == 8 and cfg.init_lora_weights is True
  ours = np.asarray(jlora.apply(CASE.model, params, cfg, CASE.inputs))
  assert np.abs(ours - np.asarray(CASE.model.apply({"params": base}, CASE.inputs))).max() > 1e-2
  np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5 * np.abs(theirs).max())
