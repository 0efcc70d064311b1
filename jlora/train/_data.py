"""Datasets as lists of example dicts, tokenized once into fixed-shape arrays, and a deterministic batch order.

Examples per task (the fields a `jsonl` file must have):

| task (`lora.task_type`) | fields              | arrays                                              |
|-------------------------|---------------------|-----------------------------------------------------|
| FEATURE_EXTRACTION      | `query`, `document` | `query_ids/mask`, `doc_ids/mask` (N, seq_len)       |
| CAUSAL_LM               | `text`              | `ids`, `mask` (N, seq_len)                          |
| SEQ_2_SEQ_LM            | `input`, `target`   | `ids`, `mask` (N, seq_len), `labels` (N, target_len) |
| SEQ_CLS                 | `text`, `label`     | `ids`, `mask` (N, seq_len), `label` (N,)            |

The batch of step `s` is a pure function of `(seed, s)`: epoch `e = s // steps_per_epoch`
uses the permutation drawn from `numpy.random.default_rng([seed, e])`. A resumed run
therefore sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from jlora.train import _stdlib

__all__ = ["ByteTokenizer", "Dataset", "batch_indices", "encode", "examples", "num_labels", "position"]

Dataset = dict[str, np.ndarray]
FIELDS = {
  "FEATURE_EXTRACTION": ("query", "document"),
  "CAUSAL_LM": ("text",),
  "SEQ_2_SEQ_LM": ("input", "target"),
  "SEQ_CLS": ("text", "label"),
}
# Module families for the classification task: a module's family is the first entry whose prefixes it matches.
FAMILIES: dict[str, tuple[str, ...]] = {
  "text": ("string", "textwrap", "difflib", "re", "unicodedata", "stringprep", "codecs", "locale", "gettext",
           "shlex", "html", "xml", "csv", "json", "base64", "binascii", "quopri"),
  "numbers": ("math", "cmath", "decimal", "fractions", "statistics", "random", "numbers", "operator", "secrets"),
  "files": ("os", "posix", "posixpath", "pathlib", "shutil", "glob", "fnmatch", "tempfile", "filecmp", "stat",
            "fileinput", "io", "tarfile", "zipfile", "gzip", "bz2", "lzma", "zlib", "mmap"),
  "network": ("socket", "ssl", "http", "urllib", "ftplib", "smtplib", "imaplib", "poplib", "email", "mailbox",
              "xmlrpc", "socketserver", "select", "selectors", "ipaddress", "mimetypes", "wsgiref"),
  "runtime": ("sys", "gc", "inspect", "ast", "dis", "traceback", "types", "typing", "abc", "importlib", "pdb",
              "tracemalloc", "threading", "multiprocessing", "subprocess", "signal", "asyncio", "concurrent"),
}


class ByteTokenizer:
  """UTF-8 bytes as token ids `3 + byte`, with pad 0, bos 1, eos 2 (for random-init models).

  `encode` matches `jlora.models.Tokenizer.encode`: `(ids, mask)` int32 (B, T).
  """

  vocab_size = 259
  pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

  def encode(self, texts: Sequence[str], *, max_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    seqs = [[1, *(3 + b for b in t.encode("utf-8")), 2][:max_length] for t in texts]
    t = max(1, max(len(s) for s in seqs))
    ids, mask = np.zeros((len(seqs), t), np.int32), np.zeros((len(seqs), t), np.int32)
    for i, s in enumerate(seqs):
      ids[i, : len(s)], mask[i, : len(s)] = s, 1
    return ids, mask


def _pad(ids: np.ndarray, mask: np.ndarray, length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  out = np.full((ids.shape[0], length), pad_id, np.int32)
  m = np.zeros((ids.shape[0], length), np.int32)
  n = min(length, ids.shape[1])
  out[:, :n], m[:, :n] = ids[:, :n], mask[:, :n]
  return out, m


def _tokens(tokenizer: Any, texts: Sequence[str], length: int) -> tuple[np.ndarray, np.ndarray]:
  ids, mask = tokenizer.encode(list(texts), max_length=length)
  return _pad(ids, mask, length, getattr(tokenizer, "pad_token_id", 0))


def _family(module: str) -> str | None:
  root = module.split(".")[0]
  return next((f for f, roots in FAMILIES.items() if root in roots), None)


def _stable_split(key: str) -> bool:
  """True for about 1 in 5 keys: a held-out example, independent of the interpreter's hash seed."""
  return zlib.crc32(key.encode()) % 5 == 0


def _stdlib_examples(source: str) -> tuple[list[dict], list[dict]]:
  if source == "stdlib_code_search":
    train, held = _stdlib.code_search_split()
    as_ex = lambda rs: [{"query": r.doc, "document": r.code} for r in rs]  # noqa: E731
    return as_ex(train), as_ex(held)
  if source == "stdlib_docstrings":
    train, held = _stdlib.code_search_split()
    as_ex = lambda rs: [{"text": f"{r.code}: {r.doc}"} for r in rs]  # noqa: E731
    return as_ex(train), as_ex(held)
  if source == "stdlib_name_from_doc":
    train, held = _stdlib.code_search_split()
    as_ex = lambda rs: [{"input": r.doc, "target": f"{r.module}.{r.qualname}"} for r in rs]  # noqa: E731
    return as_ex(train), as_ex(held)
  if source == "stdlib_module_family":
    train, held = _stdlib.code_search_split()
    recs = [r for r in train + held if _family(r.module)]
    names = list(FAMILIES)
    ex = [({"text": r.doc, "label": names.index(_family(r.module))}, _stable_split(r.doc)) for r in recs]
    return [e for e, h in ex if not h], [e for e, h in ex if h]
  raise ValueError(f"Unknown `data.source` {source!r}.")


