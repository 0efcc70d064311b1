"""Flax linen integration: `jlora.init` and `jlora.apply` by method interception.

This is the one module that intercepts linen methods. It touches the methods
that `jlora.frontends.layers` describes — `__call__` of `nn.Dense`, `nn.DenseGeneral`,
`nn.Einsum`, `nn.Conv` and `nn.Embed`, `nn.Embed.attend` (tied output heads),
and the classes users register (`jlora.register_layer`) — and only inside `jlora.init` / `jlora.apply`:
the `nn.intercept_methods` context is entered within those calls, so it lives
exactly as long as the trace that needs it (entered outside a jitted function, a
cached trace would keep or lose LoRA behind the user's back).

* `init` traces the model abstractly (`jax.eval_shape`: no FLOPs, no copy of the
  base) to find every adaptable module, its path and kernel layout, then adds
  adapter leaves to the param tree (`jlora.core.init`).
* `apply` runs the model, and each adapted layer returns
  `base(x) + s·(dropout(x)·A)·B`, factored: `A·B` is never formed. It records
  which adapters the layers read and raises, naming the rest, if any adapter
  in `params` was not read (it would be silently ignored).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jlora.core import ops as _ops
from jlora.core import stacks as _stacks
from jlora.core import tokens as _tokens
from jlora.core.config import LoraConfig
from jlora.core.fields import ALL_LINEAR, DEFAULT_TARGET_MODULES
from jlora.core.init import add_adapters
from jlora.core.merge import with_norms
from jlora.core.parameters import parameter_sites
from jlora.core.sharding import box, unbox
from jlora.core.targets import (
  LAYERS_KEY,
  LINEAR_KINDS,
  TOKENS_KEY,
  Site,
  adapter_path,
  is_head,
  leaf_name,
  path_str,
  targets_parameter,
)
from jlora.core.tree import Params, _check_tree, flatten, get_path, has_adapters, slots
from jlora.core.unadapted import Unadapted, is_matmul_like, of_sites, report, unknown_class
from jlora.frontends import flow as _flow
from jlora.frontends import layer_check as _layer_check
from jlora.frontends.layers import Call, describe
from jlora.frontends.linen_forward import BYPASS, Forward, feature_groups
from jlora.frontends.linen_run import is_foreign, run_fresh, warn_if_closed_over

__all__ = ["init", "apply"]

def _check_args(model: Any, config: Any) -> None:
  if not isinstance(config, LoraConfig):
    raise TypeError(f"`config` must be a jlora.LoraConfig, got {type(config).__name__}.")
  check_model(model)


def check_model(model: Any) -> None:
  """Raises a TypeError naming the right front-end unless `model` is a linen Module."""
  if not isinstance(model, nn.Module):
    raise TypeError(
        f"`model` must be a flax.linen Module, got {type(model).__name__}. For Flax NNX models use jlora.nnx, for "
        "Equinox modules jlora.equinox, for Haiku jlora.haiku.apply, and for any other model (plain functions of a "
        "param tree) jlora.init_tree and jlora.apply_merged."
    )


def _site(call: Call, path: tuple[str, ...] | None = None, foreign: str = "") -> Site:
  """The `Site` of one call of a described layer: its adapter path, weight, and the weight's layout.

  `path` and `foreign` (why it cannot be adapted) are given for a layer re-applied with weights passed at call time
  (`is_foreign`), whose own path is its new root's, `()`.
  """
  module, layer = call.module, call.layer
  module_path = tuple(module.path) if path is None else path
  kernel_name = layer.weight_name(module)
  kernel = module.get_variable("params", kernel_name)
  if kernel is None or not hasattr(kernel, "shape"):
    held = sorted(module.variables.get("params", {})) if module.variables else []
    if foreign:
      return Site(adapter_path(module_path, kernel_name), layer.kind, kernel_name, (), (), (), (),
                  is_head(module_path), foreign)
    raise ValueError(
        f"jlora.Layer for {type(module).__name__} names the weight {kernel_name!r}, but the module at "
        f"{path_str(module_path)!r} holds params {held}; fix `weight=` in jlora.register_layer."
    )
  shape = tuple(kernel.shape)
  n = len(shape)
  batch, why, kind = (), foreign or layer.why_not(module), layer.kind
  if kind == "einsum":
    try:
      ins, outs, batch = _ops.einsum_axes(call.equation)
    except ValueError as e:
      ins, outs, why = tuple(range(n - 1)), (n - 1,), why or str(e)
  elif kind in ("dense", "dense_general"):
    n_in = len(layer.axes(module))
    ins, outs = tuple(range(n_in)), tuple(range(n_in, n))
  elif kind == "conv":
    ins, outs = tuple(range(n - 1)), (n - 1,)
  elif kind == "ragged_dot":  # (experts, in, out): the expert axis is shared by A and B
    ins, outs, batch = (1,), (2,), (0,)
    why = why or ("" if n == 3 else f"a ragged_dot weight is (experts, in, out), got shape {shape}")
  else:  # embed
    ins, outs = (0,), (1,)
  return Site(adapter_path(module_path, kernel_name), kind, kernel_name, shape, ins, outs, batch, is_head(module_path),
              why, groups=feature_groups(module, kind))


_FOREIGN = ("it is applied with a weight given at call time (`module.apply({'params': ...})`, e.g. an output head "
            "tied to the embedding table), which is not in the params tree: no adapter can sit beside it and "
            "jlora.merge could not fold one in; leave it out (an untied head, e.g. Hugging Face's "
            "`tie_word_embeddings=False`, is adaptable)")


def _check_call(call: Call, site: Site, y: Any) -> None:
  """At init: the described input is there, and a dense weight's axes fit the call as `(inputs..., outputs...)`."""
  x = call.input
  if site.kind == "einsum" and not site.unsupported:
    labels = _ops.parse_einsum(call.equation)[1]
    if len(labels) != len(site.kernel_shape):
      raise ValueError(
          f"{type(call.module).__name__} at {path_str(site.path)!r}: the einsum {call.equation!r} of its jlora.Layer "
          f"names {len(labels)} weight axes ({labels!r}), but its weight {site.kernel_name!r} has shape "
          f"{site.kernel_shape}; fix `equation=` (or `equation_arg=`) in jlora.register_layer."
      )
  if site.kind not in ("dense", "dense_general") or site.unsupported:
    return
  n_in = len(site.in_axes)
  want_in, want_out = site.kernel_shape[:n_in], site.kernel_shape[n_in:]
  try:
    axes = [a % x.ndim for a in call.layer.axes(call.module)]
    got_in = tuple(x.shape[a] for a in (sorted(axes) if site.kind == "dense_general" else axes))
  except (IndexError, ZeroDivisionError):
    got_in = ()
  got_out = tuple(y.shape[len(y.shape) - len(want_out):]) if hasattr(y, "shape") else want_out
  if got_in != want_in or got_out != want_out:
    raise ValueError(
        f"{type(call.module).__name__} at {path_str(site.path)!r}: its input {tuple(x.shape)} and output "
        f"{tuple(getattr(y, 'shape', ()))} do not fit the weight {site.kernel_name!r} {site.kernel_shape} as "
        f"(inputs..., outputs...) contracted over axis {call.layer.axes(call.module)}, the dense layout of its "
        "jlora.Layer. A weight stored (out, in) needs an einsum description, e.g. "
        "jlora.Layer(weight='weight', input='x', equation='...i,oi->...o'); otherwise fix `axis=`."
    )


