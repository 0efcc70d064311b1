"""`jlora.nnx.merge` and `jlora.nnx.unmerge`: between a LoRA NNX model and a plain one with `W = W0 + s·A·B`."""

from __future__ import annotations

from flax import nnx
from flax.core.meta import AxisMetadata

from jlora.core import ops as _ops
from jlora.core import tokens as _tokens
from jlora.core.targets import is_lora_key, path_str
from jlora.core.variants import variant_of_leaves
from jlora.frontends.nnx.graph import adapted, check_model, require_adapters, walk
from jlora.frontends.nnx.init import strip
from jlora.frontends.nnx.layer import kernel_var, leaves_of
from jlora.frontends.nnx.tokens import tokened
from jlora.frontends.nnx.vars import PARAM_TYPES, Trainable

__all__ = ["merge", "unmerge"]


def merge(model: nnx.Module) -> nnx.Module:
  """A plain NNX model with every adapter folded in: `W = W0 + s·A·B` (DoRA: `m·(W0 + s·A·B)/‖W0 + s·A·B‖`).

  The result has the base model's classes (`nnx.Linear`, ... ; no `Lora<Base>`
  layer, no `lora_a` / `lora_b`), and its parameters are `nnx.Param` again (or the
  `Param` subclass they were), so it runs with zero added latency and computes
  what the factored LoRA model computes (trainable tokens are added to their
  tables' rows). The sum is taken in float32 and cast back
  to the kernel's dtype; stacked (`nnx.vmap`) layers merge per layer. Trained biases
  and `modules_to_save` parameters keep their trained values. Quantized kernels
  (QLoRA) come out dequantized, adapted or not: the result is a full-precision
  model (`jlora.requantize` on `to_params` packs it again). `model` is not changed.

  Args:
    model: a LoRA model (from `jlora.nnx.init` or `from_params`).

  Returns:
    The merged model.

  Raises:
    ValueError: `model` holds no adapter.
  """
  require_adapters(model, "merge")
  out = nnx.clone(model)
  for module in adapted(out).values():
    var, leaves = kernel_var(module), leaves_of(module)
    _ops.check_foldable(path_str(module.lora_path), leaves["lora_a"].shape, leaves["lora_b"].shape, var.shape)
    var.set_value(variant_of_leaves(leaves).fold(var.get_value(), leaves, module.lora_scale))
  _, variables = walk(out)
  for var in variables.values():  # kernels left quantized (not adapted): full precision, as plain layers read them
    if isinstance(var.get_value(), AxisMetadata):
      var.set_value(var.get_value().unbox())
  for path, module in tokened(out).items():  # trainable tokens: `table.at[ids].add(delta)`
    _refold(module, path, _tokens.fold)
  strip(out)
  return out


def unmerge(merged: nnx.Module, model: nnx.Module) -> nnx.Module:
  """Undoes `merge`: the LoRA model `model` with its base weights recovered from `merged` as `W0 = W − s·A·B`.

  Args:
    merged: a merged model (from `merge`): no adapters.
    model: the LoRA model whose adapters were merged (its adapters, scales and
      structure are used; its base weights are not).

  Returns:
    A LoRA model: `model`'s adapters over the base weights of `merged`, recovered
    up to the rounding of the float32 sums (cast back to the kernel's dtype), in
    full precision where `model`'s were quantized. DoRA's norms `‖W0 + s·A·B‖`,
    which the merge loses, are taken from `model`'s own kernels.

  Raises:
    ValueError: `merged` still holds adapters (subtracting would corrupt its
      kernels), `model` holds none, or their parameters differ in paths or shapes.
  """
  check_model(merged, "merged")
  require_adapters(model, "unmerge")
  _, merged_vars = walk(merged)
  left = sorted(path_str(p) for p in adapted(merged))
  left += sorted(path_str(p) for p, v in merged_vars.items() if isinstance(v, Trainable))
  if left:
    raise ValueError(
        f"jlora.nnx.unmerge: `merged` still holds LoRA adapters (at {left[:4]}{' …' if len(left) > 4 else ''}), so "
        "its kernels are W0, not W0 + s·A·B; subtracting would corrupt them. Pass the output of jlora.nnx.merge."
    )
  out = nnx.clone(model)
  _, out_vars = walk(out)
  problems = []
  for path, var in out_vars.items():
    if not isinstance(var, PARAM_TYPES) or is_lora_key(path[-1]):
      continue
    source = merged_vars.get(path)
    if source is None or not isinstance(source, PARAM_TYPES) or tuple(source.shape) != tuple(var.shape):
      problems.append(path_str(path))
    else:
      var.set_value(source.get_value())
  if problems:
    raise ValueError(f"jlora.nnx.unmerge: `merged` is not a merge of `model`: its parameters differ at "
                     f"{problems[:6]}{' …' if len(problems) > 6 else ''} (missing or other shapes).")
  norms = {}
  for path, module in adapted(model).items():  # DoRA's ‖W0 + s·A·B‖, which the merge loses, from `model`'s own W0
    if "lora_magnitude" in vars(module):
      leaves = leaves_of(module)
      norms[path] = _ops.column_norm(kernel_var(module).get_value(), leaves["lora_a"], leaves["lora_b"],
                                     module.lora_scale)
  for path, module in adapted(out).items():
    var, leaves = kernel_var(module), leaves_of(module)
    _ops.check_foldable(path_str(module.lora_path), leaves["lora_a"].shape, leaves["lora_b"].shape, var.shape)
    var.set_value(variant_of_leaves(leaves).unfold(var.get_value(), leaves, module.lora_scale, norms.get(path)))
  for path, module in tokened(out).items():
    _refold(module, path, _tokens.unfold)
  return out


def _refold(module: nnx.Module, path: tuple[str, ...], how) -> None:
  """Sets a `TokensEmbed`'s table to `how(table, delta, ids)` (`jlora.core.tokens.fold` or `unfold`)."""
  var = module.embedding
  var.set_value(how(var.get_value(), module.trainable_tokens.get_value(), module.lora_token_ids, path_str(path)))
