"""Trainable tokens and whole embedding tables in PEFT's files, both ways.

| jlora                                                   | PEFT key (after `base_model.model.<module>`)        |
|---------------------------------------------------------|-----------------------------------------------------|
| `trainable_tokens: (n_ids, dim)` beside `table`         | `.token_adapter.trainable_tokens_delta: (n_ids, dim)`, holding `table[ids] + delta` |
| an embedding table (`save_embedding_layers=True`)       | `.weight`; `.base_layer.weight` beside a LoRA adapter; `.token_adapter.base_layer.weight` beside trainable tokens |
| an output head `lm_head`'s kernel (the same)            | the same keys, `(vocab, dim)`                       |

PEFT's `trainable_tokens_delta` is, despite its name, the rows' trained values (`TrainableTokensLayer` starts it as
a copy of the rows and writes it over them); jlora's leaf is the difference (`jlora.core.tokens`), so the file's
tensor is `table[ids] + delta` and loading subtracts the rows of the table the adapter is loaded over (the file's
own table, when it holds one). A tied output head has no tensor of its own in either (it follows the embedding);
PEFT's `save_embedding_layers` writes copies under the head's name, which `load_peft` recognises and skips.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora.core import tokens as _tokens
from jlora.core.config import LoraConfig
from jlora.core.targets import TOKENS_KEY, is_lora_key, is_pair_key, leaf_name, path_str
from jlora.core.tree import Params, flatten
from jlora.formats.peft.layout import PREFIX, TOKENS_DELTA, TORCH_WEIGHTS, transposed
from jlora.formats.peft.names import module_name
from jlora.formats.peft.torch_names import NameMap

__all__ = ["DELTA", "WRAPPED", "export_tokens", "export_tables", "is_table", "is_tied_copy", "ids_of",
           "delta_from_peft", "table_from_peft"]

Path = tuple[str, ...]
DELTA = TOKENS_DELTA
WRAPPED = ".token_adapter.base_layer.weight"
_OUTPUT = "lm_head"  # PEFT's name of the output embedding (`EMBEDDING_LAYER_NAMES`: embed_tokens, lm_head)


def export_tokens(params: Params, config: LoraConfig, names: NameMap) -> tuple[dict[str, np.ndarray],
                                                                               dict[str, list[int]]]:
  """`({PEFT key: table[ids] + delta}, {PEFT module name: ids})` of every trainable-tokens leaf (`save_peft`)."""
  tensors: dict[str, np.ndarray] = {}
  indices: dict[str, list[int]] = {}
  for tk in _tokens.tokens(params, config):
    name = module_name(names, tk.module)
    if "{i}" in name:
      raise ValueError(f"save_peft: the trainable tokens at {tk.where!r} belong to a scanned module ({name!r}); PEFT "
                       "holds them for one table only.")
    table = np.asarray(jax.device_get(tk.table))
    tensors[f"{PREFIX}{name}{DELTA}"] = (table[np.asarray(tk.ids)].astype(np.float32)
                                         + np.asarray(jax.device_get(tk.delta), np.float32))
    indices[name] = list(tk.ids)
  return tensors, indices


def is_table(module: Path, leaf: str) -> bool:
  """Whether a leaf is what PEFT's `save_embedding_layers` saves: an embedding table or the `lm_head` weight."""
  return leaf == "embedding" or (bool(module) and module[-1] == _OUTPUT and leaf in TORCH_WEIGHTS)


def export_tables(params: Params, config: LoraConfig, names: NameMap, adapted: Sequence[Path]) -> dict[str, np.ndarray]:
  """`{PEFT key: table}` of every embedding table and `lm_head` weight, in PyTorch's layout (`save_embedding_layers`).

  Tables with trainable tokens are written as they are in the base (the rows' values are in `DELTA`), under the key
  PEFT's wrapper gives them.
  """
  with_tokens = {tk.module for tk in _tokens.tokens(params, config)}
  out: dict[str, np.ndarray] = {}
  for path, leaf in flatten(params).items():
    module, name = path[:-1], path[-1]
    if is_lora_key(name) or not is_table(module, name):
      continue
    if len(getattr(leaf, "shape", ())) != 2 or not hasattr(leaf, "dtype"):
      raise ValueError(f"save_peft(save_embedding_layers=True): {path_str(path)!r} is not a 2-D array "
                       f"({type(leaf).__name__}); PEFT saves embedding tables as (vocab, dim) weights.")
    suffix = WRAPPED if module in with_tokens else ".base_layer.weight" if module in adapted else ".weight"
    arr = np.asarray(jax.device_get(leaf))
    flip = transposed(name, 2, module, names, config.fan_in_fan_out)
    out[f"{PREFIX}{module_name(names, module)}{suffix}"] = arr.T if flip else arr
  return out


