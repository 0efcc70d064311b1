"""Hugging Face PEFT's on-disk LoRA format, both ways: `save_peft` and `load_peft`.

A PEFT adapter directory holds `adapter_config.json` and `adapter_model.safetensors`
with keys `base_model.model.<module>.<tensor>`, where `<module>` is the module's
name in the PyTorch model. The pieces: names (`jlora.formats.peft.names`: where
`<module>` comes from, and why jlora refuses to guess it), tensor layouts
(`jlora.formats.peft.layout`), the config (`jlora.formats.peft.config`) and the two files
(`jlora.formats.peft.files`: written as one unit, tensors with SHA-256 checksums).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora.core import stacks as _stacks
from jlora.core import tokens as core_tokens
from jlora.core.config import LoraConfig
from jlora.core.fields import pattern_lookup, rewrites_base
from jlora.core.keys import restore, stringify
from jlora.core.plain import LayoutLike, weight_site
from jlora.core.targets import (
  LAYERS_KEY,
  MAGNITUDE_KEY,
  is_head,
  is_saved,
  kernel_key,
  layer_stack,
  selects,
  targets_parameter,
)
from jlora.core.tree import (
  Params,
  _check_tree,
  adapters,
  check_adapters,
  flatten,
  get_path,
  labels,
  unflatten,
)
from jlora.formats.checkpoint import strip_adapters
from jlora.formats.peft import layout as peft_layout
from jlora.formats.peft import params as peft_params
from jlora.formats.peft import tokens as peft_tokens
from jlora.formats.peft.config import from_peft, to_jlora, to_peft
from jlora.formats.peft.files import read, write
from jlora.formats.peft.names import NameLike, module_name, name_table, per_layer, resolve
from jlora.formats.peft.torch_names import NameMap

__all__ = ["save_peft", "load_peft"]

Path = tuple[str, ...]


def _explained(usage: str) -> Callable:
  """Turns Python's argument-binding `TypeError` into one that shows the call (e.g. for the earlier order
  `save_peft(dir, params, config, model=model)`)."""

  def wrap(fn: Callable) -> Callable:
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
      try:
        signature.bind(*args, **kwargs)
      except TypeError as e:
        raise TypeError(f"{fn.__name__}: {e} (`model` is the second argument). Call it as {usage}.") from None
      return fn(*args, **kwargs)

    return call

  return wrap


def _check_order(fn: str, model: Any, params: Any, config: Any, usage: str) -> None:
  """TypeErrors for arguments out of order (a params dict as `model`, a config as `params`) or of the wrong type."""
  if isinstance(model, Mapping) or isinstance(params, LoraConfig):
    raise TypeError(f"{fn}: `model` is a {type(model).__name__} and `params` a {type(params).__name__}: the arguments "
                    f"are out of order. Call it as {usage}.")
  _check_tree(params)
  if config is not None and not isinstance(config, LoraConfig):
    raise TypeError(f"{fn}: `config` must be a jlora.LoraConfig, got {type(config).__name__}. Call it as {usage}.")


def _few(items: Any, n: int = 6) -> str:
  items = sorted(items)
  return ", ".join(items[:n]) + (f" … and {len(items) - n} more" if len(items) > n else "")


# ------------------------------------------------------------------------ save
_SAVE = "save_peft(directory, model, params, config, *, name_map=None) (model=None with name_map=...)"


@_explained(_SAVE)
def save_peft(directory: str | os.PathLike, model: Any, params: Params, config: LoraConfig, *,
              name_map: NameLike = None, save_embedding_layers: bool = False) -> None:
  """Writes `adapter_config.json` and `adapter_model.safetensors` that PEFT loads.

  `PeftModel.from_pretrained(hf_model, directory)` then computes what
  `jlora.apply(model, params, config, ...)` computes. Each adapter becomes
  `lora_A.weight: (r, fan_in)` and `lora_B.weight: (fan_out, r)` (multi-axis
  `DenseGeneral` kernels flattened; the broadcast-layout adapters of an
  `(out, in)` weight, `(1, in, r)` and `(out, 1, r)`, squeezed), embeddings
  `lora_embedding_A: (r, vocab)` and `lora_embedding_B: (dim, r)`; stacked (`nn.scan`) adapters one entry per
  layer. Trained biases (`<module>.base_layer.bias` on an adapted layer,
  `<module>.bias` elsewhere) and `modules_to_save` leaves (`<module>.weight` /
  `.bias`, in PyTorch's layout) are written under PEFT's names. Trainable
  tokens become PEFT's `<module>.token_adapter.trainable_tokens_delta:
  (n_ids, dim)`, which holds the rows' values `table[ids] + delta`, with
  `trainable_token_indices: {PEFT module name: ids}` in the config. The config
  lists exactly the saved modules as `target_modules`, with `rank_pattern` /
  `alpha_pattern` where ranks differ, so PEFT wraps those modules with those ranks.
  Adapters of `target_parameters` become PEFT's `ParamWrapper` tensors
  (`jlora.formats.peft.params`: per expert, `lora_A.weight: (r·E, in)` and
  `lora_B.weight: (out, r·E)`), named after the PyTorch module that the name
  map's `module.param` name for the parameter's path gives, and are listed as
  `target_parameters` (docs/moe.md).

  Args:
    directory: where to write: absent, empty, or a directory jlora wrote (it is
      replaced as one unit).
    model: the linen model whose `peft_name_map()` names the modules, or None
      when `name_map` is given.
    params: params with adapters.
    config: their config.
    name_map: the PyTorch module name of each Flax module path: a function from
      a module path tuple to the name (`{i}` in it marks a scanned layer's
      index), or `"flax"` for the Flax paths joined by `.`. Default: the model's
      own `peft_name_map()` (the reference models of `jlora.models` have one,
      which also knows GPT-2's `(in, out)` `Conv1D` weights).
    save_embedding_layers: also write every embedding table (`nn.Embed`'s
      `embedding`) and the `lm_head` weight whole, as PEFT's
      `save_embedding_layers=True` does, e.g. after resizing the vocabulary for new
      tokens (PEFT's users resize their base the same way before loading it). PEFT's
      `"auto"` compares the vocabulary with the base's config on the Hub, which
      jlora does not read: say True or False.

  Raises:
    TypeError: arguments in the pre-0.2 order (`save_peft(dir, params, config,
      model=model)`) or of the wrong type.
    ValueError: no names (neither `name_map` nor a model with `peft_name_map`:
      PyTorch PEFT would load nothing); `directory` holds files jlora did not
      write; an adapter does not fit its kernel or rank; a layer kind PEFT has
      no equivalent for (an `nn.Einsum` or declared layout other than one input
      and one output axis per layer, nested scans, a `modules_to_save` kernel
      with more than two axes); an init that rewrote the kernels (`"pissa"`,
      `"pissa_niter_[n]"`, `"olora"`: the jlora base holds the residual, which a
      PEFT base does not; `jlora.convert_to_lora` makes a plain adapter of the original base).
  """
  _check_order("save_peft", model, params, config, _SAVE)
  if rewrites_base(config.init_lora_weights):
    raise ValueError(
        f"save_peft: an adapter made with init_lora_weights={config.init_lora_weights!r} only makes sense over the "
        "residual base that its init wrote into the kernels, which a PEFT user's base is not. Convert it to a plain "
        "LoRA adapter of the original weights first (PEFT's path_initial_model_for_weight_conversion): "
        "tree, config = jlora.convert_to_lora(trained, initial, config), then save_peft that over the original base; "
        "or merge it (jlora.merge) and export the merged model."
    )
  if not isinstance(save_embedding_layers, bool):
    raise TypeError(f"save_peft: `save_embedding_layers` must be True or False, got {save_embedding_layers!r} (PEFT's "
                    "'auto' reads the base's config from the Hub; say True after resizing the vocabulary).")
  names = resolve(model, name_map, caller="save_peft")
  tensors, data = _export(stringify(params), config, names, save_embedding_layers)
  write(directory, tensors, data)


def _export(params: Params, config: LoraConfig, names: NameMap, save_embedding_layers: bool = False
            ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """`({PEFT key: tensor}, adapter_config dict)` of every adapter, trained bias, `modules_to_save` leaf and trained
  token rows (and with `save_embedding_layers`, the embedding tables)."""
  adapted: dict[Path, list[str]] = {}
  everything = list(adapters(params, config))
  of_params = [ad for ad in everything if targets_parameter(config, (*ad.slot.module, ad.slot.kernel_name))]
  tensors, param_names, ranks, alphas = peft_params.export(of_params, params, config, names)
  for ad in everything:
    if ad in of_params:
      continue
    if ad.slot.module != ad.slot.path:
      raise ValueError(
          f"save_peft: {ad.slot.where!r} adapts {ad.slot.kernel_name!r}, one of several weights in the module "
          f"{'/'.join(ad.slot.module)!r}; PEFT's format has one adapted weight per module name, so it cannot hold "
          "this adapter. Save it with jlora.save_adapter."
      )
    a, b, stack = ad.a, ad.b, ad.stack
    if ad.layout == "broadcast":  # an (out, in) weight: a plain transpose of PEFT's factors
      a, b, stack = peft_layout.from_broadcast(jax.device_get(a), jax.device_get(b), ad.kernel.shape, ad.slot.where)
    name = module_name(names, ad.slot.path)
    conv = ad.slot.module[-1] in names.conv or ad.groups > 1  # PEFT's Conv layers: factors as convolution kernels
    if stack > 1 or (stack == 1) != ("{i}" in name):
      raise ValueError(
          f"save_peft: {ad.slot.where!r} has {stack} leading layer axes but its PEFT name {name!r} "
          f"{'has' if '{i}' in name else 'has no'} '{{i}}'; a scanned module's name must contain '{{i}}' "
          "(one level of nn.scan is supported)."
      )
    adapted[ad.slot.path] = []
    kept = None if ad.layers is None else _stacks.layers(ad.layers)  # a scanned stack's layers_to_transform
    for i, ((n, a1), (_, b1)) in enumerate(zip(per_layer(name, a, ad.slot.where), per_layer(name, b, ad.slot.where))):
      if kept is not None and i not in kept:
        continue
      adapted[ad.slot.path].append(n)
      tensors.update(peft_layout.conv_to_peft(n, a1, b1, ad.slot.where) if conv else
                     peft_layout.lora_to_peft(n, a1, b1, ad.rank, embed=ad.slot.kernel_name == "embedding"))
      if ad.rank != config.r:
        ranks[n] = ad.rank
      if config.alpha_for(ad.slot.where) != config.lora_alpha:
        alphas[n] = config.alpha_for(ad.slot.where)
    if ad.magnitude is not None:  # DoRA: PEFT keeps one magnitude per output feature
      for i, (n, m1) in enumerate(per_layer(name, np.asarray(jax.device_get(ad.magnitude)), ad.slot.where)):
        if kept is None or i in kept:  # (1, out, 1, ...) for a convolution, as PEFT's DoRA keeps it
          tensors[f"{peft_layout.PREFIX}{n}.lora_magnitude_vector"] = (
              m1.reshape((1, -1) + (1,) * (m1.ndim - 2)) if conv else m1.reshape(-1))
  saved_modules: list[str] = []
  for path, label in flatten(labels(params, config)).items():
    if label not in ("bias", "saved"):
      continue
    module, leaf = path[:-1], path[-1]
    if label == "saved":
      top = next(module[:i] for i in range(1, len(path)) if is_saved(config, module[:i]))
      saved_modules.append(module_name(names, top))
    for n, arr in per_layer(module_name(names, module), get_path(params, path), "/".join(path)):
      flip = peft_layout.transposed(leaf, arr.ndim, module, names, config.fan_in_fan_out)
      key, value = peft_layout.full_to_peft(n, leaf, arr, wraps_adapter=module in adapted, transpose=flip,
                                            where="/".join(path))
      tensors[key] = value
  rows, indices = peft_tokens.export_tokens(params, config, names)
  tensors.update(rows)
  if save_embedding_layers:
    tensors.update({k: v for k, v in peft_tokens.export_tables(params, config, names, list(adapted)).items()
                    if k not in tensors})
  if not tensors:
    raise ValueError("save_peft: `params` holds no adapter, trained bias or modules_to_save leaf to export.")
  data = to_peft(config, params, adapted=adapted, ranks=ranks, alphas=alphas, saved_modules=saved_modules,
                 fan_in_fan_out=any(p[-1] in names.fan_in_fan_out for p in adapted), tokens=indices,
                 parameters=param_names)
  return tensors, data


# ------------------------------------------------------------------------ load
_LOAD = ("load_peft(directory, model, params, *, name_map=None, layout=None, dtype=jnp.float32) "
         "(model=None with name_map=...)")


@_explained(_LOAD)
def load_peft(directory: str | os.PathLike, model: Any, params: Params, *, name_map: NameLike = None,
              layout: LayoutLike = None, dtype: Any = jnp.float32) -> tuple[dict, LoraConfig]:
  """Imports a PEFT LoRA adapter (`adapter_config.json` + `adapter_model.safetensors`).

  Every tensor is placed and checked before anything is returned; on any error
  nothing is loaded (the input tree is never modified). Layouts are converted
  as `save_peft` writes them, in reverse: `lora_A.weight (r, fan_in)` becomes
  `lora_a: in_shape + (r,)` and `lora_B.weight (fan_out, r)` becomes
  `lora_b: (r,) + out_shape`, or the broadcast layout `(1, in, r)`,
  `(out, 1, r)` for an `(out, in)` weight (a 2-D `weight`, or as `layout`
  declares); per-layer tensors of a scanned module are stacked to `(L, ...)`.
  PEFT's trainable tokens (`<module>.token_adapter.trainable_tokens_delta`, the
  rows' values) become a `trainable_tokens` leaf holding their difference from
  the table's rows; a whole embedding table or `lm_head` weight in the file
  (`save_embedding_layers`) replaces the base's, whose shape must be the file's
  (resize the base first for a resized vocabulary).
  PEFT's `ParamWrapper` tensors (`target_parameters`) become per-expert adapters
  of the parameters that the config's entries select (named by the name map as
  `module.param`), nested wrappers placed by their shapes (docs/moe.md).
  The returned config is PEFT's, translated to Flax paths where PEFT's names
  would not select the same modules.

  Args:
    directory: the PEFT adapter directory (only safetensors is read; never pickle).
    model: the linen model whose `peft_name_map()` names the modules, or None
      when `name_map` is given.
    params: its base params (existing adapters are replaced).
    name_map: as in `save_peft`: a function or `"flax"` (default: the model's own).
    layout: the weights' layouts as given to `jlora.init_tree` (needed for
      `(out, in)` weights not named `weight`).
    dtype: dtype of the adapters (float32 by default, whatever the file holds);
      biases and `modules_to_save` leaves take the dtype of the leaf they replace.

  Returns:
    `(params, config)` ready for `jlora.apply(model, params, config, ...)`.

  Raises:
    TypeError: arguments of the wrong type or order.
    ValueError: no names for the model (as in `save_peft`), missing files, only
      a pickled `adapter_model.bin`, a truncated or corrupt safetensors file (a
      tensor whose jlora SHA-256 differs), a tensor holding NaN or inf or that
      is not floating-point, a `peft_type` other than LORA or a
      PEFT feature jlora does not implement (`lora_bias`, LoftQ, ...), tensors for modules the
      model lacks, shapes that do not fit the model (a whole table of another
      vocabulary size: the message names both shapes), ranks that differ from
      the config, trained token ids outside the table, or a changed whole weight
      that is neither an embedding table nor `lm_head`.
  """
  _check_order("load_peft", model, params, None, _LOAD)
  given, params = params, stringify(params)
  names = resolve(model, name_map, caller="load_peft")
  data, tensors = read(directory)
  config = from_peft(data)
  base = strip_adapters(params)
  tree = unflatten(base)
  table = name_table(base, names)
  ptable = peft_params.param_table(base, names, config) if config.target_parameters else {}
  nested: dict[str, dict[int, dict[str, tuple[str, Any]]]] = {}
  lora: dict[tuple[Path, str], dict[int | None, tuple[str, Any]]] = {}
  embeds: set[Path] = set()
  full: dict[Path, dict[int | None, tuple[str, Any]]] = {}
  unknown: list[str] = []
  magnitudes: dict[Path, dict[int | None, tuple[str, Any]]] = {}
  rows: dict[Path, tuple[str, str, Any]] = {}
  tables: dict[Path, tuple[str, Any]] = {}
  for key, value in tensors.items():
    kind, mname, leaf, embed = peft_layout.parse_key(key)
    if kind == "skip":
      continue
    _check_values(key, value, directory)
    tmod, depth = peft_params.strip_wrappers(mname)
    if kind == "lora" and not embed and leaf != "lora_magnitude" and tmod in ptable:
      nested.setdefault(tmod, {}).setdefault(depth, {})[leaf] = (key, value)
      continue
    if mname not in table:
      if not peft_tokens.is_tied_copy(key, mname, tensors, table):
        unknown.append(key)
      continue
    module, layer = table[mname]
    if kind == "tokens":
      if layer is not None:
        raise ValueError(f"load_peft: {key!r} trains token rows of a scanned module; jlora's trainable tokens "
                         "belong to one table.")
      rows[module] = (mname, key, value)
      continue
    if kind == "lora" and leaf == "lora_magnitude":
      magnitudes.setdefault(module, {})[layer] = (mname, value)
      continue
    if kind == "lora":
      if embed:
        embeds.add(module)
      lora.setdefault((module, leaf), {})[layer] = (mname, value)
      continue
    flax = peft_layout.flax_leaf(leaf, module, base)
    if flax is None:
      unknown.append(key)
      continue
    if flax != "bias" and not is_saved(config, tuple(mname.split("."))):
      mine = np.asarray(base[(*module, flax)])
      mine = mine if layer is None else mine[layer]
      if np.array_equal(np.asarray(value), mine) or np.array_equal(np.asarray(value).T, mine):
        continue  # an unchanged copy of a base weight (PEFT's save_embedding_layers)
      if layer is None and peft_tokens.is_table(module, flax):  # a changed or resized table: it replaces the base's
        tables[(*module, flax)] = (mname, value)
        continue
      raise ValueError(
          f"load_peft: the adapter holds a changed full weight {key!r}, but {mname!r} is not in the config's "
          "`modules_to_save`; jlora imports whole base weights only for embedding tables and `lm_head` (PEFT's "
          "save_embedding_layers), not for other layers."
      )
    full.setdefault((*module, flax), {})[layer] = (mname, value)
  if unknown:
    raise ValueError(
        f"load_peft: the adapter holds tensors for modules the model does not have: {_few(unknown)}. "
        f"Module names of this model (PEFT style) include: {_few(table)}. Pass the model the adapter was made for, "
        "or a `name_map` from Flax module paths to PEFT module names."
    )
  plora = peft_params.assign(nested, ptable, base, layout)
  if not lora and not plora:
    raise ValueError(f"load_peft: {os.fspath(directory)!r} holds no LoRA tensor (lora_A / lora_B / lora_embedding_A / _B).")
  out = dict(base)
  ranks: dict[Path, int] = {}
  alphas: dict[Path, float] = {}
  param_ranks: dict[Path, tuple[int, float]] = {}
  for (param, leaf), layers in sorted(plora.items()):
    path, value, r, alpha = peft_params.param_leaf(param, leaf, layers, base[param], config, dtype=dtype, layout=layout)
    out[path] = value
    param_ranks[param] = (r, alpha)
  for param in {p for p, _ in plora}:
    if (param, "lora_a") not in plora or (param, "lora_b") not in plora:
      raise ValueError(f"load_peft: the target parameter {'/'.join(param)!r} has only one of lora_A / lora_B.")
  present: dict[Path, tuple[int, ...]] = {}  # scanned stacks of which the file holds some layers only
  for (module, leaf), layers in sorted(lora.items()):
    out[(*module, leaf)] = _adapter_leaf(module, leaf, layers, tree, config, embed=module in embeds, dtype=dtype,
                                         ranks=ranks, alphas=alphas, layout=layout, present=present)
  for module in {m for m, _ in lora}:
    if (*module, "lora_a") not in out or (*module, "lora_b") not in out:
      raise ValueError(f"load_peft: {'/'.join(module)!r} has only one of lora_A / lora_B in the adapter.")
  for module, layers in sorted(magnitudes.items()):
    out[(*module, MAGNITUDE_KEY)] = peft_layout.magnitude_from_peft(module, layers, out, get_path(tree, module), dtype,
                                                                    present.get(module))
  for path, layers in sorted(full.items()):
    flip = peft_layout.transposed(path[-1], np.ndim(base[path]) - (next(iter(layers)) is not None), path[:-1],
                                  names, config.fan_in_fan_out)
    out[path] = peft_layout.full_from_peft(path, layers, base[path], transpose=flip)
  for path, (mname, value) in sorted(tables.items()):
    flip = peft_layout.transposed(path[-1], 2, path[:-1], names, config.fan_in_fan_out)
    out[path] = peft_tokens.table_from_peft(path, mname, value, base[path], transpose=flip)
  ids_read: dict[Path, tuple[int, ...]] = {}
  for module, (mname, key, value) in sorted(rows.items()):
    ids_read[module] = peft_tokens.ids_of(config, mname, key)
    node = {p[-1]: v for p, v in out.items() if p[:-1] == module}
    leaf, delta = peft_tokens.delta_from_peft(module, node, mname, value, ids_read[module], dtype)
    out[(*module, leaf)] = delta
  config = to_jlora(config, ranks, alphas, full, ids_read, parameters=param_ranks)
  stacked = {m: np.shape(out[(*m, "lora_a")])[0] for (m, _), ls in lora.items() if None not in ls}
  if present or (stacked and config.layers_to_transform is not None):  # layers picked inside scanned stacks
    present = {m: present.get(m, tuple(range(n))) for m, n in stacked.items()}
    config = _picked_layers(config, present, stacked, ranks)
    for module, layers in present.items():
      out[(*module, LAYERS_KEY)] = _stacks.make((stacked[module],), layers, dtype)
  params_out = unflatten(out)
  check_adapters(params_out, config)
  for _ in core_tokens.tokens(params_out, config):  # each leaf fits its table and ids
    pass
  return restore(params_out, given), config


def _check_values(key: str, value: Any, directory: str | os.PathLike) -> None:
  """Raises unless the tensor `key` of a PEFT file is floating-point with finite values only."""
  dtype = jnp.dtype(value.dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
        f"load_peft: the tensor {key!r} in {os.fspath(directory)!r} has dtype {dtype.name}; expected a floating "
        "tensor (LoRA factors, DoRA magnitudes, biases and saved modules are floating-point). The file was not "
        "written by PEFT or jlora; export it again."
    )
  if not bool(jnp.isfinite(value).all()):
    raise ValueError(
        f"load_peft: non-finite values (NaN or inf) in the tensor {key!r} of {os.fspath(directory)!r}; an adapter "
        "holding them would make every output NaN. Export the adapter again from a run that did not diverge."
    )


def _adapter_leaf(module: Path, leaf: str, layers: Mapping[int | None, tuple[str, Any]], tree: Params,
                  config: LoraConfig, *, embed: bool, dtype: Any, ranks: dict[Path, int],
                  alphas: dict[Path, float], layout: LayoutLike = None,
                  present: dict[Path, tuple[int, ...]] | None = None) -> Any:
  """One `lora_a` / `lora_b` leaf from its per-layer PEFT tensors; records the module's rank and alpha, and in
  `present` the layers held of a scanned stack the file has some layers of (the others get zeros)."""
  present = {} if present is None else present
  where = "/".join(module)
  try:
    node = get_path(tree, module)
    kname = kernel_key(module, node)
  except (KeyError, TypeError, ValueError):
    raise ValueError(f"load_peft: the model's module {where!r} has no kernel or embedding to adapt.") from None
  kernel = node[kname]
  stacked = next(iter(layers)) is not None
  k_shape = tuple(kernel.shape[1:] if stacked else kernel.shape)
  site = weight_site(module, kname, kernel, layout, stack=int(stacked))
  if site is not None and site.broadcast:  # an (out, in) weight: PEFT's factors, transposed
    if len(site.kernel_shape) != 2 or site.batch_axes:
      raise ValueError(f"load_peft: {where!r} has the layout {site.in_axes} -> {site.out_axes} over {k_shape}; "
                       "PEFT's LoRA tensors fit 2-D weights (one input and one output axis) only.")
    k_shape = (site.kernel_shape[site.in_axes[0]], site.kernel_shape[site.out_axes[0]])
  if stacked and set(layers) != set(range(kernel.shape[0])):  # some layers (PEFT's layers_to_transform): a layer mask
    if present.setdefault(module, tuple(sorted(layers))) != tuple(sorted(layers)):
      raise ValueError(f"load_peft: the scanned stack {where!r} has lora_A for layers {list(present[module])} but "
                       f"lora_B for layers {sorted(layers)}; the file is incomplete.")
  arrays = []
  for layer in sorted(layers, key=lambda x: -1 if x is None else x):
    mname, value = layers[layer]
    peft_r = pattern_lookup(config.rank_pattern, mname, config.r)
    if np.ndim(value) > 2 and not embed:  # a convolution's factors (PEFT's Conv1d / 2d / 3d)
      arr, r = peft_layout.conv_from_peft(leaf, np.asarray(value, np.float32), k_shape, mname)
      r = peft_r if r is None else r  # B's rank, with A's, is checked once both are loaded
    else:
      arr, r = peft_layout.lora_from_peft(leaf, np.asarray(value, np.float32), k_shape, embed=embed,
                                          kernel_name=kname, key=mname)
      arr = peft_layout.to_broadcast(leaf, arr, site) if site is not None and site.broadcast else arr
    if r != peft_r:
      raise ValueError(
          f"load_peft: the {leaf} tensor of {mname!r} has rank {r}, but adapter_config.json gives r={peft_r} "
          "for it (check `r` and `rank_pattern`); the files do not belong together."
      )
    if ranks.setdefault(module, r) != r:
      raise ValueError(f"load_peft: the layers of the scanned stack {where!r} have different ranks; jlora needs one.")
    alpha = pattern_lookup(config.alpha_pattern, mname, config.lora_alpha)
    if alphas.setdefault(module, alpha) != alpha:
      raise ValueError(f"load_peft: the layers of the scanned stack {where!r} have different alphas; jlora needs one.")
    arrays.append(arr)
  if stacked and module in present:  # the layers the file lacks: zeros, masked out by the stack's `lora_layers`
    at = dict(zip(sorted(layers), arrays))
    arrays = [at.get(i, np.zeros_like(arrays[0])) for i in range(kernel.shape[0])]
  return jnp.asarray(np.stack(arrays) if stacked else arrays[0], dtype)


def _picked_layers(config: LoraConfig, present: Mapping[Path, tuple[int, ...]], lengths: Mapping[Path, int],
                   ranks: Mapping[Path, int]) -> LoraConfig:
  """`config` with `layers_to_transform` the layers that the file holds of its scanned stacks (`present`: every
  stack's; `lengths`: their L), checked to select exactly the adapters read (each stack the layers below its L;
  every unrolled module's layer among them).

  Raises:
    ValueError: the file's layers cannot be one `layers_to_transform` (the message names the module).
  """
  picked = tuple(sorted(set().union(*present.values())))
  pattern = config.layers_pattern if all(layer_stack(m, config.layers_pattern) for m in present) else None
  config = dataclasses.replace(config, layers_to_transform=picked, layers_pattern=pattern)
  for module in ranks:
    if module in present:
      ok = layer_stack(module, pattern) and present[module] == tuple(i for i in picked if i < lengths[module])
    else:
      ok = selects(config, module, "dense", is_head=is_head(module))
    if not ok:
      raise ValueError(
          f"load_peft: the file adapts layers {list(picked)} of the model's scanned stacks, but "
          f"{'/'.join(module)!r} {f'at layers {list(present[module])}' if module in present else 'too'}, which "
          f"layers_to_transform={list(picked)} does not pick alike (a jlora config picks one set of layers for every "
          "stack); jlora cannot load this mix onto this model. Load it onto the unrolled model (scan_layers=False).")
  return config
