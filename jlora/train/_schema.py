"""The `jlora train` config: a typed schema of frozen dataclasses, YAML loading and `key=value` overrides.

A config file has the sections `model`, `lora`, `data`, `optimizer`, `train`,
`checkpointing` and `outputs`. Every section but `lora` is a dataclass below, whose
fields (with their help text) are the allowed keys; `lora` holds PEFT's field
names and becomes a `jlora.LoraConfig`. Unknown keys and values of the wrong type
are errors that name the key and list what is allowed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import os
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from jlora._config import LoraConfig

__all__ = [
  "CheckpointConfig",
  "Config",
  "DataConfig",
  "ModelConfig",
  "OptimizerConfig",
  "OutputsConfig",
  "TrainConfig",
  "apply_overrides",
  "describe",
  "load",
]


def _meta(help: str, choices: Sequence[Any] | None = None) -> dict[str, Any]:
  return {"help": help, "choices": tuple(choices) if choices else None}


def _field(default: Any, help: str, choices: Sequence[Any] | None = None) -> Any:
  return dataclasses.field(default=default, metadata=_meta(help, choices))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Which base model to adapt."""

  source: str = _field(
    "minilm",
    "`minilm` (the packaged all-MiniLM-L6-v2), `pretrained` (a local Hugging Face directory in `path`) or "
    "`random` (random init from the Hugging Face config dict in `config`)",
    ("minilm", "pretrained", "random"),
  )
  path: str | None = _field(None, "checkpoint directory (config.json + model.safetensors) for source=pretrained")
  config: dict = dataclasses.field(
    default_factory=dict, metadata=_meta("Hugging Face config dict for source=random (must have `model_type`)")
  )
  options: dict = dataclasses.field(
    default_factory=dict, metadata=_meta("extra jlora.models options, e.g. {scan_layers: true}")
  )
  tokenizer: str | None = _field(
    None, "directory with tokenizer.json, or `bytes` (UTF-8 bytes + 3 specials); default: the model's own, "
    "`bytes` for source=random"
  )
  dtype: str = _field("float32", "parameter dtype of the base", ("float32", "bfloat16"))


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """What to train and evaluate on; the task comes from `lora.task_type`."""

  source: str = _field(
    "stdlib_code_search",
    "`stdlib_code_search` (docstring line -> function signature, FEATURE_EXTRACTION), `stdlib_docstrings` "
    "(text, CAUSAL_LM), `stdlib_name_from_doc` (docstring -> qualified name, SEQ_2_SEQ_LM), "
    "`stdlib_module_family` (docstring -> module family, SEQ_CLS), or `jsonl` (files in train_file/eval_file "
    "with fields query/document, text, input/target or text/label)",
    ("stdlib_code_search", "stdlib_docstrings", "stdlib_name_from_doc", "stdlib_module_family", "jsonl"),
  )
  train_file: str | None = _field(None, "JSON-lines training file for source=jsonl")
  eval_file: str | None = _field(None, "JSON-lines evaluation file for source=jsonl")
  max_train: int | None = _field(None, "use at most this many training examples (null: all)")
  max_eval: int | None = _field(None, "evaluate on at most this many held-out examples (null: all)")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """optax AdamW with a schedule, warmup and clipping."""

  learning_rate: float = _field(1e-3, "peak learning rate")
  schedule: str = _field("cosine", "learning-rate schedule after warmup", ("constant", "cosine", "linear"))
  warmup_steps: int = _field(0, "linear warmup from 0 to learning_rate")
  weight_decay: float = _field(0.0, "AdamW weight decay")
  b1: float = _field(0.9, "Adam beta1")
  b2: float = _field(0.999, "Adam beta2")
  eps: float = _field(1e-8, "Adam epsilon")
  clip_norm: float | None = _field(1.0, "clip gradients to this global norm (null: no clipping)")
  lora_plus_ratio: float | None = _field(None, "LoRA+: lora_b learns this many times faster (e.g. 16)")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The loop."""

  steps: int = _field(100, "optimizer steps")
  batch_size: int = _field(16, "examples per step (pairs for contrastive training)")
  seq_len: int = _field(64, "tokens per sequence (inputs are truncated and padded to this)")
  target_len: int = _field(16, "tokens per target sequence (SEQ_2_SEQ_LM)")
  temperature: float = _field(0.05, "InfoNCE temperature (FEATURE_EXTRACTION)")
  eval_every: int = _field(0, "evaluate every N steps (0: only before and after training)")
  eval_batch_size: int = _field(64, "sequences per evaluation forward pass")
  log_every: int = _field(10, "write a metrics.jsonl line every N steps")
  seed: int = _field(0, "seed of the adapter init, data order and dropout")
  quiet: bool = _field(False, "no progress bar, only the final summary")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """Orbax checkpoints of the training state, to resume a stopped run."""

  every: int = _field(100, "save the training state every N steps (0: only on Ctrl-C)")
  keep: int = _field(2, "keep the K most recent checkpoints")
  resume: bool = _field(True, "resume from the latest checkpoint in outputs.dir/checkpoints")


@dataclasses.dataclass(frozen=True)
class OutputsConfig:
  """What a run writes into `dir`."""

  dir: str = _field("runs/default", "output directory")
  peft: bool = _field(True, "also write the adapter in PEFT format (adapter_model.safetensors)")
  merged: bool = _field(False, "also write the merged model (Hugging Face format)")
  plot: bool = _field(True, "write curves.png (loss and eval metric)")


_SECTIONS: dict[str, type] = {
  "model": ModelConfig,
  "data": DataConfig,
  "optimizer": OptimizerConfig,
  "train": TrainConfig,
  "checkpointing": CheckpointConfig,
  "outputs": OutputsConfig,
}
SECTIONS: tuple[str, ...] = ("model", "lora", "data", "optimizer", "train", "checkpointing", "outputs")


@dataclasses.dataclass(frozen=True)
class Config:
  """A whole `jlora train` config."""

  model: ModelConfig
  lora: LoraConfig
  data: DataConfig
  optimizer: OptimizerConfig
  train: TrainConfig
  checkpointing: CheckpointConfig
  outputs: OutputsConfig

  def to_dict(self) -> dict[str, Any]:
    """Plain YAML-ready dict; `lora` in PEFT's field names."""
    out = {name: dataclasses.asdict(getattr(self, name)) for name in _SECTIONS}
    lora = {f.name: getattr(self.lora, f.name) for f in dataclasses.fields(LoraConfig)}
    out["lora"] = _plain(lora)
    return {name: out[name] for name in SECTIONS}

  @classmethod
  def from_dict(cls, data: Mapping[str, Any], *, source: str = "config") -> Config:
    """Validates a nested dict (as read from YAML).

    Raises:
      ValueError: unknown sections or keys, or a value outside its choices.
      TypeError: a value of the wrong type.
    """
    if not isinstance(data, Mapping):
      raise TypeError(f"{source}: the config must be a mapping of sections {list(SECTIONS)}, got {type(data).__name__}.")
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
      raise ValueError(f"{source}: unknown section(s) {unknown}; allowed sections: {list(SECTIONS)}.")
    for name, section in data.items():
      if section is not None and not isinstance(section, Mapping):
        raise TypeError(f"{source}: section `{name}` must be a mapping of keys, got {section!r}.")
    parts = {name: _section(kind, data.get(name) or {}, name, source) for name, kind in _SECTIONS.items()}
    return cls(lora=_lora(data.get("lora") or {}, source), **parts)


