"""Haiku: the factored LoRA forward of `hk.Linear` layers (`import jlora.haiku`; `import jlora` does not import Haiku).

Adapters are made by `jlora.init_tree` on the Haiku params (module keys such as
`"attn/query"`, `"mlp/~/linear_0"`; `w: (in, out)`). `apply` runs a transformed
function's `apply` while `hk.intercept_methods` makes every adapted `hk.Linear`
(also those inside `hk.MultiHeadAttention` and `hk.nets.MLP`) return
`x·W + b + s·(x·A)·B`, factored, the same term as every other front-end (`A·B` is never
formed; with `use_dora=True`, DoRA's forward, as `jlora.apply` computes it).
The interceptor is entered inside `apply` and lives for that call only: call
`jlora.haiku.apply` inside your jitted function, never around it.

`init_eva(key, fn, params, config, batches)` is `jlora.init_eva` for these models:
EVA's data-driven adapters on the `hk.Linear` layers.

Trainable tokens (`trainable_token_indices`; `init_tree` puts
`embeddings_trainable_tokens: (n_ids, dim)` beside an `hk.Embed`'s `embeddings`):
that `hk.Embed`'s lookup gets the rows added (the table is not copied), and a read
of its `embeddings` outside the lookup (a tied head `h @ embed.embeddings.T`) gets
the table with the rows added, formed for that read.

LoRA: only `hk.Linear` is intercepted. An adapter elsewhere (a conv, an `hk.get_parameter`
used by hand, layers under `hk.layer_stack`) is an error naming it: use
`jlora.apply_merged` for those, which materializes `W0 + s·A·B`.

Example:
  >>> import haiku as hk, jax, jax.numpy as jnp, jlora, jlora.haiku
  >>> f = hk.transform(lambda x: hk.nets.MLP([16, 4], name="mlp")(x))
  >>> x = jnp.ones((2, 8))
  >>> config = jlora.LoraConfig(r=2, target_modules=["linear_0"])
  >>> params = jlora.init_tree(jax.random.key(1), f.init(jax.random.key(0), x), config)
  >>> jlora.haiku.apply(f.apply, params, config, None, x).shape
  (2, 4)
"""

from jlora.adapters.eva import haiku_init_eva as init_eva
from jlora.frontends.haiku import apply as apply

__all__ = ["apply", "init_eva"]
