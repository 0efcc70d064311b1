"""Hugging Face PEFT's on-disk LoRA format, both ways: `save_peft` and `load_peft`.

A PEFT adapter directory holds `adapter_config.json` and `adapter_model.safetensors`
with keys `base_model.model.<module>.<tensor>`, where `<module>` is the module's
name in the `transformers` task model. Layouts (jlora ↔ PEFT), per layer:

| jlora (Flax, `(in, out)` kernels)  | PEFT (PyTorch)                                     |
|------------------------------------|----------------------------------------------------|
| `lora_a: in_shape + (r,)`          | `<module>.lora_A.weight: (r, prod(in_shape))`      |
| `lora_b: (r,) + out_shape`         | `<module>.lora_B.weight: (prod(out_shape), r)`     |
| `nn.Embed` `lora_a: (vocab, r)`    | `<module>.lora_embedding_A: (r, vocab)`            |
| `nn.Embed` `lora_b: (r, dim)`      | `<module>.lora_embedding_B: (dim, r)`              |
| trained `bias` of an adapted layer | `<module>.base_layer.bias`                         |
| other trained `bias`               | `<module>.bias`                                    |
| `modules_to_save` leaves           | `<module>.weight` (`(out, in)`), `<module>.bias`   |

GPT-2's `Conv1D` layers store their LoRA tensors like `nn.Linear` ones
(`fan_in_fan_out=True` only changes how PEFT merges); their full weights are
`(in, out)` already. Stacked (`nn.scan`) adapters `(L, ...)` are written per layer.

Module names come from a *name map*: a function from a Flax module path to the
PEFT module name, e.g. `("transformer", "h_0", "attn", "c_attn") ->
"transformer.h.0.attn.c_attn"`. The reference models of `jlora.models` have one
built in (from their Hugging Face layout, `hf_spec`); for other models pass
`name_map=`, or get the default, the path joined with `.`. For a module inside
`nn.scan` (leaves with a leading layer axis) the name contains `{i}`, which is
formatted with each layer index: `"model.layers.{i}.self_attn.q_proj"`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from jlora import _ops
from jlora._config import LoraConfig
from jlora._fields import ALL_LINEAR, pattern_lookup
from jlora._targets import matches
from jlora._tree import Params, _check_tree, adapted_modules, flatten, kernel_key, labels, unflatten
from jlora.checkpoint import strip_adapters

__all__ = ["save_peft", "load_peft", "NameMap"]

NameMap = Callable[[tuple[str, ...]], str]
Path = tuple[str, ...]
PREFIX = "base_model.model."
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
_WEIGHT_LEAVES = ("kernel", "embedding", "scale", "weight", "w")


# ------------------------------------------------------------------ name maps
def _default_name(path: Path) -> str:
  return ".".join(path)


def _resolve(model: Any, name_map: NameMap | None) -> tuple[NameMap, frozenset[str]]:
  """The name map to use and the module names whose kernels are already `(in, out)` (GPT-2 Conv1D)."""
  spec = None
  arch = sys.modules.get(type(model).__module__) if model is not None else None
  if arch is not None and arch.__name__.startswith("jlora.models.") and hasattr(arch, "hf_spec"):
    spec = arch.hf_spec(model)
  conv1d = frozenset(spec.no_transpose) if spec is not None else frozenset()
  if name_map is not None:
    if not callable(name_map):
      raise TypeError(f"`name_map` must be a function from a module path tuple to a PEFT module name, got {name_map!r}.")
    return name_map, conv1d
  if spec is None:
    return _default_name, conv1d

  def from_spec(path: Path) -> str:
    parts: list[str] = []
    for p in path:
      m = re.fullmatch(r"(.+)_(\d+)", p)
      if m and m.group(1) in spec.list_names:
        parts += [m.group(1), m.group(2)]
      elif p == spec.scan_name:
        parts += [p, "{i}"]
      else:
        parts.append(p)
    return ".".join(parts)

  return from_spec, conv1d


def _name(name_map: NameMap, path: Path) -> str:
  name = name_map(path)
  if not isinstance(name, str) or not name:
    raise ValueError(f"`name_map` returned {name!r} for the module {'/'.join(path)!r}; it must return a module name.")
  return name


def _layers(name: str, leaf: Any, where: str) -> list[tuple[str, Any]]:
  """`[(name, per-layer array)]`: one entry, or one per layer when `name` has `{i}`."""
  arr = np.asarray(jax.device_get(leaf))
  if "{i}" not in name:
    return [(name, arr)]
  if arr.ndim == 0:
    raise ValueError(f"{where!r} is named {name!r} (stacked, with {{i}}) but has no layer axis.")
  return [(name.format(i=i), arr[i]) for i in range(arr.shape[0])]


# ------------------------------------------------------------------------ save
def _is_weight(leaf: str) -> bool:
  return leaf in _WEIGHT_LEAVES


def save_peft(directory: str | os.PathLike, params: Params, config: LoraConfig, *, name_map: NameMap | None = None,
              model: Any = None) -> None:
  """Writes `adapter_config.json` and `adapter_model.safetensors` that PEFT loads.

  `PeftModel.from_pretrained(hf_model, directory)` then computes what
  `jlora.apply(model, params, config, ...)` computes. Each adapter becomes
  `lora_A.weight: (r, fan_in)` and `lora_B.weight: (fan_out, r)` (multi-axis
  `DenseGeneral` kernels flattened), embeddings `lora_embedding_A: (r, vocab)`
  and `lora_embedding_B: (dim, r)`; stacked (`nn.scan`) adapters one entry per
  layer. Trained biases and `modules_to_save` leaves are written as PEFT does
  (layouts in the module docstring). The config is written so that PEFT wraps
  exactly the saved modules with the saved ranks: `target_modules` stays as given
  when it is a list of plain names selecting exactly the adapted modules, and
  otherwise lists their PEFT names; `rank_pattern` / `alpha_pattern` list each
  module whose rank / alpha differs from `r` / `lora_alpha`.

  Args:
    directory: where to write (created if needed; other files there are kept).
    params: params with adapters.
    config: their config.
    name_map: Flax module path -> PEFT module name (see the module docstring).
    model: a `jlora.models` model, whose Hugging Face names are used when
      `name_map` is not given.

  Raises:
    ValueError: an adapter does not fit its kernel or rank; a layer kind PEFT has
      no equivalent for (`nn.Einsum`, nested scans, a `modules_to_save` kernel
      with more than two axes); `init_lora_weights="pissa"` (the jlora base holds
      the PiSSA residual, which a PEFT base does not).
  """
  _check_tree(params)
  if not isinstance(config, LoraConfig):
    raise TypeError(f"`config` must be a jlora.LoraConfig, got {type(config).__name__}.")
  if config.init_lora_weights == "pissa":
    raise ValueError(
        "save_peft: a PiSSA adapter (init_lora_weights='pissa') only makes sense over the residual base that "
        "jlora wrote into the kernels; merge it (jlora.merge) and export the merged model instead."
    )
  namer, conv1d = _resolve(model, name_map)
  tensors: dict[str, np.ndarray] = {}
  ranks: dict[str, int] = {}
  alphas: dict[str, float] = {}
  adapted: list[Path] = []
  names: dict[Path, list[str]] = {}
  for path, node in adapted_modules(params):
    where = "/".join(path)
    kname = kernel_key(path, node)
    kernel, a, b = node[kname], node["lora_a"], node["lora_b"]
    r = config.rank_for(where)
    _ops.check_adapter(where, kernel.shape, a.shape, b.shape, r)
    layout, stack = _ops.layout(tuple(a.shape), tuple(b.shape), tuple(kernel.shape))
    if layout == "broadcast":
      raise ValueError(
          f"save_peft: {where!r} is an nn.Einsum adapter (broadcast layout), which has no PEFT equivalent. "
          "Exclude it, or export a merged model (jlora.merge + jlora.models.save_pretrained)."
      )
    name = _name(namer, path)
    if stack > 1 or (stack == 1) != ("{i}" in name):
      raise ValueError(
          f"save_peft: {where!r} has {stack} leading layer axes but its PEFT name {name!r} "
          f"{'has' if '{i}' in name else 'has no'} '{{i}}'; a scanned module's name must contain '{{i}}' "
          "(one level of nn.scan is supported)."
      )
    adapted.append(path)
    embed = kname == "embedding"
    names[path] = []
    for (n, a_l), (_, b_l) in zip(_layers(name, a, where), _layers(name, b, where)):
      names[path].append(n)
      a2, b2 = a_l.reshape(-1, r), b_l.reshape(r, -1)
      if embed:
        tensors[f"{PREFIX}{n}.lora_embedding_A"], tensors[f"{PREFIX}{n}.lora_embedding_B"] = a2.T, b2.T
      else:
        tensors[f"{PREFIX}{n}.lora_A.weight"], tensors[f"{PREFIX}{n}.lora_B.weight"] = a2.T, b2.T
      if r != config.r:
        ranks[n] = r
      if config.alpha_for(where) != config.lora_alpha:
        alphas[n] = config.alpha_for(where)
  adapted_set = set(adapted)
  saved_modules: list[str] = []
  for path, label in flatten(labels(params, config)).items():
    if label not in ("bias", "saved"):
      continue
    module, leaf = path[:-1], path[-1]
    name = _name(namer, module)
    value = _get(params, path)
    if label == "saved":
      top = next(module[:i] for i in range(1, len(path)) if matches(config.modules_to_save, module[:i]))
      saved_modules.append(_name(namer, top))
    for n, arr in _layers(name, value, "/".join(path)):
      if _is_weight(leaf):
        if arr.ndim > 2:
          raise ValueError(
              f"save_peft: the modules_to_save leaf {'/'.join(path)!r} has shape {arr.shape}; PEFT weights of more "
              "than two axes (a DenseGeneral or conv kernel) are not supported."
          )
        transpose = arr.ndim == 2 and leaf != "embedding" and module[-1] not in conv1d and not config.fan_in_fan_out
        tensors[f"{PREFIX}{n}.weight"] = arr.T if transpose else arr
      else:
        middle = ".base_layer" if leaf == "bias" and module in adapted_set else ""
        tensors[f"{PREFIX}{n}{middle}.{leaf}"] = arr
  if not tensors:
    raise ValueError("save_peft: `params` holds no adapter, trained bias or modules_to_save leaf to export.")
  data = config.to_dict()
  data.update(_peft_targets(params, config, adapted, names, saved_modules))
  data["rank_pattern"], data["alpha_pattern"] = ranks, alphas
  if any(p[-1] in conv1d for p in adapted):
    data["fan_in_fan_out"] = True
  if data["init_lora_weights"] not in (True, False, "gaussian"):
    data["init_lora_weights"] = True
  tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
  directory = os.fspath(directory)
  os.makedirs(directory, exist_ok=True)
  weights, cfg_file = os.path.join(directory, WEIGHTS_FILE), os.path.join(directory, CONFIG_FILE)
  tmp_w, tmp_c = f"{weights}.tmp{os.getpid()}", f"{cfg_file}.tmp{os.getpid()}"
  try:
    safetensors.numpy.save_file(tensors, tmp_w, metadata={"format": "pt"})
    with open(tmp_c, "w", encoding="utf-8") as f:
      json.dump(data, f, indent=2, sort_keys=True)
    os.replace(tmp_w, weights)
    os.replace(tmp_c, cfg_file)
  finally:
    for tmp in (tmp_w, tmp_c):
      if os.path.exists(tmp):
        os.remove(tmp)


def _get(tree: Params, path: Path) -> Any:
  node: Any = tree
  for key in path:
    node = node[key]
  return node


def _peft_targets(params: Params, config: LoraConfig, adapted: list[Path], names: Mapping[Path, list[str]],
                  saved_modules: list[str]) -> dict[str, Any]:
  """`target_modules` (and friends) that make PEFT wrap exactly the adapted modules."""
  out: dict[str, Any] = {}
  targets = config.target_modules
  keep = isinstance(targets, tuple) and not any(re.search(r"[./]", t) for t in targets)
  if keep and config.layers_to_transform is None and config.exclude_modules is None:
    with_weights = {p[:-1] for p in flatten(params) if p[-1] in ("kernel", "embedding")}
    keep = {p for p in with_weights if p[-1] in targets} == set(adapted)
  if not keep:
    explicit = sorted(n for p in adapted for n in names[p])
    out.update(target_modules=explicit, exclude_modules=None, layers_to_transform=None, layers_pattern=None)
  mts = config.modules_to_save
  if mts and any(re.search(r"[./]", m) for m in mts):
    out["modules_to_save"] = sorted(set(saved_modules))
  return out


# ------------------------------------------------------------------------ load
def _read(directory: str) -> tuple[dict, dict[str, jax.Array]]:
  if not os.path.isdir(directory):
    raise ValueError(f"load_peft: no adapter directory at {directory!r}.")
  cfg_file, weights = os.path.join(directory, CONFIG_FILE), os.path.join(directory, WEIGHTS_FILE)
  if not os.path.isfile(cfg_file):
    raise ValueError(f"load_peft: {directory!r} has no {CONFIG_FILE}; a PEFT adapter directory holds it and {WEIGHTS_FILE}.")
  if not os.path.isfile(weights):
    if os.path.isfile(os.path.join(directory, "adapter_model.bin")):
      raise ValueError(
          f"load_peft: {directory!r} holds adapter_model.bin (a pickle) and no {WEIGHTS_FILE}. jlora never unpickles "
          "files (loading a pickle can run arbitrary code); convert it where you trust it, e.g. with PEFT: "
          "`PeftModel.from_pretrained(model, dir).save_pretrained(dir, safe_serialization=True)`."
      )
    raise ValueError(f"load_peft: {directory!r} has no {WEIGHTS_FILE}.")
  try:
    with open(cfg_file, encoding="utf-8") as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"load_peft: {cfg_file!r} is not valid JSON ({e}).") from None
  if not isinstance(data, dict):
    raise ValueError(f"load_peft: {cfg_file!r} must hold a JSON object, got {type(data).__name__}.")
  try:
    with safetensors.safe_open(weights, framework="flax") as f:
      tensors = {k: f.get_tensor(k) for k in f.keys()}
  except Exception as e:  # safetensors raises its own SafetensorError, OSError or ValueError
    raise ValueError(f"load_peft: {weights!r} is not a readable safetensors file (truncated or corrupt?): {e}") from None
  return data, tensors


_LORA_SUFFIXES = {
    ".lora_A.weight": ("lora_a", False), ".lora_B.weight": ("lora_b", False),
    ".lora_embedding_A": ("lora_a", True), ".lora_embedding_B": ("lora_b", True),
}


def _table(base: Mapping[Path, Any], namer: NameMap) -> dict[str, tuple[Path, int | None]]:
  """PEFT module name -> (Flax module path, layer index or None), for every module holding leaves."""
  modules: dict[Path, Any] = {}
  for path, leaf in base.items():
    modules.setdefault(path[:-1], leaf)
  table: dict[str, tuple[Path, int | None]] = {}
  for module, leaf in modules.items():
    if not module:
      continue
    name = _name(namer, module)
    if "{i}" in name:
      for i in range(np.shape(leaf)[0]):
        table[name.format(i=i)] = (module, i)
    else:
      table[name] = (module, None)
  return table


def _kernel_name(flat: Mapping[Path, Any], module: Path) -> str:
  name = next((k for k in ("kernel", "embedding", "w", "weight") if (*module, k) in flat), None)
  if name is None:
    raise ValueError(f"load_peft: the model's module {'/'.join(module)!r} has no kernel or embedding to adapt.")
  return name


def _few(items, n: int = 6) -> str:
  items = sorted(items)
  return ", ".join(items[:n]) + (f" … and {len(items) - n} more" if len(items) > n else "")


def load_peft(directory: str | os.PathLike, model: Any, params: Params, *, name_map: NameMap | None = None,
              dtype: Any = jnp.float32) -> tuple[dict, LoraConfig]:
  """Imports a PEFT LoRA adapter (`adapter_config.json` + `adapter_model.safetensors`).

  Every tensor is placed and checked before anything is returned; on any error
  nothing is loaded (the input tree is never modified). Layouts are converted
  as in the module docstring: `lora_A.weight (r, fan_in)` becomes
  `lora_a: in_shape + (r,)` and `lora_B.weight (fan_out, r)` becomes
  `lora_b: (r,) + out_shape`; per-layer tensors of a scanned module are stacked
  to `(L, ...)`. The returned config is PEFT's, translated to Flax paths where
  PEFT's names would not select the same modules (`target_modules`,
  `rank_pattern`, `alpha_pattern`, `modules_to_save` then list module paths).

  Args:
    directory: the PEFT adapter directory (only safetensors is read; never pickle).
    model: the linen model; a `jlora.models` model brings its Hugging Face names.
    params: its base params (existing adapters are replaced).
    name_map: Flax module path -> PEFT module name, for other models.
    dtype: dtype of the adapters (float32 by default, whatever the file holds);
      biases and `modules_to_save` leaves take the dtype of the leaf they replace.

  Returns:
    `(params, config)` ready for `jlora.apply(model, params, config, ...)`.

  Raises:
    ValueError: missing files, only a pickled `adapter_model.bin`, a truncated or
      corrupt safetensors file, a `peft_type` other than LORA or a PEFT feature
      jlora does not implement (DoRA, ...), tensors for modules the model lacks,
      shapes that do not fit the model, or ranks that differ from the config.
  """
  _check_tree(params)
  directory = os.fspath(directory)
  data, tensors = _read(directory)
  fields = {f.name for f in dataclasses.fields(LoraConfig)}
  # Newer PEFT versions write keys for features jlora does not know; switched off, they mean nothing here.
  config = LoraConfig.from_dict({k: v for k, v in data.items() if k in fields or v not in (None, False, {}, [])})
  namer, conv1d = _resolve(model, name_map)
  base = strip_adapters(params)
  table = _table(base, namer)
  lora: dict[tuple[Path, str], dict[int | None, np.ndarray]] = {}
  embeds: set[Path] = set()
  full: dict[Path, dict[int | None, Any]] = {}
  unknown: list[str] = []
  for key, value in tensors.items():
    name = key[len(PREFIX):] if key.startswith(PREFIX) else key
    suffix = next((s for s in _LORA_SUFFIXES if name.endswith(s)), None)
    if suffix is not None:
      module_name = name[: -len(suffix)]
      if module_name not in table:
        unknown.append(key)
        continue
      module, layer = table[module_name]
      leaf, embed = _LORA_SUFFIXES[suffix]
      if embed:
        embeds.add(module)
      lora.setdefault((module, leaf), {})[layer] = (module_name, value)
      continue
    name = name.replace(".modules_to_save.", ".").replace(".base_layer.", ".")
    module_name, _, tleaf = name.rpartition(".")
    if ".original_module" in module_name:
      continue  # PEFT's copy of the untrained module, saved beside a modules_to_save entry with bias="all"
    if module_name not in table:
      unknown.append(key)
      continue
    module, layer = table[module_name]
    leaf = "bias" if tleaf == "bias" else next((k for k in _WEIGHT_LEAVES if (*module, k) in base), None)
    if leaf is None or (*module, leaf) not in base:
      unknown.append(key)
      continue
    if leaf != "bias" and not _saved_by(config, module_name):
      mine = _layer_of(base[(*module, leaf)], layer)
      if np.array_equal(np.asarray(value), mine) or np.array_equal(np.asarray(value).T, mine):
        continue  # an unchanged copy of a base weight (PEFT's save_embedding_layers)
      raise ValueError(
          f"load_peft: the adapter holds a changed full weight {key!r}, but {module_name!r} is not in the config's "
          "`modules_to_save`; jlora does not import modified base weights (e.g. a resized vocabulary)."
      )
    full.setdefault((*module, leaf), {})[layer] = (module_name, value)
  if unknown:
    raise ValueError(
        f"load_peft: the adapter holds tensors for modules the model does not have: {_few(unknown)}. "
        f"Module names of this model (PEFT style) include: {_few(table)}. Pass the model the adapter was made for, "
        "or a `name_map` from Flax module paths to PEFT module names."
    )
  out = dict(base)
  ranks: dict[Path, int] = {}
  alphas: dict[Path, float] = {}
  for (module, leaf), layers in sorted(lora.items()):
    where = "/".join(module)
    kname = _kernel_name(base, module)
    kernel = base[(*module, kname)]
    stacked = next(iter(layers)) is not None
    k_shape = tuple(kernel.shape[1:] if stacked else kernel.shape)
    n_layers = kernel.shape[0] if stacked else 1
    missing = sorted(set(range(n_layers)) - set(layers)) if stacked else []
    if missing:
      raise ValueError(f"load_peft: {where!r} is a scanned stack of {n_layers} layers; the adapter lacks layers {missing}.")
    arrays = []
    for layer in sorted(layers, key=lambda x: -1 if x is None else x):
      module_name, value = layers[layer]
      arr, r = _convert(leaf, module in embeds, np.asarray(value, np.float32), k_shape, kname, key=module_name)
      peft_r = pattern_lookup(config.rank_pattern, module_name, config.r)
      if r != peft_r:
        raise ValueError(
            f"load_peft: the {leaf} tensor of {module_name!r} has rank {r}, but adapter_config.json gives r={peft_r} "
            "for it (check `r` and `rank_pattern`); the files do not belong together."
        )
      if ranks.setdefault(module, r) != r:
        raise ValueError(f"load_peft: the layers of the scanned stack {where!r} have different ranks; jlora needs one.")
      alpha = pattern_lookup(config.alpha_pattern, module_name, config.lora_alpha)
      if alphas.setdefault(module, alpha) != alpha:
        raise ValueError(f"load_peft: the layers of the scanned stack {where!r} have different alphas; jlora needs one.")
      arrays.append(arr)
    out[(*module, leaf)] = jnp.asarray(np.stack(arrays) if stacked else arrays[0], dtype)
  for module in {m for m, _ in lora}:
    if (*module, "lora_a") not in out or (*module, "lora_b") not in out:
      raise ValueError(f"load_peft: {'/'.join(module)!r} has only one of lora_A / lora_B in the adapter.")
  for path, layers in sorted(full.items()):
    out[path] = _full_leaf(path, layers, base[path], config, conv1d)
  if not lora:
    raise ValueError(f"load_peft: {directory!r} holds no LoRA tensor (lora_A / lora_B / lora_embedding_A / _B).")
  config = _jlora_config(config, ranks, alphas, full)
  for module in ranks:
    where = "/".join(module)
    kname = _kernel_name(out, module)
    _ops.check_adapter(where, out[(*module, kname)].shape, out[(*module, "lora_a")].shape,
                       out[(*module, "lora_b")].shape, config.rank_for(where))
  return unflatten(out), config


def _convert(leaf: str, embed: bool, value: np.ndarray, k_shape: tuple[int, ...], kname: str, *,
             key: str) -> tuple[np.ndarray, int]:
  """One layer's PEFT tensor -> jlora layout, checked against the per-layer kernel shape."""
  if value.ndim != 2:
    raise ValueError(f"load_peft: the {leaf} tensor of {key!r} has shape {value.shape}; LoRA tensors are 2-D.")
  if embed != (kname == "embedding"):
    raise ValueError(
        f"load_peft: {key!r} holds {'embedding ' if embed else ''}LoRA tensors but the model's module is "
        f"{'an nn.Embed' if kname == 'embedding' else 'not an nn.Embed'}."
    )
  mat = value.T  # lora_A (r, in) -> (in, r); lora_B (out, r) -> (r, out); embeddings likewise
  r, size = (mat.shape[1], mat.shape[0]) if leaf == "lora_a" else (mat.shape[0], mat.shape[1])
  n = len(k_shape)
  fits = [j for j in range(1, n) if int(np.prod(k_shape[:j] if leaf == "lora_a" else k_shape[j:])) == size]
  if not fits:
    raise ValueError(
        f"load_peft: the {'lora_A' if leaf == 'lora_a' else 'lora_B'} tensor of {key!r} has shape {value.shape}, "
        f"whose {'input' if leaf == 'lora_a' else 'output'} size {size} does not fit the model's kernel {k_shape}. "
        "Was the adapter made for another base model?"
    )
  split = fits[0] if leaf == "lora_a" else fits[-1]
  if leaf == "lora_a":
    return mat.reshape(k_shape[:split] + (r,)), r
  return mat.reshape((r,) + k_shape[split:]), r


