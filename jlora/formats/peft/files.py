"""The two files of a PEFT adapter directory, written as one unit and read with their checksums.

`adapter_config.json` (the config) and `adapter_model.safetensors` (the tensors)
are written into a temporary directory that replaces the target as one unit
(`jlora.formats.atomic.directory`), so a reader sees the old pair or the new pair. The
safetensors header (`__metadata__`) carries `format: pt`, as PyTorch expects,
and `jlora_sha256`: a JSON `{tensor key: SHA-256}` (`jlora.formats.integrity`), which
`read` verifies when present; files written by PyTorch PEFT have none.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import safetensors
import safetensors.numpy

from jlora.core.safe_load import load_json
from jlora.formats import atomic as _io
from jlora.formats import integrity as _integrity

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "DIGESTS", "write", "read"]

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
DIGESTS = "jlora_sha256"


def write(directory: str | os.PathLike, tensors: dict[str, np.ndarray], config: dict[str, Any]) -> None:
  """Writes both files (tensors with their checksums) as one unit.

  Raises:
    ValueError: `directory` holds files jlora did not write (nothing changes).
  """
  tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
  digests = _integrity.digests({(k,): v for k, v in tensors.items()})
  with _io.directory(directory, what="`directory`") as tmp:
    safetensors.numpy.save_file(tensors, os.path.join(tmp, WEIGHTS_FILE),
                                metadata={"format": "pt", DIGESTS: json.dumps(digests, sort_keys=True)})
    _io.write_json(os.path.join(tmp, CONFIG_FILE), config, indent=2, sort_keys=True)


def _convert_bin(directory: str) -> str:
  """The lines of Python that turn `adapter_model.bin` into `adapter_model.safetensors` without running a pickle."""
  source, target = os.path.join(directory, "adapter_model.bin"), os.path.join(directory, WEIGHTS_FILE)
  return (
      "    import torch, safetensors.torch\n"
      f"    tensors = torch.load({source!r}, map_location='cpu', weights_only=True)\n"
      "    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()},\n"
      f"                                {target!r}, metadata={{'format': 'pt'}})"
  )


def read(directory: str | os.PathLike) -> tuple[dict, dict[str, Any]]:
  """`(config dict, {key: tensor})`, tensors checked against jlora's checksums when the file has them.

  Reads `directory`, or the previous version that an interrupted save left
  beside it (`jlora.formats.atomic.readable`). Only safetensors is read, never a pickle.

  Raises:
    ValueError: missing files, only `adapter_model.bin`, invalid JSON, an
      unreadable safetensors file, or a tensor whose checksum differs.
  """
  shown = os.fspath(directory)
  directory = _io.readable(directory)
  if not os.path.isdir(directory):
    raise ValueError(f"load_peft: no adapter directory at {shown!r}.")
  cfg_file, weights = os.path.join(directory, CONFIG_FILE), os.path.join(directory, WEIGHTS_FILE)
  if not os.path.isfile(cfg_file):
    raise ValueError(f"load_peft: {shown!r} has no {CONFIG_FILE}; a PEFT adapter directory holds it and {WEIGHTS_FILE}.")
  if not os.path.isfile(weights):
    if os.path.isfile(os.path.join(directory, "adapter_model.bin")):
      raise ValueError(
          f"load_peft: {shown!r} holds adapter_model.bin (a pickle) and no {WEIGHTS_FILE}. jlora never unpickles "
          "files (loading a pickle can run arbitrary code). Convert it once with PyTorch's restricted loader, which "
          "reads tensors only:\n" + _convert_bin(directory))
    raise ValueError(f"load_peft: {shown!r} has no {WEIGHTS_FILE}.")
  try:
    with open(cfg_file, encoding="utf-8") as f:
      data = load_json(f.read(), where=f"load_peft: {cfg_file!r}")  # a key twice is refused, naming both lines
  except UnicodeDecodeError as e:
    raise ValueError(f"load_peft: {cfg_file!r} is not valid JSON ({e}).") from None
  if not isinstance(data, dict):
    raise ValueError(f"load_peft: {cfg_file!r} must hold a JSON object, got {type(data).__name__}.")
  try:
    with safetensors.safe_open(weights, framework="flax") as f:
      tensors = {k: f.get_tensor(k) for k in f.keys()}
      meta = f.metadata() or {}
  except Exception as e:  # safetensors raises its own SafetensorError, OSError or ValueError
    raise ValueError(f"load_peft: {weights!r} is not a readable safetensors file (truncated or corrupt?): {e}") from None
  if DIGESTS in meta:
    try:
      digests = json.loads(meta[DIGESTS])
    except json.JSONDecodeError:
      digests = None
    if not isinstance(digests, dict):
      raise ValueError(f"load_peft: the checksum list in {weights!r} is damaged; restore the file from a good copy.")
    _integrity.verify({(k,): v for k, v in tensors.items()}, digests, what=f"PEFT adapter file {weights!r}")
  return data, tensors
