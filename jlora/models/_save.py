"""Writing a model as a Hugging Face checkpoint directory, atomically (`jlora.formats.atomic.directory`).

`save_pretrained` builds `config.json`, `model.safetensors` and, with `copy_from`, the
base checkpoint's other files (tokenizer, sentence-transformers modules, …) in a
temporary directory that replaces the target as one unit: a reader sees the old
directory or the complete new one, never a mix; an interrupted write leaves the old one.
A target holding files jlora did not write is refused, so nothing of the user's is lost.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from typing import Any

import numpy as np
import safetensors.numpy

from jlora.formats import atomic as _io
from jlora.models._arch import HFModel, checked_model
from jlora.models._checkpoint import to_hf_tensors

__all__ = ["base_files", "save_pretrained", "to_hf_state_dict"]

# Weights of the base model in any format: stale once the merged weights are written.
_WEIGHTS = (
  ".safetensors",
  ".safetensors.index.json",
  ".bin",
  ".bin.index.json",
  ".h5",
  ".msgpack",
  ".onnx",
  ".gguf",
  ".pt",
  ".pth",
  ".ckpt",
)
_NOT_COPIED = ("config.json", "README.md", "onnx", "openvino")  # rewritten, describing the base, or exported weights


def to_hf_state_dict(model: HFModel, params: Mapping) -> dict[str, np.ndarray]:
  """Converts `params` of a jlora reference model to Hugging Face tensor names and layouts.

  The names are those of the task model (`transformer.h.0.attn.c_attn.weight`,
  `model.layers.0.self_attn.q_proj.weight`, …); linear weights are `(out, in)`.
  Extra leaves such as `lora_a`/`lora_b` are skipped (merge them first).

  Returns:
    `{name: np.ndarray}`, ready for `safetensors.numpy.save_file`.

  Raises:
    ValueError: `model` is not a jlora reference model.
  """
  return to_hf_tensors(params, checked_model(model).hf_spec())


def base_files(checkpoint: str | os.PathLike) -> list[str]:
  """The entries of a checkpoint directory that `save_pretrained(copy_from=...)` copies, sorted.

  Everything but `config.json` (written anew), `README.md` (the base's model card), the
  base weights in any format (`*.safetensors`, `*.bin`, their indexes, `*.h5`, `*.onnx`,
  `onnx/`, `openvino/`, …) and hidden entries (`.git*`, `.cache/`, jlora's manifest).
  Subdirectories such as sentence-transformers' `1_Pooling/` are copied whole.

  Raises:
    ValueError: `checkpoint` is not a directory.
  """
  checkpoint = os.fspath(checkpoint)
  if not os.path.isdir(checkpoint):
    raise ValueError(
      f"`copy_from`: {checkpoint!r} is not a directory; pass the base checkpoint directory whose tokenizer and "
      "other files go beside the new weights, or leave `copy_from` out."
    )
  return sorted(
    name
    for name in os.listdir(checkpoint)
    if not name.startswith(".") and name not in _NOT_COPIED and not name.endswith(_WEIGHTS)
  )


def save_pretrained(
  path: str | os.PathLike,
  model: HFModel,
  params: Mapping,
  *,
  config: Mapping[str, Any] | None = None,
  copy_from: str | os.PathLike | None = None,
) -> None:
  """Writes a Hugging Face checkpoint directory, atomically: `config.json`, `model.safetensors`.

  The directory is built in a temporary directory beside `path` and swapped in as one
  unit, with a manifest of its entries (`.jlora-manifest.json`); a later call replaces a
  directory that jlora wrote, and refuses one holding files it did not.

  Args:
    path: the directory to create or replace.
    model: the jlora model.
    params: its `'params'` (merge LoRA adapters first to export a merged model).
    config: the `config.json` dict to write (default: derived from `model.config`).
    copy_from: a base checkpoint directory whose other files (tokenizer, sentence-transformers
      `modules.json`, `1_Pooling/`, …; see :func:`base_files`) are copied in with the
      weights, so that `path` loads like the base.

  Raises:
    ValueError: `model` is not a jlora model, `copy_from` is not a directory, or `path` is
      a file or holds files jlora did not write (nothing is then changed).
  """
  tensors = to_hf_state_dict(model, params)
  write = model.hf_spec().write
  if write is not None:  # the layout `transformers` writes (Mixtral: one tensor per expert)
    tensors = write(tensors)
  config = dict(config) if config is not None else model.config.to_hf()
  copied = [] if copy_from is None else base_files(copy_from)
  with _io.directory(path, what="`path`") as tmp:
    safetensors.numpy.save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
      json.dump(config, f, indent=2)
    for name in copied:
      src, dst = os.path.join(os.fspath(copy_from), name), os.path.join(tmp, name)
      if os.path.isdir(src):
        shutil.copytree(src, dst)
      else:
        shutil.copy2(src, dst)
