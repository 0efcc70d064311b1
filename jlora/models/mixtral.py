"""Mixtral: the Llama decoder with a sparse mixture-of-experts feed-forward, Hugging Face module names.

Everything but the feed-forward is :mod:`jlora.models.llama` (attention, RoPE, norms, the KV
cache, `scan_layers`, `remat`). Each block's `mlp` is :class:`MixtralSparseMoeBlock`, as
`transformers` 5 names it: a router `mlp/gate` (:class:`MixtralRouter`, `weight (E, d)`) and the
experts `mlp/experts` holding two stacked weights, `gate_up_proj (E, d, 2·ff)` and
`down_proj (E, ff, d)` (Flax `(E, in, out)`; torch keeps `(E, out, in)`).

The expert contractions are the two methods of :class:`MixtralExperts`, each a
`jax.lax.ragged_dot` over tokens sorted by expert, which this module describes to jlora
(`jlora.register_layer`), so that PEFT's Mixtral targets
`LoraConfig(target_parameters=["experts.gate_up_proj", "experts.down_proj"])` get one rank-r
adapter per expert applied factored by `jlora.apply` (docs/moe.md); `target_modules` lists
(`["q_proj", "v_proj"]`) work as for Llama.

Checkpoints: `transformers` 5 holds the fused names in memory (`mlp.experts.gate_up_proj`),
but its `save_pretrained` writes the original per-expert layout,
`block_sparse_moe.experts.{j}.w1|w2|w3.weight` and `block_sparse_moe.gate.weight`, as the
published Mixtral checkpoints are. `from_pretrained` reads either; `save_pretrained` writes
the per-expert layout; `to_hf_state_dict` gives the fused names (what
`MixtralForCausalLM.state_dict()` holds).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jlora.frontends.layers import Layer, register_layer
from jlora.models._arch import Architecture, AxisTable
from jlora.models._checkpoint import HFSpec
from jlora.models._layers import activation
from jlora.models.llama import LlamaConfig, LlamaForCausalLM

__all__ = ["ARCHITECTURE", "MixtralConfig", "MixtralExperts", "MixtralForCausalLM", "MixtralRouter", "MixtralSparseMoeBlock"]


@dataclasses.dataclass(frozen=True)
class MixtralConfig(LlamaConfig):
  """:class:`~jlora.models.llama.LlamaConfig` plus the experts (defaults: Mixtral-8x7B's).

  `num_local_experts` is E, `num_experts_per_tok` the top-k of the router. transformers'
  `router_jitter_noise` (a training-time input jitter) must be 0: jlora does not apply it.
  `output_router_logits` / `router_aux_loss_coef` are not read (no load-balancing loss).
  """

  model_type: str = "mixtral"
  intermediate_size: int = 14336
  num_key_value_heads: int | None = 8
  rms_norm_eps: float = 1e-5
  rope_theta: float = 1e6
  max_position_embeddings: int = 131072
  num_local_experts: int = 8
  num_experts_per_tok: int = 2
  router_jitter_noise: float = 0.0

  @classmethod
  def from_hf(cls, config: Mapping[str, Any]) -> MixtralConfig:
    """Reads a Hugging Face mixtral `config.json` dict (transformers 4 or 5).

    Raises:
      ValueError: for settings the Llama decoder refuses, `num_experts_per_tok` outside
        `1..num_local_experts`, or a non-zero `router_jitter_noise`.
    """
    config = dict(config)
    config.setdefault("rope_theta", 1e6)  # Mixtral's default, where neither `rope_parameters` nor the key says
    out = super().from_hf(config)
    if not 1 <= out.num_experts_per_tok <= out.num_local_experts:
      raise ValueError(f"mixtral config: `num_experts_per_tok` must be in 1..num_local_experts "
                       f"({out.num_local_experts}), got {out.num_experts_per_tok}; correct it in config.json.")
    if out.router_jitter_noise:
      raise ValueError(f"mixtral config: `router_jitter_noise`={out.router_jitter_noise} is not supported (jlora "
                       "routes without input jitter); set it to 0.0 in config.json.")
    return out

  def to_hf(self) -> dict[str, Any]:
    """A Hugging Face `config.json` dict (transformers 5 style)."""
    out = super().to_hf()
    for key in ("attention_bias", "mlp_bias"):  # Mixtral has neither; the Llama decoder's defaults (False) hold
      out.pop(key)
    return out


class MixtralExperts(nn.Module):
  """The experts' stacked weights and their two contractions over tokens sorted by expert.

  Params (created in this order, transformers' order, which PEFT's nesting of two wrappers follows):
  `gate_up_proj (E, d, 2·ff)` (gate in the first `ff` columns, up in the last) and `down_proj (E, ff, d)`.
  Both methods are `jax.lax.ragged_dot(x, W, group_sizes)`: rows `x (N, in)` sorted by expert,
  `group_sizes (E,)` int32 rows per expert; they are described to jlora (`jlora.register_layer`), so a
  `target_parameters` adapter is applied factored, one per expert.
  """

  config: MixtralConfig
  dtype: Any

  def setup(self):
    c = self.config
    init = nn.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
    e, d, f = c.num_local_experts, c.hidden_size, c.intermediate_size
    self.gate_up_proj = self.param("gate_up_proj", init, (e, d, 2 * f), self.dtype)
    self.down_proj = self.param("down_proj", init, (e, f, d), self.dtype)

  def gate_up(self, x: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """`(N, d)` rows sorted by expert -> `(N, 2·ff)`."""
    return jax.lax.ragged_dot(x, self.gate_up_proj, group_sizes)

  def down(self, x: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """`(N, ff)` rows sorted by expert -> `(N, d)`."""
    return jax.lax.ragged_dot(x, self.down_proj, group_sizes)


register_layer(MixtralExperts, Layer(weight="gate_up_proj", input="x", group_sizes="group_sizes", method="gate_up"))
register_layer(MixtralExperts, Layer(weight="down_proj", input="x", group_sizes="group_sizes", method="down"))


class MixtralRouter(nn.Module):
  """The router (`mlp/gate`): `x (N, d) -> logits (N, E)` with a `weight (E, d)` kept in torch's layout.

  As transformers 5's `MixtralTopKRouter`, it is not a linear layer: `"all-linear"` leaves it alone (as PEFT
  does), `target_modules` cannot name it, and PEFT's `target_parameters=["gate.weight"]` adapts its weight,
  which jlora folds in with `jlora.apply_merged` (`jlora.apply` refuses, naming the fix).
  """

  config: MixtralConfig
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    init = nn.initializers.lecun_normal(in_axis=-1, out_axis=-2)
    weight = self.param("weight", init, (c.num_local_experts, c.hidden_size), self.dtype)
    return jnp.einsum("nd,ed->ne", x, weight)


class MixtralSparseMoeBlock(nn.Module):
  """The sparse mixture-of-experts feed-forward (`mlp`), as transformers 5's `MixtralSparseMoeBlock`.

  Per token: router logits `gate(x) (E,)`, softmax in float32, the top-k experts, their weights
  renormalized to sum to 1; the output is `sum_k w_k · down_e(silu(gate_e(x)) · up_e(x))`.

  Dispatch: every (token, chosen expert) pair is one row, `N = B·T·k` rows sorted by expert
  (a stable argsort), so that each expert's rows are contiguous, and both contractions are
  `jax.lax.ragged_dot` with the per-expert counts as `group_sizes`; the rows' outputs are weighted
  and scattered back to their tokens. This is exact (no capacity factor, no dropped or padded
  tokens: every token meets all its k experts) and has static shapes (N does not depend on the
  routing), so it jits once and differentiates through `ragged_dot`. The alternatives are worse
  here: a capacity-based einsum dispatch drops tokens past capacity (not transformers' result),
  and running every expert on every token costs E/k times the FLOPs. Padding tokens are routed
  like the others, as in transformers (attention masks them; their own outputs go unused).
  """

  config: MixtralConfig
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """`x (B, T, d)` -> `(B, T, d)`."""
    c = self.config
    b, t, d = x.shape
    k, e = c.num_experts_per_tok, c.num_local_experts
    tokens = x.reshape(b * t, d)
    logits = MixtralRouter(c, self.dtype, name="gate")(tokens)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, k)  # (B·T, k) each
    weights = weights / weights.sum(-1, keepdims=True)
    flat = experts.reshape(-1)  # (B·T·k,) expert of each row, token-major
    order = jnp.argsort(flat, stable=True)
    token = order // k  # the token of each sorted row
    group_sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
    mod = MixtralExperts(c, self.dtype, name="experts")
    gate, up = jnp.split(mod.gate_up(tokens[token], group_sizes), 2, axis=-1)
    rows = mod.down(activation(c.hidden_act)(gate) * up, group_sizes)
    rows = rows.astype(jnp.float32) * weights.reshape(-1)[order][:, None]  # weighted in float32, as transformers
    return jnp.zeros_like(tokens).at[token].add(rows.astype(tokens.dtype)).reshape(b, t, d)


# ------------------------------------------------------------------------------------------------ checkpoints
_EXPERT = re.compile(r"(.*)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight")


def per_expert_to_fused(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Mixtral's saved layout -> transformers 5's fused names (`HFSpec.read`); other tensors pass unchanged.

  `X.block_sparse_moe.experts.{j}.w1|w3.weight (ff, d)` -> `X.mlp.experts.gate_up_proj (E, 2·ff, d)`
  (w1 the gate, first); `w2 (d, ff)` -> `X.mlp.experts.down_proj (E, d, ff)`;
  `X.block_sparse_moe.gate.weight` -> `X.mlp.gate.weight`.

  Raises:
    ValueError: a layer whose experts are not numbered 0..E-1 or lack one of w1, w2, w3 (naming them).
  """
  out: dict[str, np.ndarray] = {}
  experts: dict[str, dict[tuple[int, str], np.ndarray]] = {}
  for name, value in tensors.items():
    m = _EXPERT.fullmatch(name)
    if m:
      experts.setdefault(m.group(1), {})[(int(m.group(2)), m.group(3))] = value
    else:
      out[name.replace(".block_sparse_moe.", ".mlp.")] = value
  for layer, held in experts.items():
    count = max(j for j, _ in held) + 1
    absent = [f"{layer}.block_sparse_moe.experts.{j}.{w}.weight" for j in range(count) for w in ("w1", "w2", "w3")
              if (j, w) not in held]
    if absent:
      raise ValueError(f"The checkpoint's experts are incomplete: missing tensors {absent[:8]}; every expert "
                       "0..E-1 of a layer needs w1, w2 and w3. Check that all shards are present.")
    w = {name: [held[(j, name)] for j in range(count)] for name in ("w1", "w2", "w3")}
    try:
      out[f"{layer}.mlp.experts.gate_up_proj"] = np.concatenate([np.stack(w["w1"]), np.stack(w["w3"])], axis=1)
      out[f"{layer}.mlp.experts.down_proj"] = np.stack(w["w2"])
    except ValueError as e:
      raise ValueError(f"The experts of `{layer}` have different shapes ({e}); the checkpoint is damaged.") from None
  return out


def fused_to_per_expert(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The inverse of :func:`per_expert_to_fused` (`HFSpec.write`): the layout `transformers` saves."""
  out: dict[str, np.ndarray] = {}
  for name, value in tensors.items():
    layer, _, leaf = name.rpartition(".mlp.")
    if leaf == "experts.gate_up_proj":
      f = value.shape[1] // 2
      for j, w in enumerate(value):
        out[f"{layer}.block_sparse_moe.experts.{j}.w1.weight"] = np.ascontiguousarray(w[:f])
        out[f"{layer}.block_sparse_moe.experts.{j}.w3.weight"] = np.ascontiguousarray(w[f:])
    elif leaf == "experts.down_proj":
      for j, w in enumerate(value):
        out[f"{layer}.block_sparse_moe.experts.{j}.w2.weight"] = np.ascontiguousarray(w)
    else:
      out[name.replace(".mlp.", ".block_sparse_moe.")] = value
  return out


class MixtralForCausalLM(LlamaForCausalLM):
  """Mixtral causal LM: :class:`~jlora.models.llama.LlamaForCausalLM` whose `mlp` is a mixture of experts.

  Attributes, call and raises as the Llama model's. Parameters of a block's `mlp`:
  `gate/weight (E, d)` (torch's layout, as a plain tree's `weight`), `experts/gate_up_proj (E, d, 2·ff)`, `experts/down_proj (E, ff, d)`
  (one more leading axis `L` with `scan_layers=True`).
  """

  config: MixtralConfig
  feed_forward: ClassVar[Any] = MixtralSparseMoeBlock
  param_axes: ClassVar[AxisTable] = {
    **{k: v for k, v in LlamaForCausalLM.param_axes.items() if not k.startswith("mlp/")},
    "mlp/gate/weight": ("experts", "embed"),
    "mlp/experts/gate_up_proj": ("experts", "embed", "mlp"),
    "mlp/experts/down_proj": ("experts", "mlp", "embed"),
  }

  def hf_spec(self) -> HFSpec:
    """The Llama layout plus the experts' fused weights, read in either layout, saved per expert."""
    return super().hf_spec()._replace(
      raw_leaves=("gate_up_proj", "down_proj"),
      param_order=("gate_up_proj", "down_proj"),
      read=per_expert_to_fused,
      write=fused_to_per_expert,
    )


def build(
  config: MixtralConfig, *, dtype: Any = jnp.float32, scan_layers: bool = False, remat: bool = False
) -> MixtralForCausalLM:
  """Builds the model; `scan_layers` / `remat` as in :class:`~jlora.models.llama.LlamaForCausalLM`."""
  return MixtralForCausalLM(config, dtype, scan_layers, remat)


ARCHITECTURE = Architecture(config=MixtralConfig, build=build, options=("scan_layers", "remat"))
