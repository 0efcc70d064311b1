"""A faithful copy of MaxText's NNX `DenseGeneral` (maxtext 0.2.5, `maxtext/layers/linears.py`, class `DenseGeneral`).

maxtext 0.2.5 needs Python >= 3.12 and brings MaxText's whole stack, so the tests use this copy of the parts that
decide what jlora sees: an `nnx.Module` holding `kernel = nnx.Param(in_features_shape + out_features_shape)` and an
optional `bias`; `__call__(inputs, _initializing=False, out_sharding=None, slice_bounds=None)` casts `inputs` to
`dtype`, checks the contracted sizes, reads the kernel with `get_value()`, casts it to `dtype`, and computes
`lax.dot_general(inputs, kernel, ((axis, range(len(axis))), ((), ())))` (`axis` normalized, in its given order),
plus the bias. Left out: quantization (AQT, fp8 `kernel_scale`), sharding and host offload. Its class is named
`maxtext.layers.linears.DenseGeneral`, as the real one is, so jlora's shipped entry describes it.
"""

from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax


def _tuple(x):
  return tuple(x) if isinstance(x, Iterable) else (x,)


class DenseGeneral(nnx.Module):
  """A linear transformation with flexible axes (maxtext 0.2.5)."""

  def __init__(self, in_features_shape, out_features_shape, axis=-1, weight_dtype=jnp.float32, dtype=jnp.float32,
               use_bias=False, quant=None, matmul_precision="default", *, rngs: nnx.Rngs):
    self.in_features_shape, self.out_features_shape = _tuple(in_features_shape), _tuple(out_features_shape)
    self.axis, self.weight_dtype, self.dtype = _tuple(axis), weight_dtype, dtype
    self.quant, self.use_bias, self.matmul_precision = quant, use_bias, matmul_precision
    shape = self.in_features_shape + self.out_features_shape
    fan_in = int(np.prod(self.in_features_shape))
    self.kernel = nnx.Param(jax.random.truncated_normal(rngs.params(), -2, 2, shape, weight_dtype) / np.sqrt(fan_in))
    self.bias = nnx.Param(jax.random.normal(rngs.params(), self.out_features_shape, weight_dtype) * 0.1) \
        if use_bias else None
    self.kernel_scale = None

  def __call__(self, inputs, _initializing=False, out_sharding=None, slice_bounds=None):
    inputs = jnp.asarray(inputs, self.dtype)
    norm_axis = tuple(ax if ax >= 0 else inputs.ndim + ax for ax in self.axis)
    for i, ax in enumerate(norm_axis):
      if inputs.shape[ax] != self.in_features_shape[i]:
        raise ValueError(f"Input dimension {inputs.shape[ax]} at axis {ax} does not match expected input feature "
                         f"size {self.in_features_shape[i]}")
    kernel = jnp.asarray(self.kernel.get_value(), self.dtype)
    contract_ind = tuple(range(0, len(self.axis)))
    output = lax.dot_general(inputs, kernel, ((norm_axis, contract_ind), ((), ())),
                             precision=lax.Precision(self.matmul_precision))
    if self.bias is not None:
      output += jnp.asarray(self.bias[...], self.dtype)
    return output


DenseGeneral.__module__, DenseGeneral.__qualname__ = "maxtext.layers.linears", "DenseGeneral"
