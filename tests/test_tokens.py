"""Trainable tokens (`trainable_token_indices`) and whole embedding tables (`save_embedding_layers`).

The linen path (lookup and tied `attend`), the plain-tree path, merge / unmerge, the errors, and PEFT's files both
ways against the installed PEFT (when torch, transformers and peft are there).
"""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy
from jax.sharding import PartitionSpec

import jlora
from jlora import models
from jlora.formats.peft.api import load_peft, save_peft
from tests import test_peft
from tests.models.helpers import LLAMA, QWEN2, forward, lora_forward, tokens, write_checkpoint

VOCAB, DIM = 13, 8
IDS = (3, 11)


class TiedLM(nn.Module):
  """An embedding, one dense layer, and the embedding's `attend` as the head (a tied head)."""

  def setup(self):
    self.embed_tokens = nn.Embed(VOCAB, DIM)
    self.proj = nn.Dense(DIM)

  def __call__(self, ids):
    return self.embed_tokens.attend(jnp.tanh(self.hidden(self.embed_tokens(ids))))

  def hidden(self, h):
    return self.proj(h)


def _close(a, b, rtol=1e-5):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  np.testing.assert_allclose(a, b, rtol=0, atol=rtol * max(1.0, float(np.abs(b).max())))


pytestmark = pytest.mark.usefixtures("float32_matmuls")  # tests/conftest.py


@pytest.fixture(scope="module")
def tied():
  """`(model, base, config, params, x)`: the tied model with trainable rows 3 and 11 and a LoRA `proj`."""
  model = TiedLM()
  x = jnp.array([[1, 3, 5, 11, 3], [2, 2, 11, 0, 7]], jnp.int32)
  base = model.init(jax.random.key(0), x)["params"]
  config = jlora.LoraConfig(r=2, target_modules=["proj"], trainable_token_indices=list(IDS), init_lora_weights=False)
  return model, base, config, jlora.init(jax.random.key(1), model, base, config, x), x


def _moved(params, config, key=3, scale=0.5):
  """`params` with every trainable leaf moved by noise (as if trained)."""
  trainable, frozen = jlora.split(params, config)
  noise = jax.tree.map(lambda v: scale * jax.random.normal(jax.random.key(key), v.shape, v.dtype), trainable)
  return jlora.combine(jax.tree.map(jnp.add, trainable, noise), frozen)


# ------------------------------------------------------------------ linen: init, forward, gradients, merge
def test_init_adds_a_zero_leaf_the_model_is_unchanged_and_it_trains(tied):
  model, base, config, params, x = tied
  leaf = params["embed_tokens"]["trainable_tokens"]
  assert leaf.shape == (len(IDS), DIM) and leaf.dtype == jnp.float32 and not np.any(np.asarray(leaf))
  assert params["embed_tokens"]["embedding"] is base["embed_tokens"]["embedding"]  # the table is untouched
  trainable, frozen = jlora.split(params, config)
  assert set(trainable["embed_tokens"]) == {"trainable_tokens"} and "embedding" in frozen["embed_tokens"]
  assert jlora.labels(params, config)["embed_tokens"]["trainable_tokens"] == "trainable_tokens"
  no_lora = jlora.combine(jax.tree.map(jnp.zeros_like, jlora.split(params, config)[0]), frozen)
  _close(lora_forward(model, no_lora, config, x), forward(model, base, x), 1e-6)


def test_only_the_chosen_rows_change_after_a_step(tied):
  model, base, config, params, x = tied
  trainable, frozen = jlora.split(params, config)
  loss = lambda t: jnp.sum(jlora.apply(model, jlora.combine(t, frozen), config, x) ** 2)  # noqa: E731
  grads = jax.jit(jax.grad(loss))(trainable)
  g = np.asarray(grads["embed_tokens"]["trainable_tokens"])
  assert np.all(np.abs(g).sum(axis=1) > 0)  # both rows get a gradient (each id is looked up, and the head reads it)
  tx = optax.sgd(0.1)
  updates, _ = tx.update(grads, tx.init(trainable), trainable)
  stepped = jlora.combine(optax.apply_updates(trainable, updates), frozen)
  table = np.asarray(jlora.merge(stepped, config)["embed_tokens"]["embedding"])
  changed = np.flatnonzero(np.abs(table - np.asarray(base["embed_tokens"]["embedding"])).sum(axis=1))
  assert tuple(changed) == IDS


