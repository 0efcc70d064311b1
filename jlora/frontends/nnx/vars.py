"""The variable types of a LoRA NNX model: `Trainable` and `Frozen`, neither of them an `nnx.Param`.

`jlora.nnx.init` retypes every `nnx.Param` of the model it returns: what LoRA
trains (the adapters, the biases `config.bias` trains, `modules_to_save`) becomes
`Trainable`, everything else `Frozen`. No `nnx.Param` is left, so code written for
full fine-tuning (`nnx.grad`'s default `wrt=nnx.Param`, `nnx.Optimizer(model, tx,
wrt=nnx.Param)`) finds nothing to train rather than the base; `wrt=Trainable`
trains exactly what jlora's `split` / `labels` call trainable. (Flax's own
`nnx.LoRAParam` subclasses `nnx.Param`, so the default filter trains the base too.)

Types change in place (the `Variable` object, and so its sharing between modules,
is kept); a `Param` subclass other than `nnx.Param` is remembered in the
variable's metadata and comes back on `jlora.nnx.merge`.

A `Frozen` variable may hold a quantized kernel (a `jlora.quantize`d
`QuantizedArray`, a flax `AxisMetadata` box) for QLoRA: reading it the way NNX
layers do (`self.kernel[...]`) unboxes, i.e. dequantizes it right there, inside
the traced step, as a linen layer's `self.param` does; `get_value()` (and so
`nnx.state`, `jlora.nnx.to_params`) keeps the packed box, so the stored model stays quantized.
"""

from __future__ import annotations

from typing import Any

from flax import nnx
from flax.core.meta import AxisMetadata

__all__ = ["Trainable", "Frozen", "PARAM_TYPES", "retype", "restore"]

_ORIGIN = "jlora_origin"  # metadata key: the Param subclass a retyped variable had


class Trainable(nnx.Variable):
  """A parameter that LoRA training updates; not an `nnx.Param`.

  Held by `lora_a: in_shape + (r,)` and `lora_b: (r,) + out_shape` of every
  adapted layer, by the biases that `config.bias` trains and by every parameter
  of a `modules_to_save` module. Train with `nnx.Optimizer(model, tx,
  wrt=jlora.nnx.Trainable)` and `nnx.grad(loss, argnums=nnx.DiffState(0,
  jlora.nnx.Trainable))`, or split it off: `nnx.split(model, jlora.nnx.Trainable, ...)`.
  """


class Frozen(nnx.Variable):
  """A base-model parameter of a LoRA model, held fixed; not an `nnx.Param`.

  `jlora.nnx.merge` turns it back into the `nnx.Param` it was. A quantized kernel
  (`QuantizedArray`) is dequantized where a layer reads it: `var[...]` returns the
  full-precision kernel (`jlora.dequantize` of it), `var.get_value()` the packed box.
  """

  def __getitem__(self, key: Any) -> Any:
    value = self.get_value()
    if isinstance(value, AxisMetadata):  # a QuantizedArray: dequantized where the layer reads it
      value = value.unbox()
      return value if key is ... else value[key]
    return super().__getitem__(key)


# Variables that are parameters (the linen 'params' collection): what `to_params` reads.
PARAM_TYPES = (nnx.Param, Trainable, Frozen)


def retype(var: nnx.Variable, cls: type[nnx.Variable]) -> None:
  """Changes `var`'s type to `cls` in place, remembering a `Param` subclass it had (not `nnx.Param` itself)."""
  origin = type(var)
  if origin in (Trainable, Frozen) or origin is cls:
    object.__setattr__(var, "__class__", cls)
    return
  if origin is not nnx.Param:
    var.set_metadata(_ORIGIN, origin)
  object.__setattr__(var, "__class__", cls)


def restore(var: nnx.Variable) -> None:
  """Undoes `retype`: a `Trainable` / `Frozen` variable becomes the `Param` (subclass) it was."""
  if not isinstance(var, (Trainable, Frozen)):
    return
  origin: Any = nnx.Param
  if var.has_metadata(_ORIGIN):
    origin = var.get_metadata(_ORIGIN)
    var.del_metadata(_ORIGIN)
  object.__setattr__(var, "__class__", origin)
