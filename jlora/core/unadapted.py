"""Weights that `"all-linear"` cannot adapt: reported, never skipped in silence.

A front-end knows which weights it cannot adapt (a linen layer class it has no
description of, a weight given at call time, a weight of a plain tree with more
than two axes and no declared layout). `jlora.init`, `jlora.nnx.init` and
`jlora.init_tree` hand them to `report`: under `"all-linear"` (or a regex, which
also means "whatever matches") one `UserWarning` names each and how to include it;
a `target_modules` list that names one is refused (`refuse_named`), since the user
asked for that very module. `left_out` lists the matmul-like weights of a tree
that hold no adapter, for `jlora.summary`.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from jlora.core.config import LoraConfig
from jlora.core.fields import ALL_LINEAR
from jlora.core.targets import LINEAR_KINDS, Site, is_head, is_lora_key, leaf_name, matches, path_str

__all__ = ["Unadapted", "is_matmul_like", "unknown_class", "of_sites", "report", "refuse_named", "left_out"]

# Leaf names of weights that are not matmul weights: embedding and position tables, biases, norm scales (stacked
# by nn.scan they have two axes).
_NOT_MATMUL = re.compile(r"emb|pos|bias|scale|norm", re.IGNORECASE)


class Unadapted(NamedTuple):
  """A weight the front-end cannot adapt.

  Attributes:
    module: the path of the module that holds (or applies) it.
    weight: the weight's name.
    shape: its shape.
    why: why it is not adapted, e.g. "class MyProj is not a layer jlora knows".
    fix: how to include it, e.g. "jlora.register_layer(MyProj, jlora.Layer(weight='kernel', input=...))"
      ('' when `why` says it).
    head: the module is the model's output head (which `"all-linear"` leaves alone anyway).
  """

  module: tuple[str, ...]
  weight: str
  shape: tuple[int, ...]
  why: str
  fix: str = ""
  head: bool = False

  def line(self) -> str:
    return f"  {path_str((*self.module, self.weight))} {self.shape}: {self.why}{'; ' + self.fix if self.fix else ''}"


def is_matmul_like(name: str, leaf: Any) -> bool:
  """Whether a leaf looks like a matmul weight: floating, two or more axes, not named like an embedding or a bias."""
  dtype = getattr(leaf, "dtype", None)
  return (len(getattr(leaf, "shape", ())) >= 2 and dtype is not None and getattr(dtype, "kind", "f") in "fcV"
          and not is_lora_key(name) and not _NOT_MATMUL.search(str(name)))


def unknown_class(module: tuple[str, ...], weight: str, shape: tuple[int, ...], cls: str) -> Unadapted:
  """A weight held by a module of a layer class no front-end knows: describe it with `jlora.register_layer`."""
  return Unadapted(module, weight, tuple(shape), f"{cls} is not a layer class jlora knows",
                   f"if it computes x·W, describe it: jlora.register_layer({cls}, jlora.Layer(weight={weight!r}, "
                   "input=...)); if it uses the weight in its own code (e.g. stacked experts), name it in "
                   "`target_parameters` (docs/moe.md)")


def of_sites(sites: Sequence[Site]) -> list[Unadapted]:
  """The matmul-like sites a front-end found but cannot adapt (`Site.unsupported`), as `Unadapted` items."""
  return [Unadapted(s.module, s.kernel_name, s.kernel_shape, s.unsupported, head=s.is_head) for s in sites
          if s.unsupported and s.kind in (*LINEAR_KINDS, "undeclared")]


def _hits(config: LoraConfig, item: Unadapted) -> bool:
  spec = config.target_modules
  if spec == ALL_LINEAR:
    return not (item.head or is_head(item.module))
  return matches(spec, item.module) or matches(spec, (*item.module, item.weight))


def refuse_named(config: LoraConfig, items: Sequence[Unadapted], caller: str) -> None:
  """Raises when a `target_modules` list names a module whose weight the front-end cannot adapt.

  Raises:
    ValueError: naming each such module, why, and how to include it (or `exclude_modules`).
  """
  if not isinstance(config.target_modules, tuple):
    return
  named = [u for u in items if _hits(config, u) and not matches(config.exclude_modules, u.module)]
  if named:
    raise ValueError(
        f"{caller}: `target_modules`={list(config.target_modules)!r} names {len(named)} module(s) whose weights "
        f"jlora cannot adapt as they are:\n" + "\n".join(u.line() for u in named)
        + "\nInclude them as said, or leave them out of `target_modules`."
    )


def report(config: LoraConfig, items: Sequence[Unadapted], caller: str, *, stacklevel: int = 3) -> None:
  """One `UserWarning` naming each weight that `"all-linear"` (or a regex) reaches but cannot adapt.

  A `target_modules` list that names one raises instead (`refuse_named`).
  """
  refuse_named(config, items, caller)
  if isinstance(config.target_modules, tuple) or config.target_modules is None:
    return
  hit = [u for u in items if _hits(config, u) and not matches(config.exclude_modules, u.module)]
  if not hit:
    return
  listed = "\n".join(u.line() for u in hit[:20]) + (f"\n  ... and {len(hit) - 20} more" if len(hit) > 20 else "")
  warnings.warn(
      f"{caller}: target_modules={config.target_modules!r} leaves {len(hit)} matmul-like weight(s) without an "
      f"adapter, because jlora cannot adapt them as they are:\n{listed}\n"
      "Include them as said, or silence this by leaving them out (`exclude_modules`).",
      UserWarning,
      stacklevel=stacklevel,
  )


def left_out(params: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, tuple[int, ...]]]:
  """`[(weight path, shape)]` of the matmul-like leaves (`is_matmul_like`) whose module dict holds no adapter."""
  out: list[tuple[str, tuple[int, ...]]] = []
  for key, value in params.items():
    if isinstance(value, Mapping):
      out += left_out(value, (*prefix, str(key)))
    elif leaf_name("lora_a", str(key)) not in params and is_matmul_like(str(key), value):
      out.append((path_str((*prefix, str(key))), tuple(value.shape)))
  return out