def test_lookup_and_tied_head_see_the_rows_and_merge_equals_the_factored_forward(tied):
  model, base, config, params, x = tied
  moved = _moved(params, config)
  delta = moved["embed_tokens"]["trainable_tokens"]
  table = base["embed_tokens"]["embedding"].at[np.asarray(IDS)].add(delta)
  by_hand = jlora.merge({**moved, "embed_tokens": {"embedding": table}}, config)  # LoRA folded, rows added by hand
  ours = lora_forward(model, moved, config, x)
  _close(ours, forward(model, by_hand, x))
  merged = jlora.merge(moved, config)
  assert jax.tree.structure(merged) == jax.tree.structure(base)
  _close(ours, forward(model, merged, x))
  # the tied head alone: inputs without the trained ids see the rows through `attend`, in those columns only
  y = jnp.array([[1, 2, 4]], jnp.int32)
  zero = {**moved, "embed_tokens": {**moved["embed_tokens"], "trainable_tokens": jnp.zeros_like(delta)}}
  with_rows, without = np.asarray(lora_forward(model, moved, config, y)), np.asarray(lora_forward(model, zero, config, y))
  others = [i for i in range(VOCAB) if i not in IDS]
  np.testing.assert_array_equal(with_rows[..., others], without[..., others])
  assert np.abs(with_rows[..., list(IDS)] - without[..., list(IDS)]).min() > 1e-4
  _close(with_rows, forward(model, merged, y))


def test_unmerge_takes_the_rows_out_again(tied):
  _, base, config, params, _ = tied
  moved = _moved(params, config)
  back = jlora.unmerge(jlora.merge(moved, config), jlora.split(moved, config)[0], config)
  _close(back["embed_tokens"]["embedding"], base["embed_tokens"]["embedding"], 1e-6)
  np.testing.assert_array_equal(back["embed_tokens"]["trainable_tokens"], moved["embed_tokens"]["trainable_tokens"])


def test_a_forward_that_skips_the_table_is_refused_and_a_bank_refuses_tokens(tied):
  model, base, config, params, _ = tied
  h = jnp.ones((1, DIM))
  with pytest.raises(ValueError, match=r"embed_tokens \(trainable tokens\)"):
    jlora.apply(model, params, config, h, method="hidden")
  assert jlora.apply(model, params, config, h, method="hidden", allow_unused=True).shape == (1, DIM)
  adapters = jlora.AdapterSet().add("a", params, config)
  with pytest.raises(ValueError, match="trainable tokens"):
    jlora.stack_adapters(adapters, base)


# ------------------------------------------------------------------ plain trees
def test_plain_tree_tied_head_through_apply_merged():
  key = jax.random.key(5)
  tree = {"embed_tokens": {"embedding": jax.random.normal(key, (VOCAB, DIM))},
          "proj": {"kernel": jax.random.normal(jax.random.key(6), (DIM, DIM))}}
  config = jlora.LoraConfig(r=2, target_modules=["proj"], trainable_token_indices={"embed_tokens": [0, 5]})
  params = jlora.init_tree(jax.random.key(1), tree, config)
  assert params["embed_tokens"]["trainable_tokens"].shape == (2, DIM)

  def fn(p, ids):
    table = p["embed_tokens"]["embedding"]
    return (table[ids] @ p["proj"]["kernel"]) @ table.T  # a tied head written as x @ embedding.T

  x = jnp.array([0, 1, 5])
  _close(jlora.apply_merged(fn, params, config, x), fn(tree, x), 1e-6)
  moved = {**params, "embed_tokens": {**params["embed_tokens"], "trainable_tokens": jnp.ones((2, DIM))}}
  table = tree["embed_tokens"]["embedding"].at[jnp.array([0, 5])].add(1.0)
  _close(jlora.apply_merged(fn, moved, config, x), fn({**tree, "embed_tokens": {"embedding": table}}, x))
  grad = jax.grad(lambda t: jnp.sum(jlora.apply_merged(fn, {**params, "embed_tokens": {
      **params["embed_tokens"], "trainable_tokens": t}}, config, x)))(moved["embed_tokens"]["trainable_tokens"])
  assert grad.shape == (2, DIM) and np.all(np.abs(np.asarray(grad)).sum(axis=1) > 0)


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("indices, match", [
    ([2, 13, 40], r"'embed_tokens'.*ids \[13, 40\].*vocabulary of 13 rows"),
    ({"proj": [1]}, r"'proj' \(dense\), which is not an embedding"),
    ({"nowhere": [1]}, "matches no module"),
])
def test_bad_indices_at_init(tied, indices, match):
  model, base, _, _, x = tied
  config = jlora.LoraConfig(r=2, target_modules=["proj"], trainable_token_indices=indices)
  with pytest.raises(ValueError, match=match):
    jlora.init(jax.random.key(1), model, base, config, x)


