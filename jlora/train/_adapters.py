"""A run's adapter from and into other directories: `lora.init_from` and `outputs.adapter_set`.

**`lora.init_from`** starts the run from a saved adapter (a `jlora.save_adapter`
checkpoint: `RUN_DIR/adapter`, or `ADAPTER_SET/NAME`) instead of a fresh `jlora.init`.
The run's `lora` section must describe that adapter: the fields in `SAME_FIELDS` (those
that decide its leaves, their shapes or its output) must equal the saved config's, while
`lora_dropout` (training only), `init_lora_weights` (unused: the weights are loaded),
`task_type` and PEFT's bookkeeping fields may differ. The saved config is not taken in
silence, so that `config.yaml` always describes the adapter the run writes (`jlora merge`
rebuilds from it) and a changed config is a clear error, not a different run. The base is
checked by `jlora.load_adapter` (paths, shapes, dtypes and, for adapters `jlora train`
saved, contents). The path is part of the run's fingerprint (in `lora`); a resumed run
continues from its own checkpoint and does not read `init_from` again.

**`outputs.adapter_set`** also saves the final adapter as `ADAPTER_SET/NAME`
(`outputs.adapter_name`, default the basename of `outputs.dir`), with
`jlora.save_adapter` (base checksums included, as for `RUN_DIR/adapter`). jlora never
writes over what it did not write: a `NAME` that exists and is not a jlora adapter
checkpoint is refused; one that is needs `outputs.replace_adapter: true`, and is then
replaced by a new version that orbax commits atomically (the old one is dropped only once
the new one is complete). Checked before training (`check_entry`) and again just before
the save.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax

import jlora
import jlora.formats.checkpoint
from jlora.adapters.adapter_set import check_name
from jlora.core.fields import rewrites_base
from jlora.formats.checkpoint import MARKER
from jlora.train._schema import Config

__all__ = ["SAME_FIELDS", "check_entry", "load_init", "save_to_set"]

SAME_FIELDS = ("r", "lora_alpha", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
               "rank_pattern", "alpha_pattern", "bias", "use_rslora", "use_dora", "modules_to_save")


def _yaml_value(config: jlora.LoraConfig, field: str) -> str:
  """`field`'s value as an override would write it (`[c_attn]`, `8`, `null`)."""
  return json.dumps(config.to_dict()[field], sort_keys=False, default=sorted).replace('"', "")


def load_init(config: Config, base_params: Any, trainable: Any) -> Any:
  """The trainable tree saved at `lora.init_from`, in place of the freshly initialized `trainable`.

  Args:
    config: the run's config (`init_from` set).
    base_params: the run's base params (the adapter is checked against them).
    trainable: the trainable half of the run's `jlora.init`: the loaded tree must have
      its structure, shapes and dtypes.

  Raises:
    ValueError: no adapter checkpoint there, a base that is not the adapter's, a saved
      config that differs from `lora` in `SAME_FIELDS`, or an `init_lora_weights` that rewrites the base.
  """
  path, lora = config.init_from, config.lora
  what = f"`lora.init_from`: {path!r}"
  if not os.path.isfile(os.path.join(path, MARKER)):
    hint = (f"; it is a `jlora train` run directory: give its adapter, {os.path.join(path, 'adapter')!r}"
            if os.path.isfile(os.path.join(path, "adapter", MARKER)) else
            ": give a jlora adapter checkpoint (RUN_DIR/adapter, or ADAPTER_SET/NAME), or remove `lora.init_from`")
    kind = "is not a jlora adapter checkpoint (no jlora_adapter.json)" if os.path.isdir(path) else "does not exist"
    raise ValueError(f"{what} {kind}{hint}.")
  if rewrites_base(lora.init_lora_weights):
    raise ValueError(f"{what}: `lora.init_lora_weights: {lora.init_lora_weights}` rewrites the base from the "
                     "kernels (PiSSA, OLoRA, ...), which a run that starts from saved weights cannot do; set "
                     "`lora.init_lora_weights=true` (it is not used: the adapter's weights are loaded).")
  try:
    params, saved = jlora.formats.checkpoint.load_adapter(path, base_params)
  except ValueError as e:
    raise ValueError(f"{what}: {e}") from None
  diff = [f for f in SAME_FIELDS if getattr(saved, f) != getattr(lora, f)]
  if diff:
    shown = ", ".join(f"{f}={_yaml_value(saved, f)} (this run: {_yaml_value(lora, f)})" for f in diff)
    fix = " ".join(f"lora.{f}={_yaml_value(saved, f)}" for f in diff)
    raise ValueError(f"{what} was saved with {shown}; the `lora` section must describe the adapter the run starts "
                     f"from: set {fix}, or train a new adapter without `lora.init_from`.")
  loaded = jlora.split(params, lora)[0]
  spec = lambda tree: jax.tree.map(lambda x: (x.shape, str(x.dtype)), tree)  # noqa: E731
  if jax.tree.structure(loaded) != jax.tree.structure(trainable) or spec(loaded) != spec(trainable):
    raise ValueError(f"{what}: the saved adapter's leaves differ from those this run's `lora` section gives the model "
                     "(names, shapes or dtypes); start from an adapter trained with this model and `lora` section.")
  return loaded


