"""The `jlora train` config: a typed schema of frozen dataclasses, validated key by key.

A config has the sections `model`, `lora`, `data`, `optimizer`, `train`,
`checkpointing`, `outputs` and the optional `mesh` (`jlora.train._mesh_config`; absent:
one device). Every section but `lora` is a dataclass, whose
fields (with their help text, choices and allowed range) are the allowed keys;
`lora` holds PEFT's field names and becomes a `jlora.LoraConfig` (its one other key,
`init_from`, becomes `Config.init_from`). Unknown keys, values
of the wrong type and values out of range are errors that name the key, the value and
what is allowed. Reading YAML and `key=value` overrides is `jlora.train._load`.

Examples:
  >>> config = Config.from_dict({"train": {"steps": 5}, "lora": {"r": 4}})
  >>> config.train.steps, config.lora.r, config.train.batch_size
  (5, 4, 16)
  >>> replace(config, train={"steps": 7}).train.steps
  7
  >>> Config.from_dict({"train": {"batch_size": -1}})
  Traceback (most recent call last):
  ...
  ValueError: config: `train.batch_size` must be an integer >= 1, got -1.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from jlora.adapters.adapter_set import check_name
from jlora.core.config import LoraConfig
from jlora.core.fields import LOFTQ_BITS
from jlora.train._mesh_config import MeshConfig

__all__ = ["CheckpointConfig", "Config", "DataConfig", "MeshConfig", "ModelConfig", "OptimizerConfig",
           "OutputsConfig", "SECTIONS", "TrainConfig", "replace", "type_name"]


@dataclasses.dataclass(frozen=True)
class Range:
  """Allowed numeric values: `low <= v` (`low < v` if `low_open`), `v <= high` (`v < high` if `high_open`)."""

  low: float | None = None
  high: float | None = None
  low_open: bool = False
  high_open: bool = False

  def __contains__(self, v: float) -> bool:
    ok_low = self.low is None or (v > self.low if self.low_open else v >= self.low)
    ok_high = self.high is None or (v < self.high if self.high_open else v <= self.high)
    return ok_low and ok_high

  def __str__(self) -> str:
    if self.low is not None and self.high is not None:
      return f"in {'(' if self.low_open else '['}{_num(self.low)}, {_num(self.high)}{')' if self.high_open else ']'}"
    if self.low is not None:
      return f"{'>' if self.low_open else '>='} {_num(self.low)}"
    return f"{'<' if self.high_open else '<='} {_num(self.high)}"


def _num(x: float) -> str:
  return str(int(x)) if float(x).is_integer() else f"{x:g}"


METHODS = ("lora", "full")  # `train.method`: adapters over a frozen base, or every weight
AT_LEAST_0, AT_LEAST_1, POSITIVE = Range(0), Range(1), Range(0, low_open=True)
UNIT = Range(0, 1, high_open=True)  # Adam's betas
SEED = Range(0, 2**32, high_open=True)


def _meta(help: str, choices: Sequence[Any] | None = None, range: Range | None = None) -> dict[str, Any]:
  return {"help": help, "choices": tuple(choices) if choices else None, "range": range}


def _field(default: Any, help: str, choices: Sequence[Any] | None = None, *, range: Range | None = None) -> Any:
  return dataclasses.field(default=default, metadata=_meta(help, choices, range))


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
    default_factory=dict, metadata=_meta("Hugging Face config dict for source=random (must have `model_type`)"))
  options: dict = dataclasses.field(
    default_factory=dict, metadata=_meta("extra jlora.models options, e.g. {scan_layers: true}"))
  tokenizer: str | None = _field(
    None, "directory with tokenizer.json, or `bytes` (UTF-8 bytes + 3 specials); default: the model's own, "
    "`bytes` for source=random"
  )
  dtype: str = _field("float32", "parameter dtype of the base", ("float32", "bfloat16"))
  quantize: str | None = _field(
    None, "QLoRA: quantize the frozen base's kernels (`nf4`: 4-bit NormalFloat, block 64, double-quantized scales; "
    "`int4`: the same blocks, 15 evenly spaced levels; `int8`: per output channel); each is dequantized to "
    "`model.dtype` where its layer reads it", (None, "nf4", "int4", "int8"))


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
  max_train: int | None = _field(None, "use at most this many training examples (null: all)", range=AT_LEAST_1)
  max_eval: int | None = _field(None, "evaluate on at most this many held-out examples (null: all)", range=AT_LEAST_1)
  num_labels: int | None = _field(
    None, "SEQ_CLS classes; labels are integers in [0, num_labels) or strings (null: the largest integer label + 1 "
    "or the number of distinct strings, at most 1000)", range=Range(2)
  )


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """optax AdamW with a schedule, warmup and clipping."""

  learning_rate: float = _field(1e-3, "peak learning rate", range=AT_LEAST_0)
  schedule: str = _field("cosine", "learning-rate schedule after warmup", ("constant", "cosine", "linear"))
  warmup_steps: int = _field(0, "linear warmup from 0 to learning_rate", range=AT_LEAST_0)
  weight_decay: float = _field(0.0, "AdamW weight decay", range=AT_LEAST_0)
  b1: float = _field(0.9, "Adam beta1", range=UNIT)
  b2: float = _field(0.999, "Adam beta2", range=UNIT)
  eps: float = _field(1e-8, "Adam epsilon", range=POSITIVE)
  clip_norm: float | None = _field(1.0, "clip gradients to this global norm (null: no clipping)", range=POSITIVE)
  lora_plus_ratio: float | None = _field(None, "LoRA+: lora_b learns this many times faster (e.g. 16)", range=POSITIVE)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The loop."""

  steps: int = _field(100, "optimizer steps", range=AT_LEAST_0)
  batch_size: int = _field(16, "examples per step (pairs for contrastive training)", range=AT_LEAST_1)
  seq_len: int = _field(64, "tokens per sequence (inputs are truncated and padded to this)", range=AT_LEAST_1)
  target_len: int = _field(16, "tokens per target sequence (SEQ_2_SEQ_LM)", range=AT_LEAST_1)
  temperature: float = _field(0.05, "InfoNCE temperature (FEATURE_EXTRACTION)", range=POSITIVE)
  eval_every: int = _field(0, "evaluate every N steps (0: only before and after training)", range=AT_LEAST_0)
  eval_batch_size: int = _field(64, "sequences per evaluation forward pass", range=AT_LEAST_1)
  log_every: int = _field(10, "write a metrics.jsonl line every N steps", range=AT_LEAST_1)
  seed: int = _field(0, "seed of the adapter init, data order and dropout", range=SEED)
  quiet: bool = _field(False, "no progress bar, only the final summary")
  method: str = _field(
    "lora", "what trains: `lora` (the adapters the `lora` section describes, over the frozen base) or `full` (every "
    "weight of the model, no adapters; of the `lora` section only `task_type` applies, and the run writes the whole "
    "model as `model/` instead of `adapter/` and `peft/`)", METHODS)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """Orbax checkpoints of the training state, to resume a stopped run."""

  every: int = _field(100, "save the training state every N steps (0: only on Ctrl-C and at the end)",
                      range=AT_LEAST_0)
  keep: int = _field(2, "keep the K most recent checkpoints", range=AT_LEAST_1)
  resume: bool = _field(True, "resume from the latest checkpoint in outputs.dir/checkpoints")


