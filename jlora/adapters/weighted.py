"""`add_weighted_adapter`: one adapter from a weighted combination of several, with PEFT's name and meaning.

Every combination works per module on batched matrices `A: (*batch, fan_in, r)`, `B: (*batch, r, fan_out)`
whose product is that module's unscaled delta in float32: `batch` are the leading scan axes of a stacked adapter
(the concat layout of `jlora.core.ops`) or the axes an `nn.Einsum` / `(out, in)` kernel shares between input and
output (the broadcast layout, whose input and output axes are moved together first). So a stack is combined
layer by layer, and an einsum head by head, exactly. TIES, DARE and magnitude pruning (`jlora.adapters.merge_methods`)
prune each of those matrices (each layer's, each head's) on its own, as PEFT prunes each module's.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import zlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jlora.adapters import merge_methods as _methods
from jlora.core import ops as _ops
from jlora.core.config import LoraConfig
from jlora.core.fields import ALL_LINEAR, rewrites_base
from jlora.core.keys import restore
from jlora.core.targets import LAYERS_KEY, Slot, is_head, is_lora_key, is_tokens_key, path_str, selects
from jlora.core.tree import Params, _check_tree, flatten, get_path, slots, unflatten

__all__ = ["add_weighted_adapter"]

# PEFT's names: `cat`, then each merge method of `merge_methods` on A and B apart, and on the deltas with an SVD
# (`svd` is `linear`'s SVD form).
COMBINATIONS = ("svd", "linear", "cat", "ties", "ties_svd", "dare_linear", "dare_linear_svd", "dare_ties",
                "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")


class _Form(NamedTuple):
  """How one module's `A` / `B` map to the batched matrices (see the module docstring).

  `kernel` is the kernel's shape with its scan axes; `batch`, `ins`, `outs` are its
  axes shared by A and B, kept by A only, and kept by B only.
  """

  layout: str
  kernel: tuple[int, ...]
  batch: tuple[int, ...]
  ins: tuple[int, ...]
  outs: tuple[int, ...]

  def sizes(self, axes: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(self.kernel[i] for i in axes)

  def to_matrices(self, a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(A: (*batch, fan_in, r), B: (*batch, r, fan_out))` in float32."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    lead, r = self.sizes(self.batch), a.shape[-1]
    if self.layout == "broadcast":
      perm = (*self.batch, *self.ins, *self.outs, len(self.kernel))
      a, b = jnp.transpose(a, perm), jnp.swapaxes(jnp.transpose(b, perm).reshape(lead + (-1, r)), -1, -2)
    return a.reshape(lead + (-1, r)), b.reshape(lead + (r, -1))

  def from_matrices(self, a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The inverse of `to_matrices`, for any rank."""
    lead, ins, outs, k = self.sizes(self.batch), self.sizes(self.ins), self.sizes(self.outs), a.shape[-1]
    if self.layout == "concat":
      return a.reshape(lead + ins + (k,)), b.reshape(lead + (k,) + outs)
    inverse = tuple(np.argsort((*self.batch, *self.ins, *self.outs, len(self.kernel))))
    a = a.reshape(lead + ins + (1,) * len(outs) + (k,))
    b = jnp.swapaxes(b, -1, -2).reshape(lead + (1,) * len(ins) + outs + (k,))
    return jnp.transpose(a, inverse), jnp.transpose(b, inverse)


def _forms(a_shape: tuple[int, ...], b_shape: tuple[int, ...], r: int) -> set[_Form]:
  """Every layout that `A`, `B` of rank `r` fit, read from their shapes alone (a set of one, usually)."""
  out = set()
  if len(a_shape) == len(b_shape) >= 2 and a_shape[-1] == b_shape[-1] == r:
    pairs = list(zip(a_shape[:-1], b_shape[:-1]))
    if all(x == y or 1 in (x, y) for x, y in pairs):
      kernel = tuple(max(x, y) for x, y in pairs)
      kinds = ["batch" if x == y else "in" if y == 1 else "out" for x, y in pairs]
      out.add(_Form("broadcast", kernel, *(tuple(i for i, c in enumerate(kinds) if c == want)
                                            for want in ("batch", "in", "out"))))
  for s in range(len(a_shape) - 1):
    if a_shape[:s] == b_shape[:s] and len(b_shape) > s + 1 and b_shape[s] == r and a_shape[-1] == r:
      kernel, n_in = a_shape[:-1] + b_shape[s + 1:], len(a_shape) - 1 - s
      out.add(_Form("concat", kernel, tuple(range(s)), tuple(range(s, s + n_in)), tuple(range(s + n_in, len(kernel)))))
  return out