class Discovery(NamedTuple):
  """What `_discover` finds: the sites, the layers re-applied with weights given at call time and what those
  weights are computed from (`None`: not known), the class of every module the model runs, and the shape of each
  of their params as the module sees it (without `nn.scan`'s layer axis: what `target_parameters` reads)."""

  sites: list[Site]
  foreign: dict[tuple[str, ...], tuple[Site, frozenset | None]]
  classes: dict[tuple[str, ...], type]
  shapes: dict[tuple[str, ...], tuple[int, ...]]


def _discover(model: nn.Module, params: Params, args, kwargs, variables, probes: list | None = None) -> Discovery:
  """Every adaptable module that the model calls on these inputs, in call order (and, into `probes`, the calls
  of registered classes to check, `jlora.frontends.layer_check`)."""
  found: dict[tuple[str, ...], Site] = {}
  foreign: dict[tuple[str, ...], Site] = {}
  classes: dict[tuple[str, ...], type] = {}
  shapes: dict[tuple[str, ...], tuple[int, ...]] = {}
  running: list[tuple[str, ...]] = []  # the paths of the model's modules whose methods are running
  recorder = _flow.Recorder()

  def record(next_fun, args, kwargs, context):
    module = context.module
    outside = is_foreign(module)
    if not outside and tuple(module.path) not in classes:
      classes[tuple(module.path)] = type(module)
      for name, leaf in (module.variables.get("params") or {}).items():
        if hasattr(leaf, "shape"):
          shapes[(*module.path, name)] = tuple(leaf.shape)
    layer = describe(module, context.method_name)
    if layer is None or layer.kind == "attend" or BYPASS.get():
      running.append(tuple(module.path) if not outside else running[-1] if running else ())
      try:
        return next_fun(*args, **kwargs)
      finally:
        running.pop()
    y = next_fun(*args, **kwargs)
    call = Call(module, layer, args, kwargs)
    if outside:  # named after the module that applies it: `lm_head` in the model that calls self.lm_head.apply
      path = (*(running[-1] if running else ()), module.name or type(module).__name__)
      site = foreign[path] = _site(call, path, _FOREIGN)
      recorder.add(("w", site.path), module.get_variable("params", site.kernel_name))
      recorder.add(("y", site.path), y)
      return y
    site = _site(call)
    _check_call(call, site, y)
    known = found.setdefault(site.path, site)
    if known.kernel_shape != site.kernel_shape:
      raise ValueError(f"Module {path_str(site.path)!r} is called with two kernel shapes.")
    if probes is not None and known is site:
      probes.append(_layer_check.plan(call, site, y))
    recorder.add(("y", site.path), y)
    return y

  def trace(p):
    with nn.intercept_methods(record):
      return run_fresh(model, {"params": p, **(variables or {})}, args, kwargs)

  _, flow = _flow.trace(trace, params, recorder)
  heads = {path for kind, path in flow.returned if kind == "y"}
  sites = [s._replace(is_head=True) if s.path in heads else s for s in found.values()]
  weird = {p: (s._replace(is_head=s.is_head or p in heads), flow.sources.get(("w", p))) for p, s in foreign.items()}
  return Discovery(sites + [s for s, _ in weird.values()], weird, classes, shapes)


