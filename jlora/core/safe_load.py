"""Reading config text: the one YAML loader and the one JSON reader of jlora, both bounded and strict.

Every YAML jlora reads (`jlora train` configs and overrides, `LoraConfig.from_yaml`) goes
through `load_yaml`, and every JSON config (`LoraConfig.from_json`, PEFT's
`adapter_config.json`) through `load_json`. Compared with `yaml.safe_load` / `json.loads`:

* **Duplicate keys are refused**, naming the key's path and both lines (both parsers keep
  the last value silently). YAML merge keys (`<<: *base`) may still be overridden.
* **Aliases are bounded, not refused.** YAML anchors and aliases (`&lr 1e-3` ... `*lr`)
  are fine, but a config may expand to at most `MAX_VALUES` values (every alias counts
  as the whole value it repeats, as a program walking the result would see it), nest at
  most `MAX_DEPTH` levels, and hold at most `MAX_BYTES` of text. An "alias bomb" (nine
  levels of ten aliases each is 10**9 values from a few hundred bytes) is refused in
  milliseconds, naming the key that expands; a recursive alias is refused too. The
  check runs on the parsed node graph, before any Python object is built.
* **Floats as users write them** (YAML 1.2 / JSON): `1e3`, `1E3`, `1e-3`, `.5`, `5.`,
  `-2.5e+4` are numbers. PyYAML follows YAML 1.1, which needs a dot and a signed
  exponent, and reads `1e3` and `1e-3` as strings. `dump_yaml` quotes strings that look
  like such numbers, so what it writes reads back the same.

Errors are one-line `ValueError`s that start with `where` (a file name, `the config
text`, an override) and name the line, the key and the fix.

Examples:
  >>> load_yaml("lr: 1e-3\\nalpha: 1e3\\nd: .5", where="cfg.yaml")
  {'lr': 0.001, 'alpha': 1000.0, 'd': 0.5}
  >>> load_yaml("train:\\n  steps: 5\\n  steps: 6", where="cfg.yaml")
  Traceback (most recent call last):
  ...
  ValueError: cfg.yaml: key `train.steps` appears twice (lines 2 and 3); YAML would keep only the last value ...
"""

from __future__ import annotations

import bisect
import json
import re
from typing import Any

import yaml

__all__ = ["MAX_BYTES", "MAX_DEPTH", "MAX_VALUES", "dump_yaml", "load_json", "load_yaml"]

MAX_VALUES = 100_000  # scalars, lists and mappings after expanding every alias; configs hold a few hundred
MAX_DEPTH = 64  # levels of nesting
MAX_BYTES = 256 << 10  # 256 KiB of text (a config is a few kB; PEFT's longest are tens of kB)

_FLOAT = re.compile(r"""^[-+]?(?:
    (?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?  # 5.  .5  1.5e3  1.5e-3
    |[0-9][0-9_]*[eE][-+]?[0-9]+)$                                # 1e3  1E3  1e-3""", re.X)
_FLOAT_TAG = "tag:yaml.org,2002:float"
_MERGE_TAG = "tag:yaml.org,2002:merge"

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser when built with it (fast, depth-limited)
_Dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class Loader(_Loader):  # type: ignore[misc, valid-type]
  """`yaml.SafeLoader` that reads `1e3`-style floats; use `load_yaml`, which also bounds and checks the node graph."""


class Dumper(_Dumper):  # type: ignore[misc, valid-type]
  """`yaml.SafeDumper` that quotes strings `Loader` would read as floats (`'1e3'`)."""


for _cls in (Loader, Dumper):
  _cls.add_implicit_resolver(_FLOAT_TAG, _FLOAT, list("-+0123456789."))


def _path(path: tuple) -> str:
  out = ""
  for part in path:
    out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
  return f"`{out}`" if out else "the whole document"


