"""Reading a `jlora train` config: YAML files (`yaml.safe_load`), `section.key=value` overrides, and the help text.

Every mistake is one `ValueError` / `TypeError` line that names the file (and line, for
YAML syntax errors) or the override, so the `jlora` command can print it as is.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from jlora.train._schema import SECTION_TYPES, SECTIONS, Config, type_name

__all__ = ["apply_overrides", "describe", "load"]


def _yaml(text: str, where: str) -> Any:
  """`yaml.safe_load(text)`, with syntax errors as one-line `ValueError`s naming `where` and the line."""
  try:
    return yaml.safe_load(text)
  except yaml.MarkedYAMLError as e:
    mark = e.problem_mark or e.context_mark
    at = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
    why = "; ".join(str(p) for p in (e.context, e.problem) if p)
    raise ValueError(f"{where}{at}: not valid YAML ({' '.join(why.split())}).") from None
  except yaml.YAMLError as e:
    raise ValueError(f"{where}: not valid YAML ({' '.join(str(e).split())}).") from None


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
  """Applies `section.key=value` overrides (values parsed as YAML) to a nested config dict.

  Examples:
    >>> apply_overrides({"train": {"steps": 5}}, ["train.steps=50", "lora.target_modules=[q, v]"])
    {'train': {'steps': 50}, 'lora': {'target_modules': ['q', 'v']}}

  Raises:
    ValueError: an override without `=`, without a section, with an unknown section, or
      whose value is not valid YAML.
  """
  out = {k: dict(v or {}) if isinstance(v, Mapping) or v is None else v for k, v in data.items()}
  for item in overrides:
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) < 2 or not all(parts):
      raise ValueError(f"Override {item!r} must look like `section.key=value`, e.g. `train.steps=50`; "
                       f"sections: {list(SECTIONS)}.")
    if parts[0] not in SECTIONS:
      raise ValueError(f"Override {item!r}: unknown section `{parts[0]}`; allowed sections: {list(SECTIONS)}.")
    node = out.setdefault(parts[0], {})
    if not isinstance(node, dict):
      raise ValueError(f"Override {item!r}: section `{parts[0]}` is not a mapping.")
    for part in parts[1:-1]:
      node = node.setdefault(part, {})
      if not isinstance(node, dict):
        raise ValueError(f"Override {item!r}: `{part}` is not a mapping.")
    node[parts[-1]] = _yaml(text, f"override {item!r}") if text.strip() else None
  return out


def _read(path: str) -> str:
  if os.path.isdir(path):
    raise ValueError(f"config {path!r} is a directory; give a YAML file, e.g. configs/causal_lm_tiny.yaml.")
  if not os.path.exists(path):
    raise FileNotFoundError(f"config {path!r}: No such file; give a YAML file, e.g. configs/causal_lm_tiny.yaml.")
  try:
    with open(path, encoding="utf-8") as f:
      return f.read()
  except UnicodeDecodeError as e:
    raise ValueError(f"config {path!r} is not UTF-8 text (byte {e.start}); give a YAML file.") from None
  except OSError as e:
    raise ValueError(f"config {path!r} cannot be read: {e.strerror}.") from None


def load(path: str | os.PathLike | None, overrides: Sequence[str] = (), *, text: str | None = None) -> Config:
  """Reads a YAML config (`yaml.safe_load`), applies overrides and validates it.

  Args:
    path: the YAML file; None for an empty config (all defaults) or for `text`.
    overrides: `section.key=value` strings, applied in order.
    text: YAML text to read instead of a file (e.g. the embedded default job).

  Returns:
    The validated `Config`.

  Raises:
    ValueError / TypeError: as `Config.from_dict`, naming the file; YAML syntax errors
      name the file and line; a directory or unreadable file.
    FileNotFoundError: no such file.
  """
  data: Any = {}
  source = "overrides"
  if text is not None:
    source = "the default config"
    data = _yaml(text, source) or {}
  elif path is not None:
    source = os.fspath(path)
    data = _yaml(_read(source), source)
    if data is None:
      data = {}
    if not isinstance(data, Mapping):
      raise TypeError(f"{source}: the config must be a mapping of sections {list(SECTIONS)}, got {type(data).__name__}.")
  return Config.from_dict(apply_overrides(data, overrides), source=source)


def describe() -> str:
  """Help text: every section and key, with type, default, meaning, choices and range."""
  lines = []
  for name in SECTIONS:
    if name == "lora":
      lines.append("lora:  PEFT LoraConfig field names -> jlora.LoraConfig.from_dict, e.g. r, lora_alpha, "
                   "lora_dropout,\n       target_modules ([query, value] or all-linear), task_type (FEATURE_EXTRACTION, "
                   "CAUSAL_LM,\n       SEQ_2_SEQ_LM, SEQ_CLS: also picks the loss), bias, modules_to_save, use_rslora")
      lines.append(f"  {'init_from':<16}a string or null, default None: (jlora's key) start from this saved adapter, a "
                   "jlora adapter checkpoint such as RUN_DIR/adapter or ADAPTER_SET/NAME, instead of a fresh init; "
                   "the other lora keys must match its saved config (lora_dropout, init_lora_weights and task_type "
                   "may differ); a resumed run continues from its own checkpoint")
      continue
    kind = SECTION_TYPES[name]
    lines.append(f"{name}:  {kind.__doc__.strip()}")
    hints = typing.get_type_hints(kind)
    for f in dataclasses.fields(kind):
      default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
      choices, allowed = f.metadata["choices"], f.metadata["range"]
      extra = f" [one of: {', '.join(map(str, choices))}]" if choices else f" [{allowed}]" if allowed else ""
      lines.append(f"  {f.name:<16}{type_name(hints[f.name])}, default {default!r}: {f.metadata['help']}{extra}")
  return "\n".join(lines)