@pytest.mark.parametrize("indices, match", [
    ([-1, 2], r"ints >= 0"), ([1, 1], r"more than once"), ("3", "non-empty list"), ([], "non-empty list"),
    ([1.5], "ints >= 0"), ({}, "empty mapping"),
])
def test_bad_indices_in_the_config(indices, match):
  with pytest.raises(ValueError, match=match):
    jlora.LoraConfig(target_modules=["q"], trainable_token_indices=indices)


def test_overlaps_and_ambiguous_lists_are_refused(tied):
  model, base, _, _, x = tied
  both = jlora.LoraConfig(r=2, target_modules=["proj", "embed_tokens"], trainable_token_indices=[1])
  with pytest.raises(ValueError, match=r"both in `target_modules`.*`trainable_token_indices`"):
    jlora.init(jax.random.key(1), model, base, both, x)
  saved = jlora.LoraConfig(r=2, target_modules=["proj"], trainable_token_indices=[1], modules_to_save=["embed_tokens"])
  with pytest.raises(ValueError, match="modules_to_save"):
    jlora.init(jax.random.key(1), model, base, saved, x)
  tree = {"wte": {"embedding": jnp.ones((5, 2))}, "wpe": {"embedding": jnp.ones((4, 2))}, "q": {"kernel": jnp.ones((2, 2))}}
  with pytest.raises(ValueError, match=r"2 embedding tables .*'wte' \(5, 2\).*trainable_token_indices=\{'<module>'"):
    jlora.init_tree(jax.random.key(0), tree, jlora.LoraConfig(r=1, target_modules=["q"], trainable_token_indices=[1]))


def test_a_config_whose_ids_leave_the_table_is_refused_not_dropped(tied):
  """`table.at[ids]` drops ids outside the table silently; merge (and every reader of the leaves) refuses them."""
  params = tied[3]
  other = jlora.LoraConfig(r=2, target_modules=["proj"], trainable_token_indices=[3, 20], init_lora_weights=False)
  with pytest.raises(ValueError, match=r"'embed_tokens' ids \[20\], outside its table of 13 rows"):
    jlora.merge(params, other)


def test_config_round_trips_both_forms():
  for indices in ([5, 2], {"model.embed_tokens": [7, 1]}):
    config = jlora.LoraConfig(target_modules=["q"], trainable_token_indices=indices)
    again = jlora.LoraConfig.from_json(config.to_json())
    assert again == config and hash(again) == hash(config)
    assert json.loads(config.to_json())["trainable_token_indices"] == indices


# ------------------------------------------------------------------ PEFT's files, both ways
hf = test_peft.hf  # the (torch, transformers, peft) fixture: these tests skip without them
HF = {"qwen2": (QWEN2, "Qwen2ForCausalLM"), "llama": (LLAMA, "LlamaForCausalLM")}
TOKEN_IDS = [3, 30]
DELTA_KEY = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"


def _ids(vocab=37):
  x = tokens((2, 7), vocab)
  x[0, 1], x[1, 4] = TOKEN_IDS  # both trained ids are looked up (a tied head reads them anyway)
  return x