@dataclasses.dataclass(frozen=True)
class OutputsConfig:
  """What a run writes into `dir`."""

  dir: str = _field("runs/default", "output directory (new, empty, or an earlier run's)")
  peft: bool = _field(True, "also write the adapter in PEFT format (adapter_model.safetensors)")
  merged: bool = _field(False, "also write the merged model (Hugging Face format)")
  plot: bool = _field(True, "write curves.png (loss and eval metric)")
  adapter_set: str | None = _field(
    None, "also save the final adapter into this adapter-set directory as ADAPTER_SET/ADAPTER_NAME (what "
    "jlora.load_adapter_set and `jlora generate` read); never over files jlora did not write")
  adapter_name: str | None = _field(None, "its name in outputs.adapter_set (default: the basename of outputs.dir)")
  replace_adapter: bool = _field(False, "replace an adapter of that name already in outputs.adapter_set (saved as "
                                 "a new version: the old one stays readable until the new one is complete)")


SECTION_TYPES: dict[str, type] = {
  "model": ModelConfig,
  "data": DataConfig,
  "optimizer": OptimizerConfig,
  "train": TrainConfig,
  "checkpointing": CheckpointConfig,
  "outputs": OutputsConfig,
  "mesh": MeshConfig,
}
SECTIONS: tuple[str, ...] = ("model", "lora", "data", "optimizer", "train", "checkpointing", "outputs", "mesh")


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
  init_from: str | None = None  # `lora.init_from` (jlora's key, not PEFT's): the adapter checkpoint to start from
  mesh: MeshConfig | None = None  # the `mesh` section; None (absent) = one device

  def to_dict(self) -> dict[str, Any]:
    """Plain YAML-ready dict; `lora` in PEFT's field names (and `init_from` when set); `mesh` only when set."""
    out = {name: dataclasses.asdict(getattr(self, name)) for name in SECTION_TYPES if getattr(self, name) is not None}
    lora = {f.name: getattr(self.lora, f.name) for f in dataclasses.fields(LoraConfig)}
    out["lora"] = _plain(lora) | ({} if self.init_from is None else {"init_from": self.init_from})
    return {name: out[name] for name in SECTIONS if name in out}

  @classmethod
  def from_dict(cls, data: Mapping[str, Any], *, source: str = "config") -> Config:
    """Validates a nested dict (as read from YAML).

    Args:
      data: `{section: {key: value}}`.
      source: where it came from (a file name), the prefix of every message.

    Raises:
      ValueError: unknown sections or keys, or a value outside its choices or range.
      TypeError: a value of the wrong type.
    """
    if not isinstance(data, Mapping):
      raise TypeError(f"{source}: the config must be a mapping of sections {list(SECTIONS)}, got {type(data).__name__}.")
    unknown = sorted(set(data) - set(SECTIONS), key=str)
    if unknown:
      raise ValueError(f"{source}: unknown section(s) {unknown}; allowed sections: {list(SECTIONS)}.")
    for name, section in data.items():
      if section is not None and not isinstance(section, Mapping):
        raise TypeError(f"{source}: section `{name}` must be a mapping of keys, got {section!r}.")
    parts = {name: _section(kind, data.get(name) or {}, name, source) for name, kind in SECTION_TYPES.items()
             if name != "mesh" or data.get(name) is not None}  # no `mesh` section: one device
    lora = dict(data.get("lora") or {})
    init_from = lora.pop("init_from", None)
    if init_from is not None and (not isinstance(init_from, str) or not init_from.strip()):
      raise (ValueError if isinstance(init_from, str) else TypeError)(
        f"{source}: `lora.init_from` must be the path of a jlora adapter checkpoint (e.g. runs/sql/adapter or "
        f"adapters/sql) or null, got {init_from!r}.")
    if init_from is not None:
      try:
        check_path(init_from, "lora.init_from")
      except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    config = cls(lora=_lora(lora, source), init_from=init_from, **parts)
    _check_method(config, source)
    _check_loftq(config, source)
    return config


