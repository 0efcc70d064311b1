"""Dict keys of trees from other libraries: integer keys (NNX pure dicts), `/` inside keys (Haiku).

jlora names a leaf by the tuple of its keys as strings (`('layers', '0', 'kernel')`).
Trees whose keys are integers are worked on in a string-keyed copy
(`stringify`) and handed back with the caller's own keys (`restore`). On disk,
a key is escaped (`escape`: `%` -> `%25`, `/` -> `%2F`) so that the `/`-joined
leaf paths of checkpoint metadata stay unambiguous; keys holding neither
character are written as they are.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["stringify", "restore", "escape", "unescape", "map_keys"]

_ESCAPED = re.compile(r"%(25|2F)")


def map_keys(tree: Mapping, fn: Callable[[str], str]) -> dict:
  """A copy of a nested dict with every key `k` replaced by `fn(str(k))` (leaves are the same objects)."""
  return {fn(str(k)): map_keys(v, fn) if isinstance(v, Mapping) else v for k, v in tree.items()}


def stringify(tree: Mapping) -> dict:
  """A copy of a nested dict with string keys (`0` -> `'0'`).

  Raises:
    ValueError: two keys of one dict have the same string (`0` and `'0'`).
  """
  out = {}
  for k, v in tree.items():
    if str(k) in out:
      raise ValueError(f"The tree holds both {k!r} and {str(k)!r} as keys of one dict; jlora names leaves by "
                       "their keys as strings, so these would collide.")
    out[str(k)] = stringify(v) if isinstance(v, Mapping) else v
  return out


def restore(tree: Mapping, like: Any) -> dict:
  """`tree` (string keys) with the keys that `like` spells otherwise (e.g. integers) put back.

  Keys that `like` does not have (new adapter leaves) stay strings.
  """
  own = {str(k): k for k in like} if isinstance(like, Mapping) else {}
  out = {}
  for k, v in tree.items():
    key, sub = (own[k], like[own[k]]) if k in own else (k, None)
    out[key] = restore(v, sub) if isinstance(v, Mapping) else v
  return out


def escape(key: str) -> str:
  """A key as written to disk: `%` -> `%25` and `/` -> `%2F`, so that `/` joins paths unambiguously."""
  return key.replace("%", "%25").replace("/", "%2F")


def unescape(key: str) -> str:
  """The inverse of `escape`."""
  return _ESCAPED.sub(lambda m: "%" if m.group(1) == "25" else "/", key)