def _hf_model(hf, name, path, vocab=None):
  torch, transformers, _ = hf
  hf_model = getattr(transformers, HF[name][1]).from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
  if vocab is not None:
    hf_model.resize_token_embeddings(vocab, mean_resizing=False)
  return hf_model.eval()


def _logits(hf, module, x):
  torch = hf[0]
  with torch.no_grad():
    return module(input_ids=torch.tensor(np.asarray(x), dtype=torch.long)).logits.numpy()


def _resized(hf, name, base_path, path, vocab):
  """The Hugging Face model of `base_path` resized to `vocab` tokens, saved to `path` and read back by jlora (as a
  user converts a resized base): `(jlora model, params)`, and the resized Hugging Face model."""
  hf_model = _hf_model(hf, name, base_path, vocab=vocab)
  hf_model.save_pretrained(path)
  return (*models.from_pretrained(path), hf_model)


@pytest.mark.parametrize("name", ["qwen2"])  # tied; untied llama: test_jlora_resized_vocabulary_to_peft
def test_jlora_tokens_to_peft(hf, tmp_path, name):
  _, _, peft = hf
  write_checkpoint(tmp_path / "base", HF[name][0])
  model, base = models.from_pretrained(tmp_path / "base")
  cfg = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], trainable_token_indices=TOKEN_IDS,
                         init_lora_weights=False)
  x = _ids()
  params = _moved(jlora.init(jax.random.key(1), model, base, cfg, x), cfg, scale=0.3)
  save_peft(tmp_path / "adapter", model, params, cfg)
  weights = safetensors.numpy.load_file(os.path.join(tmp_path / "adapter", "adapter_model.safetensors"))
  table = np.asarray(base["model"]["embed_tokens"]["embedding"])
  _close(weights[DELTA_KEY], table[TOKEN_IDS] + np.asarray(params["model"]["embed_tokens"]["trainable_tokens"]), 1e-6)
  with open(tmp_path / "adapter" / "adapter_config.json") as f:
    assert json.load(f)["trainable_token_indices"] == {"model.embed_tokens": TOKEN_IDS}
  peft_model = peft.PeftModel.from_pretrained(_hf_model(hf, name, tmp_path / "base"), tmp_path / "adapter").eval()
  run = jax.jit(lambda p: jlora.apply(model, p, cfg, x))  # one compile for both calls
  ours = np.asarray(run(params))
  no_rows = {**params, "model": {**params["model"], "embed_tokens": {
      **params["model"]["embed_tokens"], "trainable_tokens": jnp.zeros((2, table.shape[1]))}}}
  assert np.abs(ours - np.asarray(run(no_rows))).max() > 1e-2  # the rows matter
  _close(_logits(hf, peft_model, x), ours, 1e-4)
  _close(_logits(hf, peft_model.merge_and_unload(), x), forward(model, jlora.merge(params, cfg), x), 1e-4)


@pytest.mark.parametrize("name", sorted(HF))
def test_peft_resized_vocabulary_to_jlora(hf, tmp_path, name):
  """PEFT's save_embedding_layers over a resized vocabulary: refused over the old base, equal over a resized one.

  Untied (llama) PEFT writes the table and `lm_head`; tied (qwen2) it writes the table and its rows twice, under
  the embedding's and the tied head's names."""
  torch, _, peft = hf
  write_checkpoint(tmp_path / "base", HF[name][0])
  vocab = LLAMA["vocab_size"] + 3
  new = [vocab - 3, vocab - 1]
  peft_cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], trainable_token_indices=new,
                             init_lora_weights=False)
  model_r, base_r, hf_model = _resized(hf, name, tmp_path / "base", tmp_path / "resized", vocab)
  peft_model = peft.get_peft_model(hf_model, peft_cfg)
  with torch.no_grad():
    for _, p in peft_model.named_parameters():
      if p.requires_grad:
        p.add_(0.3 * torch.randn_like(p))
  peft_model.eval().save_pretrained(tmp_path / "adapter", save_embedding_layers=True)
  keys = set(safetensors.numpy.load_file(os.path.join(tmp_path / "adapter", "adapter_model.safetensors")))
  assert {"base_model.model.model.embed_tokens.token_adapter.base_layer.weight", DELTA_KEY} <= keys
  assert ("base_model.model.lm_head.weight" in keys) == (name == "llama")
  model, base = models.from_pretrained(tmp_path / "base")
  with pytest.raises(ValueError, match=r"\(40, 32\).*resized vocabulary"):
    load_peft(tmp_path / "adapter", model, base)
  x = _ids()
  x[0, 2], x[1, 5] = new
  params, cfg = load_peft(tmp_path / "adapter", model_r, base_r)
  assert cfg.trainable_token_indices == {"model/embed_tokens": tuple(new)}
  assert params["model"]["embed_tokens"]["trainable_tokens"].shape == (2, 32)
  _close(lora_forward(model_r, params, cfg, x), _logits(hf, peft_model, x), 1e-4)
  _close(forward(model_r, jlora.merge(params, cfg), x), _logits(hf, peft_model.merge_and_unload(), x), 1e-4)