class _Checker:
  """One walk over a composed YAML node graph, before any Python object is built.

  It computes each node's expanded size (memoized per node: an alias is its anchor's own
  node, so the walk is linear in the text while the sizes are what a program walking the
  result would meet), and refuses depth, recursion and duplicate keys on the way.
  """

  def __init__(self, where: str, loader: Any):
    self.where, self.loader = where, loader
    self.sizes: dict[int, int] = {}
    self.open: set[int] = set()

  def fail(self, node: yaml.Node, message: str) -> ValueError:
    return ValueError(f"{self.where}:{node.start_mark.line + 1}: {message}")

  def size(self, node: yaml.Node, path: tuple, depth: int) -> int:
    key = id(node)
    if key in self.sizes:
      return self.sizes[key]
    if key in self.open:
      raise self.fail(node, f"{_path(path)} contains itself (a recursive YAML alias); write the value out.")
    if depth > MAX_DEPTH:
      raise self.fail(node, f"{_path(path)} is nested more than {MAX_DEPTH} levels deep; a config is a few levels "
                      "of mappings and lists.")
    self.open.add(key)
    total = 1
    if isinstance(node, yaml.SequenceNode):
      for i, item in enumerate(node.value):
        total += self.size(item, (*path, i), depth + 1)
    elif isinstance(node, yaml.MappingNode):
      seen: dict[Any, int] = {}
      for key_node, value_node in node.value:
        name = "<<" if key_node.tag == _MERGE_TAG else self.key(key_node)
        if key_node.tag != _MERGE_TAG and name is not None:
          line = key_node.start_mark.line + 1
          if name in seen:
            raise ValueError(f"{self.where}: key {_path((*path, name))} appears twice (lines {seen[name]} and "
                             f"{line}); YAML would keep only the last value silently. Remove one.")
          seen[name] = line
        total += self.size(key_node, (*path, name), depth + 1) + self.size(value_node, (*path, name), depth + 1)
    self.open.discard(key)
    self.sizes[key] = total
    if total > MAX_VALUES:
      raise self.fail(node, f"{_path(path)} expands to {total:,} values (YAML aliases such as `*name` repeat the whole "
                      "value their anchor `&name` holds, and nested aliases multiply); a config may hold at most "
                      f"{MAX_VALUES:,}. Write the values out, or use fewer aliases.")
    return total

  def key(self, node: yaml.Node) -> Any:
    """A scalar key's value (`1` and `"1"` differ, `yes` and `true` do not), or None for a complex key."""
    if not isinstance(node, yaml.ScalarNode):
      return None
    value = self.loader.construct_object(node)
    try:
      hash(value)
    except TypeError:
      return None
    return value


def load_yaml(text: str, *, where: str) -> Any:
  """Reads one YAML document like `yaml.safe_load`, bounded and strict (see the module docstring).

  Args:
    text: the YAML text.
    where: what the text is (a file name, `override 'a.b=c'`), the start of every message.

  Returns:
    The value (None for an empty document).

  Raises:
    ValueError: invalid YAML (with the line and column), a duplicate key (its path and
      both lines), more than `MAX_BYTES` of text, more than `MAX_VALUES` values after
      expanding aliases or more than `MAX_DEPTH` levels (the key that expands), or a
      recursive alias.
  """
  if len(text) > MAX_BYTES and len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
    raise ValueError(f"{where} holds {len(text.encode('utf-8', 'surrogatepass')):,} bytes; a config may hold at most "
                     f"{MAX_BYTES:,}. Is it the right file?")
  loader = Loader(text)
  try:
    node = loader.get_single_node()
    if node is None:
      return None
    _Checker(where, loader).size(node, (), 0)
    return loader.construct_document(node)
  except yaml.MarkedYAMLError as e:
    if not issubclass(Loader, yaml.SafeLoader) and not isinstance(e, yaml.constructor.ConstructorError):
      e = _python_error(text) or e  # PyYAML's own parser places syntax errors better (libyaml: past the end)
    mark = e.problem_mark or e.context_mark
    at = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
    why = "; ".join(str(p) for p in (e.context, e.problem) if p)
    raise ValueError(f"{where}{at}: not valid YAML ({' '.join(why.split())}).") from None
  except yaml.YAMLError as e:
    raise ValueError(f"{where}: not valid YAML ({' '.join(str(e).split())}).") from None
  except RecursionError:  # the pure-Python parser (no libyaml) on deep nesting
    raise ValueError(f"{where}: nested too deeply; a config is a few levels of mappings and lists.") from None
  finally:
    loader.dispose()