def _unadapted(params: Params, found: Discovery) -> list[Unadapted]:
  """The matmul-like weights of modules the model runs that no described layer holds (a class jlora does not
  know, an NNX module inside `nnx.bridge.ToLinen`), and the sites it cannot adapt (`Site.unsupported`)."""
  held = {(*s.module, s.kernel_name) for s in found.sites}
  described = {s.module for s in found.sites}
  out = []
  for path, leaf in flatten(params).items():
    module, name = path[:-1], path[-1]
    if path in held or module in described or not is_matmul_like(name, leaf):
      continue
    owner = next((module[:i] for i in range(len(module), -1, -1) if module[:i] in found.classes), None)
    cls = found.classes.get(owner) if owner is not None else None
    if cls is not None and _is_to_linen(cls):
      out.append(Unadapted(module, name, tuple(leaf.shape), f"it belongs to an NNX module run through "
                           f"nnx.bridge.ToLinen at {path_str(owner)!r}, whose layers jlora's linen path cannot see",
                           "adapt the NNX model itself with jlora.nnx.init (factored), or this tree with "
                           "jlora.init_tree + jlora.apply_merged (layout= for weights of more than two axes)"))
    elif cls is not None and owner == module:  # a module not run on these inputs is not reported
      out.append(unknown_class(module, name, leaf.shape, cls.__name__))
  return out + of_sites(found.sites)


def _is_to_linen(cls: type) -> bool:
  return any(c.__name__ == "ToLinen" and c.__module__.startswith("flax.nnx.bridge") for c in cls.__mro__)


