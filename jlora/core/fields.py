"""The values of `LoraConfig`'s fields: their types, their checks, and PEFT's pattern-matching rule.

`normalize` validates every field once, at construction, so that every later use
can trust the config: ranks and alphas are positive and finite, regexes compile,
names are strings, and the enum-like fields hold one of their allowed values.
"""

from __future__ import annotations

import enum
import functools
import math
import numbers
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

__all__ = ["ALL_LINEAR", "BIAS_MODES", "DATA_INITS", "DEFAULT_TARGET_MODULES", "EVA_DEFAULTS", "INIT_METHODS", "LOFTQ_BITS",
           "PEFT_ONLY_INITS",
           "FrozenMapping", "TaskType", "default_target_modules", "normalize",
           "pattern_lookup", "pissa_niter", "rewrites_base"]

BIAS_MODES = ("none", "all", "lora_only")
# The initialisations `jlora.init` runs (and `"pissa_niter_[n]"`, n >= 0: PiSSA by a randomized SVD).
INIT_METHODS = (True, False, "gaussian", "orthogonal", "pissa", "olora", "loftq")
# PEFT's other values of `init_lora_weights`: a config read from a trained adapter may name them (its A and B are
# loaded, not initialised); `jlora.init` refuses them.
PEFT_ONLY_INITS = ("corda", "astra", "lora_ga", "mica", "nora")
# Data-driven inits jlora runs outside `jlora.init`: "eva" in `jlora.init_eva` (and `jlora train`).
DATA_INITS = ("eva",)
# PEFT's `EvaConfig`, as the mapping `LoraConfig.eva_config` holds (every key filled in).
EVA_DEFAULTS = {"rho": 2.0, "tau": 0.99, "use_label_mask": True, "label_mask_value": -100, "whiten": False,
                "adjust_scaling_factors": True}
# Those that move part of W0 into the adapter at init (PEFT's `path_initial_model_for_weight_conversion` converts
# them): such an adapter belongs to the rewritten base, not to the original. (LoftQ's adapter belongs to its
# quantized base, which it was fitted to, and is kept with it.)
_REWRITE_BASE = ("pissa", "olora", "corda", "astra", "lora_ga")
LOFTQ_BITS = {4: "nf4", 8: "int8"}  # `loftq_config["loftq_bits"]` -> the jlora quantization of the base
ALL_LINEAR = "all-linear"
# The modules PEFT adapts when `target_modules` is not given, by Hugging Face `model_type` (PEFT 0.22's
# TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, for the architectures with Flax or jlora models): the
# attention's query and value projections, or the fused projection that holds them.
_QV = ("q_proj", "v_proj")
DEFAULT_TARGET_MODULES = {
    **dict.fromkeys(("llama", "llama4", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
                     "opt", "bart", "gptj", "gpt_neo", "stablelm"), _QV),
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra"), ("query", "value")),
    **dict.fromkeys(("t5", "mt5"), ("q", "v")),
    **dict.fromkeys(("gpt2", "gpt_bigcode"), ("c_attn",)),
    **dict.fromkeys(("bloom", "falcon", "gpt_neox"), ("query_key_value",)),
    "deberta-v2": ("query_proj", "value_proj"),
    "phi": ("q_proj", "v_proj", "fc1", "fc2"),
}


def default_target_modules(model_type: str) -> tuple[str, ...]:
  """The modules PEFT adapts in a Hugging Face `model_type` when `target_modules` is not given.

  `jlora.LoraConfig(target_modules=jlora.default_target_modules("llama"))` is PEFT's
  `LoraConfig()` for a Llama model: `("q_proj", "v_proj")`. (A jlora config is
  immutable and names its targets, so that `init`, `apply`, `merge` and the files
  agree: PEFT fills them in at `get_peft_model`, jlora asks for them here.)

  Raises:
    ValueError: a `model_type` without a default (the message lists those with one).
  """
  if model_type not in DEFAULT_TARGET_MODULES:
    raise ValueError(f"`model_type`={model_type!r} has no default target modules (PEFT's mapping, for the types with "
                     f"Flax or jlora models: {sorted(DEFAULT_TARGET_MODULES)}); name them, e.g. "
                     "target_modules=\"all-linear\".")
  return DEFAULT_TARGET_MODULES[model_type]


