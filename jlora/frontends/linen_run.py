"""Running a linen model inside jlora's traces: fresh `nn.jit` traces, and the closed-over-base warning."""

from __future__ import annotations

import contextvars
import itertools
import warnings
from collections.abc import Mapping
from typing import Any

import flax.core
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["CLOSED_OVER_WARN_BYTES", "is_foreign", "run_fresh", "warn_if_closed_over"]

# `apply` warns when a traced call carries more than this many bytes of concrete (closed-over) base leaves.
CLOSED_OVER_WARN_BYTES = 16 * 2**20

_FRESH_FLAG = "jlora_trace"  # a scope flag; flax's nn.jit counts scope flags in its trace-cache key
_ROOT: contextvars.ContextVar[Any] = contextvars.ContextVar("jlora_root_scope", default=None)  # run_fresh's model
_calls = itertools.count()


def run_fresh(model: nn.Module, variables: Mapping[str, Any], args: tuple, kwargs: dict) -> Any:
  """`model.apply(variables, *args, **kwargs)`, with every `nn.jit` inside the model traced afresh.

  `nn.jit` (gemma's `Transformer.__call__` is jitted) caches its trace by the
  module's fields, scope flags and argument shapes, none of which see jlora's
  interceptor: a second `jlora.init`, or a LoRA forward after a call of the same
  shapes, would replay a trace made without it (or with another config). A scope
  flag unique to this call keeps those caches apart. Inside the caller's own
  `jax.jit` that costs one extra trace per compile; eager calls of such a model
  recompile its jitted methods each time (jit the step).
  """
  method = kwargs.pop("method", None)
  if isinstance(method, str):
    method = getattr(model, method)
  elif method is None:
    method = model.__call__
  fn = getattr(method, "__func__", method)  # unbound: flax binds a clone of the model to it
  token = next(_calls)

  def fresh(module, *a, **k):
    scope = module.scope
    if scope is not None and hasattr(scope, "flags"):
      scope.flags = flax.core.freeze({**scope.flags, _FRESH_FLAG: token})
    root = _ROOT.set(scope)
    try:
      return fn(module, *a, **k)
    finally:
      _ROOT.reset(root)

  return model.apply(variables, *args, method=fresh, **kwargs)


def is_foreign(module: nn.Module) -> bool:
  """Whether a module runs re-applied with weights passed at call time (`self.lm_head.apply({"params": {...}}, h)`),
  outside the scope tree of the model `run_fresh` runs: its params are the call's, not the tree's.

  Its scopes lead up to a root of its own (not the model's), which was made without `run_fresh`'s flag: the scopes
  of lifted transforms (`nn.scan`, `nn.remat`) are roots too, but made inside the call, from flagged scopes.
  """
  root = module.scope
  while getattr(root, "parent", None) is not None:
    root = root.parent
  return root is not _ROOT.get() and _FRESH_FLAG not in (getattr(root, "flags", None) or {})


def warn_if_closed_over(params: Mapping[str, Any], fn: str = "jlora.apply") -> None:
  """Warns when a traced (jitted) call sees large concrete leaves: a base closed over, baked into the program."""
  if not isinstance(jnp.zeros(()), jax.core.Tracer):  # not being staged out (eager, or eager grad / vmap)
    return
  concrete = [x for x in jax.tree.leaves(params)
              if isinstance(x, (jax.Array, np.ndarray)) and not isinstance(x, jax.core.Tracer)]
  nbytes = sum(x.nbytes for x in concrete)
  if nbytes > CLOSED_OVER_WARN_BYTES:
    warnings.warn(
        f"{fn} is being traced with {len(concrete)} parameter leaves ({nbytes / 2**20:,.1f} MiB) that are "
        "concrete arrays, not arguments of the traced function: they were closed over, so jax compiles them into "
        "the program as constants (slow compiles and a huge program; a 7B base will not compile at all). Pass the "
        "frozen tree as an argument: `step = jax.jit(lambda trainable, frozen, x: ...)` and call "
        "`step(trainable, frozen, x)`.",
        UserWarning,
        stacklevel=3,
    )