def _node(tree: Params, path: tuple[str, ...]) -> Mapping:
  try:
    node = get_path(tree, path)
  except (KeyError, TypeError):
    return {}
  return node if isinstance(node, Mapping) else {}


def _check_tied(found: Discovery, adapted: Params) -> None:
  """Raises when an adapted weight is read by a layer re-applied with weights given at call time (a tied head):
  the factored forward would not change that layer, and `merge` would."""
  for site, sources in found.foreign.values():
    for s in found.sites:
      node = _node(adapted, s.module)
      if s.path in found.foreign or (s.slot.a_key not in node and leaf_name(TOKENS_KEY, s.kernel_name) not in node):
        continue
      kernel = (*s.module, s.kernel_name)
      if sources is not None and kernel not in sources:
        continue
      if sources is None and sorted(s.kernel_shape) != sorted(site.kernel_shape):
        continue
      how = "is computed from" if sources is not None else "may be (it was applied inside a transformed layer, " \
          "where jlora cannot trace it; its shape fits)"
      leave = f"Leave it out (`exclude_modules=[{s.path[-1]!r}]`)" if s.slot.a_key in node else \
          "Drop its `trainable_token_indices`"
      raise ValueError(
          f"jlora.init: {path_str(site.path)!r} is a layer applied with a weight given at call time (e.g. an output "
          f"head tied to the embedding: `self.lm_head.apply({{'params': {{'kernel': embedding.T}}}}, h)`), and that "
          f"weight {how} {path_str(kernel)!r}, which this config adapts (a LoRA adapter, or trainable token rows). "
          f"The factored forward would change {path_str(s.path)!r} but not that layer, while jlora.merge, which "
          f"rewrites {path_str(kernel)!r}, would change both: they would disagree. {leave}, or untie the head "
          "(Hugging Face: `tie_word_embeddings=False` in the model's config), or compute the tied head with "
          "`nn.Embed.attend`, which jlora adapts with the embedding's adapter."
      )


def _embeddings(found: Discovery, params: Params) -> list[_tokens.Embedding]:
  """The tables of the `nn.Embed` layers the model looks tokens up in (trainable tokens need flax's own class)."""
  out = []
  for s in found.sites:
    if s.kind != "embed" or s.path in found.foreign:
      continue
    cls = found.classes.get(s.module)
    why = "" if cls is nn.Embed else (
        f"it is a {getattr(cls, '__name__', cls)}, not flax's nn.Embed, whose lookup is exactly its table's rows "
        "(a subclass or registered class may scale or change them)")
    table = get_path(params, (*s.module, s.kernel_name))
    out.append(_tokens.Embedding(s.module, s.kernel_name, tuple(table.shape), why or s.unsupported))
  return out