class _PyLoader(yaml.SafeLoader):
  """The pure-Python parser, for its messages only."""


def _python_error(text: str) -> yaml.MarkedYAMLError | None:
  loader = _PyLoader(text)
  try:
    loader.get_single_node()
  except yaml.MarkedYAMLError as e:
    return e
  except RecursionError:
    pass
  finally:
    loader.dispose()
  return None


def dump_yaml(data: Any, **kwargs: Any) -> str:
  """`yaml.safe_dump(data, **kwargs)` whose text `load_yaml` reads back as `data` (strings like `1e3` quoted)."""
  return yaml.dump(data, Dumper=Dumper, **kwargs)


class _Duplicate(Exception):
  pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
  out = dict(pairs)
  if len(out) != len(pairs):
    raise _Duplicate
  return out


def load_json(text: str, *, where: str) -> Any:
  """`json.loads(text)`, refusing a key that appears twice in one object.

  Args:
    text: the JSON text.
    where: what the text is (e.g. `'adapter_config.json'`), the start of every message.

  Raises:
    ValueError: invalid JSON (with the line and column), nesting beyond Python's limit,
      or a duplicate key (its path and both lines).
  """
  try:
    return json.loads(text, object_pairs_hook=_no_duplicates)
  except json.JSONDecodeError as e:
    raise ValueError(f"{where} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}.") from None
  except RecursionError:
    raise ValueError(f"{where}: nested too deeply; a config is a few levels of objects and lists.") from None
  except _Duplicate:
    pass
  path, first, second = _JsonKeys(text).find_duplicate()
  raise ValueError(f"{where}: key {_path(path)} appears twice (lines {first} and {second}); JSON readers would keep "
                   "only the last value silently. Remove one.")


class _JsonKeys:
  """A walk over valid JSON text that finds the first duplicate key with its path and lines."""

  _ws = re.compile(r"[ \t\n\r]*")

  def __init__(self, text: str):
    self.text = text
    self.newlines = [m.start() for m in re.finditer("\n", text)]
    self.scan = json.JSONDecoder().scan_once

  def line(self, pos: int) -> int:
    return bisect.bisect_left(self.newlines, pos) + 1

  def skip(self, pos: int) -> int:
    return self._ws.match(self.text, pos).end()

  def find_duplicate(self) -> tuple[tuple, int, int]:
    try:
      self.value(self.skip(0), ())
    except _Found as found:
      return found.args
    raise AssertionError("no duplicate key found")  # unreachable: `json.loads` found one

  def value(self, pos: int, path: tuple) -> int:
    """Walks the value at `pos`; returns the position after it."""
    s = self.text
    if s[pos] not in "{[":
      return self.scan(s, pos)[1]
    close, seen, i = ("}" if s[pos] == "{" else "]"), {}, 0
    pos = self.skip(pos + 1)
    while s[pos] != close:
      if close == "}":
        key, end = json.decoder.scanstring(s, pos + 1)
        if key in seen:
          raise _Found((*path, key), seen[key], self.line(pos))
        seen[key] = self.line(pos)
        pos = self.value(self.skip(self.skip(end) + 1), (*path, key))  # past the colon
      else:
        pos, i = self.value(pos, (*path, i)), i + 1
      pos = self.skip(pos)
      if s[pos] == ",":
        pos = self.skip(pos + 1)
    return pos + 1


class _Found(Exception):
  pass