def _plain(value: Any) -> Any:
  if isinstance(value, enum.Enum):  # TaskType
    return value.value
  if isinstance(value, Mapping):
    return {str(k): _plain(v) for k, v in value.items()}
  if isinstance(value, tuple | list | frozenset | set):
    return [_plain(v) for v in (sorted(value) if isinstance(value, frozenset | set) else value)]
  return value


def _lora(data: Mapping[str, Any], source: str) -> LoraConfig:
  allowed = [f.name for f in dataclasses.fields(LoraConfig)]
  unknown = sorted(set(data) - set(allowed) - {"peft_type"})
  if unknown:
    raise ValueError(f"{source}: unknown key(s) {['lora.' + k for k in unknown]}; allowed `lora` keys (PEFT's "
                     f"LoraConfig fields): {allowed}.")
  try:
    return LoraConfig.from_dict(dict(data))
  except (TypeError, ValueError) as e:
    raise type(e)(f"{source}: section `lora`: {e}") from None


def _type_name(kind: Any) -> str:
  args = [a for a in typing.get_args(kind) if a is not type(None)]
  base = args[0] if args else kind
  name = {int: "an integer", float: "a number", bool: "true/false", str: "a string", dict: "a mapping",
          list: "a list"}.get(base, str(base))
  return name + (" or null" if type(None) in typing.get_args(kind) else "")


