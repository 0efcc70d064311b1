"""Logits equal those of `transformers` on the same tiny random checkpoints (fp32, <= 1e-4)."""

import numpy as np
import pytest

from jlora import models
from tests.models.helpers import forward, tokens

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ATOL = 1e-4


def _hf(cls_name, path, allow_missing=()):
  cls = getattr(transformers, cls_name)
  model, info = cls.from_pretrained(path, attn_implementation="eager", dtype=torch.float32, output_loading_info=True)
  assert not set(info["missing_keys"]) - set(allow_missing) and not info["unexpected_keys"], info
  return model.eval()


def _close(ours, theirs):
  ours, theirs = np.asarray(ours), theirs.detach().numpy()
  assert ours.shape == theirs.shape
  np.testing.assert_allclose(ours, theirs, atol=ATOL, rtol=0)




def _mask(b, t):
  mask = np.ones((b, t), np.int32)
  mask[1, t - 3 :] = 0  # right padding in the second row
  return mask


@pytest.mark.parametrize("name", ["gpt2", "llama", "llama3_tied_bias", "mistral", "qwen2"])
def test_causal_lm(checkpoint, name):
  path = checkpoint(name)
  model, params = models.from_pretrained(path)
  ids, mask = tokens((2, 9)), _mask(2, 9)
  ours = forward(model, params, ids, mask)
  hf = _hf("AutoModelForCausalLM", path)
  with torch.no_grad():
    theirs = hf(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits
  keep = mask.astype(bool)  # padded query positions are unspecified
  _close(np.asarray(ours)[keep], theirs[torch.tensor(keep)])


@pytest.mark.parametrize(
  "name, cls", [("bert_seq_cls", "BertForSequenceClassification"), ("bert_token_cls", "BertForTokenClassification")]
)
def test_bert_heads(checkpoint, name, cls):
  path = checkpoint(name)
  model, params = models.from_pretrained(path)
  ids, mask = tokens((2, 7)), _mask(2, 7)
  types = np.zeros_like(ids)
  types[:, 4:] = 1
  ours = forward(model, params, ids, mask, types)
  with torch.no_grad():
    theirs = _hf(cls, path)(
      input_ids=torch.tensor(ids, dtype=torch.long),
      attention_mask=torch.tensor(mask),
      token_type_ids=torch.tensor(types, dtype=torch.long),
    ).logits
  if name == "bert_token_cls":
    keep = mask.astype(bool)
    ours, theirs = np.asarray(ours)[keep], theirs[torch.tensor(keep)]
  _close(ours, theirs)


@pytest.mark.parametrize("pooler", [True, False])
def test_bert_hidden_states(checkpoint, pooler):
  """`task="HIDDEN_STATES"` returns what `transformers.BertModel` does (a classifier checkpoint has the pooler)."""
  path = checkpoint("bert_seq_cls")
  model, params = models.from_pretrained(path, task="HIDDEN_STATES", add_pooling_layer=pooler)
  ids, mask = tokens((2, 7)), _mask(2, 7)
  types = np.zeros_like(ids)
  types[:, 4:] = 1
  ours = forward(model, params, ids, mask, types)
  hf = transformers.BertModel.from_pretrained(path, attn_implementation="eager", dtype=torch.float32,
                                              add_pooling_layer=pooler).eval()
  with torch.no_grad():
    theirs = hf(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                token_type_ids=torch.tensor(types, dtype=torch.long))
  np.testing.assert_allclose(np.asarray(ours.last_hidden_state), theirs.last_hidden_state.numpy(), atol=1e-5, rtol=0)
  if pooler:
    np.testing.assert_allclose(np.asarray(ours.pooler_output), theirs.pooler_output.numpy(), atol=1e-5, rtol=0)
  else:
    assert ours.pooler_output is None and theirs.pooler_output is None


@pytest.mark.parametrize("normalize", [False, True])
def test_bert_sentence_embedding(checkpoint, normalize):
  path = checkpoint("bert")
  model, params = models.from_pretrained(path, normalize=normalize)
  ids, mask = tokens((2, 7)), _mask(2, 7)
  ours = forward(model, params, ids, mask)
  tmask = torch.tensor(mask)
  with torch.no_grad():
    h = _hf("BertModel", path, ["pooler.dense.weight", "pooler.dense.bias"])(
      input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=tmask
    ).last_hidden_state
  m = tmask[..., None].float()
  theirs = (h * m).sum(1) / m.sum(1)
  if normalize:
    theirs = torch.nn.functional.normalize(theirs, dim=-1)
  _close(ours, theirs)


@pytest.mark.parametrize("name", ["t5", "t5_gated"])
def test_t5(checkpoint, name):
  path = checkpoint(name)
  model, params = models.from_pretrained(path)
  ids, mask = tokens((2, 11)), _mask(2, 11)
  dec = tokens((2, 10), seed=1)
  ours = forward(model, params, ids, mask, dec)
  with torch.no_grad():
    theirs = _hf("T5ForConditionalGeneration", path)(
      input_ids=torch.tensor(ids, dtype=torch.long),
      attention_mask=torch.tensor(mask),
      decoder_input_ids=torch.tensor(dec, dtype=torch.long),
    ).logits
  _close(ours, theirs)
