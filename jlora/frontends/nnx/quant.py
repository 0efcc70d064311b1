"""`jlora.nnx.quantize`: an NNX model with NF4 or int8 kernels, the frozen base of QLoRA.

The NNX twin of `jlora.quantize` (which packs the kernels of a param tree): each
selected kernel becomes a `Frozen` variable holding a `QuantizedArray`
(`jlora.quant.array`), which NNX layers read dequantized right where they index
it (`self.kernel[...]`, see `jlora.frontends.nnx.vars.Frozen`), inside the traced
step, so the stored model stays packed. `jlora.nnx.init` on the result adapts it
(QLoRA); `jlora.nnx.from_params(model, jlora.quantize(params), config)` is the
other door, for a tree quantized (or loaded with `jlora.load_quantized`) outside.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
from flax import nnx
from flax.core.meta import AxisMetadata

from jlora.core.targets import path_str
from jlora.frontends.nnx.graph import Path, check_model, walk
from jlora.frontends.nnx.layer import kind_of, site_of
from jlora.frontends.nnx.vars import PARAM_TYPES, Frozen, Trainable, retype
from jlora.quant import array as _quant

__all__ = ["quantize", "is_kernel"]


def is_kernel(path: tuple[str, ...], value: Any) -> bool:
  """The default selection, as `jlora.quantize`'s: a floating leaf named `kernel` with at least 2 dimensions.

  That leaves embeddings (`embedding`), biases, norm scales and adapters (`lora_*`) as they are.
  """
  return (bool(path) and path[-1] == "kernel" and getattr(value, "ndim", 0) >= 2
          and jnp.issubdtype(value.dtype, jnp.floating))


def _stacks(modules: dict[Path, nnx.Module]) -> dict[Path, int]:
  """`{weight path: leading nnx.vmap axes}` of every adaptable layer's weight (int8 keeps a scale per layer)."""
  out = {}
  for path, module in modules.items():
    kind = kind_of(module)
    if kind is None:
      continue
    site = site_of(path, module, kind)
    weight = getattr(module, site.kernel_name, None)
    if isinstance(weight, nnx.Variable):
      out[path + (site.kernel_name,)] = max(0, len(weight.shape) - len(site.kernel_shape))
  return out


def quantize(model: nnx.Module, method: str = "nf4", *, block_size: int = 64, double_quant: bool = True,
             select: Callable[[tuple[str, ...], Any], bool] = is_kernel) -> nnx.Module:
  """A copy of an NNX model with its kernels quantized: the frozen base of QLoRA (NF4, int4 or int8).

  Each selected parameter becomes a `jlora.nnx.Frozen` variable holding a
  `QuantizedArray` (NF4: 4-bit codes, an absmax per `block_size` values along the
  last axis, ~4.15 bits per parameter with double quantization; int8: one scale
  per output channel, and per layer in an `nnx.vmap`-made stack of the layers
  `jlora.nnx.init` adapts; other stacked kernels share one scale per channel). Layers read it
  dequantized where they index it (`self.kernel[...]`), inside the traced step, so
  the model runs as before (up to the rounding) and memory holds only the packed
  kernels. `Trainable` variables (adapters, trained biases, `modules_to_save`) are
  never quantized. `model` is not changed; unselected arrays are shared.

  QLoRA is then `lora = jlora.nnx.init(key, jlora.nnx.quantize(model), config)`:
  the adapters (and DoRA's magnitudes, taken from the dequantized kernels) train,
  the packed base has no gradient, and `jlora.nnx.merge(lora)` returns a
  full-precision plain model (every kernel dequantized, adapters folded in).

  Args:
    model: an NNX model, with or without adapters.
    method: `"nf4"`, `"int4"` or `"int8"` (as for `jlora.quantize`).
    block_size: NF4 / int4 block size (even; 64 as in the QLoRA paper).
    double_quant: NF4 / int4: quantize the block absmax values too.
    select: `select(path, value) -> bool`, True = quantize; `path` is the tuple of
      attribute names, e.g. `('layers', '0', 'attn', 'query', 'kernel')`. The
      default (`is_kernel`) takes floating leaves named `kernel` of 2+ dimensions.

  Returns:
    The quantized model.

  Raises:
    TypeError: `model` is not an NNX module.
    ValueError: a bad `method` or `block_size`; NaN or inf in a kernel (the
      message names its path).

  Example:
    >>> import jax
    >>> from flax import nnx
    >>> import jlora
    >>> from jlora import nnx as lnnx
    >>> model = nnx.Linear(256, 64, rngs=nnx.Rngs(0))
    >>> qlora = lnnx.init(jax.random.key(1), lnnx.quantize(model), jlora.LoraConfig(r=8, target_modules=".*"))
    >>> qlora.kernel.get_value()
    QuantizedArray(nf4, shape=(256, 64), dtype=float32, block_size=64, double_quant=True)
    >>> qlora(jax.numpy.ones((2, 256))).shape
    (2, 64)
  """
  check_model(model)
  _quant._check_args(method, block_size, double_quant)
  out = nnx.clone(model)
  modules, variables = walk(out)
  stacks = _stacks(modules)
  for path, var in variables.items():
    if not isinstance(var, PARAM_TYPES) or isinstance(var, Trainable):
      continue
    value = var.get_value()
    if isinstance(value, AxisMetadata) or not select(path, value) or getattr(value, "size", 1) == 0:
      continue
    stack = stacks.get(path, 0) if method == "int8" else 0
    try:
      q = _quant.quantize(value, method, block_size=block_size, double_quant=double_quant, stack=stack)
    except (ValueError, TypeError) as e:
      raise type(e)(f"jlora.nnx.quantize: at {path_str(path)!r}: {e}") from None
    var.set_value(q)
    retype(var, Frozen)
  return out

