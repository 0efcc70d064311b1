"""A small wrapper over the `tokenizers` package for a checkpoint's `tokenizer.json`."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

__all__ = ["Tokenizer"]


class Tokenizer:
  """Encodes batches of text to padded int32 arrays and decodes them back.

  Args:
    tokenizer: a `tokenizers.Tokenizer`.
    pad_token_id: id used for padding (default: the tokenizer's pad token, else 0).
    padding_side: `"right"` (encoders) or `"left"` (prompts for generation).

  Examples:
    >>> tok = Tokenizer.from_pretrained(path)  # doctest: +SKIP
    >>> ids, mask = tok.encode(["a sentence", "another one"])  # doctest: +SKIP
  """

  def __init__(self, tokenizer, *, pad_token_id: int | None = None, padding_side: str = "right"):
    if padding_side not in ("left", "right"):
      raise ValueError(f"`padding_side` must be 'left' or 'right', got {padding_side!r}.")
    self.tokenizer = tokenizer
    tokenizer.no_padding()  # padding and truncation are done by `encode`, as transformers does
    tokenizer.no_truncation()
    self.pad_token_id = 0 if pad_token_id is None else pad_token_id
    self.padding_side = padding_side

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike, *, padding_side: str = "right") -> Tokenizer:
    """Reads `tokenizer.json` (and the pad token of `tokenizer_config.json`) from `path`.

    Raises:
      ValueError: if `path` has no `tokenizer.json`.
      ImportError: the `tokenizers` package (jlora's `train` extra) is not installed.
    """
    try:
      import tokenizers
    except ImportError:
      raise ImportError("jlora.models.Tokenizer needs the `tokenizers` package, which jlora's `train` extra "
                        "installs: pip install 'jlora[train]' (or pip install tokenizers).") from None

    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
      raise ValueError(f"`{path}` has no tokenizer.json; only fast-tokenizer files are read.")
    tok = tokenizers.Tokenizer.from_file(file)
    pad_id = None
    if tok.padding is not None:
      pad_id = tok.padding.get("pad_id")
    config = os.path.join(path, "tokenizer_config.json")
    if pad_id is None and os.path.isfile(config):
      with open(config) as f:
        pad = json.load(f).get("pad_token")
      pad = pad.get("content") if isinstance(pad, dict) else pad
      pad_id = tok.token_to_id(pad) if pad else None
    return cls(tok, pad_token_id=pad_id, padding_side=padding_side)

  def encode(
    self, texts: str | Sequence[str], *, max_length: int | None = None, add_special_tokens: bool = True
  ) -> tuple[np.ndarray, np.ndarray]:
    """Tokenizes a batch and pads it to its longest sequence.

    Args:
      texts: one string or a list of B strings.
      max_length: truncate each sequence to this many tokens.
      add_special_tokens: add [CLS]/[SEP], BOS, EOS as the tokenizer's post-processor says.

    Returns:
      `(input_ids, attention_mask)`, both (B, T) int32; the mask is 1 on real tokens.
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    encs = self.tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)
    seqs = [e.ids[:max_length] if max_length else e.ids for e in encs]
    t = max(1, max(len(s) for s in seqs))
    ids = np.full((len(seqs), t), self.pad_token_id, np.int32)
    mask = np.zeros((len(seqs), t), np.int32)
    for i, s in enumerate(seqs):
      sl = slice(t - len(s), t) if self.padding_side == "left" else slice(0, len(s))
      ids[i, sl], mask[i, sl] = s, 1
    return ids, mask

  def decode(self, ids, *, skip_special_tokens: bool = True) -> list[str]:
    """Decodes (B, T) token ids to B strings."""
    rows = np.asarray(ids).tolist()
    return self.tokenizer.decode_batch(rows, skip_special_tokens=skip_special_tokens)
