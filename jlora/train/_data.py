"""Datasets as lists of example dicts, checked line by line, and a deterministic batch order.

Examples per task (the fields a `jsonl` line must have; each line one JSON object):

| task (`lora.task_type`) | fields              |
|-------------------------|---------------------|
| FEATURE_EXTRACTION      | `query`, `document` |
| CAUSAL_LM               | `text`              |
| SEQ_2_SEQ_LM            | `input`, `target`   |
| SEQ_CLS                 | `text`, `label`     |

Text fields are strings. `label`s are integer class indices in `[0, num_labels)` or
class names (strings, mapped to indices in sorted order), the same kind throughout
both files. Every problem names the file and its line.

The batch of step `s` is a pure function of `(seed, s)`: epoch `e = s // steps_per_epoch`
uses the permutation drawn from `numpy.random.default_rng([seed, e])`. A resumed run
therefore sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from jlora.train import _stdlib

__all__ = ["ByteTokenizer", "Dataset", "Examples", "batch_indices", "examples", "position", "tokenize"]

Dataset = dict[str, np.ndarray]
MAX_INFERRED_LABELS = 1000  # more classes than this need an explicit `data.num_labels`
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


class Examples(NamedTuple):
  """The rows of a run: `train` and `eval` example dicts; for SEQ_CLS the classes (`label_names` for string labels)."""

  train: list[dict]
  eval: list[dict]
  num_labels: int | None = None
  label_names: tuple[str, ...] | None = None


class ByteTokenizer:
  """UTF-8 bytes as token ids `3 + byte`, with pad 0, bos 1, eos 2 (for random-init models).

  `encode` matches `jlora.models.Tokenizer.encode`: `(ids, mask)` int32 (B, T), and `decode` its `decode`.
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

  def decode(self, ids: Any, *, skip_special_tokens: bool = True) -> list[str]:
    """(B, T) token ids -> B strings (the bytes of ids >= 3, UTF-8 with replacement; specials dropped)."""
    return [bytes(int(i) - 3 for i in row if int(i) >= 3).decode("utf-8", errors="replace") for row in np.asarray(ids)]


def tokenize(tokenizer: Any, texts: Sequence[str], length: int) -> tuple[np.ndarray, np.ndarray]:
  """`(ids, mask)` int32 (N, length): `texts` encoded, truncated and padded to `length`."""
  ids, mask = tokenizer.encode(list(texts), max_length=length)
  out = np.full((ids.shape[0], length), getattr(tokenizer, "pad_token_id", 0), np.int32)
  m = np.zeros((ids.shape[0], length), np.int32)
  n = min(length, ids.shape[1])
  out[:, :n], m[:, :n] = ids[:, :n], mask[:, :n]
  return out, m


def _family(module: str) -> str | None:
  root = module.split(".")[0]
  return next((f for f, roots in FAMILIES.items() if root in roots), None)


def _stable_split(key: str) -> bool:
  """True for about 1 in 5 keys: a held-out example, independent of the interpreter's hash seed."""
  return zlib.crc32(key.encode()) % 5 == 0


def _stdlib_examples(source: str) -> tuple[list[dict], list[dict]]:
  # Code search trains on more modules too (`_stdlib.TRAIN_MORE`); its held-out split is the same either way.
  train, held = _stdlib.code_search_split(more=_stdlib.TRAIN_MORE if source == "stdlib_code_search" else ())
  if source == "stdlib_code_search":
    as_ex = lambda rs: [{"query": r.doc, "document": r.code} for r in rs]  # noqa: E731
  elif source == "stdlib_docstrings":
    as_ex = lambda rs: [{"text": f"{r.code}: {r.doc}"} for r in rs]  # noqa: E731
  elif source == "stdlib_name_from_doc":
    as_ex = lambda rs: [{"input": r.doc, "target": f"{r.module}.{r.qualname}"} for r in rs]  # noqa: E731
  elif source == "stdlib_module_family":
    names = list(FAMILIES)
    ex = [({"text": r.doc, "label": names.index(_family(r.module))}, _stable_split(r.doc))
          for r in train + held if _family(r.module)]
    return [e for e, h in ex if not h], [e for e, h in ex if h]
  else:
    raise ValueError(f"Unknown `data.source` {source!r}.")
  return as_ex(train), as_ex(held)