def _saved_by(config: LoraConfig, module_name: str) -> bool:
  parts = tuple(module_name.split("."))
  return bool(config.modules_to_save) and any(matches(config.modules_to_save, parts[:i]) for i in range(1, len(parts) + 1))


def _layer_of(leaf: Any, layer: int | None) -> np.ndarray:
  arr = np.asarray(jax.device_get(leaf))
  return arr if layer is None else arr[layer]


def _full_leaf(path: Path, layers: dict, base_leaf: Any, config: LoraConfig, conv1d: frozenset[str]) -> jax.Array:
  """A bias or modules_to_save leaf from PEFT's per-layer tensors, in the base leaf's dtype and layout."""
  where = "/".join(path)
  stacked = next(iter(layers)) is not None
  want = tuple(base_leaf.shape[1:] if stacked else base_leaf.shape)
  arrays = []
  for layer in sorted(layers, key=lambda x: -1 if x is None else x):
    module_name, value = layers[layer]
    arr = np.asarray(value)
    transpose = arr.ndim == 2 and path[-1] == "kernel" and path[-2] not in conv1d and not config.fan_in_fan_out
    arr = arr.T if transpose else arr
    if arr.shape != want:
      raise ValueError(
          f"load_peft: the tensor for {module_name!r} has shape {np.shape(value)}, which does not fit {where!r} "
          f"{want} (read as {'(out, in), transposed' if transpose else 'stored'})."
      )
    arrays.append(arr)
  if stacked and len(arrays) != base_leaf.shape[0]:
    raise ValueError(f"load_peft: the adapter holds {len(arrays)} of the {base_leaf.shape[0]} layers of {where!r}.")
  return jnp.asarray(np.stack(arrays) if stacked else arrays[0], base_leaf.dtype)