def init(key: jax.Array, model: nn.Module, params: Params, config: LoraConfig, *args,
         dtype: Any = jnp.float32, variables: Mapping[str, Any] | None = None, **kwargs) -> dict:
  """Adds LoRA adapters to a linen model's params.

  The model is traced abstractly on the example inputs `*args, **kwargs` (as for
  `model.apply`; `method=`, `rngs=` and flags such as `train=False` pass
  through) to find every `nn.Dense`, `nn.DenseGeneral`, `nn.Einsum`, `nn.Conv` and
  `nn.Embed` it calls, and every layer of a class described with
  `jlora.register_layer` (gemma's `Einsum` and MaxText's `DenseGeneral` ship
  described); those that `config` targets get `lora_a` and `lora_b` leaves
  beside their weight (`<weight>_lora_a` / `_lora_b` for a weight that is not
  its module's main one, e.g. gemma's `mlp/gating_einsum`, targeted by that path). Works through `nn.scan` / `nn.vmap` (stacked
  adapters, e.g. `lora_a: (L, d_in, r)`, a different draw per layer; with
  `layers_to_transform`, layer `i` of a stack is index `i` of its first axis,
  and the adapter carries a layer mask `lora_layers: (L,)`, `jlora.core.stacks`),
  `nn.remat`, nested and shared modules.

  Args:
    key: PRNG key for the adapter init.
    model: the linen module.
    params: its `'params'` collection (`variables['params']`).
    config: what to adapt and how.
    *args: example inputs, e.g. a batch of token ids.
    dtype: adapter dtype; float32 by default even over a bf16 base.
    variables: other collections the model needs (e.g. `{'batch_stats': ...}`).
    **kwargs: passed to `model.apply`.

  On a mesh, each adapter is created on its devices, sharded like its kernel
  (`jlora.adapter_shardings`): a base of `NamedSharding` arrays gives
  `NamedSharding` adapters, and a base of flax partitioning boxes
  (`nn.with_logical_partitioning`, `nn.Partitioned`) gives boxed adapters whose
  names follow the rule, with a `'lora_rank'` axis (logical; replicated unless
  your rules map it), so `nn.get_partition_spec` covers them.

  Returns:
    A new params tree: the base leaves (the same arrays) plus, per adapted
    module, `lora_a: in_shape + (r,)` and `lora_b: (r,) + out_shape` (a `Conv`'s
    `in_shape` is its window and input features, and `B` a 1×1 convolution; an
    `Einsum` kernel's `A` and `B` keep its shared axes), and per table of
    `trainable_token_indices` a zero `trainable_tokens: (n_ids, dim)`.

  Raises:
    ValueError: `target_modules` matches nothing (the message lists the module
      paths that exist), `r` exceeds a module's dimensions,
      `layers_to_transform` finds no layer index or asks for a layer at or
      beyond a scanned stack's length `L` (the message names the stack), a
      module is both adapted and in `modules_to_save`; a `trainable_token_indices`
      name that is no `nn.Embed` of the model, an id outside its rows, or a
      table that LoRA adapts too; an
      adapted layer of a registered (not stock flax) class whose output does not
      change by `x·ΔW` in its declared layout when its weight changes by `ΔW`
      (checked once per distinct layer, on concrete params only: see `jlora.Layer`).
    TypeError: `params` is not a nested dict.

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, jlora
    >>> model = nn.Dense(64)
    >>> x = jnp.ones((1, 512))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> config = jlora.LoraConfig(r=8, target_modules=".*")
    >>> params = jlora.init(jax.random.key(1), model, params, config, x)
    >>> params["lora_a"].shape, params["lora_b"].shape
    ((512, 8), (8, 64))
  """
  _check_args(model, config)
  _check_tree(params)
  model_type = getattr(getattr(model, "config", None), "model_type", None)  # Hugging Face's Flax modules have one
  if config.target_modules is None and not config.target_parameters and model_type in DEFAULT_TARGET_MODULES:
    raise ValueError(f"`target_modules` is not set. PEFT's default for this model's model_type {model_type!r} is "
                     f"{list(DEFAULT_TARGET_MODULES[model_type])}: pass LoraConfig(target_modules="
                     f"jlora.default_target_modules({model_type!r}), ...), or name others (\"all-linear\").")
  params, boxes = unbox(params)
  probes: list = []
  found = _discover(model, params, args, kwargs, variables, probes)
  sites = parameter_sites(config, flatten(params), found.sites, per_layer=found.shapes)
  unadapted = [u for u in _unadapted(params, found) if not targets_parameter(config, (*u.module, u.weight))]
  report(config, unadapted, "jlora.init")
  linear = config.target_modules == ALL_LINEAR
  if unadapted and all(s.unsupported or (linear and (s.is_head or s.kind not in LINEAR_KINDS)) for s in sites):
    raise ValueError("jlora.init: the model has no layer jlora can adapt on these inputs. Its matmul-like weights:\n"
                     + "\n".join(u.line() for u in unadapted))
  adapted = add_adapters(key, params, config, sites, dtype=dtype)
  _tokens.add(adapted, _tokens.resolve(config, _embeddings(found, params), [(s.module, s.kind) for s in found.sites
                                                                           if s.kind != "embed"], "jlora.init"),
              dtype=dtype, fn="jlora.init")
  _check_tied(found, adapted)
  _layer_check.check([p for p in probes if p is not None], params, adapted, variables)
  return box(adapted, boxes)