def _check_loftq(config: Config, source: str) -> None:
  """LoftQ trains over the base quantized as `model.quantize` says, which must be what LoftQ fits: the same
  method, and one round (whose quantized kernels are exactly `model.quantize`'s, so every later tool that
  quantizes the base again, `merged/`, `jlora merge`, `jlora generate`, rebuilds the same base)."""
  if config.lora.init_lora_weights != "loftq" or config.lora.loftq_config is None:
    return
  bits, iters = config.lora.loftq_config["loftq_bits"], config.lora.loftq_config["loftq_iter"]
  method = LOFTQ_BITS[bits]
  needs = [f"`model.quantize: {method}` (got {config.model.quantize!r}: the base LoftQ fits the adapter to)"
           ] if config.model.quantize != method else []
  if iters != 1:
    needs.append(f"`loftq_iter: 1` (got {iters}: `jlora train` rebuilds the quantized base from the original "
                 "weights, which reproduces one round's kernels only)")
  if needs:
    raise ValueError(f"{source}: `lora.init_lora_weights: loftq` with loftq_bits={bits} needs {' and '.join(needs)}.")


def _check_method(config: Config, source: str) -> None:
  """Raises a ValueError for a setting that only adapters have, in a run that trains every weight."""
  if config.train.method != "full":
    return
  for key, value in (("model.quantize", config.model.quantize), ("lora.init_from", config.init_from),
                     ("optimizer.lora_plus_ratio", config.optimizer.lora_plus_ratio),
                     ("outputs.adapter_set", config.outputs.adapter_set)):
    if value is not None:
      raise ValueError(f"{source}: `train.method: full` trains every weight of the model, without adapters, but "
                       f"`{key}` is {value!r}, a setting for adapters; remove it (`{key}=null`) or use "
                       "`train.method: lora`.")


def replace(config: Config, **sections: dict[str, Any]) -> Config:
  """`config` with some keys of some sections replaced, e.g. `replace(cfg, train={"steps": 3})` (not re-validated)."""
  return dataclasses.replace(config, **{k: dataclasses.replace(getattr(config, k) or SECTION_TYPES[k](), **v)
                                        for k, v in sections.items()})


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
  unknown = sorted(set(data) - set(allowed) - {"peft_type"}, key=str)
  if unknown:
    raise ValueError(f"{source}: unknown key(s) {['lora.' + str(k) for k in unknown]}; allowed `lora` keys (PEFT's "
                     f"LoraConfig fields): {allowed}, and jlora's `init_from`.")
  try:
    return LoraConfig.from_dict(dict(data))
  except (TypeError, ValueError) as e:
    raise type(e)(f"{source}: section `lora`: {e}") from None


