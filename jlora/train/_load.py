"""Reading a `jlora train` config: YAML files, `section.key=value` overrides, and the help text.

YAML is read by `jlora.core.safe_load.load_yaml`, in files and overrides alike: `1e3`, `1e-3`, `.5` and `5.`
are numbers; a key twice, more than 100,000 values after expanding aliases or 256 KiB of text are refused.

Every mistake is one `ValueError` / `TypeError` line that names the file (and line, for
YAML syntax errors) or the override, so the `jlora` command can print it as is.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from jlora.core.fields import default_target_modules
from jlora.core.safe_load import MAX_BYTES, load_yaml
from jlora.train import _model
from jlora.train._schema import SECTION_TYPES, SECTIONS, Config, type_name

__all__ = ["apply_overrides", "describe", "load"]


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
    node[parts[-1]] = load_yaml(text, where=f"override {item!r}") if text.strip() else None
  return out


def _read(path: str) -> str:
  if os.path.isdir(path):
    raise ValueError(f"config {path!r} is a directory; give a YAML file, e.g. configs/causal_lm_tiny.yaml.")
  if not os.path.exists(path):
    raise FileNotFoundError(f"config {path!r}: No such file; give a YAML file, e.g. configs/causal_lm_tiny.yaml.")
  try:
    with open(path, "rb") as f:
      data = f.read(MAX_BYTES + 1)  # at most: a device or a huge file is refused, not read whole
  except OSError as e:
    raise ValueError(f"config {path!r} cannot be read: {e.strerror}.") from None
  if len(data) > MAX_BYTES:
    raise ValueError(f"config {path!r} holds more than {MAX_BYTES:,} bytes; a config is a few kB. Is it the right "
                     "file?")
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    raise ValueError(f"config {path!r} is not UTF-8 text (line {line}, byte {e.start}); give a YAML file.") from None


def load(path: str | os.PathLike | None, overrides: Sequence[str] = (), *, text: str | None = None) -> Config:
  """Reads a YAML config, applies overrides and validates it.

  YAML is read with the safe loader and jlora's bounds, in files and overrides
  alike: `1e3`, `1e-3`, `.5` and `5.` are numbers; a key given twice (both lines
  named), more than 100,000 values after expanding aliases, or more than 256 KiB
  of text is refused.

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
    data = load_yaml(text, where=source) or {}
  elif path is not None:
    source = os.fspath(path)
    data = load_yaml(_read(source), where=source)
    if data is None:
      data = {}
    if not isinstance(data, Mapping):
      raise TypeError(f"{source}: the config must be a mapping of sections {list(SECTIONS)}, got {type(data).__name__}.")
  return _default_targets(Config.from_dict(apply_overrides(data, overrides), source=source), source)


def _default_targets(config: Config, source: str) -> Config:
  """`config` with PEFT's default `lora.target_modules` for its model's `model_type` where none are given (and no
  `target_parameters`), as PEFT's `get_peft_model` fills them in; the run, its fingerprint and its saved adapter
  config then name them."""
  lora = config.lora
  if lora.target_modules is not None or lora.target_parameters or config.train.method == "full":
    return config
  kind = _model.model_type(config.model)
  try:
    targets = default_target_modules(kind)
  except ValueError:
    raise ValueError(f"{source}: `lora.target_modules` is not set, and PEFT has no default for model_type {kind!r}; "
                     "name them, e.g. `lora.target_modules=all-linear`.") from None
  return dataclasses.replace(config, lora=dataclasses.replace(lora, target_modules=targets))


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
