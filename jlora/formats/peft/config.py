"""`adapter_config.json` both ways: a `LoraConfig` as PEFT must read it, and PEFT's as jlora must apply it.

PEFT selects modules by its own (PyTorch) names, jlora by Flax paths. Where a
name-based field would select different modules on the other side, it is
rewritten to an explicit list: `save_peft` lists the saved modules' PEFT names,
`load_peft` their Flax paths (`target_modules`, `rank_pattern`, `alpha_pattern`,
`modules_to_save`, `trainable_token_indices`).
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Mapping
from typing import Any

from jlora.core.config import LoraConfig
from jlora.core.fields import ALL_LINEAR, rewrites_base
from jlora.core.targets import adapter_path, is_saved, matches
from jlora.core.tree import KERNEL_KEYS, Params, flatten

__all__ = ["to_peft", "from_peft", "to_jlora"]

Path = tuple[str, ...]


def _has_separator(names: Any) -> bool:
  return any(re.search(r"[./]", n) for n in names)


def to_peft(config: LoraConfig, params: Params, *, adapted: Mapping[Path, list[str]], ranks: Mapping[str, int],
            alphas: Mapping[str, float], saved_modules: list[str], fan_in_fan_out: bool,
            tokens: Mapping[str, list[int]] | None = None, parameters: list[str] | None = None) -> dict[str, Any]:
  """The `adapter_config.json` dict that makes PEFT wrap exactly the adapted modules with their ranks.

  Args:
    config: the jlora config.
    params: the params with adapters.
    adapted: `{Flax module path: [PEFT names, one per layer]}` of the adapted modules.
    ranks: `{PEFT name: r}` where it differs from `config.r` (PEFT's `rank_pattern`).
    alphas: `{PEFT name: alpha}` where it differs from `config.lora_alpha`.
    saved_modules: PEFT names of the `modules_to_save` modules.
    fan_in_fan_out: an adapted module stores its PyTorch weight `(in, out)` (GPT-2's `Conv1D`).
    tokens: `{PEFT name: ids}` of the tables with trainable tokens (PEFT's `trainable_token_indices`, dict form).
    parameters: PEFT names (`module.param`) of the adapted target parameters (`target_parameters`).
  """
  data = config.to_dict()
  data["target_parameters"] = sorted(parameters) if parameters else None
  targets = config.target_modules
  keep = isinstance(targets, tuple) and not _has_separator(targets)
  if keep and config.layers_to_transform is None and config.exclude_modules is None:
    with_weights = {p[:-1] for p in flatten(params) if p[-1] in KERNEL_KEYS}
    keep = {p for p in with_weights if p[-1] in targets} == set(adapted)
  if not keep:
    data.update(target_modules=sorted(n for names in adapted.values() for n in names) or None, exclude_modules=None,
                layers_to_transform=None, layers_pattern=None)
  if config.modules_to_save and _has_separator(config.modules_to_save):
    data["modules_to_save"] = sorted(set(saved_modules))
  data["rank_pattern"], data["alpha_pattern"] = dict(ranks), dict(alphas)
  if fan_in_fan_out:
    data["fan_in_fan_out"] = True
  data["trainable_token_indices"] = dict(tokens) if tokens else None
  if data["init_lora_weights"] not in (True, False, "gaussian"):  # PEFT would run them (or rewrite the base) at load
    data["init_lora_weights"] = True
    data["eva_config"] = None  # an init's settings go with it (PEFT warns about an eva_config without "eva")
  return data


def from_peft(data: Mapping[str, Any]) -> LoraConfig:
  """PEFT's config as a `LoraConfig` (PEFT names kept); keys for features switched off are dropped.

  Any initialisation loads (`"orthogonal"`, `"eva"`, `"loftq"`, PiSSA / OLoRA / CorDA saved converted, which
  PEFT writes as `true`, ...): it mattered when training started; the file holds A and B as trained. An adapter
  whose init rewrote the base and that was saved unconverted is refused, and a LoftQ one warns (both belong to a
  base other than the original weights).

  Raises:
    ValueError: a feature jlora does not implement is switched on, an adapter saved unconverted over the residual
      base its init wrote, or a value is invalid.
  """
  fields = {f.name for f in dataclasses.fields(LoraConfig)}
  if data.get("target_parameters") and data.get("target_modules") == []:  # PEFT's "no module, only parameters"
    data = {**data, "target_modules": None}
  # Newer PEFT versions write keys for features jlora does not know; switched off, they mean nothing here.
  config = LoraConfig.from_dict({k: v for k, v in data.items() if k in fields or v not in (None, False, {}, [])})
  init = config.init_lora_weights
  if rewrites_base(init):
    raise ValueError(
        f"load_peft: the adapter's config has init_lora_weights={init!r}: that init moved part of each base weight "
        "into the adapter, and the adapter was saved unconverted, so it computes the trained model only over the "
        "rewritten (residual) base PEFT made, not over the model's own weights. Save it converted in PEFT: "
        "peft_model.save_pretrained(out_dir, path_initial_model_for_weight_conversion=init_dir), init_dir holding "
        "the adapter saved right after init (with init_lora_weights=True); that plain LoRA adapter of rank 2r loads "
        "here. If `params` is that residual base itself, set \"init_lora_weights\": true in adapter_config.json."
    )
  if init == "loftq":
    warnings.warn(
        "load_peft: a LoftQ adapter (init_lora_weights='loftq') was initialised to make up for the quantization "
        "error of the base PEFT quantized with it: it computes the fine-tuned model over that quantized backbone "
        "(usually published with the adapter), not over the original full-precision weights.", UserWarning,
        stacklevel=4)
  return config


def to_jlora(config: LoraConfig, ranks: Mapping[Path, int], alphas: Mapping[Path, float],
             full: Mapping[Path, Any], tokens: Mapping[Path, tuple[int, ...]] | None = None, *,
             parameters: Mapping[Path, tuple[int, float]] | None = None) -> LoraConfig:
  """The inverse of `to_peft`: PEFT's config with names rewritten to Flax paths where they would select otherwise.

  Args:
    config: `from_peft(data)`.
    ranks: `{Flax module path: r}` of every adapter read.
    alphas: `{Flax module path: alpha}` of every adapter read.
    full: the Flax paths of the trained biases and `modules_to_save` leaves read.
    tokens: `{Flax module path: ids}` of the trainable tokens read.
    parameters: `{Flax parameter path: (r, alpha)}` of the target parameters' adapters read (`target_parameters`
      becomes exactly these paths).

  Raises:
    ValueError: the file holds trained biases but its config says `bias='none'`.
  """
  changes: dict[str, Any] = {}
  paths = sorted(ranks)
  parameters = dict(parameters or {})
  if config.target_parameters or parameters:
    changes["target_parameters"] = tuple("/".join(p) for p in sorted(parameters)) or None
    ranks, alphas = dict(ranks), dict(alphas)
    for p, (r, a) in parameters.items():  # named as jlora names the adapter: its module's, or module/param
      where = adapter_path(p[:-1], p[-1])
      ranks[where], alphas[where] = r, a
  if not paths and parameters:
    changes.update(target_modules=None, exclude_modules=None, layers_to_transform=None, layers_pattern=None)
  elif config.target_modules != ALL_LINEAR and not all(
      matches(config.target_modules, p) and not matches(config.exclude_modules, p) for p in paths):
    changes.update(target_modules=tuple("/".join(p) for p in paths), exclude_modules=None, layers_to_transform=None,
                   layers_pattern=None)
  if any(config.rank_for("/".join(p)) != r for p, r in ranks.items()):
    changes["rank_pattern"] = {"/".join(p): r for p, r in ranks.items() if r != config.r}
  if any(config.alpha_for("/".join(p)) != a for p, a in alphas.items()):
    changes["alpha_pattern"] = {"/".join(p): a for p, a in alphas.items() if a != config.lora_alpha}
  saved_modules = {p[:-1] for p in full if p[-1] != "bias"}
  if saved_modules and not all(is_saved(config, m) for m in saved_modules):
    changes["modules_to_save"] = tuple(sorted("/".join(m) for m in saved_modules))
  if config.trainable_token_indices is not None or tokens:
    changes["trainable_token_indices"] = {"/".join(p): ids for p, ids in tokens.items()} if tokens else None
  biases = sorted("/".join(p) for p in full if p[-1] == "bias" and p[:-1] not in saved_modules)
  if biases and config.bias == "none":
    shown = ", ".join(biases[:6]) + (f" … and {len(biases) - 6} more" if len(biases) > 6 else "")
    raise ValueError(
        f"load_peft: the adapter holds trained biases ({shown}) but its config has bias='none'; the files do not "
        "belong together."
    )
  return dataclasses.replace(config, **changes)
