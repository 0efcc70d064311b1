"""BERT's per-token outputs (`task="HIDDEN_STATES"`) and how the task heads sit on them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora import models
from jlora.models import bert
from jlora.models.bert import BertOutput
from tests.models.helpers import CONFIGS, forward, random_model, tokens, write_checkpoint, zero_model


def _inputs():
  ids = tokens((2, 7))
  mask = np.ones_like(ids)
  mask[1, -3:] = 0
  types = np.zeros_like(ids)
  types[:, 4:] = 1
  return ids, mask, types


def _without_pooler(params):
  return {k: v for k, v in params.items() if k != "pooler"}


def test_hidden_states_shapes_and_pooler_switch():
  seq_cls, params = random_model(CONFIGS["bert_seq_cls"])
  model = bert.build(seq_cls.config, task="HIDDEN_STATES")
  _, tree = zero_model(CONFIGS["bert"], task="HIDDEN_STATES")
  assert jax.tree.structure(tree) == jax.tree.structure(params["bert"])  # transformers.BertModel's names
  assert sorted(tree) == ["embeddings", "encoder", "pooler"]
  out = forward(model, params["bert"], *_inputs())
  assert isinstance(out, BertOutput) and out._fields == ("last_hidden_state", "pooler_output")
  assert out.last_hidden_state.shape == (2, 7, 16) and out.pooler_output.shape == (2, 16)
  dense = params["bert"]["pooler"]["dense"]  # pooler_output = tanh(dense([CLS]))
  cls = out.last_hidden_state[:, 0]
  np.testing.assert_allclose(out.pooler_output, jnp.tanh(cls @ dense["kernel"] + dense["bias"]), atol=1e-6, rtol=1e-5)
  bare = bert.build(seq_cls.config, task="HIDDEN_STATES", add_pooling_layer=False)
  assert sorted(zero_model(CONFIGS["bert"], task="HIDDEN_STATES", add_pooling_layer=False)[1]) == [
    "embeddings",
    "encoder",
  ]
  no_pool = forward(bare, _without_pooler(params["bert"]), *_inputs())
  assert no_pool.pooler_output is None
  np.testing.assert_array_equal(no_pool.last_hidden_state, out.last_hidden_state)


def test_task_heads_sit_on_the_hidden_states():
  """The same weights: SEQ_CLS = classifier(pooler_output), TOKEN_CLS = classifier(last_hidden_state),
  FEATURE_EXTRACTION = the masked mean of last_hidden_state."""
  seq_cls, params = random_model(CONFIGS["bert_seq_cls"])
  ids, mask, types = _inputs()
  out = forward(bert.build(seq_cls.config, task="HIDDEN_STATES"), params["bert"], ids, mask, types)
  head = params["classifier"]
  np.testing.assert_allclose(
    forward(seq_cls, params, ids, mask, types), out.pooler_output @ head["kernel"] + head["bias"], atol=1e-5, rtol=1e-5
  )
  token_params = {"bert": _without_pooler(params["bert"]), "classifier": head}
  token = forward(bert.build(seq_cls.config, task="TOKEN_CLS"), token_params, ids, mask, types)
  np.testing.assert_allclose(token, out.last_hidden_state @ head["kernel"] + head["bias"], atol=1e-5, rtol=1e-5)
  embed = forward(bert.build(seq_cls.config, task="FEATURE_EXTRACTION"), token_params["bert"], ids, mask, types)
  m = mask[..., None].astype(np.float32)
  np.testing.assert_allclose(embed, (np.asarray(out.last_hidden_state) * m).sum(1) / m.sum(1), atol=1e-5, rtol=1e-5)


def test_hidden_states_load_from_task_and_base_checkpoints(tmp_path):
  _, written = write_checkpoint(tmp_path / "cls", CONFIGS["bert_seq_cls"])
  _, params = models.from_pretrained(tmp_path / "cls", task="HIDDEN_STATES")  # `bert.` stripped, classifier skipped
  np.testing.assert_array_equal(params["pooler"]["dense"]["kernel"], written["bert"]["pooler"]["dense"]["kernel"])
  write_checkpoint(tmp_path / "base", CONFIGS["bert"])  # a sentence-embedding checkpoint: no pooler weights
  with pytest.raises(ValueError, match=r"missing head parameters: pooler/dense/.*`add_pooling_layer=False`"):
    models.from_pretrained(tmp_path / "base", task="HIDDEN_STATES")
  model, params = models.from_pretrained(tmp_path / "base", task="HIDDEN_STATES", add_pooling_layer=False)
  assert sorted(params) == ["embeddings", "encoder"]
  _, with_key = models.from_pretrained(tmp_path / "base", task="HIDDEN_STATES", key=jax.random.key(0))
  assert with_key["pooler"]["dense"]["kernel"].shape == (16, 16)
  hf_names = models.to_hf_state_dict(model, params)
  assert "embeddings.word_embeddings.weight" in hf_names and not any(k.startswith("bert.") for k in hf_names)


def test_add_pooling_layer_belongs_to_hidden_states():
  with pytest.raises(ValueError, match=r"`add_pooling_layer=False` applies to `task='HIDDEN_STATES'` only"):
    models.from_config(CONFIGS["bert"], key=jax.random.key(0), task="TOKEN_CLS", add_pooling_layer=False)
