"""Adding adapter leaves to a param tree, given the sites a model exposes.

`jlora.init` (linen, `jlora._linen`) finds the sites by tracing the model;
`jlora.init_tree` reads them off a plain tree of 2-D kernels (Haiku, hand-written
jnp models, any dict of `kernel` / `w` matrices). Both end here.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

from jlora import _ops
from jlora._config import LoraConfig
from jlora._targets import Site, path_str, select_sites
from jlora._tree import Params, _check_tree, get_path, has_adapters, module_dicts

__all__ = ["add_adapters", "init_tree"]


def _site_key(key: jax.Array, path: tuple[str, ...]) -> jax.Array:
  return jax.random.fold_in(key, zlib.crc32(path_str(path).encode()) & 0x7FFFFFFF)


def _copy_dicts(tree: Params) -> dict:
  return {k: _copy_dicts(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def add_adapters(key: jax.Array, params: Params, config: LoraConfig, sites: Sequence[Site], *, dtype) -> dict:
  """Returns a copy of `params` with `lora_a`/`lora_b` beside each targeted kernel.

  Base leaves are the same arrays (bit-identical), except that `"pissa"` writes
  the residual `W0 − s·A·B` into the kernel.

  Raises:
    ValueError: see `jlora._targets.select_sites`; a site's kernel is missing or
      has scan axes other than leading ones.
  """
  if has_adapters(params):
    raise ValueError(
        "`params` already holds LoRA adapters (lora_a/lora_b leaves). Pass the base params, or use "
        "jlora.split(params, config) to keep adapter trees apart."
    )
  stacked = {}
  for site in sites:
    kernel = get_path(params, site.path + (site.kernel_name,))
    extra = kernel.ndim - len(site.kernel_shape)
    if extra < 0 or tuple(kernel.shape[extra:]) != site.kernel_shape:
      raise ValueError(
          f"The kernel at {path_str(site.path)!r} has shape {tuple(kernel.shape)} but the module uses "
          f"{site.kernel_shape}: only leading scan/vmap axes (variable_axes={{'params': 0}}) are supported."
      )
    stacked[site.path] = extra
  out = _copy_dicts(params)
  for site in select_sites(config, sites, stacked):
    node = get_path(out, site.path)
    kernel = node[site.kernel_name]
    where = path_str(site.path)
    r = config.rank_for(where)
    stack = tuple(kernel.shape[: stacked[site.path]])
    if config.init_lora_weights == "pissa":
      if not jnp.issubdtype(kernel.dtype, jnp.floating):
        raise ValueError(f"init_lora_weights='pissa' needs a floating-point kernel at {where!r}, got {kernel.dtype}.")
      a, b, residual = _ops.pissa(kernel, site, r, config.scale_for(where), dtype)
      node[site.kernel_name] = residual
    else:
      a, b = _ops.init_adapter(_site_key(key, site.path), site, r, stack, config.init_lora_weights, dtype)
    node["lora_a"], node["lora_b"] = a, b
  return out


def init_tree(key: jax.Array, params: Params, config: LoraConfig, *, kernel_names: Sequence[str] = ("kernel", "w"),
              dtype=jnp.float32) -> dict:
  """Adds adapters to a plain param tree, for models that are not linen modules.

  Every dict holding a 2-D leaf named in `kernel_names` is a dense layer
  `y = x·W` with `W: (d_in, d_out)` (Haiku's `w`, Flax's `kernel`); the module
  path is the dict's path. Run such a model with `jlora.apply_merged`, which
  materializes `W0 + s·A·B` (correct and differentiable, slower to train than
  the factored linen path).

  Args:
    key: PRNG key for the adapter init.
    params: nested dict of arrays.
    config: the LoRA config.
    kernel_names: leaf names that are dense kernels.
    dtype: adapter dtype (float32 by default, whatever the base dtype).

  Returns:
    `params` with `lora_a: (d_in, r)`, `lora_b: (r, d_out)` beside each target.
  """
  _check_tree(params)
  sites = []
  for path, node in module_dicts(params):
    for name in kernel_names:
      leaf = node.get(name)
      if leaf is not None and not isinstance(leaf, dict) and getattr(leaf, "ndim", 0) == 2:
        sites.append(Site(path, "dense", name, tuple(leaf.shape), (0,), (1,)))
        break
  return add_adapters(key, params, config, sites, dtype=dtype)