def _check(kind: Any, value: Any) -> Any:
  """`value` converted to `kind`, or raises TypeError."""
  args = typing.get_args(kind)
  if value is None:
    if type(None) in args:
      return None
    raise TypeError
  base = next((a for a in args if a is not type(None)), kind) if isinstance(kind, types.UnionType) else kind
  if base is bool:
    if isinstance(value, bool):
      return value
  elif base is int:
    if isinstance(value, int) and not isinstance(value, bool):
      return value
  elif base is float:
    if isinstance(value, int | float) and not isinstance(value, bool):
      return float(value)
    if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
      with contextlib.suppress(ValueError):
        return float(value)
  elif base is str:
    if isinstance(value, str):
      return value
  elif base is dict:
    if isinstance(value, Mapping):
      return dict(value)
  raise TypeError


def _section(kind: type, data: Mapping[str, Any], name: str, source: str) -> Any:
  fields = {f.name: f for f in dataclasses.fields(kind)}
  unknown = sorted(set(data) - set(fields))
  if unknown:
    raise ValueError(f"{source}: unknown key(s) {[f'{name}.{k}' for k in unknown]}; allowed `{name}` keys: "
                     f"{list(fields)}.")
  hints = typing.get_type_hints(kind)
  values = {}
  for key, value in data.items():
    try:
      values[key] = _check(hints[key], value)
    except TypeError:
      raise TypeError(f"{source}: `{name}.{key}` must be {_type_name(hints[key])}, got {value!r} "
                      f"({type(value).__name__}).") from None
    choices = fields[key].metadata["choices"]
    if choices and values[key] not in choices:
      raise ValueError(f"{source}: `{name}.{key}` must be one of {list(choices)}, got {value!r}.")
  return kind(**values)


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
  """Applies `section.key=value` overrides (values parsed as YAML) to a nested config dict.

  Examples:
    >>> apply_overrides({"train": {"steps": 5}}, ["train.steps=50", "lora.target_modules=[q, v]"])
    {'train': {'steps': 50}, 'lora': {'target_modules': ['q', 'v']}}

  Raises:
    ValueError: an override without `=`, without a section, or with an unknown section.
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
    node[parts[-1]] = yaml.safe_load(text) if text.strip() else None
  return out


def load(path: str | os.PathLike | None, overrides: Sequence[str] = (), *, text: str | None = None) -> Config:
  """Reads a YAML config (`yaml.safe_load`), applies overrides and validates it.

  Args:
    path: the YAML file; None for an empty config (all defaults) or for `text`.
    overrides: `section.key=value` strings, applied in order.
    text: YAML text to read instead of a file (e.g. the embedded default job).

  Raises:
    ValueError / TypeError: as `Config.from_dict`, naming the file.
    FileNotFoundError: no such file.
  """
  data: Any = {}
  source = "overrides"
  if text is not None:
    source, data = "the default config", yaml.safe_load(text) or {}
  elif path is not None:
    source = os.fspath(path)
    with open(path, encoding="utf-8") as f:
      data = yaml.safe_load(f) or {}
    if not isinstance(data, Mapping):
      raise TypeError(f"{source}: the config must be a mapping of sections {list(SECTIONS)}, got {type(data).__name__}.")
  return Config.from_dict(apply_overrides(data, overrides), source=source)


def describe() -> str:
  """Help text: every section and key, with type, default and meaning."""
  lines = []
  for name in SECTIONS:
    if name == "lora":
      lines.append("lora:  PEFT LoraConfig field names -> jlora.LoraConfig.from_dict, e.g. r, lora_alpha, "
                   "lora_dropout,\n       target_modules ([query, value] or all-linear), task_type (FEATURE_EXTRACTION, "
                   "CAUSAL_LM,\n       SEQ_2_SEQ_LM, SEQ_CLS: also picks the loss), bias, modules_to_save, use_rslora")
      continue
    kind = _SECTIONS[name]
    lines.append(f"{name}:  {kind.__doc__.strip()}")
    hints = typing.get_type_hints(kind)
    for f in dataclasses.fields(kind):
      default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
      choices = f.metadata["choices"]
      one_of = f" [one of: {', '.join(map(str, choices))}]" if choices else ""
      lines.append(f"  {f.name:<16}{_type_name(hints[f.name])}, default {default!r}: {f.metadata['help']}{one_of}")
  return "\n".join(lines)