def _jlora_config(config: LoraConfig, ranks: dict[Path, int], alphas: dict[Path, float],
                  full: Mapping[Path, Any]) -> LoraConfig:
  """PEFT's config, with names rewritten to Flax paths where PEFT's would not select the same modules."""
  changes: dict[str, Any] = {}
  paths = sorted(ranks)
  if config.target_modules != ALL_LINEAR and not all(
      matches(config.target_modules, p) and not matches(config.exclude_modules, p) for p in paths):
    changes.update(target_modules=tuple("/".join(p) for p in paths), exclude_modules=None, layers_to_transform=None,
                   layers_pattern=None)
  if any(config.rank_for("/".join(p)) != r for p, r in ranks.items()):
    changes["rank_pattern"] = {"/".join(p): r for p, r in ranks.items() if r != config.r}
  if any(config.alpha_for("/".join(p)) != a for p, a in alphas.items()):
    changes["alpha_pattern"] = {"/".join(p): a for p, a in alphas.items() if a != config.lora_alpha}
  trial = dataclasses.replace(config, **changes)
  saved_modules = {p[:-1] for p in full if p[-1] != "bias"}
  if saved_modules and not all(
      config.modules_to_save and any(matches(config.modules_to_save, m[:i]) for i in range(1, len(m) + 1))
      for m in saved_modules):
    changes["modules_to_save"] = tuple(sorted("/".join(m) for m in saved_modules))
  biases = [p for p in full if p[-1] == "bias" and p[:-1] not in saved_modules]
  if biases and trial.bias == "none":
    raise ValueError(
        f"load_peft: the adapter holds trained biases ({_few('/'.join(p) for p in biases)}) but its config has "
        "bias='none'; the files do not belong together."
    )
  return dataclasses.replace(config, **changes)