class _Entry(NamedTuple):
  """One input adapter at one module: its weight `wᵢ` and scale `sᵢ`, its leaves, rank and index in `adapters`."""
  weight: float
  scale: float
  a: jax.Array
  b: jax.Array
  rank: int
  source: int


def add_weighted_adapter(
    adapters: Sequence[tuple[Params, LoraConfig]],
    weights: Sequence[float],
    combination_type: str = "svd",
    *,
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    density: float | None = None,
    majority_sign_method: str | None = None,
    key: jax.Array | None = None,
    kernels: Params | None = None,
) -> tuple[dict, LoraConfig]:
  """One adapter whose delta combines the deltas of several, with PEFT's `add_weighted_adapter` semantics.

  With `Δᵢ = sᵢ·Aᵢ·Bᵢ` the delta of adapter `i` at a module (its own scale `sᵢ`,
  `α/r` or `α/√r` with rsLoRA, after `rank_pattern`/`alpha_pattern`, applied
  exactly once):

  * `"cat"`: `A = [w₁s₁A₁ | w₂s₂A₂ | …]`, `B = [B₁; B₂; …]`, so `Δ = Σ wᵢΔᵢ` exactly,
    with rank `Σ rᵢ` of the adapters present at the module.
  * `"svd"`: the best rank-`svd_rank` approximation (truncated SVD, in float32,
    per layer of a stack and per shared einsum axis) of `Σ wᵢΔᵢ`, its rank capped at each
    module's `min(fan_in, fan_out)` (a rank never exceeds its layer, as in `jlora.init`; the
    output config's `rank_pattern` records it); `A` holds the left singular vectors, `B` the
    singular values times the right ones. `svd_clamp`
    (a quantile in [0, 1]) clips both factors to `±h`, `h` that quantile of their
    entries' magnitudes (PEFT takes it of the signed entries, which depends on the
    arbitrary signs of singular vectors; 1.0 clips nothing).
  * `"linear"`: `A = Σ sign(cᵢ)·√|cᵢ|·Aᵢ`, `B = Σ √|cᵢ|·Bᵢ` with `cᵢ = wᵢsᵢ` (equal ranks
    per module). Not `Σ wᵢΔᵢ`: two different adapters add cross terms
    `√(cᵢcⱼ)·(AᵢBⱼ + AⱼBᵢ)`; it is exact only for one adapter (or proportional ones).
  * `"ties"`, `"dare_linear"`, `"dare_ties"`, `"magnitude_prune"`: as `"linear"` (the `Aᵢ`
    merged with weights `sign(cᵢ)·√|cᵢ|`, the `Bᵢ` with `√|cᵢ|`, equal ranks), by that merge
    method of `jlora.adapters.merge_methods` instead of a weighted sum: each `Aᵢ` (and each
    `Bᵢ`) pruned to a fraction `density` of its entries (by magnitude, or at random with
    DARE's `1/density` rescaling), and with TIES a sign elected per entry
    (`majority_sign_method`) and the agreeing entries averaged.
  * `"ties_svd"`, `"dare_linear_svd"`, `"dare_ties_svd"`, `"magnitude_prune_svd"`: the same
    method on the deltas `Δᵢ` with weights `wᵢ`, then the truncated SVD of `"svd"`
    (`svd_rank`, `svd_clamp`; any ranks).

  Pruning acts on each module's matrix (one layer of a stack, one head of an einsum) as
  PEFT prunes one PyTorch module's. The DARE methods draw their masks from `key`, one
  independent draw per module path, factor (`A`, `B` or the delta) and adapter index,
  so the same call gives the same adapter; PEFT draws from PyTorch's global generator,
  so the two agree in distribution, and exactly given the same masks. Unlike PEFT, which
  silently falls back to `"linear"` when given one adapter, every method here applies to
  one adapter too (a pruned or truncated copy of it).

  A module that an adapter lacks contributes zero to it (the output covers the
  union of the modules). The output's scale is 1 everywhere: `lora_alpha = r`
  (`alpha_pattern = rank_pattern` where ranks differ per module), `use_rslora=False`;
  the scales live in `A`/`B`. The output config is the first config with those
  ranks, the union of the `target_modules` (lists merged, regexes joined as
  `(a)|(b)`; the list of adapted paths where neither describes the output), and
  `bias="none"`, `modules_to_save=None`.

  Args:
    adapters: `[(adapter_tree, config), …]`: each tree holds only `lora_a`/`lora_b`
      (or `<weight>_lora_a`/`_lora_b`) leaves, e.g. the trainable half of
      `jlora.split(params, config)` made with `bias="none"`; all over the same base.
    weights: one finite real weight per adapter (negative subtracts).
    combination_type: one of `COMBINATIONS`: `"svd"`, `"linear"`, `"cat"`, `"ties"`,
      `"dare_linear"`, `"dare_ties"`, `"magnitude_prune"`, or one of the last four
      with `_svd`.
    svd_rank: the output rank for the SVD forms (default: the largest input rank).
    svd_clamp: for the SVD forms, the quantile at which to clip the factors (None: no clipping).
    density: the fraction of entries each adapter keeps, in (0, 1] (1 prunes nothing);
      required by TIES, DARE and magnitude pruning, refused by the others.
    majority_sign_method: `"total"` (the default: the sign of the sum of the pruned
      entries) or `"frequency"` (the sign held by more of them); TIES and DARE-TIES only.
    key: a PRNG key for DARE's masks (required by the `dare_*` forms, refused by the others).
    kernels: the base (any tree holding the kernels at the adapters' module paths).
      Only needed where `A`/`B` shapes alone fit two layouts (the error says so).

  Returns:
    `(adapter_tree, config)`: a tree of `A` (`S + in_shape + (k,)`, or the broadcast
    layout) and `B` (`S + (k,) + out_shape`) leaves in the inputs' result dtype
    (bf16 in, bf16 out), for `jlora.combine(tree, frozen)` and then `jlora.apply`,
    `jlora.merge`, `jlora.save_adapter`, `jlora.save_peft`.

  Raises:
    TypeError: `adapters` is not a list of `(dict, LoraConfig)` pairs, or a weight
      or option is of the wrong type.
    ValueError: no adapters, a weights length mismatch, a non-finite weight, an
      unknown `combination_type`, an option the method does not take or a missing one
      (`density` outside (0, 1], an unknown `majority_sign_method`, no `key` for DARE),
      unequal ranks for the methods that merge `A` and `B` apart, an `svd_rank` above every
      module's `min(fan_in, fan_out)`, a tree with leaves other than adapters, DoRA
      adapters (no defined combined magnitude), adapters whose init rewrote the kernel
      (PiSSA, OLoRA), or adapters whose shapes do not fit their config or each other
      (the message names the module and the fix).

  Example:
    >>> tree, config = add_weighted_adapter([(t1, c1), (t2, c2)], [0.7, 0.3], "cat")  # doctest: +SKIP
    >>> pairs, key = [(t1, c1), (t2, c2)], jax.random.key(0)  # DARE: the same key, the same adapter  # doctest: +SKIP
    >>> tree, config = add_weighted_adapter(pairs, [1, 1], "dare_ties", density=0.3, key=key)   # doctest: +SKIP
    >>> y = jlora.apply(model, jlora.combine(tree, frozen), config, x)                # doctest: +SKIP
  """
  pairs = _check_pairs(adapters)
  given = _check_weights(weights, len(pairs))
  sign = _check_options(combination_type, svd_rank, svd_clamp, density, majority_sign_method, key)
  if kernels is not None:
    _check_tree(kernels, "kernels")
  groups: dict[Slot, dict[str, Any]] = {}
  for i, (tree, config) in enumerate(pairs):
    for slot in slots(tree):
      node = get_path(tree, slot.module)
      a, b = node[slot.a_key], node[slot.b_key]
      path, forms = _layout(slot, a, b, kernels)
      where, r = path_str(path), config.rank_for(path_str(path))
      if a.shape[-1] != r:
        raise ValueError(
            f"`adapters[{i}]`: the adapter at {where!r} has rank {a.shape[-1]} (lora_a {a.shape}) but its config "
            f"gives r={r} there; pair each tree with the LoraConfig it was made with (check `r`, `rank_pattern`)."
        )
      forms = forms(r)
      group = groups.setdefault(slot, {"path": path, "forms": forms, "entries": []})
      group["forms"] = group["forms"] & forms
      group["entries"].append(_Entry(given[i], config.scale_for(where), a, b, r, i))
  svd = combination_type.endswith("svd")
  k = svd_rank or max(e.rank for g in groups.values() for e in g["entries"])
  forms = {key: _one_form(path_str(g["path"]), g["entries"], g["forms"]) for key, g in groups.items()}
  # a rank-k factorization of a (fan_in × fan_out) delta has at most min(fan_in, fan_out) useful columns: each
  # module gets min(k, that), as jlora.init never makes r larger than a layer; a k above every module's is refused
  limits = {key: min(math.prod(f.sizes(f.ins)), math.prod(f.sizes(f.outs))) for key, f in forms.items()}
  if svd and k > max(limits.values()):
    widest = max(limits, key=limits.get)
    raise ValueError(
        f"`svd_rank`={k} is larger than the dimensions of every adapted layer (the widest, "
        f"{path_str(groups[widest]['path'])!r}, allows min(fan_in, fan_out) = {limits[widest]}): its factors would "
        f"hold only zero columns beyond that, and jlora.init refuses such ranks too. Use svd_rank <= "
        f"{limits[widest]} (each layer gets min(svd_rank, min(fan_in, fan_out)))."
    )
  out, ranks = {}, {}
  for slot, group in groups.items():
    where, entries = path_str(group["path"]), group["entries"]
    form = forms[slot]
    if combination_type in _methods.METHODS and len({e.rank for e in entries}) > 1:
      ranks_given = ", ".join(f"adapters[{e.source}]: r={e.rank}" for e in entries)
      svd_form = "svd" if combination_type == "linear" else f"{combination_type}_svd"
      raise ValueError(f"combination_type={combination_type!r} needs equal ranks per module, but at {where!r} "
                       f"{ranks_given} (it merges the A and B factors apart); use 'cat' (exact, ranks add) or "
                       f"{svd_form!r} (any ranks, `svd_rank=`).")
    a, b = _combine([(e.a, e.b) for e in entries], jnp.asarray([e.weight for e in entries], jnp.float32),
                    jnp.asarray([e.scale for e in entries], jnp.float32),
                    _masks(key, group["path"], combination_type, form, entries, density), kind=combination_type,
                    form=form, k=min(k, limits[slot]) if svd else 0, clamp=svd_clamp, density=density, sign=sign)
    dtype = jnp.result_type(*(x for e in entries for x in (e.a, e.b)))
    out[slot.leaf("lora_a")], out[slot.leaf("lora_b")] = a.astype(dtype), b.astype(dtype)
    ranks[group["path"]] = a.shape[-1]
  return restore(unflatten(out), pairs[0][0]), _output_config([c for _, c in pairs], ranks)