def type_name(kind: Any) -> str:
  """`an integer`, `a number or null`, ...: the type of a schema field in words."""
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
    if isinstance(value, float) and value.is_integer() and abs(value) <= 2**53:  # `1e3` is read as 1000.0
      return int(value)
  elif base is float:
    number = None
    if isinstance(value, int | float) and not isinstance(value, bool):
      number = float(value)
    elif isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
      try:
        number = float(value)
      except ValueError:
        pass
    if number is not None and math.isfinite(number):
      return number
  elif base is str:
    if isinstance(value, str):
      return value
  elif base is dict:
    if isinstance(value, Mapping):
      return dict(value)
  elif base is list and isinstance(value, list | tuple):
    return list(value)
  raise TypeError


# The keys that name files or directories, and the one that names a directory entry.
PATH_KEYS = ("model.path", "model.tokenizer", "data.train_file", "data.eval_file", "outputs.dir", "outputs.adapter_set",
             "lora.init_from")
NAME_MAX, PATH_MAX = 255, 4095  # bytes per path component, bytes per path (Linux's limits; macOS: 255, 1023)


def check_path(value: str, key: str, *, name: bool = False) -> None:
  """Raises a ValueError naming `key` when `value` cannot be a path (`name`: a single directory entry).

  A path holds no NUL byte, at most `PATH_MAX` bytes, and no component (between `/`) longer
  than `NAME_MAX` bytes (in UTF-8, as the file system counts them); a name holds no `/` either.
  """
  if "\0" in value:
    raise ValueError(f"`{key}` holds a NUL byte (\\x00, at character {value.index(chr(0))}); no file or directory "
                     "name can hold one: remove it.")
  if name and "/" in value:
    raise ValueError(f"`{key}` is a name, not a path, so it cannot hold '/': got {value[:80]!r}.")
  encoded = os.fsencode(value)
  if len(encoded) > PATH_MAX:
    raise ValueError(f"`{key}` is {len(encoded):,} bytes long; a path holds at most {PATH_MAX:,}. Choose a shorter "
                     "one.")
  long = [part for part in encoded.split(b"/") if len(part) > NAME_MAX]
  if long:
    shown = os.fsdecode(long[0])
    raise ValueError(f"`{key}`: {shown[:40]!r}… is {len(long[0])} bytes long; a file or directory name holds at most "
                     f"{NAME_MAX} bytes (in UTF-8). Choose a shorter one.")


def _section(kind: type, data: Mapping[str, Any], name: str, source: str) -> Any:
  fields = {f.name: f for f in dataclasses.fields(kind)}
  unknown = sorted(set(data) - set(fields), key=str)
  if unknown:
    raise ValueError(f"{source}: unknown key(s) {[f'{name}.{k}' for k in unknown]}; allowed `{name}` keys: "
                     f"{list(fields)}.")
  hints = typing.get_type_hints(kind)
  values = {}
  for key, value in data.items():
    what = type_name(hints[key])
    if what.startswith("a number"):
      what = "a finite number" + what[len("a number"):]
    try:
      values[key] = _check(hints[key], value)
    except TypeError:
      raise TypeError(f"{source}: `{name}.{key}` must be {what}, got {value!r} ({type(value).__name__}).") from None
    meta = fields[key].metadata
    if meta["choices"] and values[key] not in meta["choices"]:
      raise ValueError(f"{source}: `{name}.{key}` must be one of {list(meta['choices'])}, got {value!r}.")
    if meta["range"] is not None and values[key] is not None and values[key] not in meta["range"]:
      kind_word = "an integer" if hints[key] in (int, int | None) else "a number"
      raise ValueError(f"{source}: `{name}.{key}` must be {kind_word} {meta['range']}, got {values[key]!r}.")
  for key, value in values.items():
    if value is not None and (f"{name}.{key}" in PATH_KEYS or (name, key) == ("outputs", "adapter_name")):
      try:
        check_path(value, f"{name}.{key}", name=key == "adapter_name")
      except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
  for key in ("dir", "adapter_set") if name == "outputs" else ():
    if values.get(key) is not None and not values[key].strip():
      raise ValueError(f"{source}: `outputs.{key}` must be a directory path, got {values[key]!r}.")
  if name == "outputs" and values.get("adapter_name") is not None:
    try:
      check_name(values["adapter_name"])
    except ValueError as e:
      raise ValueError(f"{source}: `outputs.adapter_name`: {e}") from None
  try:
    return kind(**values)
  except ValueError as e:  # the section's own checks (`MeshConfig`)
    raise ValueError(f"{source}: {e}") from None
