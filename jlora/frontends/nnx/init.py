"""`jlora.nnx.init` and `jlora.nnx.from_params`: a LoRA copy of an NNX model, by module surgery.

Both build the adapter tree in jlora's plain params layout first, through the
same code as linen models (`jlora.core.init.add_adapters`: the same targeting rule and
errors, the same draws per module path, PiSSA), then install it into a clone of
the model (`_build`): adapted layers get their `Lora<Base>` class and `lora_a` /
`lora_b` (and DoRA's `lora_magnitude`), and every parameter is retyped `Trainable`
or `Frozen` by `jlora.labels` (a quantized kernel must be `Frozen`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core.meta import AxisMetadata

from jlora.core import tokens as _tokens
from jlora.core.config import LoraConfig
from jlora.core.init import add_adapters
from jlora.core.parameters import refuse as refuse_parameters
from jlora.core.targets import LAYERS_KEY, Site, is_lora_key, is_tokens_key, path_str, selects
from jlora.core.tree import _check_tree, adapted_modules, check_adapters, flatten, has_adapters, labels
from jlora.core.unadapted import Unadapted, is_matmul_like, of_sites, report, unknown_class
from jlora.frontends import layer_check
from jlora.frontends.layers import kinds_listing
from jlora.frontends.nnx import tokens as _nnx_tokens
from jlora.frontends.nnx.check import plans
from jlora.frontends.nnx.graph import Path, adapted, check_config, check_model, sites, to_params, walk
from jlora.frontends.nnx.layer import install, uninstall
from jlora.frontends.nnx.vars import PARAM_TYPES, Frozen, Trainable, restore, retype

__all__ = ["init", "from_params", "strip"]


def _check_base(model: nnx.Module, caller: str) -> None:
  """Raises unless the model holds no adapters (and no variables named like them)."""
  where = sorted(path_str(p) for p in adapted(model))
  _, variables = walk(model)
  named = sorted(path_str(p) for p, v in variables.items() if is_lora_key(p[-1]) or isinstance(v, Trainable))
  if where or named:
    shown = (where or named)[:4]
    raise ValueError(
        f"jlora.nnx.{caller}: `model` already holds LoRA adapters or variables named like them (at {shown}"
        f"{' …' if len(where or named) > 4 else ''}). Pass the base model; to stack a new adapter on a trained one, "
        "merge it first: jlora.nnx.init(key, jlora.nnx.merge(model), config)."
    )


def init(key: jax.Array, model: nnx.Module, config: LoraConfig, *args, rngs: nnx.Rngs | None = None,
         dtype: Any = jnp.float32, **kwargs) -> nnx.Module:
  """A LoRA copy of an NNX model: every targeted layer adapted, factored, `A·B` never formed.

  Each `nnx.Linear`, `nnx.LinearGeneral` (so `nnx.MultiHeadAttention`'s query,
  key, value and out), `nnx.Einsum`, `nnx.Conv` and `nnx.Embed` that `config`
  targets becomes a `Lora<Base>` layer (a subclass of its class) computing
  `base(x) + s·(dropout(x)·A)·B`, with `lora_a: in_shape + (r,)` and
  `lora_b: (r,) + out_shape` beside its kernel (the same layouts as `jlora.init`'s).
  With `config.use_dora`, DoRA: a `lora_magnitude` beside them (the kernel's shape
  with input axes of size 1), initialised like the linen path to `‖W0 + s·A·B‖` per
  output column, so the model is unchanged at init; the forward is DoRA's
  term, the same as `jlora.apply` on a linen twin.
  A model from `jlora.nnx.quantize` (kernels packed as NF4 / int8
  `QuantizedArray`s) gives QLoRA: each kernel is dequantized where its layer reads
  it, and DoRA's magnitudes start from the dequantized kernels.
  Layers made by `nnx.vmap` (a stack run by `nnx.scan`) get stacked adapters,
  `lora_a: (L, d_in, r)`, a different draw per layer. Module paths are attribute
  names from the root with list indices, `layers/0/attn/query`, and targets match
  them as in `jlora.init` (names, regex, `"all-linear"` without the output head,
  `layers_to_transform`, `rank_pattern` ...).

  With `config.trainable_token_indices`, each table it names (the same rules and
  errors as `jlora.init`: a list names the model's one `nnx.Embed`, or the one named
  `embed_tokens`) becomes a `TokensEmbed` (`jlora.frontends.nnx.tokens`) holding a
  zero `trainable_tokens: (n_ids, dim)`; its lookup and `attend` see the rows.

  The returned model holds no `nnx.Param`: what trains (adapters, trainable tokens, the biases
  `config.bias` trains, `modules_to_save`) is `jlora.nnx.Trainable` and the rest
  `jlora.nnx.Frozen`. Train with `nnx.Optimizer(model, tx, wrt=jlora.nnx.Trainable)`.
  `model` itself is not changed; both share the base arrays (nothing is copied).

  Args:
    key: PRNG key of the adapter init (the same draws as `jlora.init` gives a
      linen module at the same paths).
    model: the NNX model (the base).
    config: what to adapt and how.
    *args: optional example inputs of `model(*args, **kwargs)`. When given, the
      model is traced abstractly on them (no FLOPs): a layer whose output the
      model returns unchanged counts as the output head, and an `nnx.Einsum`
      given its equation at call time gets it from the call.
    rngs: rng streams; a stream `lora_dropout` (or NNX's `default`) drives
      `config.lora_dropout` (an `nnx.Dropout` on the LoRA input of each adapted
      layer, off in `model.eval()`). Without it the forward is deterministic.
    dtype: adapter dtype; float32 by default, even over a bf16 base.
    **kwargs: example keyword inputs.

  Returns:
    The LoRA model.

  Raises:
    TypeError: `model` is not an NNX module (a linen one is told to use
      `jlora.init`), or `config` is not a `LoraConfig`.
    ValueError: `target_modules` matches nothing (the message lists every
      adaptable module path), `model` already holds adapters, `r` exceeds a
      module's dimensions, `layers_to_transform` finds no layer index or meets a stack of
      `nnx.vmap`-made layers (no per-layer mask here; linen has one), a module
      is both adapted and in `modules_to_save`; a `trainable_token_indices` name
      that is no `nnx.Embed`, an id outside its rows, or a table LoRA adapts too.

  Example:
    >>> import jax
    >>> from flax import nnx
    >>> import jlora
    >>> from jlora import nnx as lnnx
    >>> model = nnx.Linear(512, 64, rngs=nnx.Rngs(0))
    >>> config = jlora.LoraConfig(r=8, target_modules=".*")
    >>> lora = lnnx.init(jax.random.key(1), model, config)
    >>> type(lora).__name__, lora.lora_a.shape, lora.lora_b.shape
    ('LoraLinear', (512, 8), (8, 64))
  """
  check_model(model)
  check_config(config)
  refuse_parameters("jlora.nnx.init", config)
  _check_base(model, "init")
  found, eqs, seen = sites(model, args, kwargs)
  modules, variables = walk(model)
  unadapted = _unadapted(modules, variables, found)
  report(config, unadapted, "jlora.nnx.init")
  if not [s for s in found if not s.unsupported]:
    listed = "".join("\n" + u.line() for u in unadapted)
    raise ValueError(
        f"`model` has no layer jlora.nnx adapts ({kinds_listing(nnx=True)}, or a class described with "
        f"jlora.register_layer).{' Its matmul-like weights:' + listed if listed else ''}"
    )
  lora = nnx.clone(model)
  base = to_params(model)
  tree = add_adapters(key, to_params(lora), config, found, dtype=dtype, masks="jlora.nnx.init")
  targets = _tokens.resolve(config, _nnx_tokens.embeddings(found, modules, variables),
                            [(s.module, s.kind) for s in found if s.kind != "embed"], "jlora.nnx.init")
  _tokens.add(tree, targets, dtype=dtype, fn="jlora.nnx.init")
  layer_check.check(plans(modules, found, seen, eqs), base, tree)
  _build(lora, tree, config, {s.path: s for s in found}, eqs, rngs, "jlora.nnx.init")
  return lora


def _unadapted(modules: dict[Path, nnx.Module], variables: dict[Path, nnx.Variable],
               found: list[Site]) -> list[Unadapted]:
  """The matmul-like parameters that no adaptable layer holds (a class jlora.nnx does not know), and the sites it
  cannot adapt (`Site.unsupported`)."""
  held = {(*s.module, s.kernel_name) for s in found} | {s.module for s in found}
  out = []
  for path, var in variables.items():
    module = modules.get(path[:-1])
    if not isinstance(var, nnx.Param) or path in held or path[:-1] in held or module is None:
      continue
    if is_matmul_like(path[-1], var.get_value()):
      out.append(unknown_class(path[:-1], path[-1], var.shape, type(module).__name__))
  return out + of_sites(found)


def from_params(model: nnx.Module, params: Mapping[str, Any], config: LoraConfig, *args,
                rngs: nnx.Rngs | None = None, **kwargs) -> nnx.Module:
  """The LoRA model of `params`: the inverse of `jlora.nnx.to_params`.

  Builds, from `model` (with or without adapters; not changed), a LoRA model whose
  every parameter is the leaf of `params` at its path, adapted exactly where
  `params` holds `lora_a` / `lora_b`, and with trainable tokens (a `TokensEmbed`)
  where it holds `trainable_tokens` beside an `nnx.Embed`'s table. It takes what `jlora.load_adapter` or
  `jlora.load_peft` return for `jlora.nnx.to_params(base)`, or the params of a
  linen twin of the model (same module paths). Kernels of `params` may be
  quantized (`jlora.quantize(jlora.nnx.to_params(lora))`, `jlora.load_quantized`):
  the model then holds them packed, as `Frozen` variables that its layers read
  dequantized (QLoRA). DoRA adapters (`lora_magnitude` leaves) need
  `config.use_dora`.

  Args:
    model: the NNX model (the base, or a LoRA model of it).
    params: a whole params tree with adapters (base leaves and adapters), in
      `to_params`' layout; leaves the tree lacks keep the model's values.
    config: the config the adapters were made with.
    *args: optional example inputs, as in `init`.
    rngs: rng streams for `config.lora_dropout`, as in `init`.
    **kwargs: optional example keyword inputs.

  Returns:
    The LoRA model.

  Raises:
    ValueError: `params` holds no adapter; an adapter sits where the model has no
      adaptable layer, or one `config` does not select, or does not fit its
      kernel or the config's rank; a leaf has no variable in the model at its
      path, or another shape.
  """
  check_model(model)
  check_config(config)
  _check_tree(params)
  refuse_parameters("jlora.nnx.from_params", config)
  if not has_adapters(params) and not any(is_tokens_key(p[-1]) for p in flatten(params)):
    raise ValueError(
        "jlora.nnx.from_params: `params` holds no LoRA adapter (no lora_a/lora_b leaves). Pass a tree with "
        "adapters, e.g. what jlora.load_adapter(path, jlora.nnx.to_params(base)) returns."
    )
  check_adapters(params, config)
  lora = nnx.clone(model)
  strip(lora)
  found, eqs, _ = sites(lora, args, kwargs)
  by_path = {s.path: s for s in found}
  for path, node in adapted_modules(params):
    site = by_path.get(path)
    where = path_str(path)
    if site is None:
      shown = "\n".join(f"  {path_str(s.path)}  ({s.kind})" for s in found[:40])
      raise ValueError(f"`params` holds an adapter at {where!r}, where the model has no layer jlora.nnx adapts. "
                       f"Adaptable layers:\n{shown}\nPass the model the adapter was made for.")
    if site.unsupported:
      raise ValueError(f"Cannot adapt {where!r} ({site.kind}): {site.unsupported}.")
    if any(str(k).endswith(LAYERS_KEY) for k in node):
      raise ValueError(f"`params` holds a layer mask (lora_layers) at {where!r}: an adapter of some layers of a "
                       "scanned stack (layers_to_transform), which jlora.nnx has no per-layer mask for. Run it with "
                       "the linen model (jlora.apply), or merge it (jlora.merge) into the weights.")
    if not selects(config, path, site.kind, is_head=site.is_head):
      raise ValueError(
          f"`params` holds an adapter at {where!r}, which the config (target_modules={config.target_modules!r}, "
          f"exclude_modules={config.exclude_modules!r}, layers_to_transform={config.layers_to_transform!r}) does "
          "not select. Pass the LoraConfig that created it."
      )
  _build(lora, params, config, by_path, eqs, rngs, "jlora.nnx.from_params")
  return lora


def strip(model: nnx.Module) -> None:
  """Removes adapters in place, unmerged: adapted layers (and `TokensEmbed`s) get their base class back, parameters
  their Param type."""
  for module in adapted(model).values():
    uninstall(module)
  for module in _nnx_tokens.tokened(model).values():
    _nnx_tokens.uninstall(module)
  _, variables = walk(model)
  for var in variables.values():
    restore(var)


def _build(model: nnx.Module, tree: Mapping[str, Any], config: LoraConfig, by_path: dict[Path, Site],
           eqs: dict[Path, str], rngs: nnx.Rngs | None, fn: str) -> None:
  """Installs the adapters (and trainable tokens) of `tree` into `model` (in place), sets its other leaves,
  retypes every parameter."""
  modules, variables = walk(model)
  missing, bad = [], []
  for path, leaf in flatten(tree).items():
    if is_lora_key(path[-1]):
      continue
    var = variables.get(path)
    if var is None or not isinstance(var, PARAM_TYPES):
      missing.append(path_str(path))
    elif tuple(jnp.shape(leaf)) != tuple(var.shape):
      bad.append(f"{path_str(path)} {tuple(jnp.shape(leaf))} (the model's: {tuple(var.shape)})")
    elif leaf is not var.get_value():
      var.set_value(leaf)
  if missing or bad:
    raise ValueError(
        "`params` does not fit the model: "
        + (f"no parameter at {missing[:6]}{' …' if len(missing) > 6 else ''}" if missing else "")
        + ("; " if missing and bad else "") + (f"other shapes: {bad[:6]}" if bad else "")
        + ". Pass the params of this model (jlora.nnx.to_params), or of a linen model with the same module paths."
    )
  stream = _dropout_stream(rngs, config)
  for path, node in adapted_modules(tree):
    site = by_path[path]
    stack = variables[path + (site.kernel_name,)].get_value().ndim - len(site.kernel_shape)
    shape = tuple(variables[path + (site.kernel_name,)].shape[:stack])
    dropout = None if stream is None or site.kind == "embed" else _dropout(stream, config.lora_dropout, shape)
    install(modules[path], path, site.kind, node[site.slot.a_key], node[site.slot.b_key], node.get(site.slot.m_key),
            scale=config.scale_for(path_str(path)), einsum_str=eqs.get(path), dropout=dropout, weight=site.kernel_name)
  _nnx_tokens.install(model, tree, config, fn)
  for path, label in flatten(labels(tree, config)).items():
    if is_lora_key(path[-1]):
      continue
    if label != "frozen" and isinstance(variables[path].get_value(), AxisMetadata):
      raise ValueError(
          f"The kernel at {path_str(path)!r} is quantized (jlora.quantize), but the config trains it (label "
          f"{label!r}: modules_to_save={config.modules_to_save!r}, bias={config.bias!r}); a quantized kernel has no "
          "gradient. Keep it in full precision: jlora.quantize(params, select=...) without that path."
      )
    retype(variables[path], Frozen if label == "frozen" else Trainable)
  for var in variables.values():
    if isinstance(var, nnx.Param):  # parameters the tree did not hold stay fixed too
      retype(var, Frozen)


def _dropout_stream(rngs: nnx.Rngs | None, config: LoraConfig) -> nnx.RngStream | None:
  if rngs is None or config.lora_dropout == 0.0:
    return None
  if not isinstance(rngs, nnx.Rngs):
    raise TypeError(f"`rngs` must be an nnx.Rngs (e.g. nnx.Rngs(lora_dropout=0)), got {type(rngs).__name__}.")
  try:
    return rngs["lora_dropout"]
  except KeyError:
    return None


def _dropout(stream: nnx.RngStream, rate: float, stack: tuple[int, ...]) -> nnx.Dropout:
  """An `nnx.Dropout` on the LoRA input, with its own key (one per layer of a stack, for `nnx.scan`)."""
  drop = nnx.Dropout(rate, rng_collection="lora_dropout")
  drop.rngs = stream.split(stack) if stack else stream.fork()
  return drop