def apply(model: nn.Module, params: Params, config: LoraConfig, *args, rngs: Mapping[str, jax.Array] | None = None,
          variables: Mapping[str, Any] | None = None, allow_unused: bool = False, dora_norms: Params | None = None,
          **kwargs) -> Any:
  """The LoRA forward of a linen model: pure, jittable, differentiable.

  Each adapted layer computes `y = base(x) + s·(dropout(x)·A)·B` factored (the
  r-wide product `x·A` first; `A·B` is never formed). The LoRA term is computed
  in `result_type(x.dtype, A.dtype)` — float32 for float32 adapters over a bf16
  base — and added to the base output in the base output's dtype.

  LoRA dropout (`config.lora_dropout`) acts on the LoRA input only, and only
  when `rngs` holds a stream named `'lora_dropout'`; without it the forward is
  deterministic. (Inside `nn.scan`, list `'lora_dropout'` in `split_rngs` for a
  different mask per layer.)

  Args:
    model: the linen module.
    params: the params with adapters (from `jlora.init`, or `combine(trainable, frozen)`).
    config: the config the adapters were created with.
    *args: model inputs.
    rngs: rng streams, e.g. `{'dropout': k1, 'lora_dropout': k2}`.
    variables: other collections (e.g. `{'batch_stats': ...}`).
    allow_unused: let adapters that this forward does not reach pass (e.g.
      `method=encode` of an encoder-decoder); by default they raise.
    dora_norms: for serving unmerged DoRA adapters: `jlora.dora_norms(params,
      config)` of these very params, computed once; each layer then skips
      forming `W0 + s·A·B` for its norm. Inference only: under training the
      norms change with `A` and `B` every step.
    **kwargs: passed to `model.apply` (`method=`, `mutable=`, model flags).

  Returns:
    What `model.apply` returns.

  Raises:
    ValueError: `params` holds no adapter; an adapter does not match the config
      (rank, shape, a module the config does not target, or a scanned stack's
      layer mask other than the layers `layers_to_transform` picks there:
      checked when `params` is concrete); an adapter was not
      read by any intercepted layer call (it would be silently ignored: a layer
      class jlora does not know, a wrong `method=`, a renamed module), unless
      `allow_unused`. The check runs when the forward is traced, so it costs
      nothing per step under `jit`.
  """
  _check_args(model, config)
  _check_tree(params)
  if not has_adapters(params):
    raise ValueError(
        "`params` holds no LoRA adapter (no lora_a/lora_b leaves), so jlora.apply would run the bare base model. "
        "Create adapters with jlora.init, or pass jlora.combine(trainable, frozen)."
    )
  _check_masks(unbox(params)[0], config)
  if dora_norms is not None:
    params = with_norms(unbox(params)[0], dora_norms)
  return run_forward(Forward(config), model, params, args, kwargs, rngs, variables, allow_unused)


def _check_masks(params: Params, config: LoraConfig) -> None:
  """Raises unless every layer mask (a scanned stack's `lora_layers`) fits its kernel and, outside `jit`, holds the
  layers `config` picks there (`jlora.core.stacks.check`): inside the scan, each layer sees only its own entry."""
  for slot in slots(params):
    node = get_path(params, slot.module)
    if slot.key(LAYERS_KEY) in node:
      slot = slot.resolve(node)
      kernel = node.get(slot.kernel_name)
      _stacks.check(slot.where, slot.path, node[slot.key(LAYERS_KEY)], tuple(getattr(kernel, "shape", ())), config)


def run_forward(forward: Forward, model: nn.Module, params: Params, args: tuple, kwargs: dict,
                rngs: Mapping[str, jax.Array] | None, variables: Mapping[str, Any] | None, allow_unused: bool,
                fn: str = "jlora.apply") -> Any:
  """Runs `model` with `forward` intercepting its layers, then checks that every adapter was read."""
  warn_if_closed_over(params, fn)
  params = unbox(params)[0]
  with nn.intercept_methods(forward):
    out = run_fresh(model, {"params": params, **(variables or {})}, args, {**kwargs, "rngs": rngs})
  if not allow_unused:
    forward.check_consumed(params, fn)
  return out
