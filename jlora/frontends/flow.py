"""What flows where in a model: one abstract trace, read as a jaxpr, answers two questions discovery asks.

`jlora.init` (linen) and `jlora.nnx.init` run the model once abstractly (no
FLOPs) to find its layers. Two things need more than the layers' shapes:

* **the output head**: a layer whose output the model returns, unchanged or only
  passed through operations with no other varying input and no change of size
  (a cast, a scale by a constant, a soft-cap `c·tanh(y/c)`, a reshape, a sharding
  constraint). `"all-linear"` leaves it alone, as PEFT does.
* **the sources of a weight given at call time**: flax runs
  `self.lm_head.apply({"params": {"kernel": embedding.T}}, h)` (the tied-head idiom
  of Hugging Face's Flax GPT-2 and T5) as a layer re-applied on its own; its
  weight is not in the params tree but computed from leaves that are. An adapter
  on such a leaf would change that layer in `merge` (which rewrites the leaf) but
  not in the factored forward, so discovery must know them.

A `Recorder` keeps the values of interest while the model runs under `trace`,
which returns them as extra outputs of the traced function; the jaxpr then tells
which are returned and which params leaves each depends on. Values recorded inside
a nested trace (a layer inside `nn.scan`, `nn.remat`, `nnx.scan`) cannot leave it:
for those `Flow` knows nothing (the head is then found by name only, and a weight's
sources are unknown).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import jax
import jax.extend.core as jcore
import jax.numpy as jnp

__all__ = ["Recorder", "Flow", "trace"]


class Recorder:
  """Values seen while a model runs under `trace`, by key (a layer path, say): `add(key, value)`."""

  def __init__(self):
    self.values: list[tuple[Hashable, Any]] = []
    self._anchor: Any = None

  def add(self, key: Hashable, value: Any) -> None:
    """Records `value` (an array, traced) under `key`; values from a nested trace are dropped (see module doc)."""
    trace_of = getattr(value, "_trace", None)
    if self._anchor is not None and trace_of is not None and trace_of is getattr(self._anchor, "_trace", None):
      self.values.append((key, value))


class Flow(NamedTuple):
  """What the jaxpr of one trace says about the recorded values.

  Attributes:
    returned: keys of values the model returns (see the module doc).
    sources: `{key: paths}`: the params leaves (paths of the params tree) each
      recorded value is computed from; keys recorded inside a nested trace are absent.
  """

  returned: frozenset
  sources: dict


def trace(fn: Callable[[Any], Any], params: Any, recorder: Recorder) -> tuple[Any, Flow]:
  """Traces `fn(params)` abstractly (as `jax.eval_shape`) with `recorder` open, and reads the flow.

  Args:
    fn: runs the model on `params`, calling `recorder.add` on the values of interest.
    params: the params tree (arrays or `jax.ShapeDtypeStruct`s).
    recorder: a fresh recorder.

  Returns:
    `(out, flow)`: the output's shapes and dtypes, and the `Flow`.
  """
  paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in p) for p, _ in paths_leaves]
  keys: list[Hashable] = []

  def run(anchor, leaves):
    recorder._anchor = anchor
    try:
      out = fn(jax.tree.unflatten(treedef, leaves))
    finally:
      recorder._anchor = None
    keys.extend(k for k, _ in recorder.values)
    return out, [v for _, v in recorder.values]

  closed, (out, _) = jax.make_jaxpr(run, return_shape=True)(jnp.zeros((), jnp.float32),
                                                             [leaf for _, leaf in paths_leaves])
  jaxpr = closed.jaxpr
  n_out = len(jax.tree.leaves(out))
  model_out, taps = jaxpr.outvars[:n_out], jaxpr.outvars[n_out:]
  return out, Flow(_returned(jaxpr, model_out, taps, keys), _sources(jaxpr, taps, keys, paths))


def _is_var(v: Any) -> bool:
  return isinstance(v, jcore.Var) and not isinstance(v, jcore.Literal)


def _producers(jaxpr: Any) -> dict:
  return {v: eqn for eqn in jaxpr.eqns for v in eqn.outvars if _is_var(v)}


def _returned(jaxpr: Any, outs: list, taps: list, keys: list) -> frozenset:
  """Keys of taps that reach a model output through size-preserving operations with no other varying input."""
  constant = set(jaxpr.constvars)
  for eqn in jaxpr.eqns:  # values computed from constants and literals alone
    if all(not _is_var(v) or v in constant for v in eqn.invars):
      constant.update(v for v in eqn.outvars if _is_var(v))
  producers = _producers(jaxpr)
  by_var: dict = {}
  for key, v in zip(keys, taps):
    if _is_var(v):
      by_var.setdefault(v, []).append(key)
  found = set()
  for v in outs:
    seen = set()
    while _is_var(v) and v not in seen:
      seen.add(v)
      found.update(by_var.get(v, ()))
      eqn = producers.get(v)
      if eqn is None:
        break
      varying = [u for u in eqn.invars if _is_var(u) and u not in constant]
      if len(varying) != 1 or _size(varying[0]) != _size(v):
        break
      v = varying[0]
  return frozenset(found)


def _size(v: Any) -> int:
  shape = getattr(v.aval, "shape", ())
  n = 1
  for d in shape:
    n *= int(d)
  return n


def _sources(jaxpr: Any, taps: list, keys: list, paths: list) -> dict:
  """`{key: frozenset of params paths}` each tap depends on (through any operation)."""
  leaf_of = {v: i for i, v in enumerate(jaxpr.invars[1:])}  # invars[0]: the anchor
  producers = _producers(jaxpr)
  out: dict = {}
  for key, v in zip(keys, taps):
    reached, stack, seen = set(), [v], set()
    while stack:
      u = stack.pop()
      if not _is_var(u) or u in seen:
        continue
      seen.add(u)
      if u in leaf_of:
        reached.add(paths[leaf_of[u]])
      eqn = producers.get(u)
      if eqn is not None:
        stack.extend(eqn.invars)
    out[key] = out.get(key, frozenset()) | frozenset(reached)
  return out
