"""`jlora generate`: prompts through adapters of one base model, every (adapter, prompt) pair in one batch.

Each source (a positional argument, `PATH` or `NAME=PATH`) is one of:

* a `jlora train` run directory (`config.yaml` + `adapter/`): its adapter, named after
  the directory (`runs/sql` -> `sql`);
* an adapter checkpoint (a `jlora.save_adapter` directory such as `ADAPTER_SET/NAME`):
  named after the directory (`RUN_DIR/adapter` after the run);
* an adapter-set directory (subdirectories that are adapter checkpoints, as
  `outputs.adapter_set` writes): all its adapters, by their subdirectory names.

The base model and tokenizer are those of a run's `config.yaml` (`--base-run`, default
the first source that is a run or lies in one), rebuilt as `jlora merge` does
(`jlora.train._setup.base_model`). Every other run among the sources must have the same
base (the `model` section, and `train.seed` for a random init), and every adapter is
checked against the base by `jlora.load_adapter`. Only CAUSAL_LM runs generate.

The prompts are encoded with the run's tokenizer (a trailing end-of-sequence token
dropped), left-padded, repeated once per adapter (and once for the base model with
`--base`, named `__base__`) and decoded in ONE `jlora.models.generate` call with the
adapters stacked in a bank (`jlora.stack_adapters`): each row generates exactly what
that adapter generates alone (greedy decoding). Sampling (`temperature > 0`) is
reproducible for a given `seed` and batch, but not the same draw as generating alone.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

import jlora
import jlora.formats.checkpoint
from jlora import models
from jlora.adapters.adapter_set import BASE, check_name
from jlora.formats.checkpoint import MARKER
from jlora.train import _load, _model, _setup, _tasks
from jlora.train._schema import Config

__all__ = ["Completion", "Source", "generate", "parse_source", "read_prompts", "table"]


class Source(NamedTuple):
  """A positional argument: `path`, its `kind` (`run`, `adapter` or `set`) and the `name` given with `NAME=`."""

  path: str
  kind: str
  name: str | None = None


class Completion(NamedTuple):
  """One row of the output: the adapter (`'__base__'` for the base model), the prompt and what it generated."""

  adapter: str
  prompt: str
  completion: str
  tokens: list[int]


def _kind(path: str) -> str | None:
  if os.path.isfile(os.path.join(path, "config.yaml")):
    return "run"
  if os.path.isfile(os.path.join(path, MARKER)):
    return "adapter"
  if os.path.isdir(path) and any(os.path.isfile(os.path.join(path, e, MARKER)) for e in os.listdir(path)):
    return "set"
  return None


def parse_source(arg: str) -> Source:
  """`PATH` or `NAME=PATH` as a `Source`.

  Raises:
    ValueError: the path is none of the three kinds, or `NAME=` before an adapter-set directory.
  """
  name, path = None, arg
  if "=" in arg and not os.path.exists(arg):
    name, path = arg.split("=", 1)
    _name(name, f"`{arg}`")
  kind = _kind(path)
  if kind is None:
    raise ValueError(f"`{path}` is not a `jlora train` run directory (config.yaml + adapter/), an adapter checkpoint "
                     f"({MARKER}) or an adapter-set directory (subdirectories holding {MARKER}).")
  if kind == "set" and name is not None:
    raise ValueError(f"`{arg}`: NAME= names one adapter, but `{path}` is an adapter-set directory (its adapters keep "
                     "their subdirectory names).")
  return Source(path, kind, name)


def _name(name: str, where: str) -> str:
  try:
    return check_name(name)
  except ValueError as e:
    raise ValueError(f"{where}: {e} Give another name with NAME=PATH.") from None


def _run_of(source: Source) -> str | None:
  """The run directory a source lies in (a run itself, or a run's `adapter/`), if any."""
  if source.kind == "run":
    return source.path
  parent = os.path.dirname(os.path.abspath(source.path))
  return parent if source.kind == "adapter" and os.path.isfile(os.path.join(parent, "config.yaml")) else None


def _default_name(source: Source) -> str:
  path = os.path.abspath(source.path)
  run = _run_of(source)
  return os.path.basename(run if source.kind == "adapter" and run is not None else path)


def _config(run: str) -> Config:
  config = _load.load(os.path.join(run, "config.yaml"))
  task = getattr(config.lora.task_type, "value", config.lora.task_type)
  if task != "CAUSAL_LM":
    raise ValueError(f"`{run}` is a {task} run (`lora.task_type`); only CAUSAL_LM runs generate text.")
  return config


def _base_key(config: Config) -> dict[str, Any]:
  """What determines a run's base model: the `model` section, and `train.seed` for a random init."""
  model = config.to_dict()["model"]
  key = {f"model.{k}": v for k, v in model.items()}
  if config.model.source == "random":
    key["train.seed"] = config.train.seed
  return key


def _load_base(sources: Sequence[Source], base_run: str | None) -> tuple[Any, _model.Model]:
  """The base run's config and model, after checking every run among the sources has the same base."""
  runs = [r for r in map(_run_of, sources) if r is not None]
  if base_run is None:
    if not runs:
      raise ValueError("No run directory among the sources gives the base model; add --base-run RUN_DIR (a `jlora "
                       "train` run on the base model these adapters were trained on).")
    base_run = runs[0]
  elif not os.path.isfile(os.path.join(base_run, "config.yaml")):
    raise ValueError(f"--base-run: `{base_run}` is not a finished `jlora train` run directory (no config.yaml).")
  config = _config(base_run)
  key = _base_key(config)
  for run in runs:
    other = _base_key(_config(run))
    diff = sorted(k for k in set(key) | set(other) if key.get(k) != other.get(k))
    if diff:
      raise ValueError(f"`{run}` and `{base_run}` have different base models ({', '.join(diff)} differ); generate "
                       "with adapters of one base model at a time.")
  return config, _setup.base_model(config, _tasks.get(config.lora.task_type))


def _guarded(path: str, what: str, load: Any, *args: Any) -> Any:
  try:
    return load(*args)
  except ValueError as e:
    raise ValueError(f"`{path}`: {what}: {e}") from None


def _adapters(sources: Sequence[Source], base: _model.Model) -> jlora.AdapterSet:
  """The adapters of the sources, in order, each checked against the base and its task."""
  out, origin = jlora.AdapterSet(), {}
  for s in sources:
    if s.kind == "set":
      found = _guarded(s.path, "adapter set", jlora.load_adapter_set, s.path, base.params)
      entries = [(n, os.path.join(s.path, n), found.params(n, base.params), found.config(n)) for n in found.names]
    else:
      ckpt = os.path.join(s.path, "adapter") if s.kind == "run" else s.path
      if not os.path.isfile(os.path.join(ckpt, MARKER)):
        raise ValueError(f"`{s.path}` has config.yaml but no adapter checkpoint (adapter/); is the run finished?")
      name = s.name or _name(_default_name(s), f"`{s.path}`")
      entries = [(name, s.path, *_guarded(s.path, "adapter", jlora.formats.checkpoint.load_adapter, ckpt, base.params))]
    for name, where, params, config in entries:
      task = getattr(config.task_type, "value", config.task_type)
      if task not in (None, "CAUSAL_LM"):
        raise ValueError(f"`{where}`: adapter {name!r} is a {task} adapter; only CAUSAL_LM adapters generate text.")
      if name in origin:
        raise ValueError(f"Two adapters are named {name!r} (`{origin[name]}` and `{where}`); give one under another "
                         f"name as NAME=PATH, e.g. {name}-2={where} (a set's adapters can be given one by one).")
      origin[name] = where
      out = out.add(name, params, config)
  return out


def _encode(tokenizer: Any, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """Left-padded `(ids, mask)` of the prompts, each as the run's tokenizer encodes it minus a trailing EOS."""
  eos = getattr(tokenizer, "eos_token_id", None)
  seqs = []
  for i, text in enumerate(prompts):
    ids, mask = tokenizer.encode([text])
    seq = [int(t) for t, m in zip(ids[0], mask[0]) if m]
    if seq and eos is not None and seq[-1] == eos:
      seq = seq[:-1]
    if not seq:
      raise ValueError(f"Prompt {i + 1} ({text!r}) has no tokens; give a non-empty prompt.")
    seqs.append(seq)
  width, pad = max(map(len, seqs)), getattr(tokenizer, "pad_token_id", 0) or 0
  ids, mask = np.full((len(seqs), width), pad, np.int32), np.zeros((len(seqs), width), np.int32)
  for i, seq in enumerate(seqs):
    ids[i, width - len(seq):], mask[i, width - len(seq):] = seq, 1
  return ids, mask


def _eos_ids(tokenizer: Any, model: Any) -> list[int]:
  """The end-of-sequence ids: the tokenizer's, else the model config's (one id or several)."""
  eos = getattr(tokenizer, "eos_token_id", None)
  if eos is None:
    eos = getattr(getattr(model, "config", None), "eos_token_id", None)
  return [] if eos is None else [int(e) for e in (eos if isinstance(eos, (tuple, list)) else (eos,))]


def _check_options(max_new_tokens: int, temperature: float, top_k: int | None, seed: int) -> None:
  if max_new_tokens < 1:
    raise ValueError(f"--max-new-tokens must be >= 1, got {max_new_tokens}.")
  if not (math.isfinite(temperature) and temperature >= 0):
    raise ValueError(f"--temperature must be a finite number >= 0 (0: greedy), got {temperature}.")
  if top_k is not None and top_k < 1:
    raise ValueError(f"--top-k must be >= 1, got {top_k}.")
  if not 0 <= seed < 2**32:
    raise ValueError(f"--seed must be in [0, 2**32), got {seed}.")


def generate(sources: Sequence[str], prompts: Sequence[str], *, base_run: str | None = None, with_base: bool = False,
             max_new_tokens: int = 32, temperature: float = 0.0, top_k: int | None = None,
             seed: int = 0) -> list[Completion]:
  """Every prompt through every adapter of `sources` (and the base model with `with_base`), in one batch.

  Args:
    sources: run directories, adapter checkpoints or adapter-set directories (`PATH`
      or `NAME=PATH`; see the module docstring).
    prompts: the prompts.
    base_run: the run whose `config.yaml` gives the base model (default: the first
      source that is a run or lies in one).
    with_base: also generate with the base model (rows named `'__base__'`).
    max_new_tokens: tokens to generate per row (fewer are shown after an EOS).
    temperature: 0 for greedy decoding, else sampling at this temperature.
    top_k: sample among the `top_k` most likely tokens.
    seed: the sampling key's seed.

  Returns:
    One `Completion` per (prompt, adapter): prompts in order, and for each the base
    model first (with `with_base`), then the adapters in the order of `sources`.

  Raises:
    ValueError: no prompts, nothing to generate with, a source that is none of the
      three kinds, runs of different base models or of another task, an adapter that
      does not fit the base, duplicate names, a bad option.
  """
  _check_options(max_new_tokens, temperature, top_k, seed)
  if not prompts:
    raise ValueError("No prompts; give --prompt TEXT (repeatable) or --prompts-file FILE.")
  parsed = [parse_source(s) for s in sources]
  if not parsed and not with_base:
    raise ValueError("Nothing to generate with: give run directories, adapter checkpoints or adapter-set "
                     "directories, and/or --base (with --base-run RUN_DIR) for the base model.")
  config, base = _load_base(parsed, base_run)
  adapters = _adapters(parsed, base)
  frozen = _setup.quantized(config, base.params, base.model)  # a QLoRA run's adapters were trained over its quantized base
  names = [BASE] * with_base + list(adapters.names)
  rows = [(name, p) for p in prompts for name in names]
  ids, mask = _encode(base.tokenizer, prompts)
  ids, mask = (np.repeat(x, len(names), axis=0) for x in (ids, mask))
  eos = _eos_ids(base.tokenizer, base.model)
  pad = getattr(base.tokenizer, "pad_token_id", 0) or 0
  bank = jlora.stack_adapters(adapters, frozen) if len(adapters) else None
  out = models.generate(base.model, frozen, ids, mask, max_new_tokens=max_new_tokens,
                        key=jax.random.key(seed), temperature=temperature, top_k=top_k,
                        eos_token_id=eos[0] if eos else None, pad_token_id=pad, adapters=bank,
                        adapter_ids=[name for name, _ in rows] if bank is not None else None)
  result = []
  for (name, prompt), row in zip(rows, np.asarray(jax.device_get(out)).tolist()):
    stop = next((i for i, t in enumerate(row) if t in eos), len(row))
    tokens = row[:stop]
    result.append(Completion(name, prompt, base.tokenizer.decode([tokens])[0], tokens))
  return result


def read_prompts(prompts: Sequence[str], file: str | None) -> list[str]:
  """The `--prompt`s, then the non-blank lines of `--prompts-file` (UTF-8, trailing newlines removed)."""
  out = list(prompts)
  if file is not None:
    try:
      with open(file, encoding="utf-8") as f:
        out += [line.rstrip("\r\n") for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
      raise ValueError(f"--prompts-file: {file!r} cannot be read as UTF-8 text ({e}).") from None
  return out


def _cell(text: str, width: int | None = None) -> str:
  text = text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
  return text if width is None or len(text) <= width else text[: width - 1] + "…"


def table(rows: Sequence[Completion], *, prompt_width: int = 40) -> str:
  """A plain-text table `adapter | prompt | completion` (newlines shown as `\\n`; long prompts cut)."""
  cells = [(_cell(r.adapter), _cell(r.prompt, prompt_width), _cell(r.completion)) for r in rows]
  head = ("adapter", "prompt", "completion")
  w = [max(len(c[i]) for c in [head, *cells]) for i in range(2)]
  lines = [f"{a:<{w[0]}}  {p:<{w[1]}}  {c}".rstrip() for a, p, c in [head, tuple("-" * n for n in (*w, 10)), *cells]]
  return "\n".join(lines)