def is_tied_copy(key: str, mname: str, tensors: Mapping[str, Any], table: Mapping[str, Any]) -> bool:
  """Whether a trainable-tokens tensor of a module the model lacks is a copy of one the model has: PEFT's
  `save_embedding_layers` over a tied head writes the head's wrapper (`lm_head.token_adapter.*`), which shares its
  table and rows with the embedding's, under the head's name too; a jlora model with a tied head (`attend`) has no
  such module."""
  suffix = key[len(PREFIX) + len(mname):]
  if not suffix.startswith(".token_adapter."):
    return False
  value = np.asarray(tensors[key])
  return any(k != key and k.startswith(PREFIX) and k.endswith(suffix) and k[len(PREFIX):-len(suffix)] in table
             and np.shape(tensors[k]) == value.shape and np.array_equal(np.asarray(tensors[k]), value)
             for k in tensors)


def ids_of(config: LoraConfig, mname: str, key: str) -> tuple[int, ...]:
  """The ids PEFT's config gives the module `mname` (PEFT's match: the name, or a suffix after a `.`).

  Raises:
    ValueError: the config gives none for it.
  """
  spec = config.trainable_token_indices
  if spec is None:
    raise ValueError(f"load_peft: the adapter holds {key!r} but its adapter_config.json has no "
                     "`trainable_token_indices`; the files do not belong together.")
  if not isinstance(spec, Mapping):
    return spec
  hit = next((k for k in spec if mname == k or mname.endswith("." + k)), None)
  if hit is None:
    raise ValueError(f"load_peft: the adapter holds {key!r} but adapter_config.json's trainable_token_indices names "
                     f"{sorted(spec)}, not {mname!r}; the files do not belong together.")
  return spec[hit]


def delta_from_peft(module: Path, node: Mapping[str, Any], mname: str, value: Any, ids: tuple[int, ...],
                    dtype: Any) -> tuple[str, jax.Array]:
  """`(leaf name, delta)` of PEFT's `trainable_tokens_delta` (the rows' values) over the table in `node`.

  Raises:
    ValueError: the module holds no embedding table, the tensor's shape does not fit, or an id is outside the table.
  """
  where = path_str(module)
  kname = next((k for k in _tokens.EMBEDDING_NAMES if k in node), None)
  if kname is None or len(np.shape(node[kname])) != 2:
    raise ValueError(f"load_peft: the adapter trains token rows of {mname!r}, but the model's {where!r} holds no "
                     f"embedding table ({', '.join(_tokens.EMBEDDING_NAMES)}): trainable tokens of another layer "
                     "(e.g. an untied nn.Dense head) are not supported.")
  if any(is_pair_key(k) for k in node):
    raise ValueError(f"load_peft: the adapter has both LoRA factors and trainable token rows for {mname!r}; jlora "
                     "gives a table one of them.")
  table = np.asarray(jax.device_get(node[kname]))
  want = (len(ids), table.shape[1])
  if tuple(np.shape(value)) != want:
    raise ValueError(f"load_peft: {mname}{DELTA} has shape {tuple(np.shape(value))}; {len(ids)} ids over the table "
                     f"{where!r} {table.shape} need {want}.")
  bad = [i for i in ids if i >= table.shape[0]]
  if bad:
    raise ValueError(
        f"load_peft: the adapter trains token ids {bad} of {mname!r}, outside the vocabulary of {table.shape[0]} rows "
        f"of {where!r}. The adapter was trained over a resized vocabulary: pass the base resized to it (e.g. the "
        "Hugging Face model after resize_token_embeddings, converted), or the adapter saved with "
        "save_embedding_layers=True over such a base."
    )
  rows = np.asarray(value, np.float32) - table[np.asarray(ids)].astype(np.float32)
  return leaf_name(TOKENS_KEY, kname), jnp.asarray(rows, dtype)


def table_from_peft(path: Path, mname: str, value: Any, base_leaf: Any, *, transpose: bool) -> jax.Array:
  """A whole embedding table (or `lm_head` weight) of the file, in the base leaf's layout and dtype.

  Raises:
    ValueError: its shape differs from the base's (a resized vocabulary the base was not resized to).
  """
  arr = np.asarray(value)
  arr = arr.T if transpose else arr
  if arr.shape != tuple(base_leaf.shape):
    raise ValueError(
        f"load_peft: the adapter holds the whole table {mname!r} of shape {tuple(np.shape(value))} (PEFT's "
        f"save_embedding_layers; read as {arr.shape}), but `params` holds {tuple(base_leaf.shape)} at "
        f"{path_str(path)!r}: the adapter was trained over a resized vocabulary. Pass the base resized the same way "
        "(e.g. the Hugging Face model after resize_token_embeddings, converted; or the table padded with "
        "jnp.concatenate to the adapter's rows); the file's table then replaces it."
    )
  return jnp.asarray(arr, base_leaf.dtype)