# ------------------------------------------------------------------ checks
def _check_pairs(adapters: Any) -> list[tuple[Params, LoraConfig]]:
  usage = "add_weighted_adapter([(tree_1, config_1), (tree_2, config_2)], weights=[w_1, w_2])"
  single = isinstance(adapters, Sequence) and len(adapters) == 2 and isinstance(adapters[1], LoraConfig)
  if not isinstance(adapters, Sequence) or isinstance(adapters, str) or single:
    hint = " (a single pair: wrap it in a list)" if single else " (an AdapterSet: pass its .pairs())" * hasattr(
        adapters, "pairs")
    raise TypeError(f"`adapters` must be a list of (adapter_tree, LoraConfig) pairs, got {type(adapters).__name__}"
                    f"{hint}; call {usage}.")
  if not adapters:
    raise ValueError(f"`adapters` is empty; give at least one (adapter_tree, LoraConfig) pair: {usage}.")
  for i, pair in enumerate(adapters):
    if not (isinstance(pair, Sequence) and len(pair) == 2 and isinstance(pair[1], LoraConfig)):
      raise TypeError(f"`adapters[{i}]` must be an (adapter_tree, LoraConfig) pair, got {type(pair).__name__}; "
                      f"call {usage}.")
    tree, config = pair
    _check_tree(tree, f"adapters[{i}][0]")
    if config.use_dora:  # the one rule: a weighted combination is defined for LoRA deltas only
      raise ValueError(
          f"add_weighted_adapter: adapters[{i}] has use_dora=True. A DoRA adapter's magnitude rescales the direction "
          "of its own W0 + s·A·B, so a weighted combination of DoRA adapters has no well-defined magnitude (neither "
          "a sum of magnitudes nor any one of them gives the combined layer). Merge each DoRA adapter (jlora.merge) "
          "and combine the full weights, or combine LoRA adapters (use_dora=False)."
      )
    masked = sorted(path_str(p[:-1]) for p in flatten(tree) if str(p[-1]).endswith(LAYERS_KEY))
    if masked:
      raise ValueError(
          f"add_weighted_adapter: adapters[{i}] adapts some layers of the scanned stack(s) {masked[:4]} "
          "(layers_to_transform, a layer mask `lora_layers`); a weighted combination is made of whole stacks. "
          "Merge it (jlora.merge) and combine full weights, or combine adapters of every layer of the stack."
      )
    others = sorted(path_str(p) for p in flatten(tree) if not is_lora_key(p[-1]) or is_tokens_key(p[-1]))
    if others:
      raise ValueError(
          f"`adapters[{i}][0]` holds leaves that are not adapters: {', '.join(others[:4])}"
          f"{' …' if len(others) > 4 else ''}. Only lora_a/lora_b combine (trained biases, modules_to_save and "
          "trainable tokens cannot be weighted); pass jlora.split(params, dataclasses.replace(config, bias='none', "
          f"modules_to_save=None))[0] without its `trainable_tokens` leaves, and the base, if needed, as `kernels=`."
      )
    if not any(True for _ in slots(tree)):
      raise ValueError(f"`adapters[{i}][0]` holds no adapter (no lora_a/lora_b leaves); pass the trainable half "
                       "of jlora.split(params, config).")
    if rewrites_base(config.init_lora_weights):
      raise ValueError(
          f"`adapters[{i}]` is a {config.init_lora_weights!r} adapter (its init rewrote the kernels, as PiSSA and "
          "OLoRA do): it belongs to its own residual base, not to a base shared with the others. Convert it to a "
          "plain LoRA adapter of the original base (jlora.convert_to_lora), or merge it (jlora.merge) and combine "
          "full weights."
      )
  return [tuple(p) for p in adapters]