def _kind(value: Any) -> str:
  return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
    type(value), "a number")


def _row(line: str, where: str, fields: Sequence[str]) -> dict:
  try:
    row = json.loads(line)
  except json.JSONDecodeError as e:
    raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); each line must be one JSON object "
                     f"with fields {list(fields)}.") from None
  if not isinstance(row, dict):
    shown = "" if row is None else f" ({line.strip()[:60]})"
    raise ValueError(f"{where}: each line must be a JSON object with fields {list(fields)}, got {_kind(row)}{shown}.")
  missing = [k for k in fields if k not in row]
  if missing:
    raise ValueError(f"{where}: missing field(s) {missing}; each line needs {list(fields)}.")
  for k in fields:
    if k != "label" and not isinstance(row[k], str):
      raise ValueError(f"{where}: field `{k}` must be a string, got {_kind(row[k])} ({json.dumps(row[k])[:60]}).")
  return {k: row[k] for k in fields}


def _read_jsonl(path: str | None, key: str, fields: Sequence[str]) -> list[tuple[dict, str]]:
  """`(row, "file:line")` for each non-blank line of the JSON-lines file in `data.<key>`."""
  if not path:
    raise ValueError(f"`data.source: jsonl` needs `data.{key}`, a JSON-lines file with fields {list(fields)}; "
                     f"e.g. data.{key}=data/{key.split('_')[0]}.jsonl.")
  if os.path.isdir(path):
    raise ValueError(f"`data.{key}`: {path!r} is a directory; give a JSON-lines file.")
  if not os.path.isfile(path):
    raise ValueError(f"`data.{key}`: no such file {path!r}.")
  out, offset = [], 0
  try:
    with open(path, "rb") as f:  # bytes: a text-mode reader decodes ahead, so its errors name a later line
      for n, raw in enumerate(f, 1):
        try:
          line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
          raise ValueError(f"{path}:{n}: not UTF-8 text (byte {raw[e.start]:#04x} at offset {offset + e.start} of "
                           f"the file, byte {e.start + 1} of the line); `data.{key}` must be a UTF-8 JSON-lines "
                           "file.") from None
        offset += len(raw)
        if line.strip():
          out.append((_row(line, f"{path}:{n}", fields), f"{path}:{n}"))
  except OSError as e:
    raise ValueError(f"`data.{key}`: {path!r} cannot be read ({e.strerror}).") from None
  if not out:
    raise ValueError(f"`data.{key}`: {path!r} holds no examples.")
  return out


