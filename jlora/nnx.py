"""jlora for Flax NNX models: LoRA by module surgery, with the same config, math and files as linen models.

`import jlora` does not import this module (nor `flax.nnx`); use
`from jlora import nnx as lnnx`.

* `init(key, model, config)` returns a LoRA copy of an NNX model: each targeted
  `nnx.Linear` / `LinearGeneral` / `Einsum` / `Conv` / `Embed` becomes a
  `Lora<Base>` layer (a subclass of its class) that runs its base call and adds
  the same term as every other front-end:
  `base(x) + s·(dropout(x)·A)·B`, factored, or with `use_dora=True` DoRA
  (`lora_magnitude`, `Trainable` beside `lora_a` / `lora_b`, initialised to
  `‖W0 + s·A·B‖` per output column, so the model is unchanged at init).
* Trainable tokens (`LoraConfig.trainable_token_indices`): the targeted
  `nnx.Embed` becomes a `TokensEmbed` holding the rows' change
  `trainable_tokens: (n_ids, dim)` (`Trainable`, zero at init) beside its table;
  its lookup and `attend` see `table.at[ids].add(delta)` without copying the table.
* QLoRA: `quantize(model, "nf4")` (or `"int8"`) returns a copy whose kernels are
  packed `QuantizedArray`s held by `Frozen` variables; layers read them
  dequantized where they index them, inside the step, so memory stays packed.
  `init(key, quantize(model), config)` adapts it. A tree quantized outside
  (`jlora.quantize(to_params(lora))`, `jlora.load_quantized`) goes in through
  `from_params(model, tree, config)`. Gradients reach only the adapters;
  `merge` gives a full-precision plain model (every kernel dequantized).
* Its parameters are `Trainable` (adapters, trained biases, `modules_to_save`)
  or `Frozen` (the rest), neither an `nnx.Param`: `nnx.Optimizer(model, tx,
  wrt=Trainable)` trains exactly the adapter, and code that trains `nnx.Param`
  finds nothing to train instead of silently fine-tuning the base.
* `nnx.split(model, Trainable, ...)`, `nnx.jit`, `nnx.scan` / `nnx.remat` over
  `nnx.vmap`-made layers (adapters stacked like the kernels) work as usual.
* `merge(model)` returns a plain NNX model with `W = W0 + s·A·B` (DoRA:
  `m·(W0 + s·A·B)/‖W0 + s·A·B‖`); `unmerge` goes back.
* `to_params(model)` / `from_params(model, params, config)` convert to and from
  jlora's plain params dict (the linen layout), which `jlora.save_adapter`,
  `jlora.load_adapter`, `jlora.save_peft` and `jlora.load_peft` read and write.
"""

from __future__ import annotations

from typing import Any

import optax
from flax import nnx

from jlora.frontends.nnx.graph import require_adapters
from jlora.frontends.nnx.graph import to_params as to_params
from jlora.frontends.nnx.init import from_params as from_params
from jlora.frontends.nnx.init import init as init
from jlora.frontends.nnx.merge import merge as merge
from jlora.frontends.nnx.merge import unmerge as unmerge
from jlora.frontends.nnx.quant import quantize as quantize
from jlora.frontends.nnx.vars import Frozen as Frozen
from jlora.frontends.nnx.vars import Trainable as Trainable

__all__ = ["Frozen", "Trainable", "from_params", "init", "merge", "optimizer", "quantize", "split", "to_params",
           "unmerge"]


def split(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """`nnx.split(model, Trainable, ...)`: `(graphdef, trainable, rest)`, after checking the model has adapters.

  `trainable` holds the adapters (`lora_a: in_shape + (r,)`, `lora_b: (r,) +
  out_shape`, DoRA's `lora_magnitude`, stacked `(L, ...)` for `nnx.vmap`-made
  layers), trainable tokens (`trainable_tokens: (n_ids, dim)`), trained biases
  and `modules_to_save` parameters; `rest` everything
  else (the frozen base, quantized kernels included, rng state, batch statistics). `nnx.merge(graphdef, trainable, rest)` rebuilds the
  model. For a pure jitted step, differentiate with respect to `trainable` only and
  pass `rest` as an argument: a jitted function that closes over it compiles the
  whole base in as constants.

  Raises:
    ValueError: `model` holds no adapter.
  """
  require_adapters(model, "split")
  return nnx.split(model, Trainable, ...)


def optimizer(model: nnx.Module, tx: optax.GradientTransformation, **kwargs: Any) -> nnx.Optimizer:
  """`nnx.Optimizer(model, tx, wrt=Trainable)`, after checking the model has adapters.

  The optimizer keeps state for, and updates, only `Trainable` variables; the
  frozen base stays bit-identical. Compute the gradients with the same filter:
  `nnx.grad(loss_fn, argnums=nnx.DiffState(0, jlora.nnx.Trainable))(model)`.

  Args:
    model: a LoRA model.
    tx: the optax transformation.
    **kwargs: passed to `nnx.Optimizer`.

  Raises:
    ValueError: `model` holds no adapter.
  """
  require_adapters(model, "optimizer")
  return nnx.Optimizer(model, tx, wrt=Trainable, **kwargs)
