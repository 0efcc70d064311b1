"""PEFT's on-disk format both ways: layouts, names, errors, and logits against the real PEFT (when installed)."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy

import jlora
from jlora import NameMap, models
from jlora.formats import integrity as _integrity
from jlora.formats.peft.api import load_peft, save_peft
from tests import zoo
from tests.models.helpers import CONFIGS, forward, lora_forward, tokens, write_checkpoint

ATOL = 1e-4


pytestmark = pytest.mark.usefixtures("float32_matmuls")  # tests/conftest.py


def _inputs(name):
  ids = tokens((2, 7))
  if name.startswith("t5"):
    return (ids, np.ones_like(ids), tokens((2, 5), seed=1))
  if name.startswith("bert"):
    return (ids, np.ones_like(ids), np.zeros_like(ids))
  return (ids,)


def _tiny(name, targets, *, key=2, **options):
  opts = {k: options.pop(k) for k in ("scan_layers",) if k in options}
  model, base = models.from_config(CONFIGS[name], key=jax.random.key(0), **opts)
  cfg = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **options)
  return model, base, cfg, jlora.init(jax.random.key(key), model, base, cfg, *_inputs(name))


def _weights(directory):
  return safetensors.numpy.load_file(os.path.join(directory, "adapter_model.safetensors"))


def _same_trees(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ------------------------------------------------------------------ layouts and names (no torch)
def test_gpt2_keys_layouts_and_round_trip(tmp_path):
  model, base, cfg, params = _tiny("gpt2", ["c_attn", "c_fc"], bias="lora_only", rank_pattern={"c_fc": 2})
  save_peft(tmp_path, model, params, cfg)
  w = _weights(tmp_path)
  node = params["transformer"]["h_1"]["attn"]["c_attn"]
  a, b = w["base_model.model.transformer.h.1.attn.c_attn.lora_A.weight"], w[
      "base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"]
  assert a.shape == (4, 16) and b.shape == (48, 4)  # (r, in), (out, r): Conv1D stores LoRA like Linear
  np.testing.assert_array_equal(a, np.asarray(node["lora_a"]).T)
  np.testing.assert_array_equal(b, np.asarray(node["lora_b"]).T)
  assert w["base_model.model.transformer.h.0.mlp.c_fc.lora_A.weight"].shape == (2, 16)
  assert "base_model.model.transformer.h.0.attn.c_attn.base_layer.bias" in w
  data = json.loads((tmp_path / "adapter_config.json").read_text())
  assert data["peft_type"] == "LORA" and data["fan_in_fan_out"] is True
  assert data["target_modules"] == ["c_attn", "c_fc"]
  assert data["rank_pattern"] == {"transformer.h.0.mlp.c_fc": 2, "transformer.h.1.mlp.c_fc": 2}
  loaded, cfg2 = load_peft(tmp_path, model, base)
  _same_trees(loaded, params)
  assert cfg2.rank_for("transformer/h_1/mlp/c_fc") == 2 and cfg2.bias == "lora_only"
  # Loading onto a tree that already holds (other) adapters replaces them.
  _, _, _, other = _tiny("gpt2", ["c_attn", "c_fc"], key=9, bias="lora_only", rank_pattern={"c_fc": 2})
  again, _ = load_peft(tmp_path, model, other)
  _same_trees(again, params)


def test_scanned_stack_exports_per_layer(tmp_path):
  model, base, cfg, params = _tiny("llama", ["q_proj", "v_proj"], scan_layers=True)
  assert params["model"]["layers"]["self_attn"]["q_proj"]["lora_a"].shape == (2, 32, 4)
  save_peft(tmp_path, model, params, cfg)
  w = _weights(tmp_path)
  stacked = np.asarray(params["model"]["layers"]["self_attn"]["v_proj"]["lora_b"])
  for i in range(2):
    np.testing.assert_array_equal(w[f"base_model.model.model.layers.{i}.self_attn.v_proj.lora_B.weight"], stacked[i].T)
  assert not any("{i}" in k for k in w)
  # The same file loads onto the unscanned model, and back onto the scanned one.
  plain, _ = models.from_config(CONFIGS["llama"], key=jax.random.key(0))
  plain_base = models.from_hf_state_dict(plain, models.to_hf_state_dict(model, base))  # the same base, unstacked
  per_layer, cfg2 = load_peft(tmp_path, plain, plain_base)
  np.testing.assert_array_equal(per_layer["model"]["layers_1"]["self_attn"]["v_proj"]["lora_b"], stacked[1])
  x = _inputs("llama")
  np.testing.assert_allclose(lora_forward(plain, per_layer, cfg2, *x), lora_forward(model, params, cfg, *x), atol=1e-5, rtol=1e-5)
  again, _ = load_peft(tmp_path, model, base)
  _same_trees(again, params)


def test_embedding_and_dense_general_layouts_with_name_map(tmp_path):
  case = next(c for c in zoo.cases() if c.name == "attention")  # DenseGeneral (16,) -> (2, 8), (2, 8) -> (16,)
  base = zoo.build(case)
  cfg = jlora.LoraConfig(r=3, target_modules=["query", "out"], init_lora_weights=False)
  params = jlora.init(jax.random.key(1), case.model, base, cfg, case.inputs)
  name_map = lambda path: "attn." + ".".join(path)  # noqa: E731
  save_peft(tmp_path, None, params, cfg, name_map=name_map)
  w = _weights(tmp_path)
  assert w["base_model.model.attn.query.lora_A.weight"].shape == (3, 16)
  assert w["base_model.model.attn.query.lora_B.weight"].shape == (16, 3)  # (heads * head_dim, r)
  assert w["base_model.model.attn.out.lora_A.weight"].shape == (3, 16)
  np.testing.assert_array_equal(w["base_model.model.attn.query.lora_B.weight"],
                                np.asarray(params["query"]["lora_b"]).reshape(3, 16).T)
  loaded, cfg2 = load_peft(tmp_path, case.model, base, name_map=name_map)
  _same_trees(loaded, params)
  np.testing.assert_allclose(jlora.apply(case.model, loaded, cfg2, case.inputs),
                             jlora.apply(case.model, params, cfg, case.inputs), atol=1e-6, rtol=1e-5)

  emb = next(c for c in zoo.cases() if c.name == "embed")
  base = zoo.build(emb)
  cfg = jlora.LoraConfig(r=2, target_modules=["embed"], init_lora_weights=False)
  params = jlora.init(jax.random.key(1), emb.model, base, cfg, emb.inputs)
  save_peft(tmp_path / "emb", emb.model, params, cfg, name_map="flax")  # the Flax path joined with "."
  w = _weights(tmp_path / "emb")
  np.testing.assert_array_equal(w["base_model.model.embed.lora_embedding_A"], np.asarray(params["embed"]["lora_a"]).T)
  assert w["base_model.model.embed.lora_embedding_A"].shape == (2, 40)  # (r, vocab)
  assert w["base_model.model.embed.lora_embedding_B"].shape == (16, 2)  # (dim, r)
  loaded, _ = load_peft(tmp_path / "emb", emb.model, base, name_map="flax")
  _same_trees(loaded, params)


def test_modules_to_save_and_bias_all_round_trip(tmp_path):
  model, base, cfg, params = _tiny("bert_seq_cls", ["query", "value"], bias="all", modules_to_save=["classifier"])
  save_peft(tmp_path, model, params, cfg)
  w = _weights(tmp_path)
  kernel = np.asarray(params["classifier"]["kernel"])
  np.testing.assert_array_equal(w["base_model.model.classifier.weight"], kernel.T)  # torch (out, in)
  assert "base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.bias" in w
  assert "base_model.model.bert.encoder.layer.0.attention.output.LayerNorm.bias" in w
  trained = jax.tree.map(lambda x: x + 0.5, params)
  save_peft(tmp_path, model, trained, cfg)
  loaded, cfg2 = load_peft(tmp_path, model, base)
  trainable, frozen = jlora.split(loaded, cfg2)
  _same_trees(trainable, jlora.split(trained, cfg)[0])
  _same_trees(frozen, jlora.split(params, cfg)[1])


def test_einsum_and_pissa_refused(tmp_path):
  case = next(c for c in zoo.cases() if c.name == "einsum")
  cfg = jlora.LoraConfig(r=2, target_modules=["qkv"])
  params = jlora.init(jax.random.key(1), case.model, zoo.build(case), cfg, case.inputs)
  with pytest.raises(ValueError, match=r"'qkv' is an nn.Einsum adapter"):
    save_peft(tmp_path, case.model, params, cfg, name_map="flax")
  pissa = jlora.LoraConfig(r=2, target_modules=["qkv"], init_lora_weights="pissa")  # refused before any tensor
  with pytest.raises(ValueError, match="init_lora_weights='pissa' only makes sense over the residual base"):
    save_peft(tmp_path, case.model, params, pissa, name_map="flax")
  assert not os.listdir(tmp_path)


# ------------------------------------------------------------------ names, arguments, files (no torch)
def _mlp_adapter():
  case = next(c for c in zoo.cases() if c.name == "mlp")
  cfg = jlora.LoraConfig(r=2, target_modules=["fc_0"], init_lora_weights=False)
  base = zoo.build(case)
  return case.model, base, cfg, jlora.init(jax.random.key(1), case.model, base, cfg, case.inputs)


def test_no_names_is_refused_both_ways(tmp_path):
  model, base, cfg, params = _mlp_adapter()  # a linen model without peft_name_map
  fix = r"only warns about missing keys.*Pass `name_map=`.*`name_map='flax'`"
  with pytest.raises(ValueError, match=r"save_peft: no PEFT module names: the model \(MLP\) has no `peft_name_map\(\)`"
                                       r" and no `name_map=` was given.*" + fix):
    save_peft(tmp_path / "a", model, params, cfg)
  with pytest.raises(ValueError, match=r"save_peft: no PEFT module names: no `model`.*" + fix):
    save_peft(tmp_path / "a", None, params, cfg)
  assert not os.listdir(tmp_path)
  save_peft(tmp_path / "a", None, params, cfg, name_map="flax")
  assert sorted(_weights(tmp_path / "a")) == ["base_model.model.fc_0.lora_A.weight", "base_model.model.fc_0.lora_B.weight"]
  with pytest.raises(ValueError, match=r"load_peft: no PEFT module names: the model \(MLP\)"):
    load_peft(tmp_path / "a", model, base)
  loaded, _ = load_peft(tmp_path / "a", None, base, name_map="flax")
  _same_trees(loaded, params)
  named = NameMap(lambda path: "net." + ".".join(path))  # a NameMap works as name_map= too
  save_peft(tmp_path / "b", model, params, cfg, name_map=named)
  assert "base_model.model.net.fc_0.lora_A.weight" in _weights(tmp_path / "b")
  _same_trees(load_peft(tmp_path / "b", model, base, name_map=named)[0], params)
  with pytest.raises(ValueError, match=r"`name_map`='hf' is not a name scheme jlora knows; the only string accepted "
                                       r"is 'flax'"):
    save_peft(tmp_path / "c", model, params, cfg, name_map="hf")
  with pytest.raises(TypeError, match=r"`name_map` must be a function from a module path tuple .* got int"):
    load_peft(tmp_path / "a", model, base, name_map=3)


def test_old_argument_order_is_a_type_error_that_shows_the_call(tmp_path):
  model, _, cfg, params = _mlp_adapter()
  call = re.escape("Call it as save_peft(directory, model, params, config, *, name_map=None)")
  with pytest.raises(TypeError, match=r"save_peft: multiple values for argument 'model'.*" + call):
    save_peft(tmp_path, params, cfg, model=model)  # the order before: (directory, params, config, *, model=)
  with pytest.raises(TypeError, match=r"save_peft: missing a required argument: 'config'.*" + call):
    save_peft(tmp_path, params, cfg, name_map="flax")
  with pytest.raises(TypeError, match=r"`model` is a dict and `params` a LoraConfig: the arguments are out of "
                                      r"order.*" + call):
    save_peft(tmp_path, params, cfg, model)
  with pytest.raises(TypeError, match=r"`config` must be a jlora\.LoraConfig, got dict"):
    save_peft(tmp_path, model, params, cfg.to_dict(), name_map="flax")
  assert not os.listdir(tmp_path)


def test_directory_is_replaced_as_one_unit_and_foreign_files_are_kept(tmp_path):
  _, _, cfg, params = _mlp_adapter()
  out = tmp_path / "out"
  save_peft(out, None, params, cfg, name_map="flax")
  assert sorted(os.listdir(out)) == [".jlora-manifest.json", "adapter_config.json", "adapter_model.safetensors"]
  cfg2 = jlora.LoraConfig(r=2, lora_alpha=32, target_modules=["fc_0"], bias="all", init_lora_weights=False)
  save_peft(out, None, params, cfg2, name_map="flax")  # both files replaced together
  assert json.loads((out / "adapter_config.json").read_text())["lora_alpha"] == 32
  assert "base_model.model.fc_1.bias" in _weights(out)
  assert sorted(os.listdir(tmp_path)) == ["out"], "no temporary or backup directory is left"
  theirs = tmp_path / "theirs"  # e.g. written by PyTorch PEFT, with its README
  theirs.mkdir()
  (theirs / "README.md").write_text("model card")
  with pytest.raises(ValueError, match=r"holds files jlora did not write \(README\.md\)"):
    save_peft(theirs, None, params, cfg, name_map="flax")
  assert os.listdir(theirs) == ["README.md"] and (theirs / "README.md").read_text() == "model card"
  (tmp_path / "file").write_text("x")
  with pytest.raises(ValueError, match="exists and is not a directory"):
    save_peft(tmp_path / "file", None, params, cfg, name_map="flax")
  assert (tmp_path / "file").read_text() == "x"


def test_tensor_checksums_are_written_and_verified(tmp_path):
  _, base, cfg, params = _mlp_adapter()
  save_peft(tmp_path, None, params, cfg, name_map="flax")
  file = tmp_path / "adapter_model.safetensors"
  with safetensors.safe_open(str(file), framework="numpy") as f:
    digests = json.loads(f.metadata()["jlora_sha256"])
    assert f.metadata()["format"] == "pt"
  assert digests == {k: _integrity.digest(v) for k, v in _weights(tmp_path).items()}
  data = bytearray(file.read_bytes())
  data[-3] ^= 0x10  # a bit inside the last tensor's bytes (the header stays valid)
  file.write_bytes(bytes(data))
  with pytest.raises(ValueError, match=r"The PEFT adapter file '.*adapter_model\.safetensors' is corrupt: leaf "
                                       r"'base_model\.model\.fc_0\.lora_[AB]\.weight' does not match its checksum"):
    load_peft(tmp_path, None, base, name_map="flax")
  # A file without jlora's checksums (PyTorch PEFT's) loads as before.
  safetensors.numpy.save_file(_weights(tmp_path), str(file), metadata={"format": "pt"})
  load_peft(tmp_path, None, base, name_map="flax")


# ------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def _gpt2_adapter():
  model, base, cfg, params = _tiny("gpt2", ["c_attn"])
  return model, base, cfg, params


@pytest.fixture
def saved(tmp_path, _gpt2_adapter):
  model, base, cfg, params = _gpt2_adapter
  path = tmp_path / "adapter"
  save_peft(path, model, params, cfg)
  return path, model, base


def _edit_config(path, **changes):
  data = json.loads((path / "adapter_config.json").read_text())
  data.update(changes)
  (path / "adapter_config.json").write_text(json.dumps(data))


def test_missing_files_and_pickle_refused(saved, tmp_path):
  path, model, base = saved
  with pytest.raises(ValueError, match="no adapter directory"):
    load_peft(tmp_path / "nope", model, base)
  os.rename(path / "adapter_model.safetensors", path / "adapter_model.bin")
  with pytest.raises(ValueError, match=r"adapter_model.bin \(a pickle\).*never unpickles"):
    load_peft(path, model, base)
  os.remove(path / "adapter_model.bin")
  with pytest.raises(ValueError, match=r"has no adapter_model\.safetensors"):
    load_peft(path, model, base)
  os.remove(path / "adapter_config.json")
  with pytest.raises(ValueError, match=r"has no adapter_config\.json"):
    load_peft(path, model, base)


@pytest.mark.parametrize("damage", ["truncate", "garbage_header"])
def test_corrupt_safetensors(saved, damage):
  path, model, base = saved
  file = path / "adapter_model.safetensors"
  data = file.read_bytes()
  file.write_bytes(data[: len(data) - 100] if damage == "truncate" else b"\x10\x00\x00\x00\x00\x00\x00\x00{not json" + data)
  with pytest.raises(ValueError, match="not a readable safetensors file"):
    load_peft(path, model, base)


@pytest.mark.parametrize("changes, match", [
    ({"peft_type": "IA3"}, "loads LoRA adapters only"),
    ({"use_dora": True}, "use_dora=True but the adapter at .* has no DoRA magnitude"),
    ({"r": 8}, r"has rank 4, but adapter_config.json gives r=8"),
    ({"rank_pattern": {"h.1.attn.c_attn": 2}}, r"'transformer.h.1.attn.c_attn' has rank 4.*r=2"),
])
def test_bad_config(saved, changes, match):
  path, model, base = saved
  _edit_config(path, **changes)
  with pytest.raises(ValueError, match=match):
    load_peft(path, model, base)


def test_modules_absent_and_shapes_that_do_not_fit(saved):
  path, model, base = saved
  llama, llama_base = models.from_config(CONFIGS["llama"], key=jax.random.key(0))
  with pytest.raises(ValueError, match=r"modules the model does not have: base_model\.model\.transformer\.h\.0"):
    load_peft(path, llama, llama_base)
  wide, wide_base = models.from_config({**CONFIGS["gpt2"], "n_embd": 32, "n_head": 4}, key=jax.random.key(0))
  with pytest.raises(ValueError, match=r"lora_A tensor of 'transformer.h.0.attn.c_attn' has shape \(4, 16\)"):
    load_peft(path, wide, wide_base)
  w = _weights(path)
  del w["base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"]
  safetensors.numpy.save_file(w, str(path / "adapter_model.safetensors"))
  with pytest.raises(ValueError, match="has only one of lora_A / lora_B"):
    load_peft(path, model, base)


@pytest.mark.parametrize("tensor, damage", [
    ("lora_A", "nan"), ("lora_B", "inf"), ("lora_magnitude_vector", "nan"), ("bias", "-inf"),
    ("lora_A", "int32"), ("lora_B", "int8"), ("lora_magnitude_vector", "int16"), ("bias", "bool"),
])
def test_nan_or_integer_tensors_of_a_foreign_file_are_refused(tmp_path, tensor, damage):
  """A file that PEFT or jlora did not write (no jlora checksums): NaN/inf or a non-float dtype names the tensor."""
  case = next(c for c in zoo.cases() if c.name == "mlp")
  cfg = jlora.LoraConfig(r=2, target_modules=["fc_0"], init_lora_weights=False, use_dora=True, bias="lora_only")
  base = zoo.build(case)
  params = jlora.init(jax.random.key(1), case.model, base, cfg, case.inputs)
  save_peft(tmp_path, None, params, cfg, name_map="flax")
  weights = _weights(tmp_path)
  (key,) = [k for k in weights if k.endswith((f"fc_0.{tensor}", f"fc_0.{tensor}.weight", f"fc_0.base_layer.{tensor}"))]
  original = weights[key]
  value = original.copy()
  if damage in ("nan", "inf", "-inf"):
    value.flat[value.size // 2] = float(damage)
    match = rf"load_peft: non-finite values \(NaN or inf\) in the tensor '{re.escape(key)}' of '.*'; an adapter"
  else:
    value = np.round(value * 10).astype(damage)
    match = rf"load_peft: the tensor '{re.escape(key)}' in '.*' has dtype {damage}; expected a floating tensor"
  weights[key] = value
  safetensors.numpy.save_file(weights, str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(ValueError, match=match):
    load_peft(tmp_path, None, base, name_map="flax")
  weights[key] = original.astype(np.float16)  # finite floats of another width load
  safetensors.numpy.save_file(weights, str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
  load_peft(tmp_path, None, base, name_map="flax")


# --------------------------------------------------------------------- against the real PEFT
ARCHS = {
    # name: (checkpoint config, transformers class, jlora config kwargs, model options)
    "gpt2": ("gpt2", "GPT2LMHeadModel", {"target_modules": ["c_attn", "c_proj", "c_fc"], "bias": "all"}, {}),
    "llama": ("llama", "LlamaForCausalLM", {"target_modules": ["q_proj", "v_proj", "down_proj"],
                                           "rank_pattern": {"down_proj": 2}, "alpha_pattern": {"v_proj": 16}}, {}),
    "llama_scan": ("llama", "LlamaForCausalLM", {"target_modules": ["q_proj", "o_proj"]}, {"scan_layers": True}),
    "bert": ("bert_seq_cls", "BertForSequenceClassification",
             {"target_modules": ["query", "value", "word_embeddings"], "bias": "lora_only",
              "modules_to_save": ["classifier"], "task_type": "SEQ_CLS"}, {}),
    "t5": ("t5", "T5ForConditionalGeneration", {"target_modules": ["q", "v", "wo"],
                                                 "task_type": "SEQ_2_SEQ_LM"}, {}),
    # DoRA: GPT-2's Conv1D (fan_in_fan_out), a scanned Llama with two ranks, BERT's word embeddings
    "gpt2_dora": ("gpt2", "GPT2LMHeadModel", {"target_modules": ["c_attn", "c_proj", "c_fc"], "use_dora": True}, {}),
    "llama_dora_scan": ("llama", "LlamaForCausalLM", {"target_modules": ["q_proj", "down_proj"], "use_dora": True,
                                                      "rank_pattern": {"down_proj": 2}}, {"scan_layers": True}),
    "bert_dora": ("bert_seq_cls", "BertForSequenceClassification",
                  {"target_modules": ["query", "value", "word_embeddings"], "use_dora": True}, {}),
}


def _torch_inputs(torch, name, inputs):
  t = [torch.tensor(np.asarray(x), dtype=torch.long) for x in inputs]
  if name.startswith("t5"):
    return {"input_ids": t[0], "attention_mask": t[1], "decoder_input_ids": t[2]}
  if name.startswith("bert"):
    return {"input_ids": t[0], "attention_mask": t[1], "token_type_ids": t[2]}
  return {"input_ids": t[0]}


@pytest.fixture(scope="module")
def hf():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  peft = pytest.importorskip("peft")
  torch.manual_seed(0)
  return torch, transformers, peft


def _hf_model(hf, cls, path):
  torch, transformers, _ = hf
  return getattr(transformers, cls).from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def _logits(torch, module, kwargs):
  with torch.no_grad():
    return module(**kwargs).logits.numpy()


def _train(model, params, cfg, inputs, steps=3):
  """A few adamw steps on a next-token-like loss: adapters, biases and saved modules all move."""
  trainable, frozen = jlora.split(params, cfg)
  tx = optax.adamw(1e-2)
  state = tx.init(trainable)

  @jax.jit
  def step(t, s):
    grads = jax.grad(lambda t: jnp.mean(jlora.apply(model, jlora.combine(t, frozen), cfg, *inputs) ** 2))(t)
    updates, s = tx.update(grads, s, t)
    return optax.apply_updates(t, updates), s

  for _ in range(steps):
    trainable, state = step(trainable, state)
  return jlora.combine(trainable, frozen)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_jlora_to_peft(hf, tmp_path, arch):
  torch, _, peft = hf
  name, cls, kwargs, options = ARCHS[arch]
  write_checkpoint(tmp_path / "base", CONFIGS[name])
  model, base = models.from_pretrained(tmp_path / "base", **options)
  cfg = jlora.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kwargs)
  inputs = _inputs(name)
  params = jlora.init(jax.random.key(1), model, base, cfg, *inputs)
  if arch == "gpt2":
    params = _train(model, params, cfg, inputs)
  elif arch == "bert" or "dora" in arch:  # as if trained: classifier, biases and DoRA magnitudes move too
    trainable, frozen = jlora.split(params, cfg)
    noise = jax.tree.map(lambda x: 0.1 * jax.random.normal(jax.random.key(3), x.shape, x.dtype), trainable)
    params = jlora.combine(jax.tree.map(jnp.add, trainable, noise), frozen)
  save_peft(tmp_path / "adapter", model, params, cfg)
  peft_model = peft.PeftModel.from_pretrained(_hf_model(hf, cls, tmp_path / "base"), tmp_path / "adapter").eval()
  ours = np.asarray(lora_forward(model, params, cfg, *inputs))
  kw = _torch_inputs(torch, name, inputs)
  plain = np.asarray(forward(model, base, *inputs))
  assert np.abs(ours - plain).max() > 1e-2  # the adapter is not a no-op
  np.testing.assert_allclose(_logits(torch, peft_model, kw), ours, atol=ATOL, rtol=0)
  merged = np.asarray(forward(model, jlora.merge(params, cfg), *inputs))
  np.testing.assert_allclose(_logits(torch, peft_model.merge_and_unload(), kw), merged, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_peft_to_jlora(hf, tmp_path, arch):
  torch, _, peft = hf
  name, cls, kwargs, options = ARCHS[arch]
  write_checkpoint(tmp_path / "base", CONFIGS[name])
  peft_cfg = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, fan_in_fan_out=name == "gpt2", **kwargs)
  peft_model = peft.get_peft_model(_hf_model(hf, cls, tmp_path / "base"), peft_cfg)
  with torch.no_grad():  # "training": move every trainable tensor (adapters, biases, saved modules)
    for _, p in peft_model.named_parameters():
      if p.requires_grad:
        p.add_(0.05 * torch.randn_like(p))
  peft_model.eval()
  peft_model.save_pretrained(tmp_path / "adapter")
  inputs = _inputs(name)
  kw = _torch_inputs(torch, name, inputs)
  theirs = _logits(torch, peft_model, kw)
  model, base = models.from_pretrained(tmp_path / "base", **options)
  params, cfg = load_peft(tmp_path / "adapter", model, base)
  np.testing.assert_allclose(np.asarray(lora_forward(model, params, cfg, *inputs)), theirs, atol=ATOL, rtol=0)
  merged = np.asarray(forward(model, jlora.merge(params, cfg), *inputs))
  assert np.abs(merged - np.asarray(forward(model, base, *inputs))).max() > 1e-2  # the adapter is not a no-op
  np.testing.assert_allclose(merged, _logits(torch, peft_model.merge_and_unload(), kw), atol=ATOL, rtol=0)
