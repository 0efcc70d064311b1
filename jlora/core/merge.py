"""Merge and unmerge: rewrite the param tree between `W0 + adapters` and `W = W0 + s·A·B`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora.core import ops as _ops
from jlora.core import sharding as _sharding
from jlora.core import stacks as _stacks
from jlora.core import tokens as _tokens
from jlora.core import tree as _tree
from jlora.core.config import LoraConfig
from jlora.core.targets import LAYERS_KEY, MAGNITUDE_KEY, is_lora_key, is_tokens_key
from jlora.core.tree import Params, _check_tree, adapted_modules, flatten, unflatten
from jlora.core.variants import variant_of_leaves

__all__ = ["merge", "unmerge", "apply_merged", "dora_norms", "norm_key", "with_norms"]


def _rebuild(tree: Params, replace: dict[tuple[str, ...], dict], drop_lora: bool, prefix=()) -> dict:
  out = {}
  for key, value in tree.items():
    path = prefix + (str(key),)
    if isinstance(value, Mapping):
      out[key] = _rebuild(value, replace, drop_lora, path)
    elif not (drop_lora and is_lora_key(key)):
      out[key] = value
  out.update(replace.get(prefix, {}))
  return out


def _check_finite(where: str, value: jax.Array) -> None:
  if isinstance(value, jax.core.Tracer):
    raise ValueError(
        f"merge(safe=True) checks values, so it cannot run under jax.jit (at {where!r}); "
        "call it outside jit or use safe=False."
    )
  if not bool(np.all(np.isfinite(np.asarray(value, dtype=np.float32)))):
    raise ValueError(f"merge(safe=True): the merged kernel at {where!r} has NaN or inf; the adapter is broken.")


def merge(params: Params, config: LoraConfig, *, safe: bool = False) -> dict:
  """Folds every adapter into its kernel: `W ← W0 + s·A·B`, and drops the adapter leaves.

  A DoRA adapter folds as `W ← m·(W0 + s·A·B)/‖W0 + s·A·B‖` (`jlora.unmerge`
  then needs `jlora.dora_norms` taken before the merge), and trainable tokens
  (`trainable_token_indices`) as `table ← table.at[ids].add(delta)`.

  Kernels keep their sharding (the sum of sharded `A`, `B` never gathers a
  kernel) and their flax partitioning boxes, if any.

  The result has the base's tree structure, shapes and dtypes, so plain
  `model.apply` runs it with no added latency. The sum is computed in float32
  and cast back to the kernel's dtype. Stacked (scanned) layers merge per layer; those of a stack that
  `layers_to_transform` leaves out (its layer mask, `lora_layers`, is 0 there) keep their kernels bit-identical.
  Trained biases and `modules_to_save` leaves are kept as they are.

  Args:
    params: params with adapters.
    config: the config the adapters were created with (for ranks and scales).
    safe: check that every merged kernel is finite (outside `jit` only).

  Returns:
    The merged params tree.

  Raises:
    ValueError: `params` holds no adapter; an adapter does not fit its kernel or
      the config's rank; with `safe`, a merged kernel has NaN/inf.
  """
  _check_tree(params)
  params, boxes = _sharding.unbox(params)
  replace: dict[tuple[str, ...], dict] = {}
  for ad in _tree.adapters(params, config):
    leaves = ad.leaves
    _ops.check_foldable(ad.slot.where, ad.a.shape, ad.b.shape, ad.kernel.shape)
    merged = variant_of_leaves(leaves).fold(ad.kernel, leaves, ad.scale)
    if ad.layers is not None:  # a scanned stack's layers outside `layers_to_transform` keep their kernels
      merged = _stacks.select(ad.layers, merged, ad.kernel)
    if safe:
      _check_finite(f"{ad.slot.where}/{ad.slot.kernel_name}", merged)
    replace.setdefault(ad.slot.module, {})[ad.slot.kernel_name] = merged
  _fold_tokens(params, config, replace, safe)
  if not replace:
    raise ValueError(
        "merge: `params` holds no LoRA adapter (lora_a/lora_b leaves); there is nothing to merge. "
        "Was it merged already, or split into (trainable, frozen)? Pass jlora.combine(trainable, frozen)."
    )
  return _sharding.box(_rebuild(params, replace, drop_lora=True), boxes)


def _fold_tokens(params: Params, config: LoraConfig, replace: dict[tuple[str, ...], dict], safe: bool) -> None:
  """Adds to `replace` each table with its trainable tokens folded in."""
  for tk in _tokens.tokens(params, config):
    if tk.kernel_name in replace.get(tk.module, {}):
      raise ValueError(f"merge: {tk.where!r} holds both a LoRA adapter and trainable tokens for "
                       f"{tk.kernel_name!r}; jlora.init gives a table one of them. Pass the tree it made.")
    merged = _tokens.fold(tk.table, tk.delta, tk.ids, tk.where)
    if safe:
      _check_finite(f"{tk.where}/{tk.kernel_name}", merged)
    replace.setdefault(tk.module, {})[tk.kernel_name] = merged


def dora_norms(params: Params, config: LoraConfig) -> dict:
  """DoRA's column norms `‖W0 + s·A·B‖` of every DoRA adapter, for `unmerge` after `merge`.

  A DoRA merge `W = m·(W0 + s·A·B)/‖W0 + s·A·B‖` keeps only the direction: the
  norm cannot be read back from `W`, so take it before merging.

  Returns:
    A tree `{module path: {magnitude leaf name: norm}}`, each norm shaped like its magnitude.
  """
  _check_tree(params)
  params = _sharding.unbox(params)[0]
  return _tree.unflatten({ad.slot.leaf("lora_magnitude"): _ops.column_norm(ad.kernel, ad.a, ad.b, ad.scale)
                          for ad in _tree.adapters(params, config) if ad.magnitude is not None})


def norm_key(m_key: str) -> str:
  """The leaf name a cached norm takes beside its magnitude, inside `jlora.apply(..., dora_norms=...)` only."""
  return f"{m_key}_norm"


def with_norms(params: Params, norms: Any) -> dict:
  """`params` with each of `norms` (from `jlora.dora_norms`) beside its magnitude, where the forward reads it.

  The norms go into the param tree (not beside it) so that `nn.scan` slices them
  per layer like the magnitudes.

  Raises:
    TypeError: `norms` is not a nested dict.
    ValueError: a norm without a same-shaped magnitude in `params`, or a
      magnitude without its norm.
  """
  _check_tree(norms, "dora_norms")
  flat, given = flatten(params), flatten(norms)
  magnitudes = {p for p in flat if str(p[-1]).endswith(MAGNITUDE_KEY)}  # `lora_magnitude`, `<weight>_lora_magnitude`
  fix = "pass jlora.dora_norms(params, config) of these very params"
  for path, norm in given.items():
    if path not in magnitudes or jnp.shape(norm) != jnp.shape(flat[path]):
      got = "no DoRA magnitude" if path not in magnitudes else f"a magnitude of shape {jnp.shape(flat[path])}"
      raise ValueError(f"`dora_norms` at {'/'.join(path)!r} has shape {jnp.shape(norm)}, but `params` holds {got} "
                       f"there; {fix}.")
  missing = sorted("/".join(p) for p in magnitudes - set(given))
  if missing:
    more = " …" if len(missing) > 4 else ""
    raise ValueError(f"`dora_norms` has no norm for the DoRA magnitudes at {missing[:4]}{more}; "
                     f"{fix}.")
  return unflatten({**flat, **{(*p[:-1], norm_key(p[-1])): n for p, n in given.items()}})


def unmerge(merged: Params, adapters: Params, config: LoraConfig, *, norms: Params | None = None) -> dict:
  """Undoes `merge`: `W0 ← W − s·A·B`, with the adapters put back beside the kernels.

  Trainable tokens come out of their tables too (`table.at[ids].add(-delta)`).

  Args:
    merged: a merged tree (from `merge`): no `lora_a` / `lora_b` leaves.
    adapters: a tree holding the adapters that were merged: the unmerged
      params, or just the trainable half of `jlora.split`.
    config: the config of those adapters.
    norms: for DoRA adapters, `jlora.dora_norms(params, config)` taken before
      the merge (`W0 = W·‖W0 + s·A·B‖/m − s·A·B`).

  Returns:
    The params with adapters; `W0` is restored up to the rounding of the float32
    sums (cast back to the kernel's dtype).

  Raises:
    ValueError: `merged` still holds adapters (it is not a merged tree: subtracting
      would corrupt the kernels), `adapters` holds none, an adapter does
      not fit the merged kernel, or a DoRA adapter without its `norms`.
  """
  _check_tree(merged, "merged")
  _check_tree(adapters, "adapters")
  (merged, boxes), (adapters, adapter_boxes) = _sharding.unbox(merged), _sharding.unbox(adapters)
  left = [("/".join(path)) for path, _ in adapted_modules(merged)]
  left += ["/".join(path) for path, node in _tree.module_dicts(merged) if any(map(is_tokens_key, node))]
  if left:
    raise ValueError(
        f"unmerge: `merged` still holds LoRA adapters (at {left[:4]}{' …' if len(left) > 4 else ''}), so its "
        "kernels are W0, not W0 + s·A·B; subtracting would corrupt them. Pass the output of jlora.merge."
    )
  replace: dict[tuple[str, ...], dict] = {}
  for ad in _tree.adapters(adapters, config, kernels=merged):
    _ops.check_foldable(ad.slot.where, ad.a.shape, ad.b.shape, ad.kernel.shape)
    variant = variant_of_leaves(ad.leaves)
    w0 = variant.unfold(ad.kernel, ad.leaves, ad.scale, None if ad.magnitude is None else _norm(norms, ad))
    leaves = {ad.slot.key(role): leaf for role, leaf in ad.leaves.items()}
    if ad.layers is not None:
      w0 = _stacks.select(ad.layers, w0, ad.kernel)
      leaves[ad.slot.key(LAYERS_KEY)] = ad.layers
    replace.setdefault(ad.slot.module, {}).update({ad.slot.kernel_name: w0, **leaves})
  for tk in _tokens.tokens(adapters, config, kernels=merged):
    replace.setdefault(tk.module, {}).update({tk.kernel_name: _tokens.unfold(tk.table, tk.delta, tk.ids, tk.where),
                                              tk.key: tk.delta})
  if not replace:
    raise ValueError("unmerge: `adapters` holds no lora_a/lora_b leaves.")
  return _sharding.box(_rebuild(merged, replace, drop_lora=False), {**adapter_boxes, **boxes})


def _norm(norms: Params | None, ad: _tree.Adapter) -> Any:
  try:
    norm = _tree.get_path(norms, ad.slot.leaf("lora_magnitude")) if norms is not None else None
  except (KeyError, TypeError):
    norm = None
  if norm is None or tuple(norm.shape) != tuple(ad.magnitude.shape):
    raise ValueError(
        f"unmerge: {ad.slot.where!r} is a DoRA adapter, whose merge keeps only the direction of W0 + s·A·B: its norm "
        f"must be given. Take norms = jlora.dora_norms(params, config) before jlora.merge and pass "
        f"unmerge(..., norms=norms){'' if norms is None else ' (the given `norms` has no fitting entry there)'}."
    )
  return norm


def _package(obj: Any) -> str:
  """The top-level package of `obj`'s class or of one of its bases (`"equinox"`, `"haiku"`, `"flax"`, ...)."""
  return next((c.__module__.split(".")[0] for c in type(obj).__mro__
               if c.__module__.split(".")[0] in ("equinox", "haiku", "flax")), "")


def _check_fn(fn: Any) -> None:
  """TypeErrors that say what to pass instead of a model object or a misplaced params tree."""
  if isinstance(fn, Mapping):
    raise TypeError("apply_merged: `fn` is a dict: the arguments are out of order. Call it as "
                    "apply_merged(fn, params, config, *args), e.g. apply_merged(f.apply, params, config, None, x).")
  package = _package(fn)
  if package == "equinox":
    raise TypeError(f"apply_merged: `fn` is an Equinox module ({type(fn).__name__}), not a function of a param tree; "
                    "use jlora.equinox (init, then call the model: the LoRA term is factored).")
  if package == "flax":
    raise TypeError(f"apply_merged: `fn` is a Flax module ({type(fn).__name__}), not a function of a param tree; use "
                    "jlora.apply(model, params, config, *args) for linen and jlora.nnx for NNX (both factored), or "
                    "pass a function such as `lambda p, *a: model.apply({'params': p}, *a)`.")
  if not callable(fn):
    hint = (" A Haiku `hk.transform` result is a pair of functions: pass its `apply`, as "
            "apply_merged(f.apply, params, config, rng_or_None, *inputs).") if hasattr(fn, "apply") else ""
    raise TypeError(f"apply_merged: `fn` must be a function of the param tree, got {type(fn).__name__}.{hint}")


def apply_merged(fn: Callable[..., Any], params: Params, config: LoraConfig, *args, **kwargs) -> Any:
  """Runs any pure function of a param tree with LoRA, by materializing `W0 + s·A·B`.

  The generic path for models that are not linen modules (Haiku, Equinox or
  NNX models as dicts, hand-written jnp): `fn(merge(params, config), *args, **kwargs)`,
  for trees from `jlora.init_tree` (any adapter layout, integer keys, keys with `/`).
  It is exact and differentiable wrt the adapters, but a training step pays for
  the full weight gradient (`dA = s·dW·Bᵀ`) and the merged copy of every adapted
  weight, so it is slower than a factored path (`jlora.apply` for linen,
  `jlora.equinox` for Equinox).

  Args:
    fn: `fn(params, *args, **kwargs)`, e.g. a Haiku `transformed.apply`.
    params: the params with adapters.
    config: the config the adapters were created with.
    *args: passed to `fn` after the merged params (for Haiku: the rng, or None, then the inputs).
    **kwargs: passed to `fn`.

  Returns:
    What `fn` returns.

  Raises:
    TypeError: `fn` is not a function of a param tree (a Haiku `Transformed`
      pair, an Equinox or Flax module: the message says what to use) or the
      arguments are out of order.
    ValueError: as `jlora.merge`.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"proj": {"w": jnp.ones((3, 2))}}
    >>> config = jlora.LoraConfig(r=1, target_modules=["proj"], init_lora_weights=False)
    >>> p = jlora.init_tree(jax.random.key(0), params, config)
    >>> y = jlora.apply_merged(lambda q, x: x @ q["proj"]["w"], p, config, jnp.ones((1, 3)))
    >>> bool(jnp.allclose(y, jnp.ones((1, 3)) @ (1.0 + 8.0 * p["proj"]["lora_a"] @ p["proj"]["lora_b"])))
    True
  """
  _check_fn(fn)
  return fn(merge(params, config), *args, **kwargs)  # merge keeps the tree's own keys (integers too)