def test_jlora_resized_vocabulary_to_peft(hf, tmp_path):
  _, _, peft = hf
  write_checkpoint(tmp_path / "base", LLAMA)
  vocab = LLAMA["vocab_size"] + 3
  model, base, _ = _resized(hf, "llama", tmp_path / "base", tmp_path / "resized", vocab)
  emb = base["model"]["embed_tokens"]["embedding"]  # jlora's new rows differ from the PEFT user's (below)
  base["model"]["embed_tokens"]["embedding"] = emb.at[-3:].add(0.3)
  base["lm_head"]["kernel"] = base["lm_head"]["kernel"].at[:, -3:].add(0.3)
  cfg = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], trainable_token_indices=[vocab - 2],
                         init_lora_weights=False)
  x = _ids()
  x[1, 1] = vocab - 2
  params = _moved(jlora.init(jax.random.key(1), model, base, cfg, x), cfg, scale=0.3)
  save_peft(tmp_path / "adapter", model, params, cfg, save_embedding_layers=True)
  weights = safetensors.numpy.load_file(os.path.join(tmp_path / "adapter", "adapter_model.safetensors"))
  assert weights["base_model.model.model.embed_tokens.token_adapter.base_layer.weight"].shape == (vocab, 32)
  assert weights["base_model.model.lm_head.weight"].shape == (vocab, 32)
  hf_model = _hf_model(hf, "llama", tmp_path / "base", vocab=vocab)  # new rows of its own, replaced by the file's
  peft_model = peft.PeftModel.from_pretrained(hf_model, tmp_path / "adapter").eval()
  _close(_logits(hf, peft_model, x), lora_forward(model, params, cfg, x), 1e-4)


def test_sharding_rule_keeps_the_tables_dim_spec(tied):
  _, _, _, params, _ = tied
  specs = jax.tree.map(lambda _: PartitionSpec(), params)
  specs["embed_tokens"] = {"embedding": PartitionSpec("vocab", "embed"), "trainable_tokens": None}
  out = jlora.adapter_shardings(params, specs)
  assert out["embed_tokens"]["trainable_tokens"] == PartitionSpec(None, "embed")


class ForeignHead(nn.Module):
  """A head applied with the table given at call time (`lm_head.apply({'params': {'kernel': table.T}})`)."""

  def setup(self):
    self.embed_tokens, self.proj, self.lm_head = nn.Embed(VOCAB, DIM), nn.Dense(DIM), nn.Dense(VOCAB, use_bias=False)

  def __call__(self, ids):
    h = self.proj(self.embed_tokens(ids))
    return self.lm_head.apply({"params": {"kernel": self.embed_tokens.variables["params"]["embedding"].T}}, h)


def test_a_head_given_the_table_at_call_time_is_refused():
  model, x = ForeignHead(), jnp.array([[1, 3]])
  base = model.init(jax.random.key(0), x)["params"]
  config = jlora.LoraConfig(r=2, target_modules=["proj"], trainable_token_indices=[3])
  with pytest.raises(ValueError, match=r"weight given at call time.*'embed_tokens/embedding'.*Drop its .trainable_token_indices."):
    jlora.init(jax.random.key(1), model, base, config, x)