def pissa_niter(init: Any) -> int | None:
  """`n` of `init_lora_weights="pissa_niter_[n]"` (PiSSA by a randomized SVD of `n` subspace iterations), else None."""
  match = re.fullmatch(r"pissa_niter_(\d+)", init) if isinstance(init, str) else None
  return None if match is None else int(match.group(1))


def rewrites_base(init: Any) -> bool:
  """Whether an `init_lora_weights` value rewrites the base kernels at init (PiSSA, its fast form, OLoRA, and PEFT's
  CorDA, Astra and LoRA-GA): the adapter then belongs to that residual base, not to the original weights."""
  return isinstance(init, str) and (init in _REWRITE_BASE or pissa_niter(init) is not None)


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
  """A read-only, hashable `str -> value` mapping (`rank_pattern` / `alpha_pattern`, `trainable_token_indices`).

  Its order is part of its value: the first matching key wins (PEFT's rule), so two
  mappings with the same items in another order are different configs.
  """

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
    return hash(tuple(self._items.items()))

  def __eq__(self, other: object) -> bool:
    return isinstance(other, Mapping) and list(self._items.items()) == list(other.items())

  def __repr__(self) -> str:
    return repr(self._items)


TargetSpec = str | tuple[str, ...] | None


@functools.lru_cache(maxsize=1024)
def _pattern_regex(key: str) -> re.Pattern:
  """PEFT's `(.*\\.)?key$` for a `rank_pattern` / `alpha_pattern` key (also with `/` separators)."""
  return re.compile(rf"(?:.*[./])?(?:{key})")


def pattern_lookup(pattern: Mapping[str, Any], path: str, default: Any) -> Any:
  """PEFT's `rank_pattern`/`alpha_pattern` lookup for a module path (`a/b/c` or `a.b.c`).

  The first key, in the mapping's order, whose regex matches the whole path or a
  trailing part of it after a separator (PEFT's `(.*\\.)?key$`) gives the value;
  otherwise `default`. This is PEFT's `get_pattern_key` rule: with overlapping keys,
  order decides, not length.
  """
  forms = {path.replace("/", "."), path.replace(".", "/")}
  for key, value in pattern.items():
    regex = _pattern_regex(key)
    if any(regex.fullmatch(form) for form in forms):
      return value
  return default


def _compiles(name: str, regex: str) -> None:
  try:
    re.compile(regex)
  except re.error as e:
    raise ValueError(f"`{name}`: {regex!r} is not a valid regular expression ({e}); escape special characters "
                     "such as `.` and `(` with a backslash, or give a list of module names.") from None


def _targets(name: str, value: Any) -> TargetSpec:
  if value is None:
    return None
  if isinstance(value, str):
    if not value:
      raise ValueError(f"`{name}` is an empty string; give a module name list or a regex.")
    if value != ALL_LINEAR:
      _compiles(name, value)
    return value
  if isinstance(value, (Sequence, set, frozenset)) and all(isinstance(v, str) and v for v in value):
    if not value:
      raise ValueError(f"`{name}` is empty; give at least one module name, a regex or 'all-linear'.")
    return tuple(sorted(value)) if isinstance(value, (set, frozenset)) else tuple(value)
  raise TypeError(
      f"`{name}` must be a list of module names or a regex string, got {value!r}; "
      f"e.g. {name}=[\"q\", \"v\"]."
  )


def _ids(name: str, value: Any) -> tuple[int, ...]:
  """A non-empty list of distinct token ids (ints >= 0) as a tuple."""
  fix = f"e.g. {name}=[32000, 32001] (the ids of the tokens whose embedding rows train)"
  if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (Sequence, set, frozenset)) or not value:
    raise ValueError(f"`{name}` must be a non-empty list of token ids, got {value!r}; {fix}.")
  ids = []
  for i in value:
    if isinstance(i, bool) or not isinstance(i, numbers.Integral) or i < 0:
      raise ValueError(f"`{name}` must hold token ids (ints >= 0), got {i!r} in {value!r}; {fix}.")
    ids.append(int(i))
  twice = sorted({i for i in ids if ids.count(i) > 1})
  if twice:
    raise ValueError(f"`{name}` names the token ids {twice} more than once; each row trains once, list it once.")
  return tuple(sorted(ids)) if isinstance(value, (set, frozenset)) else tuple(ids)