def _check_weights(weights: Any, n: int) -> list[float]:
  if not isinstance(weights, Sequence) and not (isinstance(weights, (np.ndarray, jax.Array)) and weights.ndim == 1):
    raise TypeError(f"`weights` must be a list of numbers, one per adapter, got {type(weights).__name__}.")
  if len(weights) != n:
    raise ValueError(f"`weights` has {len(weights)} entries but `adapters` has {n}; give one weight per adapter, "
                     f"e.g. weights={[1.0] * n}.")
  out = []
  for i, w in enumerate(weights):
    if isinstance(w, (bool, str, np.bool_)) or np.ndim(w) != 0 or not np.isrealobj(w):
      raise TypeError(f"`weights[{i}]` must be a real number, got {w!r}.")
    out.append(float(w))
    if not math.isfinite(out[-1]):
      raise ValueError(f"`weights[{i}]` is {out[-1]}; weights must be finite numbers.")
  return out


def _method(combination_type: str) -> str | None:
  """The `merge_methods` method of a combination (`"svd"` is `"linear"`'s SVD form); None for `"cat"`."""
  if combination_type == "cat":
    return None
  return "linear" if combination_type == "svd" else combination_type.removesuffix("_svd")


def _check_options(combination_type: Any, svd_rank: Any, svd_clamp: Any, density: Any, majority_sign_method: Any,
                   key: Any) -> str:
  """Raises unless the options fit `combination_type`; returns the majority sign method (`"total"` by default)."""
  if not isinstance(combination_type, str) or combination_type not in COMBINATIONS:
    raise ValueError(f"`combination_type`={combination_type!r} is not one of {', '.join(map(repr, COMBINATIONS))}.")
  method = _method(combination_type)
  svd_forms = f"the SVD forms ({', '.join(repr(c) for c in COMBINATIONS if c.endswith('svd'))})"
  for name, value in (("svd_rank", svd_rank), ("svd_clamp", svd_clamp)):
    _option(name, value, combination_type.endswith("svd"), combination_type, svd_forms)
  if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1):
    raise ValueError(f"`svd_rank` must be a positive int (or None for the largest input rank), got {svd_rank!r}.")
  if svd_clamp is not None and (isinstance(svd_clamp, bool) or not isinstance(svd_clamp, (int, float))
                                or not 0 <= svd_clamp <= 1):
    raise ValueError(f"`svd_clamp` must be a quantile in [0, 1] (e.g. 0.99), or None, got {svd_clamp!r}.")
  _option("density", density, method not in (None, "linear"), combination_type, "TIES, DARE and magnitude pruning",
          "the fraction of each adapter's entries it keeps, in (0, 1] (PEFT has no default either); e.g. density=0.5.")
  if density is not None and (isinstance(density, bool) or not isinstance(density, (int, float))
                              or not 0 < density <= 1):
    raise ValueError(f"`density` must be a number in (0, 1] (the fraction of entries kept; 1 prunes nothing), got "
                     f"{density!r}; e.g. density=0.5.")
  _option("majority_sign_method", majority_sign_method, method in _methods.ELECTS_SIGN, combination_type,
          "TIES ('ties', 'ties_svd', 'dare_ties', 'dare_ties_svd')")
  sign = "total" if majority_sign_method is None else majority_sign_method
  if sign not in _methods.SIGN_METHODS:
    raise ValueError(f"`majority_sign_method` must be one of {', '.join(map(repr, _methods.SIGN_METHODS))}, got "
                     f"{majority_sign_method!r}.")
  _option("key", key, method in _methods.RANDOM, combination_type, "the DARE forms ('dare_linear', 'dare_ties' and "
          "their '_svd' forms)", "a PRNG key for DARE's random masks; e.g. key=jax.random.key(0) (the same key gives "
          "the same adapter).")
  if key is not None and not (isinstance(key, jax.Array) and (jnp.issubdtype(key.dtype, jax.dtypes.prng_key) or (
      key.dtype == jnp.uint32 and key.shape == (2,)))):
    raise TypeError(f"`key` must be a PRNG key (jax.random.key(0) or jax.random.PRNGKey(0)), got "
                    f"{type(key).__name__}.")
  return sign