def _read_jsonl(path: str | None, what: str, fields: Sequence[str]) -> list[dict]:
  if not path:
    raise ValueError(f"`data.source: jsonl` needs `data.{what}` (a JSON-lines file with fields {list(fields)}).")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"`data.{what}`: no such file {path!r}.")
  out = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if line.strip():
        row = json.loads(line)
        missing = [k for k in fields if k not in row]
        if missing:
          raise ValueError(f"{path}:{n}: missing field(s) {missing}; each line needs {list(fields)}.")
        out.append({k: row[k] for k in fields})
  if not out:
    raise ValueError(f"`data.{what}`: {path!r} holds no examples.")
  return out


def examples(data: Any, task: str) -> tuple[list[dict], list[dict]]:
  """`(train, eval)` example dicts for `task` from a `DataConfig`.

  Raises:
    ValueError: the source does not produce the task's fields, or a file is malformed.
  """
  fields = FIELDS[task]
  if data.source == "jsonl":
    train = _read_jsonl(data.train_file, "train_file", fields)
    held = _read_jsonl(data.eval_file, "eval_file", fields)
  else:
    train, held = _stdlib_examples(data.source)
    if set(train[0]) != set(fields):
      sources = {"FEATURE_EXTRACTION": "stdlib_code_search", "CAUSAL_LM": "stdlib_docstrings",
                 "SEQ_2_SEQ_LM": "stdlib_name_from_doc", "SEQ_CLS": "stdlib_module_family"}
      raise ValueError(f"`data.source: {data.source}` gives {sorted(train[0])}, but `lora.task_type: {task}` needs "
                       f"{list(fields)}: use `data.source: {sources[task]}` or `jsonl`.")
  if task == "SEQ_CLS":
    labels = sorted({e["label"] for e in train + held}, key=str)
    if not all(isinstance(e["label"], int) for e in train + held):  # string labels -> indices
      index = {v: i for i, v in enumerate(labels)}
      train = [{**e, "label": index[e["label"]]} for e in train]
      held = [{**e, "label": index[e["label"]]} for e in held]
  return _subset(train, data.max_train), _subset(held, data.max_eval)


def _subset(rows: list[dict], n: int | None) -> list[dict]:
  """At most `n` rows, a fixed random subset in the original order."""
  if n is None or n >= len(rows):
    return rows
  keep = np.sort(np.random.default_rng(0).permutation(len(rows))[:n])
  return [rows[i] for i in keep]


def num_labels(task: str, *splits: Sequence[dict]) -> int | None:
  """Classes of a SEQ_CLS dataset (`max(label) + 1`); None for other tasks."""
  if task != "SEQ_CLS":
    return None
  return 1 + max(int(r["label"]) for rows in splits for r in rows)


def encode(rows: Sequence[dict], task: str, tokenizer: Any, *, seq_len: int, target_len: int) -> Dataset:
  """Tokenizes example dicts into fixed-shape int32 arrays (see the module docstring)."""
  col = lambda k: [str(r[k]) for r in rows]  # noqa: E731
  if task == "FEATURE_EXTRACTION":
    q, qm = _tokens(tokenizer, col("query"), seq_len)
    d, dm = _tokens(tokenizer, col("document"), seq_len)
    return {"query_ids": q, "query_mask": qm, "doc_ids": d, "doc_mask": dm}
  if task == "CAUSAL_LM":
    ids, mask = _tokens(tokenizer, col("text"), seq_len)
    return {"ids": ids, "mask": mask}
  if task == "SEQ_2_SEQ_LM":
    ids, mask = _tokens(tokenizer, col("input"), seq_len)
    tgt, tmask = _tokens(tokenizer, col("target"), target_len)
    return {"ids": ids, "mask": mask, "labels": np.where(tmask > 0, tgt, -100).astype(np.int32)}
  if task == "SEQ_CLS":
    ids, mask = _tokens(tokenizer, col("text"), seq_len)
    return {"ids": ids, "mask": mask, "label": np.asarray([int(r["label"]) for r in rows], np.int32)}
  raise ValueError(f"Unsupported task {task!r}; supported: {list(FIELDS)}.")


def position(step: int, n: int, batch_size: int) -> tuple[int, int]:
  """`(epoch, offset)` of the batch of `step` in a dataset of `n` examples."""
  per_epoch = max(1, n // batch_size)
  return step // per_epoch, (step % per_epoch) * batch_size


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> np.ndarray:
  """Example indices of the batch of `step`: (batch_size,), without replacement within an epoch.

  Raises:
    ValueError: fewer examples than `batch_size`.
  """
  if n < batch_size:
    raise ValueError(f"`train.batch_size` is {batch_size} but the training set has only {n} examples.")
  epoch, offset = position(step, n, batch_size)
  perm = np.random.default_rng([seed, epoch]).permutation(n)
  return perm[offset: offset + batch_size]
