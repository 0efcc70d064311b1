"""`LoraConfig` and `TaskType`: PEFT's LoRA settings, validated and immutable.

The field names and their meaning follow Hugging Face PEFT's `LoraConfig`, so a
PEFT `adapter_config.json` loads as is and a config written here loads in PEFT.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

__all__ = ["LoraConfig", "TaskType", "FrozenMapping"]

BIAS_MODES = ("none", "all", "lora_only")
INIT_METHODS = (True, False, "gaussian", "pissa")
ALL_LINEAR = "all-linear"


class TaskType(enum.StrEnum):
  """PEFT's task types; the long spellings (`SEQUENCE_CLASSIFICATION`, ...) are accepted too."""

  SEQ_CLS = "SEQ_CLS"
  SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
  CAUSAL_LM = "CAUSAL_LM"
  TOKEN_CLS = "TOKEN_CLS"
  QUESTION_ANS = "QUESTION_ANS"
  FEATURE_EXTRACTION = "FEATURE_EXTRACTION"

  @classmethod
  def _missing_(cls, value: object) -> TaskType | None:
    if isinstance(value, str):
      key = value.strip().upper().replace("-", "_")
      key = _TASK_ALIASES.get(key, key)
      for member in cls:
        if member.value == key:
          return member
    return None


_TASK_ALIASES = {
    "SEQUENCE_CLASSIFICATION": "SEQ_CLS",
    "TOKEN_CLASSIFICATION": "TOKEN_CLS",
    "QUESTION_ANSWERING": "QUESTION_ANS",
    "SEQ2SEQ_LM": "SEQ_2_SEQ_LM",
}


class FrozenMapping(Mapping):
  """A read-only, hashable `str -> number` mapping (for `rank_pattern` / `alpha_pattern`)."""

  __slots__ = ("_items",)

  def __init__(self, items: Mapping[str, Any] = ()):
    self._items = dict(items)

  def __getitem__(self, key: str) -> Any:
    return self._items[key]

  def __iter__(self) -> Iterator[str]:
    return iter(self._items)

  def __len__(self) -> int:
    return len(self._items)

  def __hash__(self) -> int:
    return hash(tuple(sorted(self._items.items())))

  def __eq__(self, other: object) -> bool:
    return isinstance(other, Mapping) and dict(self._items) == dict(other)

  def __repr__(self) -> str:
    return repr(self._items)