def _option(name: str, value: Any, applies: bool, combination_type: str, which: str, need: str = "") -> None:
  """Raises when an option is given to a combination it does not apply to (`which` says where it does), or is
  missing where it applies and is required (`need` says what it is)."""
  if value is not None and not applies:
    shown = repr(value) if isinstance(value, (str, int, float)) else f"<{type(value).__name__}>"
    raise ValueError(f"`{name}` applies to {which} only, got {name}={shown} with combination_type={combination_type!r}"
                     "; drop it.")
  if value is None and applies and need:
    raise ValueError(f"combination_type={combination_type!r} needs `{name}`, {need}")


# ------------------------------------------------------------------ layouts
def _layout(slot: Slot, a: jax.Array, b: jax.Array, kernels: Params | None):
  """`(adapter path, rank -> candidate forms)`: from the kernel when `kernels` is given, else from the shapes."""
  if kernels is None:
    return slot.path, lambda r: _forms(tuple(a.shape), tuple(b.shape), r)
  try:
    holder = get_path(kernels, slot.module)
  except (KeyError, TypeError):
    raise ValueError(f"`kernels` has no module {path_str(slot.module)!r}, where an adapter sits; pass the base "
                     "these adapters were made for.") from None
  slot = slot.resolve(holder)
  if slot.kernel_name not in holder:
    raise ValueError(f"`kernels` has no weight {slot.kernel_name!r} in {path_str(slot.module)!r} for the adapter "
                     "there.")
  path, kernel_shape = slot.path, tuple(holder[slot.kernel_name].shape)

  def forms(r: int) -> set[_Form]:
    _ops.check_adapter(path_str(path), kernel_shape, a.shape, b.shape, r)
    _ops.check_foldable(path_str(path), a.shape, b.shape, kernel_shape)
    return {f for f in _forms(tuple(a.shape), tuple(b.shape), r) if f.kernel == kernel_shape}

  return path, forms


