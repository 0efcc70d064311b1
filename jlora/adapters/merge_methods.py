"""Merging task tensors: task arithmetic, TIES, DARE and magnitude pruning, as PEFT's `utils/merge_utils.py`.

`merge(tensors, weights, method=...)` takes `n` tensors stacked on the first axis, `(n, *batch, size)`, and
returns their merge, `(*batch, size)`. Each method works entry by entry, except the pruning, which acts on each
`size`-long row (one adapter's tensor of one module: `batch` are a stack's layers or an einsum's shared axes, as
`jlora.adapters.weighted` lays them out), so it is PEFT's computation for one module of a PyTorch model:

* `"linear"` (task arithmetic): `Σ wᵢ·tᵢ`.
* `"magnitude_prune"`: each `tᵢ` keeps its `int(density·size)` entries of largest magnitude (the rest are zero),
  then `Σ wᵢ·tᵢ`.
* `"ties"` (Yadav et al. 2023): prune by magnitude as above; elect a sign per entry from the pruned, *unweighted*
  tensors: the sign of `Σ tᵢ` (`majority_sign_method="total"`) or of `Σ sign(tᵢ)` (`"frequency"`), `+` on a tie;
  then the mean of the weighted entries `wᵢ·tᵢ` whose sign `sign(tᵢ)` is the elected one (zero where none is).
* `"dare_linear"` (Yu et al. 2024): each entry of each `tᵢ` is kept with probability `density` and the kept ones
  divided by `density` (so the expectation is `tᵢ`), then `Σ wᵢ·tᵢ`.
* `"dare_ties"`: DARE's random pruning, then TIES' sign election and disjoint mean.

`density` is the fraction kept, in (0, 1]; 1 keeps everything (PEFT warns and skips the pruning; so does this,
silently). DARE's masks are given (`dare_masks` draws them on the host with NumPy from a seed, so no random-number
program is compiled per shape), where PEFT draws from PyTorch's global generator (`torch.bernoulli`): the two agree
in distribution, and exactly when given the same masks (`tests/test_weighted.py` feeds jlora's masks to PEFT).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["METHODS", "SIGN_METHODS", "RANDOM", "ELECTS_SIGN", "merge", "prune_magnitude", "prune_random",
           "dare_masks"]

METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
RANDOM = ("dare_linear", "dare_ties")  # the methods that draw random masks
ELECTS_SIGN = ("ties", "dare_ties")  # the methods that take `majority_sign_method`
SIGN_METHODS = ("total", "frequency")


def prune_magnitude(t: jax.Array, density: float) -> jax.Array:
  """`t: (*batch, size)` with all but the `int(density·size)` largest-magnitude entries of each row set to zero."""
  size = t.shape[-1]
  k = int(density * size)  # PEFT's count, with Python's float rounding
  if k >= size:
    return t
  if k == 0:
    return jnp.zeros_like(t)
  _, top = jax.lax.top_k(jnp.abs(t), k)
  mask = jnp.put_along_axis(jnp.zeros(t.shape, bool), top, True, axis=-1, inplace=False)
  return jnp.where(mask, t, 0)


def dare_masks(seeds: Sequence[Sequence[int]], shape: tuple[int, ...], density: float) -> np.ndarray:
  """`(len(seeds), *shape)` bool: DARE's masks, entry kept with probability `density`, one NumPy draw per seed
  (a sequence of non-negative ints, `numpy.random.SeedSequence`'s entropy)."""
  return np.stack([np.random.default_rng(list(seed)).random(shape) < density for seed in seeds])


def prune_random(mask: jax.Array, t: jax.Array, density: float) -> jax.Array:
  """DARE: the entries of `t` where `mask` holds (drawn with probability `density`), divided by `density`."""
  if density >= 1:
    return t
  return t * mask.astype(t.dtype) / density


def _elected(t: jax.Array, method: str) -> jax.Array:
  """`t: (n, ...)` -> where each `tᵢ`'s sign is the majority sign (PEFT's `calculate_majority_sign_mask`)."""
  sign = jnp.sign(t)
  total = t.sum(0) if method == "total" else sign.sum(0)
  return sign == jnp.where(total >= 0, 1, -1).astype(t.dtype)


def merge(tensors: jax.Array, weights: jax.Array, *, method: str, density: float | None = None,
          majority_sign_method: str = "total", masks: jax.Array | None = None) -> jax.Array:
  """The merge of `tensors: (n, *batch, size)` with `weights: (n,)` by `method` (see the module docstring).

  Args:
    tensors: the stacked task tensors, float32.
    weights: one weight per tensor.
    method: one of `METHODS`.
    density: the fraction of entries each tensor keeps, in (0, 1] (all methods but `"linear"`).
    majority_sign_method: `"total"` or `"frequency"` (TIES and DARE-TIES).
    masks: `(n, *batch, size)` bool, DARE's masks (`dare_masks`; DARE only).

  Returns:
    `(*batch, size)`.
  """
  w = weights.reshape((-1,) + (1,) * (tensors.ndim - 1)).astype(tensors.dtype)
  if method == "linear":
    return (tensors * w).sum(0)
  if method in RANDOM:
    tensors = prune_random(masks, tensors, density)
  else:
    tensors = prune_magnitude(tensors, density)
  if method not in ELECTS_SIGN:
    return (tensors * w).sum(0)
  mask = _elected(tensors, majority_sign_method)
  return (tensors * w * mask).sum(0) / jnp.maximum(mask.sum(0), 1).astype(tensors.dtype)