def _token_indices(value: Any) -> tuple[int, ...] | FrozenMapping | None:
  """`trainable_token_indices`: None, a list of ids (the input embedding), or `{module name: [ids]}`."""
  if value is None:
    return None
  if isinstance(value, Mapping):
    if not value:
      raise ValueError("`trainable_token_indices` is an empty mapping; give {module name: [token ids]}, a list of "
                       "ids (for the input embedding), or None.")
    for key in value:
      if not isinstance(key, str) or not key:
        raise TypeError(f"`trainable_token_indices` keys must be module names (e.g. 'embed_tokens'), got {key!r}.")
    return FrozenMapping({k: _ids(f"trainable_token_indices[{k!r}]", v) for k, v in value.items()})
  return _ids("trainable_token_indices", value)


def _loftq_config(value: Any) -> FrozenMapping | None:
  """PEFT's `LoftQConfig` as a mapping: `{"loftq_bits": 4 or 8, "loftq_iter": n >= 1}` (None or `{}`: unset)."""
  if value is None or (isinstance(value, Mapping) and not value):
    return None
  fix = "e.g. loftq_config={'loftq_bits': 4, 'loftq_iter': 1}"
  if not isinstance(value, Mapping) or set(value) - {"loftq_bits", "loftq_iter"}:
    raise ValueError(f"`loftq_config` must be a mapping with keys 'loftq_bits' and 'loftq_iter' (PEFT's LoftQConfig), "
                     f"got {value!r}; {fix}.")
  bits, iters = value.get("loftq_bits", 4), value.get("loftq_iter", 1)
  if isinstance(bits, bool) or bits not in LOFTQ_BITS:
    raise ValueError(f"`loftq_config['loftq_bits']` must be 4 (an NF4 base) or 8 (int8), got {bits!r}; {fix}.")
  if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
    raise ValueError(f"`loftq_config['loftq_iter']` must be an int >= 1 (alternations of quantizing and SVD), got "
                     f"{iters!r}; {fix}.")
  return FrozenMapping({"loftq_bits": int(bits), "loftq_iter": iters})


def _eva_config(value: Any) -> FrozenMapping | None:
  """PEFT's `EvaConfig` as a mapping, every key filled in from `EVA_DEFAULTS` (None or `{}`: unset)."""
  if value is None or (isinstance(value, Mapping) and not value):
    return None
  fix = "e.g. eva_config={'rho': 2.0, 'tau': 0.99}"
  if not isinstance(value, Mapping) or set(value) - set(EVA_DEFAULTS):
    raise ValueError(f"`eva_config` must be a mapping with keys from {sorted(EVA_DEFAULTS)} (PEFT's EvaConfig), got "
                     f"{value!r}; {fix}.")
  out = {**EVA_DEFAULTS, **value}
  for name in ("rho", "tau"):
    v = out[name]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
      raise ValueError(f"`eva_config[{name!r}]` must be a number, got {v!r}; {fix}.")
    out[name] = float(v)
  if out["rho"] < 1.0:
    raise ValueError(f"`eva_config['rho']` must be >= 1.0 (a layer's rank may grow to r·rho), got {out['rho']!r}; "
                     "rho=1.0 keeps every layer at its rank.")
  if not 0.0 <= out["tau"] <= 1.0:
    raise ValueError(f"`eva_config['tau']` must be in [0, 1] (the cosine similarity at which a component has "
                     f"converged), got {out['tau']!r}; e.g. tau=0.99.")
  for name in ("use_label_mask", "whiten", "adjust_scaling_factors"):
    if not isinstance(out[name], bool):
      raise ValueError(f"`eva_config[{name!r}]` must be True or False, got {out[name]!r}.")
  if isinstance(out["label_mask_value"], bool) or not isinstance(out["label_mask_value"], int):
    raise ValueError(f"`eva_config['label_mask_value']` must be an int (the label of ignored tokens), got "
                     f"{out['label_mask_value']!r}; e.g. -100.")
  return FrozenMapping(out)