def _one_form(where: str, entries: list[_Entry], forms: set[_Form]) -> _Form:
  if len(forms) == 1:
    return next(iter(forms))
  shapes = "; ".join(f"adapters[{e.source}]: lora_a {tuple(e.a.shape)}, lora_b {tuple(e.b.shape)}" for e in entries)
  if not forms:
    raise ValueError(f"The adapters at {where!r} do not fit one kernel ({shapes}): every adapter must be made for "
                     "the same base model. Combine adapters of one base only.")
  listed = ", ".join(f"{f.layout} over a kernel {f.kernel}" for f in sorted(forms))
  raise ValueError(f"The adapter shapes at {where!r} ({shapes}) fit more than one layout ({listed}); pass the base "
                   "as `kernels=` (e.g. the frozen half of jlora.split) so the kernel shapes decide.")


# ------------------------------------------------------------------ the math
_FACTORS = ("lora_a", "lora_b", "delta")  # what DARE masks: its index is part of each mask's seed


def _dare_seeds(key: jax.Array, path: tuple[str, ...], factor: str, sources: tuple[int, ...]) -> list[list[int]]:
  """The seeds of DARE's masks of one factor at one module: the key's words, a hash of the module path, the
  factor and the adapter's index in `adapters` (so a mask does not depend on which other adapters are there)."""
  data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
  words = [int(x) for x in np.asarray(data).ravel()]
  return [[*words, zlib.crc32(path_str(path).encode()), _FACTORS.index(factor), s] for s in sources]


