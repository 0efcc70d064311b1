"""Trainable tokens in NNX models: the rows of an `nnx.Embed` that `LoraConfig.trainable_token_indices` trains.

`jlora.nnx.init` and `jlora.nnx.from_params` turn each such `nnx.Embed` into a `TokensEmbed` in place (a subclass
of `nnx.Embed`, as adapted layers are `Lora<Base>`): it holds the rows' change `trainable_tokens: (n_ids, dim)` as a
`Trainable` beside its `Frozen` table, and the ids as a static attribute. Its lookup and its `attend` (a tied head)
run the base call, then add the corrections of `jlora.core.tokens` (`lookup`, `attend`), which see
`table.at[ids].add(delta)` without copying the table. `jlora.nnx.merge` folds the rows into the table (`fold`),
`jlora.nnx.unmerge` takes them out. The concept (which tables, the errors) is `jlora.core.tokens`'; this module
only finds NNX's tables and installs the layer.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from flax import nnx

from jlora.core import tokens as _tokens
from jlora.core.config import LoraConfig
from jlora.core.targets import Site
from jlora.core.tree import get_path
from jlora.frontends.nnx.graph import Path, to_params, walk
from jlora.frontends.nnx.layer import is_adapted
from jlora.frontends.nnx.vars import Trainable

__all__ = ["TokensEmbed", "embeddings", "install", "tokened", "uninstall"]

_ATTRS = ("trainable_tokens", "lora_token_ids", "lora_path")  # what `install` adds and `uninstall` removes


class _Tokens(nnx.Module):
  """Mixin placed before `nnx.Embed`: the rows' corrections after the base lookup and `attend`."""

  def __call__(self, inputs, *args, **kwargs):
    y = super().__call__(inputs, *args, **kwargs)
    return _tokens.lookup(y, jnp.asarray(inputs), self.trainable_tokens[...], self.lora_token_ids,
                          self.embedding.shape[0])

  def attend(self, query, *args, **kwargs):
    y = super().attend(query, *args, **kwargs)
    return _tokens.attend(y, query, self.trainable_tokens[...], self.lora_token_ids)


TokensEmbed = types.new_class(
    "TokensEmbed", (_Tokens, nnx.Embed), {"pytree": nnx.Embed._pytree__is_pytree},
    lambda ns: ns.update(__module__="jlora.nnx", jlora_base=nnx.Embed,
                         __doc__="`flax.nnx.Embed` with trainable token rows (`trainable_token_indices`, jlora.nnx)."))


def embeddings(found: list[Site], modules: Mapping[Path, nnx.Module],
               variables: Mapping[Path, nnx.Variable]) -> list[_tokens.Embedding]:
  """The tables of the model's embedding layers, for `jlora.core.tokens.resolve` (rows train in flax's own
  `nnx.Embed` only)."""
  out = []
  for s in found:
    if s.kind != "embed":
      continue
    cls = type(modules[s.module])
    why = "" if cls is nnx.Embed else (
        f"it is a {cls.__name__}, not flax's nnx.Embed, whose lookup is exactly its table's rows (a subclass or "
        "registered class may scale or change them)")
    var = variables.get((*s.module, s.kernel_name))
    shape = tuple(var.shape) if var is not None else s.kernel_shape
    out.append(_tokens.Embedding(s.module, s.kernel_name, shape, why or s.unsupported))
  return out


def install(model: nnx.Module, tree: Mapping[str, Any], config: LoraConfig, fn: str) -> None:
  """Turns each `nnx.Embed` of `model` (in place) whose module dict in `tree` holds a `trainable_tokens` leaf into
  a `TokensEmbed` holding that leaf.

  Args:
    model: the model, its parameters already set from `tree`.
    tree: params in `to_params`' layout (whole, or the adapters' half).
    config: the config the leaves were made with (their ids).
    fn: the caller, for messages.

  Raises:
    ValueError: a leaf where the model has no `nnx.Embed` (or another class), beside a LoRA adapter, or that does
      not fit its table and the config's ids.
  """
  modules, _ = walk(model)
  for tk in _tokens.tokens(tree, config, kernels=to_params(model)):
    module = modules.get(tk.module)
    _tokens.check_alone(get_path(tree, tk.module), tk.module, fn)
    if type(module) is not nnx.Embed or tk.kernel_name != "embedding" or is_adapted(module):
      raise ValueError(
          f"{fn}: `params` holds trainable tokens at {tk.where!r}, where the model has a "
          f"{type(module).__name__}{' with a LoRA adapter' if is_adapted(module) else ''}, not flax's nnx.Embed "
          "(whose lookup is exactly its table's rows); pass the params and config made for this model.")
    module.trainable_tokens = Trainable(tk.delta)
    module.lora_token_ids = tuple(int(i) for i in tk.ids)
    module.lora_path = tk.module
    object.__setattr__(module, "__class__", TokensEmbed)


def tokened(model: nnx.Module) -> dict[Path, nnx.Module]:
  """`{path: module}` of the model's `TokensEmbed` layers."""
  modules, _ = walk(model)
  return {p: m for p, m in modules.items() if isinstance(m, TokensEmbed)}


def uninstall(module: nnx.Module) -> None:
  """Undoes `install`: an `nnx.Embed` again, without the rows."""
  for name in _ATTRS:
    if name in vars(module):
      delattr(module, name)
  object.__setattr__(module, "__class__", nnx.Embed)