TargetSpec = str | tuple[str, ...] | None


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """LoRA settings with PEFT's names and meaning.

  The adapted layer computes `y = x·W0 + s·(dropout(x)·A)·B` with `A: (d_in, r)`,
  `B: (r, d_out)`, `B = 0` at init and `s = lora_alpha / r` (`lora_alpha / sqrt(r)`
  with `use_rslora`). The config is immutable and hashable, so it can be a static
  argument of `jax.jit`; lists given to it are stored as tuples.

  Attributes:
    r: the rank of every adapter (overridden per module by `rank_pattern`).
    lora_alpha: the scale numerator (overridden per module by `alpha_pattern`).
    lora_dropout: dropout probability on the LoRA input only, in [0, 1). It acts
      only when `jlora.apply` is given an rng stream named `'lora_dropout'`.
    target_modules: which layers get adapters. A list matches a module's name or
      a path suffix (`"q"`, `"attention.q"`, `"attention/q"`); a string is a regex
      that must match the whole module path (written with `.` or `/`);
      `"all-linear"` adapts every `Dense`/`DenseGeneral`/`Einsum` except the
      output head.
    exclude_modules: like `target_modules`, and wins over it.
    layers_to_transform: only adapt layers with these indices.
    layers_pattern: the name of the layer list (`"layers"`, `"h"`, `"block"`) whose
      index `layers_to_transform` reads; see `jlora._targets.layer_index`.
    rank_pattern: `{key: rank}` overrides; a key matches a module path that equals
      it or ends with it (PEFT's `(.*\\.)?key$`); the longest matching key wins.
    alpha_pattern: `{key: alpha}` overrides, matched like `rank_pattern`.
    bias: `"none"`, `"all"` (every bias of the model trains and is saved) or
      `"lora_only"` (only the biases of adapted layers).
    use_rslora: scale by `lora_alpha / sqrt(r)` (rank-stabilized LoRA).
    init_lora_weights: `True` (A kaiming-uniform, B zero), `"gaussian"`
      (A ~ N(0, (1/r)²), B zero), `False` (B non-zero too; for tests only) or
      `"pissa"` (A, B from the top-r SVD of W0; the residual replaces W0).
    modules_to_save: modules (matched like a `target_modules` list) whose every
      parameter trains fully and is saved with the adapter, e.g. a new classifier.
    task_type: a `TaskType` (informational, as in PEFT).
    fan_in_fan_out: PEFT's flag for PyTorch `Conv1D` layouts; kept for the PEFT
      format only (Flax kernels are always `(in, out)`).
    inference_mode: PEFT's flag, kept for round trips.
    base_model_name_or_path: kept for round trips.
    revision: kept for round trips.
  """

  r: int = 8
  lora_alpha: float = 8
  lora_dropout: float = 0.0
  target_modules: TargetSpec = None
  exclude_modules: TargetSpec = None
  layers_to_transform: tuple[int, ...] | None = None
  layers_pattern: tuple[str, ...] | None = None
  rank_pattern: FrozenMapping = dataclasses.field(default_factory=FrozenMapping)
  alpha_pattern: FrozenMapping = dataclasses.field(default_factory=FrozenMapping)
  bias: str = "none"
  use_rslora: bool = False
  init_lora_weights: bool | str = True
  modules_to_save: tuple[str, ...] | None = None
  task_type: TaskType | None = None
  fan_in_fan_out: bool = False
  inference_mode: bool = False
  base_model_name_or_path: str | None = None
  revision: str | None = None

  def __post_init__(self):
    norm = _normalize(self)
    for name, value in norm.items():
      object.__setattr__(self, name, value)

  # ---------------------------------------------------------------- scaling
  def rank_for(self, path: str) -> int:
    """The rank of the module at `path` (`a/b/c`), after `rank_pattern`."""
    return pattern_lookup(self.rank_pattern, path, self.r)

  def alpha_for(self, path: str) -> float:
    """`lora_alpha` of the module at `path`, after `alpha_pattern`."""
    return pattern_lookup(self.alpha_pattern, path, self.lora_alpha)

  def scale_for(self, path: str) -> float:
    """`s = alpha / r`, or `alpha / sqrt(r)` with `use_rslora`, for the module at `path`."""
    r = self.rank_for(path)
    denom = r**0.5 if self.use_rslora else r
    return float(self.alpha_for(path)) / denom

  # --------------------------------------------------------- serialization
  def to_dict(self) -> dict[str, Any]:
    """A PEFT `adapter_config.json`-compatible dict."""
    out: dict[str, Any] = {"peft_type": "LORA"}
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if isinstance(value, tuple):
        value = list(value)
      elif isinstance(value, FrozenMapping):
        value = dict(value)
      elif isinstance(value, TaskType):
        value = value.value
      out[f.name] = value
    if out["layers_pattern"] is not None and len(out["layers_pattern"]) == 1:
      out["layers_pattern"] = out["layers_pattern"][0]
    return out

  def to_json(self, path: str | os.PathLike | None = None) -> str:
    """Serializes to PEFT's JSON; writes it atomically to `path` when given."""
    text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
    if path is not None:
      tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
      with open(tmp, "w", encoding="utf-8") as f:
        f.write(text + "\n")
      os.replace(tmp, path)
    return text

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> LoraConfig:
    """Builds a config from a PEFT-style dict.

    Unknown keys are ignored with a warning; PEFT features that jlora does not
    implement (DoRA, LoRA bias, ...) raise when they are switched on.

    Raises:
      TypeError: `data` is not a mapping.
      ValueError: `peft_type` is not LORA, an unsupported feature is enabled, or
        a value is invalid.
    """
    if not isinstance(data, Mapping):
      raise TypeError(f"`LoraConfig.from_dict` expects a mapping, got {type(data).__name__}.")
    data = dict(data)
    peft_type = data.pop("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
      raise ValueError(
          f"`peft_type` is {peft_type!r}; jlora loads LoRA adapters only (`peft_type`: \"LORA\")."
      )
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs, unknown = {}, []
    for key, value in data.items():
      if key in known:
        kwargs[key] = value
      elif key in _UNSUPPORTED:
        if _is_enabled(value, _UNSUPPORTED[key][0]):
          raise ValueError(
              f"`{key}`={value!r} asks for {_UNSUPPORTED[key][1]}, which jlora does not "
              f"support; remove the key or set it to {_UNSUPPORTED[key][0]!r}."
          )
      elif key not in _PEFT_IGNORED:
        unknown.append(key)
    if unknown:
      warnings.warn(f"LoraConfig: ignoring unknown keys {sorted(unknown)}.", UserWarning, stacklevel=2)
    return cls(**kwargs)

  @classmethod
  def from_json(cls, path_or_text: str | os.PathLike) -> LoraConfig:
    """Loads from a JSON file path (e.g. PEFT's `adapter_config.json`) or a JSON string."""
    text = _read_text(path_or_text, "path_or_text")
    return cls.from_dict(json.loads(text))

  @classmethod
  def from_yaml(cls, path_or_text: str | os.PathLike) -> LoraConfig:
    """Loads from a YAML file path or YAML text (with `yaml.safe_load`)."""
    import yaml

    text = _read_text(path_or_text, "path_or_text")
    data = yaml.safe_load(text)
    return cls.from_dict(data if data is not None else {})


def _read_text(path_or_text: str | os.PathLike, name: str) -> str:
  """Returns the text of a file path, or the argument itself when it is inline text."""
  if isinstance(path_or_text, str) and not os.path.isfile(path_or_text):
    if "\n" in path_or_text or path_or_text.lstrip().startswith("{") or ":" in path_or_text:
      return path_or_text
  if not isinstance(path_or_text, (str, os.PathLike)):
    raise TypeError(f"`{name}` expects a file path or text, got {type(path_or_text).__name__}.")
  if not os.path.isfile(path_or_text):
    raise FileNotFoundError(f"`{name}`: no file at {os.fspath(path_or_text)!r}.")
  with open(path_or_text, encoding="utf-8") as f:
    return f.read()


def pattern_lookup(pattern: Mapping[str, Any], path: str, default: Any) -> Any:
  """PEFT's `rank_pattern`/`alpha_pattern` lookup for a module path `a/b/c`.

  A key matches when it equals the path or is a regex matching a trailing part of
  it (PEFT's `(.*\\.)?key$`, on the `.`- or `/`-separated path); an exact match
  wins, then the first matching key in insertion order.
  """
  dotted = path.replace("/", ".")
  if path in pattern or dotted in pattern:
    return pattern[path] if path in pattern else pattern[dotted]
  for key, value in pattern.items():
    for form, sep in ((dotted, r"\."), (path, "/")):
      if re.fullmatch(rf"(?:.*{sep})?(?:{key})", form):
        return value
  return default


# PEFT keys that name features jlora does not implement: (default, description).
_UNSUPPORTED = {
    "use_dora": (False, "DoRA (weight-decomposed LoRA)"),
    "lora_bias": (False, "a trainable bias on lora_B"),
    "layer_replication": (None, "layer replication"),
    "use_qalora": (False, "QA-LoRA"),
    "trainable_token_indices": (None, "trainable token indices"),
    "target_parameters": (None, "LoRA on raw nn.Parameters"),
    "megatron_config": (None, "Megatron parallel layers"),
    "loftq_config": ({}, "LoftQ initialization"),
    "eva_config": (None, "EVA initialization"),
    "corda_config": (None, "CorDA initialization"),
    "alora_invocation_tokens": (None, "activated LoRA"),
    "arrow_config": (None, "Arrow routing"),
}
# PEFT keys that carry no meaning for jlora and are dropped silently.
_PEFT_IGNORED = {
    "auto_mapping", "megatron_core", "runtime_config", "qalora_group_size",
    "ensure_weight_tying", "layers_pattern_hint", "peft_version", "lora_ga_config",
}


def _is_enabled(value: Any, default: Any) -> bool:
  return not (value == default or value is None or value is False or value == {} or value == [])


def _targets(name: str, value: Any) -> TargetSpec:
  if value is None:
    return None
  if isinstance(value, str):
    if not value:
      raise ValueError(f"`{name}` is an empty string; give a module name list or a regex.")
    return value
  if isinstance(value, (Sequence, set, frozenset)) and all(isinstance(v, str) and v for v in value):
    if not value:
      raise ValueError(f"`{name}` is empty; give at least one module name, a regex or 'all-linear'.")
    return tuple(sorted(value)) if isinstance(value, (set, frozenset)) else tuple(value)
  raise TypeError(
      f"`{name}` must be a list of module names or a regex string, got {value!r}; "
      f"e.g. {name}=[\"q\", \"v\"]."
  )


def _pattern(name: str, value: Any, number_type: type) -> FrozenMapping:
  if value is None:
    return FrozenMapping()
  if not isinstance(value, Mapping):
    raise TypeError(f"`{name}` must be a mapping of module name to value, got {type(value).__name__}.")
  for key, v in value.items():
    if not isinstance(key, str) or not key:
      raise TypeError(f"`{name}` keys must be non-empty module names, got {key!r}.")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
      raise ValueError(f"`{name}[{key!r}]` must be a positive number, got {v!r}.")
    if number_type is int and int(v) != v:
      raise ValueError(f"`{name}[{key!r}]` must be an integer rank, got {v!r}.")
  return FrozenMapping({k: number_type(v) for k, v in value.items()})


def _normalize(cfg: LoraConfig) -> dict[str, Any]:
  """Validates every field; returns the normalized values."""
  out: dict[str, Any] = {}
  if isinstance(cfg.r, bool) or not isinstance(cfg.r, int) or cfg.r <= 0:
    raise ValueError(f"`r` must be a positive integer (the adapter rank), got {cfg.r!r}; e.g. r=8.")
  alpha = cfg.lora_alpha
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
    raise ValueError(f"`lora_alpha` must be a positive number, got {alpha!r}; e.g. lora_alpha=16.")
  drop = cfg.lora_dropout
  if isinstance(drop, bool) or not isinstance(drop, (int, float)) or not 0.0 <= drop < 1.0:
    raise ValueError(f"`lora_dropout` must be in [0, 1), got {drop!r}; e.g. lora_dropout=0.1.")
  out["lora_dropout"] = float(drop)
  out["target_modules"] = _targets("target_modules", cfg.target_modules)
  out["exclude_modules"] = _targets("exclude_modules", cfg.exclude_modules)
  out["modules_to_save"] = _targets("modules_to_save", cfg.modules_to_save)
  if isinstance(out["modules_to_save"], str):
    out["modules_to_save"] = (out["modules_to_save"],)
  if cfg.bias not in BIAS_MODES:
    raise ValueError(f"`bias` must be one of {BIAS_MODES}, got {cfg.bias!r}.")
  init = cfg.init_lora_weights
  if isinstance(init, str):
    init = {"true": True, "false": False, "kaiming": True}.get(init.lower(), init.lower())
  if not any(init is m or (isinstance(m, str) and init == m) for m in INIT_METHODS):
    raise ValueError(
        f"`init_lora_weights` must be one of True, False, 'gaussian', 'pissa', got {cfg.init_lora_weights!r}."
    )
  out["init_lora_weights"] = init

  layers = cfg.layers_to_transform
  if layers is not None:
    layers = (layers,) if isinstance(layers, int) and not isinstance(layers, bool) else layers
    if not isinstance(layers, Sequence) or not all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers
    ):
      raise ValueError(f"`layers_to_transform` must be a layer index or a list of them (ints >= 0), got {cfg.layers_to_transform!r}.")
    layers = tuple(layers)
    if isinstance(out["target_modules"], str) and out["target_modules"] != ALL_LINEAR:
      raise ValueError(
          "`layers_to_transform` cannot be combined with a regex `target_modules` (as in PEFT); "
          "write the layer indices into the regex or give `target_modules` as a list."
      )
  out["layers_to_transform"] = layers
  pattern = cfg.layers_pattern
  if pattern is not None:
    pattern = (pattern,) if isinstance(pattern, str) else pattern
    if not isinstance(pattern, Sequence) or not all(isinstance(p, str) and p for p in pattern):
      raise TypeError(f"`layers_pattern` must be a name or a list of names, got {cfg.layers_pattern!r}.")
    if layers is None:
      raise ValueError("`layers_pattern` was given without `layers_to_transform`; give both or neither.")
    pattern = tuple(pattern)
  out["layers_pattern"] = pattern
  out["rank_pattern"] = _pattern("rank_pattern", cfg.rank_pattern, int)
  out["alpha_pattern"] = _pattern("alpha_pattern", cfg.alpha_pattern, float)
  task = cfg.task_type
  if task is not None and not isinstance(task, TaskType):
    try:
      task = TaskType(task)
    except ValueError:
      raise ValueError(
          f"`task_type` {task!r} is unknown; use one of {[t.value for t in TaskType]} "
          "(or SEQUENCE_CLASSIFICATION / TOKEN_CLASSIFICATION)."
      ) from None
  out["task_type"] = task
  for flag in ("use_rslora", "fan_in_fan_out", "inference_mode"):
    if not isinstance(getattr(cfg, flag), bool):
      raise TypeError(f"`{flag}` must be True or False, got {getattr(cfg, flag)!r}.")
  return out