def _pattern(name: str, value: Any, number_type: type) -> FrozenMapping:
  if value is None:
    return FrozenMapping()
  if not isinstance(value, Mapping):
    raise TypeError(f"`{name}` must be a mapping of module name to value, got {type(value).__name__}.")
  for key, v in value.items():
    if not isinstance(key, str) or not key:
      raise TypeError(f"`{name}` keys must be non-empty module names, got {key!r}.")
    _compiles(f"{name}[{key!r}]", key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
      raise ValueError(f"`{name}[{key!r}]` must be a positive, finite number, got {v!r}.")
    if number_type is int and int(v) != v:
      raise ValueError(f"`{name}[{key!r}]` must be an integer rank, got {v!r}.")
  return FrozenMapping({k: number_type(v) for k, v in value.items()})


def normalize(cfg: Any) -> dict[str, Any]:
  """Validates every field of a `LoraConfig`; returns the normalized values (lists as tuples, ...)."""
  out: dict[str, Any] = {}
  if isinstance(cfg.r, bool) or not isinstance(cfg.r, int) or cfg.r <= 0:
    raise ValueError(f"`r` must be a positive integer (the adapter rank), got {cfg.r!r}; e.g. r=8.")
  alpha = cfg.lora_alpha
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < math.inf:
    raise ValueError(f"`lora_alpha` must be a positive, finite number, got {alpha!r}; e.g. lora_alpha=16.")
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
  known = (*INIT_METHODS, *DATA_INITS, *PEFT_ONLY_INITS)
  if not any(init is m or (isinstance(m, str) and init == m) for m in known) and pissa_niter(init) is None:
    raise ValueError(
        f"`init_lora_weights` must be one of {', '.join(map(repr, INIT_METHODS))} or 'pissa_niter_[n]' (what "
        f"jlora.init runs), 'eva' (jlora.init_eva), or PEFT's {', '.join(map(repr, PEFT_ONLY_INITS))} (what a "
        f"trained adapter's config may name), got {cfg.init_lora_weights!r}."
    )
  out["init_lora_weights"] = init
  out["loftq_config"] = _loftq_config(cfg.loftq_config)
  out["eva_config"] = _eva_config(cfg.eva_config)

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
  out["trainable_token_indices"] = _token_indices(cfg.trainable_token_indices)
  for flag in ("use_rslora", "use_dora", "fan_in_fan_out", "inference_mode"):
    if not isinstance(getattr(cfg, flag), bool):
      raise TypeError(f"`{flag}` must be True or False, got {getattr(cfg, flag)!r}.")
  out["target_parameters"] = _parameters(cfg, out)
  return out


def _parameters(cfg: Any, out: Mapping[str, Any]) -> tuple[str, ...] | None:
  """`target_parameters`: a list of parameter names or path suffixes (no regex, as in PEFT), and PEFT's refusals
  for a `ParamWrapper` (its adapter is applied to the weight, so the input cannot be dropped out, and DoRA's norm and
  PyTorch's `fan_in_fan_out` layout do not apply), raised here rather than at the first use."""
  value = cfg.target_parameters
  if value is None:
    return None
  if isinstance(value, str) or not isinstance(value, (Sequence, set, frozenset)) or not value or not all(
      isinstance(v, str) and v for v in value):
    raise TypeError(f"`target_parameters` must be a non-empty list of parameter names or path suffixes (PEFT takes "
                    f"no regex here), got {value!r}; e.g. target_parameters=[\"experts.gate_up\", \"experts.down\"].")
  names = tuple(sorted(value)) if isinstance(value, (set, frozenset)) else tuple(value)
  refused = [(field, why) for field, bad, why in (
      ("lora_dropout", out["lora_dropout"] != 0.0, "the adapter is added to the weight, so no dropout of the "
       "layer's input can reach the LoRA term alone"),
      ("use_dora", cfg.use_dora, "DoRA's magnitude needs a layer's weight norm, which a raw parameter has not"),
      ("fan_in_fan_out", cfg.fan_in_fan_out, "a target parameter's layout is its own (2-D `(in, out)`, 3-D "
       "`(experts, in, out)`)"),
  ) if bad]
  if refused:
    field, why = refused[0]
    raise ValueError(f"`{field}`={getattr(cfg, field)!r} cannot be combined with `target_parameters` (as in PEFT, "
                     f"whose ParamWrapper refuses it): {why}. Set {field} to its default, or adapt these weights "
                     "through `target_modules`.")
  return names
