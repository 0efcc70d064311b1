"""Equinox: LoRA by module surgery, factored (`import jlora.equinox`; `import jlora` does not import Equinox).

`init` replaces each targeted `eqx.nn.Linear` (also those inside
`eqx.nn.MultiheadAttention` and `eqx.nn.MLP`) by a `LoraLinear` and each targeted
`eqx.nn.Embedding` by a `LoraEmbedding`. A wrapper holds the original module as
`base` and the adapters as array leaves of their own, and computes
`base(x) + s·(x·A)·B`, the same term as every other front-end (the rank-r product first; `A·B` is
never formed). With `use_dora=True` a wrapper also holds DoRA's `lora_magnitude`
and computes DoRA's forward, as `jlora.apply` does. With `trainable_token_indices`,
the named `eqx.nn.Embedding` becomes a `TokensEmbedding` holding the rows' change
`trainable_tokens: (n_ids, dim)` (zero at init): its lookup sees
`table.at[ids].add(delta)` without copying the table, and its `weight` is that
table, formed when read (for a tied head written by hand). `trainable_mask(model)`
is the filter spec that `eqx.partition`
and `eqx.filter_grad` need to train the adapters only, and `merge` folds them
back into plain modules.

Layouts. An Equinox `Linear.weight` is `(out, in)`, so its adapters take jlora's
broadcast layout: `lora_a: (1, in, r)` on the input side, `lora_b: (out, 1, r)`
on the output side, `B = 0` at init; `delta W = s·(A·B)ᵀ` in the weight's layout.
An `Embedding.weight` `(vocab, dim)` gets PEFT's embedding roles: `lora_a: (vocab, r)`
zeros at init, `lora_b: (r, dim)`. Layers stacked by `eqx.filter_vmap` (leading
axes on every weight) get stacked adapters.

`to_params` / `from_params` convert to and from jlora's plain params dict (module
paths from the attribute names and indices, e.g. `layers/0`, with `base`
dropped; an Embedding's weight is named `embedding` there), for `jlora.save_adapter`,
`jlora.save_peft(..., name_map="flax")`, `jlora.merge` and the other tree functions.

Example:
  >>> import equinox as eqx, jax, jlora, jlora.equinox
  >>> model = eqx.nn.MLP(8, 2, 16, 2, key=jax.random.key(0))
  >>> config = jlora.LoraConfig(r=4, target_modules=["layers.0", "layers.1"])
  >>> lora_model = jlora.equinox.init(jax.random.key(1), model, config)
  >>> trainable, frozen = eqx.partition(lora_model, jlora.equinox.trainable_mask(lora_model))
  >>> lora_model.layers[0].lora_a.shape, lora_model.layers[0].lora_b.shape
  ((1, 8, 4), (16, 1, 4))
  >>> merged = jlora.equinox.merge(lora_model)  # plain eqx.nn.MLP again
"""

from jlora.frontends.equinox import LoraEmbedding as LoraEmbedding
from jlora.frontends.equinox import LoraLinear as LoraLinear
from jlora.frontends.equinox import TokensEmbedding as TokensEmbedding
from jlora.frontends.equinox import from_params as from_params
from jlora.frontends.equinox import init as init
from jlora.frontends.equinox import merge as merge
from jlora.frontends.equinox import to_params as to_params
from jlora.frontends.equinox import trainable_mask as trainable_mask

__all__ = ["LoraEmbedding", "LoraLinear", "TokensEmbedding", "from_params", "init", "merge", "to_params",
           "trainable_mask"]
