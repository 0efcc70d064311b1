"""`LoraConfig`: PEFT's LoRA settings, validated and immutable, and their JSON / YAML forms.

The field names and their meaning follow Hugging Face PEFT's `LoraConfig`, so a
PEFT `adapter_config.json` loads as is and a config written here loads in PEFT.
Each field's checks live in `jlora.core.fields`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from jlora.core.fields import FrozenMapping, TargetSpec, TaskType, normalize, pattern_lookup
from jlora.core.safe_load import load_json, load_yaml
from jlora.formats import atomic as _io

__all__ = ["LoraConfig"]


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
    target_parameters: weights to adapt by their parameter's name, PEFT's rule: an
      entry matches the parameter path `module/.../name` (written with `.` or `/`)
      when it equals it or a trailing part of it (`"experts.w"`, `"moe/experts/w"`).
      A 2-D match is an `(in, out)` weight (one LoRA pair); a 3-D one a stack of
      expert weights `(experts, in, out)`, with one rank-`r` adapter per expert
      (see docs/moe.md); `nn.scan` may add one leading axis. Not a regex;
      independent of `target_modules` (which may stay None), `exclude_modules` and
      `layers_to_transform`. As in PEFT, it refuses `lora_dropout`, `use_dora` and
      `fan_in_fan_out`.
    layers_to_transform: only adapt layers with these indices.
    layers_pattern: the name of the layer list (`"layers"`, `"h"`, `"block"`) whose
      index `layers_to_transform` reads: a path component `layers_3` or `layers3`,
      or `layers` followed by a component `3`, gives 3. Without it, the first
      component (other than the module's own name) that is a number or ends in
      `_N` gives the index. A scanned (`nn.scan`) stack's path gives none: its
      layer `i` is index `i` of the stack's first axis (with `layers_pattern`,
      when a component of its path is the pattern itself, e.g. `model/layers/...`).
    rank_pattern: `{key: rank}` overrides; a key is a regex that matches a module
      path equal to it or ending with it (PEFT's `(.*\\.)?key$`); the first matching
      key in the mapping's order wins, as in PEFT.
    alpha_pattern: `{key: alpha}` overrides, matched like `rank_pattern`.
    bias: `"none"`, `"all"` (every bias of the model trains and is saved) or
      `"lora_only"` (only the biases of adapted layers).
    use_rslora: scale by `lora_alpha / sqrt(r)` (rank-stabilized LoRA).
    use_dora: DoRA (weight-decomposed LoRA): a trainable magnitude per output
      feature, `y = m ⊙ (W0 + s·A·B)x / ‖W0 + s·A·B‖` with the norm taken over
      each output's inputs and treated as a constant in the backward pass, as
      in PEFT (linen models: `jlora.init` / `jlora.apply`).
    init_lora_weights: `True` (A kaiming-uniform, B zero), `"gaussian"`
      (A ~ N(0, (1/r)²), B zero), `False` (B non-zero too; for tests only),
      `"orthogonal"` (A, B non-zero, of rank r/2, `A·B = 0`; r even), `"pissa"`
      (A, B from the top-r SVD of W0; the residual replaces W0), `"pissa_niter_[n]"`
      (the same by a randomized SVD of n iterations) or `"olora"` (A, B from the QR
      decomposition of W0; the residual replaces W0) or `"loftq"` (LoftQ, with
      `loftq_config`: each targeted kernel becomes its NF4 or int8 quantization
      `Q` and A, B the top-r SVD of what quantizing lost, so `deq(Q) + s·A·B ≈ W0`:
      QLoRA's base with an adapter that starts by making up for the rounding).
      `"eva"` (EVA: A from the principal components of each layer's inputs over a
      few batches, ranks redistributed by explained variance) runs in
      `jlora.init_eva`, which reads data. PEFT's `"corda"`, `"astra"`, `"lora_ga"`,
      `"mica"` and `"nora"` are accepted as the history of a trained adapter
      (`jlora.load_peft`); `jlora.init` refuses them (and `"eva"`).
    loftq_config: LoftQ's settings (PEFT's `LoftQConfig` as a dict): `loftq_bits`
      4 (NF4, blocks of 64, double-quantized scales) or 8 (int8 per output channel),
      and `loftq_iter` (alternations of quantizing and SVD, >= 1).
    eva_config: EVA's settings (PEFT's `EvaConfig` as a dict, missing keys filled
      with its defaults): `rho` (>= 1; a layer's rank may grow to `round(r·rho)`),
      `tau` (the cosine similarity between two steps' components at which they
      have converged), `use_label_mask` / `label_mask_value` (tokens whose label is
      the value are left out), `whiten` (components divided by the square root of
      their singular values), `adjust_scaling_factors` (`lora_alpha` scaled with a
      layer's new rank, so its scale stays `lora_alpha / r`).
    modules_to_save: modules (matched like a `target_modules` list) whose every
      parameter trains fully and is saved with the adapter, e.g. a new classifier.
    trainable_token_indices: rows of an embedding that train, the rest frozen
      (e.g. new chat tokens): a list of token ids, for the model's input
      embedding (its only `nn.Embed`, else the one named `embed_tokens`), or
      `{module name or path suffix: [ids]}`. Each such module gets one
      `trainable_tokens` leaf `(n_ids, dim)` beside its table, zero at init; the
      lookup (and a tied head's `attend`) sees `table.at[ids].add(delta)`.
      Stored as a tuple, or a `{name: tuple}` mapping.
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
  use_dora: bool = False
  init_lora_weights: bool | str = True
  loftq_config: FrozenMapping | None = None
  eva_config: FrozenMapping | None = None
  modules_to_save: tuple[str, ...] | None = None
  trainable_token_indices: tuple[int, ...] | FrozenMapping | None = None
  task_type: TaskType | None = None
  fan_in_fan_out: bool = False
  inference_mode: bool = False
  base_model_name_or_path: str | None = None
  revision: str | None = None
  target_parameters: tuple[str, ...] | None = None

  def __post_init__(self):
    norm = normalize(self)
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
        value = {k: list(v) if isinstance(v, tuple) else v for k, v in value.items()}
      elif isinstance(value, TaskType):
        value = value.value
      out[f.name] = value
    if out["layers_pattern"] is not None and len(out["layers_pattern"]) == 1:
      out["layers_pattern"] = out["layers_pattern"][0]
    if out["loftq_config"] is None:
      out["loftq_config"] = {}  # PEFT's default
    return out

  def to_json(self, path: str | os.PathLike | None = None) -> str:
    """Serializes to PEFT's JSON (pattern keys in their order); writes it atomically to `path` when given."""
    data = self.to_dict()
    text = json.dumps({k: data[k] for k in sorted(data)}, indent=2)
    if path is not None:
      _io.write_text(path, text + "\n")
    return text

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> LoraConfig:
    """Builds a config from a PEFT-style dict.

    Unknown keys are ignored with a warning. PEFT's keys that configure an
    initialisation jlora does not run (`corda_config`, ...) are dropped:
    they mattered when training started, not to the adapter a file holds. PEFT
    features and variants whose forward is not plain LoRA or DoRA (LoRA bias,
    QA-LoRA, BD-LoRA, KaSA, VeLoRA, MonteCLoRA, aLoRA, Arrow, ...) raise, naming
    the variant, when they are switched on.

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
              f"`{key}`={value!r} asks for {_UNSUPPORTED[key][1]}, which jlora does not implement: an "
              "adapter trained with it does not compute plain LoRA (or DoRA), so jlora refuses it rather than run "
              f"it wrong. For a new run, remove the key or set it to {_UNSUPPORTED[key][0]!r}."
          )
      elif key not in _PEFT_IGNORED:
        unknown.append(key)
    if unknown:
      warnings.warn(f"LoraConfig: ignoring unknown keys {sorted(unknown)}.", UserWarning, stacklevel=2)
    return cls(**kwargs)

  @classmethod
  def from_json(cls, path_or_text: str | os.PathLike) -> LoraConfig:
    """Loads PEFT's `adapter_config.json` from a file path, or JSON text (a string starting with `{`).

    Raises:
      FileNotFoundError: no file at the path.
      ValueError: the file is not valid JSON (the message names the file, line and column),
        holds a key twice (both lines), or holds an invalid config.
    """
    text, source = _read_text(path_or_text, inline=lambda t: t.lstrip().startswith("{"))
    return cls._from_parsed(load_json(text, where=source), source)

  @classmethod
  def from_yaml(cls, path_or_text: str | os.PathLike) -> LoraConfig:
    """Loads from a YAML file path or YAML text (a string with a newline or `key: value`).

    Read with YAML's safe loader and jlora's bounds: `1e3`, `1e-3`, `.5` and `5.`
    are numbers; a key given twice, more than 100,000 values after expanding
    aliases, more than 64 levels or 256 KiB of text is refused with one line
    naming the key (and line).

    Raises:
      FileNotFoundError: no file at the path.
      ValueError: not valid YAML (the message names the line), a key that appears twice
        (both lines), a config that expands past 100,000 values (aliases), or an invalid config.
    """
    text, source = _read_text(path_or_text, inline=lambda t: "\n" in t or ": " in t or t.lstrip().startswith("{"))
    data = load_yaml(text, where=source)
    return cls._from_parsed({} if data is None else data, source)

  @classmethod
  def _from_parsed(cls, data: Any, source: str) -> LoraConfig:
    if not isinstance(data, Mapping):
      raise ValueError(f"{source} must hold a mapping of LoraConfig fields, got {type(data).__name__}.")
    try:
      return cls.from_dict(data)
    except (TypeError, ValueError) as e:
      raise type(e)(f"{source}: {e}") from None


def _read_text(path_or_text: str | os.PathLike, inline: Callable[[str], bool]) -> tuple[str, str]:
  """`(text, source)`: a file's text, or the argument itself where `inline(it)` says it is text, not a path."""
  if isinstance(path_or_text, str) and inline(path_or_text):
    return path_or_text, "the config text"
  if not isinstance(path_or_text, (str, os.PathLike)):
    raise TypeError(f"`path_or_text` expects a file path or text, got {type(path_or_text).__name__}.")
  path = os.fspath(path_or_text)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"`path_or_text`: no file at {path!r}.")
  with open(path, encoding="utf-8") as f:
    return f.read(), repr(path)