def _entry(config: Config) -> tuple[str, str] | None:
  """`(ADAPTER_SET, NAME)` (the directory absolute), or None without `outputs.adapter_set`."""
  out = config.outputs
  if out.adapter_set is None:
    extra = [k for k in ("adapter_name", "replace_adapter") if getattr(out, k) not in (None, False)]
    if extra:
      raise ValueError(f"`outputs.{extra[0]}` is set but `outputs.adapter_set` is not; set `outputs.adapter_set` "
                       "to the adapter-set directory the adapter goes into, or remove it.")
    return None
  name = out.adapter_name or os.path.basename(os.path.abspath(out.dir))
  if out.adapter_name is None:
    try:
      check_name(name)
    except ValueError as e:
      raise ValueError(f"`outputs.adapter_name` defaults to the basename of `outputs.dir`, {name!r}, which is not a "
                       f"valid name ({e}); set `outputs.adapter_name`.") from None
  return os.path.abspath(out.adapter_set), name


def check_entry(config: Config) -> str | None:
  """`ADAPTER_SET/NAME` where the adapter will be saved (None without `outputs.adapter_set`); writes nothing.

  Raises:
    ValueError: `outputs.adapter_set` is a file; `NAME` there exists and is not a jlora
      adapter checkpoint; or is one, without `outputs.replace_adapter`.
  """
  found = _entry(config)
  if found is None:
    return None
  root, name = found
  entry = os.path.join(root, name)
  if os.path.lexists(root) and not os.path.isdir(root):
    raise ValueError(f"`outputs.adapter_set`: {root!r} is not a directory; give a directory (new, or holding "
                     "adapter checkpoints).")
  top = root
  while not os.path.lexists(top):
    top = os.path.dirname(top)
  if not os.path.isdir(top):
    raise ValueError(f"`outputs.adapter_set`: {root!r} cannot be created: {top!r} is a file; choose another "
                     "`outputs.adapter_set`.")
  if not os.access(top, os.W_OK | os.X_OK):
    raise ValueError(f"`outputs.adapter_set`: {root!r} is not writable ({top!r}: permission denied); choose another "
                     "`outputs.adapter_set`.")
  if not os.path.lexists(entry):
    return entry
  where = f"`outputs.adapter_set`: {entry!r} (adapter {name!r})"
  if os.path.islink(entry):
    raise ValueError(f"{where} is a symbolic link (to {os.readlink(entry)!r}); jlora saves an adapter into a directory "
                     "of its own and never follows or replaces a link. Remove the link, or choose another "
                     "`outputs.adapter_name`.")
  if os.path.isdir(entry) and not os.path.islink(entry) and os.path.isfile(os.path.join(entry, MARKER)):
    if not config.outputs.replace_adapter:
      raise ValueError(f"{where} already holds an adapter checkpoint; set `outputs.replace_adapter=true` to replace "
                       "it (saved as a new version: the old one stays readable until the new one is complete), or "
                       "choose another `outputs.adapter_name`.")
    return entry
  # Not an adapter: refused unless empty (or holding only the temporary marker of a first save that was killed).
  foreign = [] if not os.path.isdir(entry) or os.path.islink(entry) else sorted(
    e for e in os.listdir(entry) if not e.startswith(f".{MARKER}.jlora-tmp-"))
  if not os.path.isdir(entry) or os.path.islink(entry) or foreign:
    shown = f" ({', '.join(foreign[:6])}{' …' if len(foreign) > 6 else ''})" if foreign else ""
    raise ValueError(f"{where} exists and is not a jlora adapter checkpoint{shown}; jlora never writes over files "
                     "it did not write. Choose another `outputs.adapter_name` or `outputs.adapter_set`.")
  return entry


def save_to_set(config: Config, params: Any) -> str | None:
  """Saves the adapter in `params` as `ADAPTER_SET/NAME` (checked again first); returns that path (None: no set)."""
  entry = check_entry(config)
  if entry is not None:
    jlora.formats.checkpoint.save_adapter(entry, params, config.lora, base_checksums=True)
  return entry
