"""A linen model with every layer kind jlora adapts, and the sharding rule's expected specs for it, by hand.

Embed, DenseGeneral out (16 -> (4, 8)) and in ((4, 8) -> 16), an Einsum with a
shared axis, and a Dense inside nn.scan. Imported by `tests/test_sharding.py` and
its 8-device subprocess.
"""

import flax.linen as nn
from jax.sharding import PartitionSpec as P


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return x + nn.Dense(16, name="up")(x), None


class Model(nn.Module):
  @nn.compact
  def __call__(self, ids):
    x = nn.Embed(32, 16, name="embed")(ids)
    x = nn.DenseGeneral((4, 8), name="qkv")(x)
    x = nn.DenseGeneral(16, axis=(-2, -1), name="o")(x)
    x = nn.Einsum((4, 16, 8), "btd,hdk->bthk", name="ein")(x).reshape(x.shape[:2] + (32,))[..., :16]
    x, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)(name="layers")(x, None)
    return x


SPECS = {"embed": {"embedding": P("model", "data")},
         "qkv": {"kernel": P("data", "model", None), "bias": P("model", None)},
         "o": {"kernel": P("model", "data", None), "bias": P()},  # both contracting axes sharded
         "ein": {"kernel": P("model", "data", None), "bias": P()},
         "layers": {"up": {"kernel": P(None, "data", "model"), "bias": P(None, "model")}}}
# The rule, by hand: A keeps the kernel's stack and input specs, B its stack and output specs, r replicated;
# an einsum adapter keeps the specs of the axes it shares with the kernel; a DoRA magnitude those it shares.
EXPECTED = {"embed": (P("model", None), P(None, "data"), P(None, "data")),
            "qkv": (P("data", None), P(None, "model", None), P(None, "model", None)),
            "o": (P("model", "data", None), P(None, None), P(None, None, None)),
            "ein": (P(None, "data", None, None), P("model", None, None, None), P("model", None, None)),
            "layers/up": (P(None, "data", None), P(None, None, "model"), P(None, None, "model"))}