# PEFT keys of features jlora does not implement, each changing what the adapted layer computes or what the file
# holds (PEFT 0.22: every LoraConfig field tagged `is_lora_variant` but `use_dora`, and the rest below):
# (default, description).
_UNSUPPORTED = {
    "lora_bias": (False, "a trainable bias on lora_B"),
    "layer_replication": (None, "layer replication"),
    "use_qalora": (False, "QA-LoRA (A reads group-pooled inputs)"),
    "megatron_config": (None, "Megatron parallel layers"),
    "alora_invocation_tokens": (None, "activated LoRA (aLoRA: the adapter acts only from its invocation tokens on)"),
    "arrow_config": (None, "Arrow routing (a router over several adapters)"),
    "use_bdlora": (None, "BD-LoRA (block-diagonal A or B factors)"),
    "kasa_config": (None, "KaSA (a trained diagonal between A and B, over a base with its r smallest singular "
                          "directions removed)"),
    "velora_config": (None, "VeLoRA (a compressed backward pass for A, and its projection state in the file)"),
    "monteclora_config": (None, "MonteCLoRA (Monte Carlo perturbations of A in training, and its sampler in the "
                                "file)"),
}
# PEFT keys that carry no meaning for a jlora config and are dropped silently: bookkeeping, and the settings of an
# initialisation (which mattered when training started; `init_lora_weights` itself is kept).
_PEFT_IGNORED = {
    "auto_mapping", "megatron_core", "runtime_config", "qalora_group_size",
    "ensure_weight_tying", "layers_pattern_hint", "peft_version",
    "corda_config", "astra_config", "lora_ga_config",
}


def _is_enabled(value: Any, default: Any) -> bool:
  return not (value == default or value is None or value is False or value == {} or value == [])