def _masks(key: jax.Array | None, path: tuple[str, ...], kind: str, form: _Form, entries: list[_Entry],
           density: float | None) -> dict[str, np.ndarray] | None:
  """DARE's masks at one module, `{factor: (n, *batch, size)}` as `_combine` prunes them (one row per matrix of
  `A: (*batch, fan_in, r)`, `B: (*batch, r, fan_out)` or the delta `(*batch, fan_in, fan_out)`); None without DARE."""
  if key is None:
    return None
  lead, r = form.sizes(form.batch), entries[0].rank
  fan_in, fan_out = math.prod(form.sizes(form.ins)), math.prod(form.sizes(form.outs))
  sizes = {"lora_a": fan_in * r, "lora_b": r * fan_out, "delta": fan_in * fan_out}
  factors = ("delta",) if kind.endswith("svd") else ("lora_a", "lora_b")
  sources = tuple(e.source for e in entries)
  return {f: _methods.dare_masks(_dare_seeds(key, path, f, sources), lead + (sizes[f],), density) for f in factors}


@functools.partial(jax.jit, static_argnames=("kind", "form", "k", "clamp", "density", "sign"))
def _combine(leaves: list[tuple[jax.Array, jax.Array]], weights: jax.Array, scales: jax.Array,
             masks: dict[str, jax.Array] | None, *, kind: str, form: _Form, k: int, clamp: float | None,
             density: float | None, sign: str) -> tuple[jax.Array, jax.Array]:
  """The combined `(A, B)` in the form's layout, in float32, from `[(Aᵢ, Bᵢ)]`, `weights`: `(n,)` `wᵢ` and
  `scales`: `(n,)` `sᵢ`; `masks` are DARE's (`_masks`), else None."""
  mats = [form.to_matrices(a, b) for a, b in leaves]
  coefs = weights * scales
  if kind == "cat":
    return form.from_matrices(jnp.concatenate([c * a for c, (a, _) in zip(coefs, mats)], -1),
                              jnp.concatenate([b for _, b in mats], -2))
  method = _method(kind)
  options = {"method": method, "density": density, "majority_sign_method": sign}

  def merged(tensors: list[jax.Array], w: jax.Array, factor: str) -> jax.Array:
    """`merge_methods.merge` of same-shaped matrices, each flattened to one row per batch element."""
    shape = tensors[0].shape
    flat = jnp.stack([t.reshape(shape[:-2] + (-1,)) for t in tensors])
    return _methods.merge(flat, w, masks=None if masks is None else masks[factor], **options).reshape(shape)

  if not kind.endswith("svd"):  # the A's and the B's merged apart, with the weights split as ±√|c|, √|c|
    roots = jnp.sqrt(jnp.abs(coefs))
    return form.from_matrices(merged([a for a, _ in mats], jnp.where(coefs < 0, -roots, roots), "lora_a"),
                              merged([b for _, b in mats], roots, "lora_b"))
  deltas = [s * jnp.matmul(a, b, precision=lax.Precision.HIGHEST) for s, (a, b) in zip(scales, mats)]
  u, sv, vh = jnp.linalg.svd(merged(deltas, weights, "delta"), full_matrices=False)
  a, b = u[..., :k], sv[..., :k, None] * vh[..., :k, :]
  if clamp is not None:  # the quantile of |entries|: PEFT's of the signed ones depends on the SVD's arbitrary signs
    both = jnp.concatenate([a.reshape(a.shape[:-2] + (-1,)), b.reshape(b.shape[:-2] + (-1,))], -1)
    hi = jnp.quantile(jnp.abs(both), clamp, axis=-1)[..., None, None]
    a, b = jnp.clip(a, -hi, hi), jnp.clip(b, -hi, hi)
  return form.from_matrices(a, b)  # k <= min(fan_in, fan_out): the caller caps it


