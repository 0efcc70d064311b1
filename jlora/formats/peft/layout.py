"""PEFT tensor keys and layouts, each jlora -> PEFT conversion beside its inverse.

Per layer (jlora Flax kernels are `(in, out)`; PyTorch weights `(out, in)`):

| jlora                               | PEFT key (after `base_model.model.<module>`) |
|-------------------------------------|----------------------------------------------|
| `lora_a: in_shape + (r,)`           | `.lora_A.weight: (r, prod(in_shape))`        |
| `lora_b: (r,) + out_shape`          | `.lora_B.weight: (prod(out_shape), r)`       |
| `nn.Embed` `lora_a: (vocab, r)`     | `.lora_embedding_A: (r, vocab)`              |
| `nn.Embed` `lora_b: (r, dim)`       | `.lora_embedding_B: (dim, r)`                |
| DoRA `lora_magnitude` (kernel-shaped, input axes 1) | `.lora_magnitude_vector: (prod(out_shape),)` |
| trained `bias` of an adapted layer  | `.base_layer.bias`                           |
| other trained `bias`                | `.bias`                                      |
| `modules_to_save` kernel `(in, out)`| `.weight: (out, in)` (as is for `fan_in_fan_out` modules and embeddings) |
| `modules_to_save` `scale`, `bias`   | `.weight`, `.bias`                           |
| `(out, in)` `weight` (Equinox): `lora_a: (1, in, r)`, `lora_b: (out, 1, r)` | `.lora_A.weight: (r, in)`, `.lora_B.weight: (out, r)` |
| `modules_to_save` `weight` `(out, in)` | `.weight` as is                           |
| `nn.Conv` `lora_a: window + (in, r)` | `.lora_A.weight: (r, in) + window` (a convolution kernel) |
| `nn.Conv` `lora_b: (r/g, out)`       | `.lora_B.weight: (out, r/g, 1, ...)` (a 1×1 convolution, `g` groups) |
| `nn.Conv` DoRA `lora_magnitude`      | `.lora_magnitude_vector: (1, out, 1, ...)`   |

A convolution's factors (a module listed in `NameMap.conv`, or a grouped convolution's adapter, `g > 1`) are
PEFT's `_ConvNd` layers': `A` a convolution with the base's window over all input features, `B` a 1×1 convolution
with the base's groups. Flax kernels are `window + (in, out)` (channels last), PyTorch's `(out, in) + window`.

GPT-2's `Conv1D` layers store their LoRA tensors like `nn.Linear` ones
(`fan_in_fan_out=True` only changes how PEFT merges); their full weights are
`(in, out)` already.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora.core import ops as _ops
from jlora.core.plain import TORCH_STYLE
from jlora.core.targets import KERNEL_KEYS, Site, kernel_key
from jlora.formats.peft.torch_names import NameMap

__all__ = ["PREFIX", "TORCH_WEIGHTS", "TOKENS_DELTA", "lora_to_peft", "lora_from_peft", "conv_to_peft",
           "conv_from_peft", "magnitude_from_peft", "from_broadcast", "to_broadcast", "transposed", "full_to_peft",
           "parse_key", "full_from_peft"]

PREFIX = "base_model.model."
# Flax leaves that PyTorch calls `weight`: the kernels, and a norm's `scale`.
TORCH_WEIGHTS = (*KERNEL_KEYS, "scale")
_LORA = {  # PEFT key suffix -> (jlora leaf, is an embedding)
    ".lora_A.weight": ("lora_a", False), ".lora_B.weight": ("lora_b", False),
    ".lora_embedding_A": ("lora_a", True), ".lora_embedding_B": ("lora_b", True),
    ".lora_magnitude_vector": ("lora_magnitude", False),
}
TOKENS_DELTA = ".token_adapter.trainable_tokens_delta"  # PEFT's trainable tokens (`jlora.formats.peft.tokens`)
Path = tuple[str, ...]


# --------------------------------------------------------------------- adapters
def lora_to_peft(name: str, a: np.ndarray, b: np.ndarray, r: int, *, embed: bool) -> dict[str, np.ndarray]:
  """One layer's `lora_a: in_shape + (r,)`, `lora_b: (r,) + out_shape` -> PEFT's `(r, in)`, `(out, r)` tensors."""
  a2, b2 = a.reshape(-1, r).T, b.reshape(r, -1).T
  if embed:
    return {f"{PREFIX}{name}.lora_embedding_A": a2, f"{PREFIX}{name}.lora_embedding_B": b2}
  return {f"{PREFIX}{name}.lora_A.weight": a2, f"{PREFIX}{name}.lora_B.weight": b2}


def conv_to_peft(name: str, a: np.ndarray, b: np.ndarray, where: str) -> dict[str, np.ndarray]:
  """One convolution's `lora_a: window + (in, r)`, `lora_b: (r/g, out)` -> PEFT's `(r, in) + window` and
  `(out, r/g) + (1,) * len(window)`.

  Raises:
    ValueError: the adapter is not a convolution's (a module listed in `NameMap.conv` with another kernel).
  """
  if a.ndim < 3 or b.ndim != 2:
    raise ValueError(
        f"save_peft: {where!r} is named in the name map's `conv`, but its adapter (lora_a {a.shape}, lora_b {b.shape}) "
        "is not an nn.Conv's (lora_a window + (in, r), lora_b (r, out)); take it out of `conv`."
    )
  n = a.ndim - 2
  a_t = np.transpose(a, (n + 1, n) + tuple(range(n)))
  b_t = b.T.reshape(b.shape[1], b.shape[0], *(1,) * n)
  return {f"{PREFIX}{name}.lora_A.weight": a_t, f"{PREFIX}{name}.lora_B.weight": b_t}


def conv_from_peft(leaf: str, value: np.ndarray, kernel_shape: tuple[int, ...],
                   key: str) -> tuple[np.ndarray, int | None]:
  """The inverse of `conv_to_peft` for one tensor: `(r, in) + window` -> `window + (in, r)`, `(out, r/g, 1, ...)` ->
  `(r/g, out)`.

  Args:
    leaf: `"lora_a"` or `"lora_b"`.
    value: the PEFT tensor, of the kernel's number of axes.
    kernel_shape: the per-layer shape of the model's `nn.Conv` kernel, `window + (in/g, out)`.
    key: the PEFT module name, for messages.

  Returns:
    `(array, r)`; `r` is None for `lora_b` (a grouped convolution's `B` holds `r/g`: the rank is `A`'s, and the
    pair is checked together once loaded).

  Raises:
    ValueError: the tensor does not fit the model's kernel (another window, input or output size).
  """
  k, n = tuple(kernel_shape), value.ndim - 2
  name = "lora_A" if leaf == "lora_a" else "lora_B"
  if leaf == "lora_a":
    arr = np.transpose(value, tuple(range(2, n + 2)) + (1, 0))
    fits = len(k) == value.ndim and arr.shape[:-2] == k[:-2] and arr.shape[-2] % k[-2] == 0
    want = f"(r, in) + window {k[:-2]} with `in` a multiple of {k[-2]}"
  else:
    arr = value.reshape(value.shape[:2]).T
    fits = len(k) == value.ndim and value.shape[2:] == (1,) * n and value.shape[0] == k[-1]
    want = f"({k[-1]}, r/groups) + {(1,) * max(len(k) - 2, 0)}"
  if not fits:
    raise ValueError(
        f"load_peft: the {name} tensor of {key!r} has shape {value.shape}, a convolution's, which does not fit the "
        f"model's kernel {k} (expected {want}). Was the adapter made for another base model?"
    )
  return arr, (arr.shape[-1] if leaf == "lora_a" else None)


def lora_from_peft(leaf: str, value: np.ndarray, kernel_shape: tuple[int, ...], *, embed: bool, kernel_name: str,
                   key: str) -> tuple[np.ndarray, int]:
  """The inverse of `lora_to_peft` for one tensor: `(r, in)` -> `in_shape + (r,)`, `(out, r)` -> `(r,) + out_shape`.

  Args:
    leaf: `"lora_a"` or `"lora_b"`.
    value: the PEFT tensor, `(r, in)` or `(out, r)`.
    kernel_shape: the per-layer shape of the model's kernel, `in_shape + out_shape`.
    embed: the tensor is a `lora_embedding_*` one.
    kernel_name: the name of the model's kernel leaf (`"embedding"` for `nn.Embed`).
    key: the PEFT module name, for messages.

  Returns:
    `(array, r)`.

  Raises:
    ValueError: the tensor is not 2-D, its kind (embedding or not) differs from
      the model's module, or its size fits no split of the kernel's axes.
  """
  if value.ndim != 2:
    raise ValueError(f"load_peft: the {leaf} tensor of {key!r} has shape {value.shape}; LoRA tensors are 2-D.")
  if embed != (kernel_name == "embedding"):
    raise ValueError(
        f"load_peft: {key!r} holds {'embedding ' if embed else ''}LoRA tensors but the model's module is "
        f"{'an nn.Embed' if kernel_name == 'embedding' else 'not an nn.Embed'}."
    )
  mat = value.T  # lora_A (r, in) -> (in, r); lora_B (out, r) -> (r, out); embeddings likewise
  r, size = (mat.shape[1], mat.shape[0]) if leaf == "lora_a" else (mat.shape[0], mat.shape[1])
  n = len(kernel_shape)
  fits = [j for j in range(1, n) if int(np.prod(kernel_shape[:j] if leaf == "lora_a" else kernel_shape[j:])) == size]
  if not fits:
    raise ValueError(
        f"load_peft: the {'lora_A' if leaf == 'lora_a' else 'lora_B'} tensor of {key!r} has shape {value.shape}, "
        f"whose {'input' if leaf == 'lora_a' else 'output'} size {size} does not fit the model's kernel "
        f"{kernel_shape}. Was the adapter made for another base model?"
    )
  if leaf == "lora_a":
    return mat.reshape(kernel_shape[:fits[0]] + (r,)), r
  return mat.reshape((r,) + kernel_shape[fits[-1]:]), r


def from_broadcast(a: np.ndarray, b: np.ndarray, kernel_shape: tuple[int, ...],
                   where: str) -> tuple[np.ndarray, np.ndarray, int]:
  """Broadcast-layout adapters of an `(out, in)` weight per layer (a PyTorch-style `weight`) -> the concat layout
  `S + (in, r)`, `S + (r, out)`, and the number of stack axes `len(S)`.

  Raises:
    ValueError: the weight has several input or output axes, shared axes other
      than leading (stacked-layer) ones, or is an `nn.Einsum` kernel `(in, out)`
      (whose adapters would not load back into the einsum's layout).
  """
  a, b, k = np.asarray(a), np.asarray(b), tuple(kernel_shape)
  ins = [i for i, d in enumerate(k) if d > 1 and a.shape[i] == d and b.shape[i] == 1]
  outs = [i for i, d in enumerate(k) if d > 1 and b.shape[i] == d and a.shape[i] == 1]
  stack = len(k) - len(ins) - len(outs)
  if len(ins) != 1 or len(outs) != 1 or [outs[0], ins[0]] != list(range(stack, len(k))):
    raise ValueError(
        f"save_peft: {where!r} is an nn.Einsum adapter, or a broadcast-layout adapter whose kernel {k} is not an "
        "(out, in) weight per layer, which has no PEFT equivalent. Exclude it, or export a merged model "
        "(jlora.merge + jlora.models.save_pretrained)."
    )
  return np.squeeze(a, axis=outs[0]), np.swapaxes(np.squeeze(b, axis=ins[0]), -1, -2), stack


def to_broadcast(leaf: str, arr: np.ndarray, site: Site) -> np.ndarray:
  """The inverse of `from_broadcast` for one layer: `(in, r)` / `(r, out)` -> the site's broadcast shapes."""
  r = arr.shape[-1] if leaf == "lora_a" else arr.shape[0]
  a_shape, b_shape = _ops.adapter_shapes(site, r)
  return arr.reshape(a_shape) if leaf == "lora_a" else arr.T.reshape(b_shape)


def magnitude_from_peft(module: Path, layers: Mapping[int | None, tuple[str, Any]], out: Mapping[Path, Any],
                        node: Mapping[str, Any], dtype: Any, present: tuple[int, ...] | None = None) -> Any:
  """A DoRA `lora_magnitude` leaf from PEFT's per-layer `lora_magnitude_vector` tensors (one value per output).

  `out` holds the module's imported `lora_a` / `lora_b` (flat paths); `node` is the module's dict in the base;
  `present`: the layers the file holds of a scanned stack it has some layers of (the others, masked out, get the
  kernel's norms, as `jlora.init` gives them).
  """
  where = "/".join(module)
  if (*module, "lora_a") not in out:
    raise ValueError(f"load_peft: {where!r} has a lora_magnitude_vector but no lora_A / lora_B in the adapter.")
  kernel = node[kernel_key(module, node)]
  a, b = out[(*module, "lora_a")], out[(*module, "lora_b")]
  stacked = next(iter(layers)) is not None
  shape = _ops.magnitude_shape(a.shape, b.shape, kernel.shape)
  per_layer_shape = shape[1:] if stacked else shape
  arrays = []
  for layer in sorted(layers, key=lambda x: -1 if x is None else x):
    mname, value = layers[layer]
    value = np.asarray(value, np.float32)
    if value.size != int(np.prod(per_layer_shape)):
      raise ValueError(f"load_peft: the lora_magnitude_vector of {mname!r} has {value.size} values; the model's "
                       f"{where!r} has {int(np.prod(per_layer_shape))} outputs.")
    arrays.append(value.reshape(per_layer_shape))
  if stacked and present is not None and tuple(sorted(layers)) == tuple(present):
    norms = np.asarray(_ops.column_norm(kernel, jnp.zeros_like(a), jnp.zeros_like(b), 1.0), np.float32)
    at = dict(zip(sorted(layers), arrays))
    arrays = [at.get(i, norms[i]) for i in range(kernel.shape[0])]
  if stacked and len(arrays) != kernel.shape[0]:
    raise ValueError(f"load_peft: the adapter holds the DoRA magnitude of {len(arrays)} of the {kernel.shape[0]} "
                     f"layers of {where!r}.")
  return jnp.asarray(np.stack(arrays) if stacked else arrays[0], dtype)


# ------------------------------------------------------------------ full leaves
def transposed(leaf: str, ndim: int, module: Path, names: NameMap, fan_in_fan_out: bool) -> bool:
  """Whether a full leaf is stored transposed in PEFT: 2-D kernels, unless `(in, out)` there too, or already
  `(out, in)` (a `weight`) (both ways)."""
  return (ndim == 2 and leaf in KERNEL_KEYS and leaf != "embedding" and leaf not in TORCH_STYLE
          and module[-1] not in names.fan_in_fan_out and not fan_in_fan_out)


def full_to_peft(name: str, leaf: str, arr: np.ndarray, *, wraps_adapter: bool, transpose: bool,
                 where: str) -> tuple[str, np.ndarray]:
  """A trained bias or `modules_to_save` leaf (one layer) -> its PEFT key and tensor.

  Raises:
    ValueError: a weight of more than two axes (PEFT has no such layout).
  """
  if leaf in TORCH_WEIGHTS:
    if arr.ndim > 2:
      raise ValueError(
          f"save_peft: the modules_to_save leaf {where!r} has shape {arr.shape}; PEFT weights of more than two axes "
          "(a DenseGeneral or conv kernel) are not supported."
      )
    return f"{PREFIX}{name}.weight", arr.T if transpose else arr
  return f"{PREFIX}{name}{'.base_layer' if leaf == 'bias' and wraps_adapter else ''}.{leaf}", arr


def parse_key(key: str) -> tuple[str, str, str | None, bool]:
  """The inverse of the key functions above: `(kind, module name, leaf, embed)`.

  `kind` is `"lora"` (leaf `lora_a` / `lora_b`), `"tokens"` (PEFT's
  `trainable_tokens_delta`, `jlora.formats.peft.tokens`), `"full"` (leaf is
  PyTorch's name, `weight` or `bias`...; a table under PEFT's trainable-tokens
  wrapper too) or `"skip"` (PEFT's copy of an untrained module).
  """
  name = key[len(PREFIX):] if key.startswith(PREFIX) else key
  for suffix, (leaf, embed) in _LORA.items():
    if name.endswith(suffix):
      return "lora", name[: -len(suffix)], leaf, embed
  if name.endswith(TOKENS_DELTA):
    return "tokens", name[: -len(TOKENS_DELTA)], "trainable_tokens", False
  name = name.replace(".modules_to_save.", ".").replace(".token_adapter.", ".").replace(".base_layer.", ".")
  module_name, _, torch_leaf = name.rpartition(".")
  if ".original_module" in module_name:  # saved beside a modules_to_save entry with bias="all"
    return "skip", module_name, None, False
  return "full", module_name, torch_leaf, False


def flax_leaf(torch_leaf: str, module: Path, base: Mapping[Path, Any]) -> str | None:
  """The Flax leaf a PEFT `weight` / `bias` tensor replaces in `module`, or None when it has none."""
  if torch_leaf == "bias":
    return "bias" if (*module, "bias") in base else None
  if torch_leaf != "weight":
    return None
  return next((k for k in TORCH_WEIGHTS if (*module, k) in base), None)


def full_from_peft(path: Path, layers: Mapping[int | None, tuple[str, Any]], base_leaf: Any, *,
                   transpose: bool) -> jax.Array:
  """The inverse of `full_to_peft`: per-layer tensors -> the leaf, in the base leaf's dtype and shape.

  Raises:
    ValueError: a tensor's shape does not fit, or layers of a stack are missing.
  """
  where = "/".join(path)
  stacked = next(iter(layers)) is not None
  want = tuple(base_leaf.shape[1:] if stacked else base_leaf.shape)
  arrays = []
  for layer in sorted(layers, key=lambda x: -1 if x is None else x):
    module_name, value = layers[layer]
    arr = np.asarray(value)
    arr = arr.T if transpose and arr.ndim == 2 else arr
    if arr.shape != want:
      raise ValueError(
          f"load_peft: the tensor for {module_name!r} has shape {np.shape(value)}, which does not fit {where!r} "
          f"{want} (read as {'(out, in), transposed' if transpose else 'stored'})."
      )
    arrays.append(arr)
  if stacked and len(arrays) != base_leaf.shape[0]:
    raise ValueError(f"load_peft: the adapter holds {len(arrays)} of the {base_leaf.shape[0]} layers of {where!r}.")
  return jnp.asarray(np.stack(arrays) if stacked else arrays[0], base_leaf.dtype)
