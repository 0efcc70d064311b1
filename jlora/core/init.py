"""Adding adapter leaves to a param tree, given the sites a model exposes.

`jlora.init` (linen, `jlora.frontends.linen`) finds the sites by tracing the model;
`jlora.init_tree` reads them off a plain tree (Haiku, Equinox or NNX as dicts,
hand-written jnp; layouts by leaf name or declared, see `jlora.core.plain`). Both end here.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jlora.core import stacks as _stacks
from jlora.core import tokens as _tokens
from jlora.core.config import LoraConfig
from jlora.core.keys import restore, stringify
from jlora.core.parameters import parameter_sites
from jlora.core.plain import KERNEL_NAMES, LayoutLike, tree_sites
from jlora.core.sharding import adapter_shardings, box, unbox
from jlora.core.targets import LAYERS_KEY, Site, leaf_name, path_str, select_sites, stack_layers
from jlora.core.tree import Params, _check_tree, flatten, get_path, has_adapters, unflatten
from jlora.core.unadapted import of_sites, report
from jlora.core.variants import init_for, variant_of
from jlora.quant.array import QuantizedArray

__all__ = ["add_adapters", "init_tree", "site_key"]


def site_key(key: jax.Array, path: tuple[str, ...]) -> jax.Array:
  """The key of one adapter path: `key` folded with a hash of the path (the same draw wherever the path sits)."""
  return jax.random.fold_in(key, zlib.crc32(path_str(path).encode()) & 0x7FFFFFFF)


def _copy_dicts(tree: Params) -> dict:
  return {k: _copy_dicts(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def add_adapters(key: jax.Array, params: Params, config: LoraConfig, sites: Sequence[Site], *, dtype,
                 masks: str | None = None) -> dict:
  """Returns a copy of `params` with `lora_a`/`lora_b` beside each targeted kernel.

  Base leaves are the same arrays (bit-identical), except that `"pissa"`,
  `"pissa_niter_[n]"` and `"olora"` write the residual `W0 − s·A·B` into the kernel.
  A scanned stack whose layers `layers_to_transform` picks also gets its layer mask (`lora_layers`,
  `jlora.core.stacks`), and its other layers zero `A` and `B` (and their kernels as they were).

  Args:
    masks: as in `jlora.core.targets.select_sites`: the caller's name when its forward cannot honour a layer
      mask (NNX, Equinox), None when it can (linen, plain trees through `jlora.merge`).

  Raises:
    ValueError: see `jlora.core.targets.select_sites`; a site's kernel is missing or
      has scan axes other than leading ones.
  """
  if has_adapters(params):
    raise ValueError(
        "`params` already holds LoRA adapters (lora_a/lora_b leaves). Pass the base params, or use "
        "jlora.split(params, config) to keep adapter trees apart."
    )
  stacked = {}
  for site in sites:
    if site.unsupported:  # never adapted (and a weight given at call time is not in the tree)
      continue
    kernel = get_path(params, site.module + (site.kernel_name,))
    extra = kernel.ndim - len(site.kernel_shape)
    if extra < 0 or tuple(kernel.shape[extra:]) != site.kernel_shape:
      raise ValueError(
          f"The kernel at {path_str(site.path)!r} has shape {tuple(kernel.shape)} but the module uses "
          f"{site.kernel_shape}: only leading scan/vmap axes (variable_axes={{'params': 0}}) are supported."
      )
    stacked[site.path] = tuple(kernel.shape[:extra])
  out = _copy_dicts(params)
  chosen = select_sites(config, sites, stacked, masks=masks)
  method = config.init_lora_weights
  variant, initial = variant_of(config), init_for(method, config.loftq_config)
  for site in chosen if initial.rewrites_kernel else ():
    kernel, where = get_path(out, site.module + (site.kernel_name,)), path_str(site.path)
    if isinstance(kernel, QuantizedArray):
      raise ValueError(f"init_lora_weights={method!r} rewrites the kernel at {where!r}, which is quantized "
                       "(jlora.quantize); initialize on the full-precision base, then quantize the residual.")
    if not jnp.issubdtype(kernel.dtype, jnp.floating):
      raise ValueError(f"init_lora_weights={method!r} needs a floating-point kernel at {where!r}, got {kernel.dtype}.")
  reads = initial.reads_kernel or variant.reads_kernel  # whether the new leaves depend on the kernels' values
  kernels = {site.path: get_path(out, site.module + (site.kernel_name,)) for site in chosen} if reads else {}

  def create(key: jax.Array, kernels: dict) -> dict:
    """`{leaf path: value}` of every new leaf (and of each kernel an init rewrites, as PiSSA and OLoRA do)."""
    new = {}
    for site in chosen:
      where, node = path_str(site.path), site.module
      r, scale = config.rank_for(where), config.scale_for(where)
      kernel = kernels.get(site.path)
      stack = stacked[site.path]
      a, b, rewritten = initial.fn(site_key(key, site.path), site, r, scale, stack, kernel, dtype)
      picked = stack_layers(config, site.path, stack)
      mask = None if picked is None else _stacks.make(stack, picked)
      if mask is not None:  # the other layers: no adapter (zeros that no gradient reaches), the kernel as it was
        a, b = _stacks.select(mask, a, jnp.zeros_like(a)), _stacks.select(mask, b, jnp.zeros_like(b))
        rewritten = None if rewritten is None else _stacks.select(mask, rewritten, kernel)
      if rewritten is not None:
        kernel = new[(*node, site.kernel_name)] = rewritten
      leaves = {"lora_a": a, "lora_b": b, **variant.init(kernel, a, b, scale)}
      if mask is not None:
        leaves[LAYERS_KEY] = mask
      for role, value in leaves.items():
        new[(*node, leaf_name(role, site.kernel_name))] = value.astype(dtype)
    return new

  placed = None if isinstance(key, jax.core.Tracer) else _placements(out, lambda: jax.eval_shape(create, key, kernels))
  if placed is None:
    new = create(key, kernels)
  else:  # each leaf is created on its devices by the sharding rule: one program, no host round trip, no gather
    rebuild = _host_key(key)
    new = jax.jit(lambda kernels: create(rebuild(), kernels), out_shardings=placed)(kernels)
  for path, value in new.items():
    get_path(out, path[:-1])[path[-1]] = value
  return out


def _host_key(key: jax.Array) -> Callable[[], jax.Array]:
  """A function rebuilding `key` from host data (a constant of the program, on every process alike)."""
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    data, impl = np.asarray(jax.random.key_data(key)), jax.random.key_impl(key)
    return lambda: jax.random.wrap_key_data(data, impl=impl)
  data = np.asarray(key)
  return lambda: jnp.asarray(data)


def _placements(tree: dict, shapes: Callable[[], Mapping[tuple[str, ...], Any]]) -> dict | None:
  """Where each new leaf goes when the base is on a mesh: `{path: NamedSharding}` by the rule, else None.

  `shapes()` gives `{path: jax.ShapeDtypeStruct}` of the new leaves (traced only on a mesh).

  Base leaves that are not `NamedSharding` arrays count as replicated over the
  mesh, so that every new leaf has a place on it.
  """
  flat = flatten(tree)
  named = {p: v.sharding for p, v in flat.items() if isinstance(getattr(v, "sharding", None), NamedSharding)}
  if not named:
    return None
  mesh, new = next(iter(named.values())).mesh, shapes()
  every = flatten(adapter_shardings(unflatten({**flat, **new}),
                                    unflatten({p: named.get(p, NamedSharding(mesh, PartitionSpec())) for p in flat})))
  return {p: every[p] for p in new}


def init_tree(key: jax.Array, params: Params, config: LoraConfig, *, kernel_names: Sequence[str] = KERNEL_NAMES,
              layout: LayoutLike = None, dtype=jnp.float32) -> dict:
  """Adds adapters to a plain param tree, for models that are not linen modules.

  Haiku (`hk.transform(...).init`), Equinox and NNX models as dicts
  (`jlora.equinox.to_params`, `nnx.to_pure_dict(nnx.state(model))`), hand-written
  jnp. A weight is a leaf named in `kernel_names` or matched by `layout`; its
  module path (what `target_modules` matches) is the path of the dict holding
  it (plus the leaf's name when that is not `kernel`, `w`, `weight` or
  `embedding`). Layouts: a 2-D `kernel` / `w` is `(in, out)`,
  a 2-D `weight` is `(out, in)` (Equinox, PyTorch); other weights need
  `layout=`. Keys may be integers (kept as they are) or hold `/` (Haiku's
  `"mlp/~/linear_0"`, matched by its components). `"all-linear"` skips output
  heads, which a tree (no model is run) shows only by name: a module named
  `lm_head`, `classifier`, `score`, `qa_outputs`, `head` or `logits_dense`; leave
  a head of another name out with `exclude_modules`. It warns (one `UserWarning`
  naming each) about the weights of more than two axes it leaves out for want of
  a `layout=`, and a `target_modules` list naming one raises.
  Run the model with `jlora.apply_merged`, which materializes `W0 + s·A·B`
  (exact and differentiable; slower to train than a factored path).
  `trainable_token_indices` names tables by their module: a 2-D `embedding`
  (Flax), `embeddings` (Haiku) or `weight` (`(out, in)`: an Equinox
  `Embedding`, or an output head) leaf, whose rows are tokens; the list form
  takes the only `embedding` / `embeddings` table, or the one in a module named
  `embed_tokens`. Each gets a zero `trainable_tokens: (n_ids, dim)` leaf, which
  `merge` (and so `apply_merged`) adds to the rows `ids`.

  Args:
    key: PRNG key for the adapter init.
    params: nested dict of arrays.
    config: the LoRA config.
    kernel_names: leaf names that are weights.
    layout: the `(input_axes, output_axes)` of weights whose layout is not the
      default: a dict `{leaf name, module name or path suffix: axes}`
      (`"weight"`, `"attn/query/w"`, `"attn.out"`; the first matching entry
      wins), or a function `(leaf path, leaf) -> axes or None`. Axes in neither
      set: leading ones are stacked layers, others shared (per-head) axes.
    dtype: adapter dtype (float32 by default, whatever the base dtype).

  Returns:
    `params` with adapters beside each target: for `W: (d_in, d_out)`,
    `lora_a: (d_in, r)` and `lora_b: (r, d_out)`; for `W: (d_out, d_in)`,
    `lora_a: (1, d_in, r)` and `lora_b: (d_out, 1, r)` (the broadcast layout:
    `A` on the input side, `B` on the output side, `B = 0` at init).

  Raises:
    TypeError: `params` is not a nested dict, `config` not a `LoraConfig`, or
      `layout` is malformed.
    ValueError: as `jlora.init` (nothing matched: the message lists the
      weights found; rank too large; ...), a targeted weight of more than two
      axes without a declared layout, or a declared layout that does not fit.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"attn/query": {"w": jnp.ones((8, 8))}, "proj": {"weight": jnp.ones((4, 8))}}
    >>> config = jlora.LoraConfig(r=2, target_modules=["query", "proj"])
    >>> p = jlora.init_tree(jax.random.key(0), params, config)
    >>> p["attn/query"]["lora_a"].shape, p["proj"]["lora_a"].shape, p["proj"]["lora_b"].shape
    ((8, 2), (1, 8, 2), (4, 1, 2))
  """
  _check_tree(params)
  if not isinstance(config, LoraConfig):
    raise TypeError(f"`config` must be a jlora.LoraConfig, got {type(config).__name__}.")
  plain, boxes = unbox(params)
  tree = stringify(plain)
  sites = parameter_sites(config, flatten(tree), tree_sites(tree, kernel_names, layout), layout=layout)
  report(config, of_sites(sites), "jlora.init_tree")
  out = add_adapters(key, tree, config, sites, dtype=dtype)
  targets = _tokens.resolve(config, _tokens.plain_embeddings(tree), [(s.module, s.kind) for s in sites],
                            "jlora.init_tree")
  _tokens.add(out, targets, dtype=dtype, fn="jlora.init_tree")
  return box(restore(out, plain), boxes)