# ------------------------------------------------------------------ the output config
def _union_targets(configs: list[LoraConfig]) -> Any:
  """PEFT's union of `target_modules`: lists merged, regexes joined; None where they mix."""
  specs = [c.target_modules for c in configs]
  if all(s == ALL_LINEAR for s in specs):
    return ALL_LINEAR
  if all(isinstance(s, tuple) for s in specs):
    return tuple(dict.fromkeys(t for s in specs for t in s))
  if all(isinstance(s, str) and s != ALL_LINEAR for s in specs):
    return specs[0] if len(set(specs)) == 1 else "|".join(f"({s})" for s in dict.fromkeys(specs))
  return None


def _output_config(configs: list[LoraConfig], ranks: dict[tuple[str, ...], int]) -> LoraConfig:
  """The first config with scale 1 and the output's ranks everywhere, selecting every output adapter."""
  values = list(ranks.values())
  r = max(set(values), key=lambda v: (values.count(v), v))
  pattern = {re.escape(path_str(p)): v for p, v in ranks.items() if v != r}
  config = dataclasses.replace(configs[0], r=r, lora_alpha=r, use_rslora=False, rank_pattern=pattern,
                               alpha_pattern=pattern, target_modules=_union_targets(configs), bias="none",
                               modules_to_save=None)
  if any(config.rank_for(path_str(p)) != v for p, v in ranks.items()):  # a key also matched a longer path
    pattern = {re.escape(path_str(p)): v for p, v in sorted(ranks.items(), key=lambda item: -len(item[0]))}
    config = dataclasses.replace(config, rank_pattern=pattern, alpha_pattern=pattern)
  if config.target_modules is None or not all(selects(config, p, "dense", is_head=is_head(p))
                                              for p in ranks):
    config = dataclasses.replace(config, target_modules=tuple(path_str(p) for p in ranks), exclude_modules=None,
                                 layers_to_transform=None, layers_pattern=None)
  return config
