"""Tokenizer wrapper: padding sides, masks, truncation, decode (a tiny word-level tokenizer)."""

import json

import numpy as np
import pytest

from jlora import models

tokenizers = pytest.importorskip("tokenizers")


@pytest.fixture
def tok_dir(tmp_path):
  vocab = {"[PAD]": 0, "[UNK]": 1, "hello": 2, "world": 3, "big": 4}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.decoder = tokenizers.decoders.WordPiece()
  tok.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "[PAD]"}))
  return tmp_path


def test_encode_pads_right_and_left(tok_dir):
  tok = models.Tokenizer.from_pretrained(tok_dir)
  ids, mask = tok.encode(["hello big world", "world"])
  np.testing.assert_array_equal(ids, [[2, 4, 3], [3, 0, 0]])
  np.testing.assert_array_equal(mask, [[1, 1, 1], [1, 0, 0]])
  assert ids.dtype == np.int32 and mask.dtype == np.int32
  left = models.Tokenizer.from_pretrained(tok_dir, padding_side="left")
  ids, mask = left.encode(["hello big world", "world"])
  np.testing.assert_array_equal(ids, [[2, 4, 3], [0, 0, 3]])
  np.testing.assert_array_equal(mask, [[1, 1, 1], [0, 0, 1]])
  ids, _ = tok.encode("hello big world", max_length=2)
  np.testing.assert_array_equal(ids, [[2, 4]])
  assert tok.decode([[2, 3]]) == ["hello world"]


def test_tokenizer_errors(tmp_path, tok_dir):
  with pytest.raises(ValueError, match=r"has no tokenizer\.json"):
    models.Tokenizer.from_pretrained(tmp_path / "none")
  with pytest.raises(ValueError, match="`padding_side` must be 'left' or 'right'"):
    models.Tokenizer.from_pretrained(tok_dir, padding_side="middle")