def _labels(rows: list[tuple[dict, str]], num_labels: int | None) -> tuple[int, tuple[str, ...] | None]:
  """`(number of classes, class names or None for integer labels)`, or a ValueError naming the line."""
  first = None
  for row, where in rows:
    v = row["label"]
    kind = "an integer" if isinstance(v, int) and not isinstance(v, bool) else "a string" if isinstance(v, str) else None
    if kind is None:
      raise ValueError(f"{where}: `label` must be an integer class index or a class name (string), got {_kind(v)} "
                       f"({json.dumps(v)}).")
    if first is None:
      first = (kind, where)
    elif kind != first[0]:
      raise ValueError(f"{where}: `label` {json.dumps(v)} is {kind}, but {first[1]} has {first[0]} label; use "
                       "integer class indices or class names (strings) throughout.")
    if kind == "an integer" and v < 0:
      raise ValueError(f"{where}: `label` must be a class index >= 0, got {v}.")
  allowed = f"`data.num_labels: {num_labels}`" if num_labels else f"at most {MAX_INFERRED_LABELS:,} inferred"
  if first[0] == "an integer":
    top, where = max(((row["label"], w) for row, w in rows), key=lambda t: t[0])
    n, names = num_labels or top + 1, None
    if top >= n or n > (num_labels or MAX_INFERRED_LABELS):
      raise ValueError(f"{where}: `label` {top} is outside [0, {min(n, num_labels or MAX_INFERRED_LABELS)}) "
                       f"({allowed}); set `data.num_labels` if {top + 1:,} classes are meant.")
  else:
    names = tuple(sorted({row["label"] for row, _ in rows}))
    n, top, where = num_labels or len(names), len(names), rows[0][1]
    if top > (num_labels or MAX_INFERRED_LABELS):
      raise ValueError(f"{where}: `label` has {top:,} distinct class names ({allowed}); set `data.num_labels` if "
                       f"{top:,} classes are meant, or check that `label` holds the class.")
  if n < 2:
    raise ValueError(f"{rows[0][1]}: every `label` is {json.dumps(rows[0][0]['label'])}; a classifier needs at "
                     "least 2 classes.")
  return n, names


def examples(data: Any, task: Any) -> Examples:
  """The checked `(train, eval)` example dicts of a `DataConfig` for a task (`jlora.train._tasks.Task`).

  Raises:
    ValueError: the source does not produce the task's fields, a file is missing or
      malformed (naming the file and line), or a label is not a valid class.
  """
  fields = task.fields
  if data.num_labels is not None and "label" not in fields:
    raise ValueError(f"`data.num_labels` is for SEQ_CLS; `lora.task_type: {task.name}` has no labels (remove it).")
  if data.source == "jsonl":
    train = _read_jsonl(data.train_file, "train_file", fields)
    held = _read_jsonl(data.eval_file, "eval_file", fields)
  else:
    train_rows, held_rows = _stdlib_examples(data.source)
    if set(train_rows[0]) != set(fields):
      raise ValueError(f"`data.source: {data.source}` gives {sorted(train_rows[0])}, but `lora.task_type: {task.name}` "
                       f"needs {list(fields)}: use `data.source: {task.stdlib_source}` or `jsonl`.")
    where = f"`data.source: {data.source}`"
    train, held = [(r, where) for r in train_rows], [(r, where) for r in held_rows]
  num_labels = names = None
  if "label" in fields:
    num_labels, names = _labels(train + held, data.num_labels)
    if names is not None:  # class names -> indices, in sorted order
      index = {name: i for i, name in enumerate(names)}
      train = [({**r, "label": index[r["label"]]}, w) for r, w in train]
      held = [({**r, "label": index[r["label"]]}, w) for r, w in held]
  strip = lambda rows: [r for r, _ in rows]  # noqa: E731
  return Examples(_subset(strip(train), data.max_train), _subset(strip(held), data.max_eval), num_labels, names)


def _subset(rows: list[dict], n: int | None) -> list[dict]:
  """At most `n` rows, a fixed random subset in the original order."""
  if n is None or n >= len(rows):
    return rows
  keep = np.sort(np.random.default_rng(0).permutation(len(rows))[:n])
  return [rows[i] for i in keep]


def position(step: int, n: int, batch_size: int) -> tuple[int, int]:
  """`(epoch, offset)` of the batch of `step` in a dataset of `n` examples."""
  per_epoch = max(1, n // batch_size)
  return step // per_epoch, (step % per_epoch) * batch_size


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> np.ndarray:
  """Example indices of the batch of `step`: (batch_size,), without replacement within an epoch.

  Raises:
    ValueError: `batch_size` is not in [1, n].
  """
  if not 1 <= batch_size <= n:
    raise ValueError(f"`train.batch_size` is {batch_size} but must be in [1, {n}] (the training examples).")
  epoch, offset = position(step, n, batch_size)
  perm = np.random.default_rng([seed, epoch]).permutation(n)
  return perm[offset: offset + batch_size]
