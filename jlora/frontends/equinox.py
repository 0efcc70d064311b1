"""Equinox: LoRA and DoRA by module surgery, factored: the wrappers hand each call to `jlora.core.adapted`.

The public names are re-exported by `jlora.equinox`, whose docstring describes them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from jlora.core import ops as _ops
from jlora.core import tokens as _tokens
from jlora.core.adapted import adapted
from jlora.core.config import LoraConfig
from jlora.core.init import add_adapters
from jlora.core.keys import stringify
from jlora.core.parameters import refuse as refuse_parameters
from jlora.core.plain import site
from jlora.core.targets import LORA_KEYS, MAGNITUDE_KEY, TOKENS_KEY, Site, is_lora_key, path_str
from jlora.core.tree import check_magnitude, flatten, unflatten
from jlora.core.tree import trainable_mask as _tree_mask
from jlora.core.variants import variant_of_leaves

__all__ = ["LoraLinear", "LoraEmbedding", "TokensEmbedding", "init", "merge", "trainable_mask", "to_params",
           "from_params"]

Path = tuple[str, ...]


# The call sites of the two wrappers: a Linear's `(out, in)` weight meets one example `x: (in,)` as the einsum
# `i,oi->o` (its adapters are in the broadcast layout, `jlora.core.ops`); an Embedding is an `embed` site.
_LINEAR = Site(("LoraLinear",), "einsum", "weight", (), (1,), (0,), equation="i,oi->o")
_EMBEDDING = Site(("LoraEmbedding",), "embed", "embedding", (), (0,), (1,))


def _leaves(node: Any) -> dict[str, jax.Array]:
  """`{role: leaf}` of a wrapper, as `jlora.core.adapted` and `jlora.core.variants` take them."""
  leaves = {"lora_a": node.lora_a, "lora_b": node.lora_b}
  return leaves if node.lora_magnitude is None else {**leaves, MAGNITUDE_KEY: node.lora_magnitude}


class LoraLinear(eqx.Module):
  """`eqx.nn.Linear` with a LoRA (or DoRA) adapter: `base(x) + s·(dropout(x)·A)·B`, factored.

  Attributes:
    base: the original `eqx.nn.Linear` (weight `(out, in)`).
    lora_a: `(1, in, r)` (broadcast layout: the input side).
    lora_b: `(out, 1, r)`, zeros at init.
    scale: `s` (`lora_alpha / r`, or `/ sqrt(r)` with rsLoRA).
    dropout: LoRA dropout rate, applied to the LoRA input when the call gets a `key`.
    inference: no dropout (set by `eqx.nn.inference_mode`).
    lora_magnitude: DoRA's magnitude `(out, 1)` (`‖W0 + s·(A·B)ᵀ‖` over the inputs at init), or None for LoRA.
  """

  base: eqx.nn.Linear
  lora_a: jax.Array
  lora_b: jax.Array
  scale: float = eqx.field(static=True)
  dropout: float = eqx.field(static=True, default=0.0)
  inference: bool = False
  lora_magnitude: jax.Array | None = None

  def __call__(self, x: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
    """`x: (in,)` (or a scalar for `in_features="scalar"`) -> `(out,)`, like the base layer."""
    y = self.base(x, key=key)
    leaves = _leaves(self)
    bias = None if self.base.bias is None else jnp.reshape(self.base.bias, (-1,))
    out = adapted(_LINEAR, variant_of_leaves(leaves), jnp.reshape(x, (-1,)), jnp.reshape(y, (-1,)), self.base.weight,
                  leaves, scale=self.scale, rate=self.dropout, dropout_key=None if self.inference else key, bias=bias,
                  y_is_product=True)
    return out.reshape(y.shape)


class LoraEmbedding(eqx.Module):
  """`eqx.nn.Embedding` with a LoRA (or DoRA) adapter (PEFT's roles): `base(i) + s·A[i]·B`.

  Attributes:
    base: the original `eqx.nn.Embedding` (weight `(vocab, dim)`).
    lora_a: `(vocab, r)`, zeros at init.
    lora_b: `(r, dim)`.
    scale: `s`.
    lora_magnitude: DoRA's magnitude `(1, dim)`, or None for LoRA.
  """

  base: eqx.nn.Embedding
  lora_a: jax.Array
  lora_b: jax.Array
  scale: float = eqx.field(static=True)
  lora_magnitude: jax.Array | None = None

  def __call__(self, x: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
    """`x`: an integer index -> `(dim,)`, like the base layer."""
    y = self.base(x, key=key)
    leaves = _leaves(self)
    return adapted(_EMBEDDING, variant_of_leaves(leaves), x, y, self.base.weight, leaves, scale=self.scale,
                   y_is_product=True)


class TokensEmbedding(eqx.Module):
  """`eqx.nn.Embedding` with trainable token rows (`trainable_token_indices`): `table.at[ids].add(delta)[i]`.

  The lookup adds the rows' change to the base lookup (`jlora.core.tokens.lookup`), without copying the table.

  Attributes:
    base: the original `eqx.nn.Embedding` (weight `(vocab, dim)`), frozen.
    trainable_tokens: `(n_ids, dim)`: row `k` is added to `table[ids[k]]`; zeros at init.
    ids: the trained token ids.
  """

  base: eqx.nn.Embedding
  trainable_tokens: jax.Array
  ids: tuple[int, ...] = eqx.field(static=True)

  def __call__(self, x: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
    """`x`: an integer index -> `(dim,)`, like the base layer."""
    return _tokens.lookup(self.base(x, key=key), jnp.asarray(x), self.trainable_tokens, self.ids,
                          self.base.weight.shape[0])

  @property
  def weight(self) -> jax.Array:
    """The table with the rows added, `(vocab, dim)`, for code that reads the weight by hand (a tied head
    `weight @ h`): formed here, one copy of the table per read, as `jlora.apply_merged` forms a merged weight."""
    return _tokens.fold(self.base.weight, self.trainable_tokens, self.ids)


_WRAPPERS = (LoraLinear, LoraEmbedding, TokensEmbedding)
_NODES = (eqx.nn.Linear, eqx.nn.Embedding, *_WRAPPERS)


def _is_node(x: Any) -> bool:
  return isinstance(x, _NODES)


def _name(k: Any) -> str:
  for attr in ("name", "key", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _nodes(model: Any) -> tuple[list[tuple[Path, Any]], Any]:
  """`([(path, leaf or layer)], treedef)`, with Linear / Embedding / wrapper modules kept whole."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(model, is_leaf=_is_node)
  return [(tuple(_name(k) for k in kp), leaf) for kp, leaf in leaves], treedef


def _weight_name(node: Any) -> str:
  """The name of a layer's weight in jlora's dict: `weight` (`(out, in)`), or `embedding` for an Embedding."""
  return "embedding" if isinstance(node, (eqx.nn.Embedding, LoraEmbedding, TokensEmbedding)) else "weight"


def _node_dict(node: Any) -> dict[str, Any]:
  """A layer as a module dict of jlora's tree: weight, bias, and the adapters of a wrapper."""
  base = node.base if isinstance(node, _WRAPPERS) else node
  name = _weight_name(node)
  out = {name: base.weight}
  if getattr(base, "bias", None) is not None:
    out["bias"] = base.bias
  if isinstance(node, TokensEmbedding):
    out[TOKENS_KEY] = node.trainable_tokens
  elif isinstance(node, _WRAPPERS):
    a_key, b_key = LORA_KEYS
    out[a_key], out[b_key] = node.lora_a, node.lora_b
    if node.lora_magnitude is not None:
      out[MAGNITUDE_KEY] = node.lora_magnitude
  return out


def to_params(model: Any) -> dict:
  """The model's arrays as jlora's params dict (string keys; non-array leaves left out).

  A layer at attribute path `layers[0]` is the module dict `{"layers": {"0": {"weight": (out, in), "bias": ...,
  "lora_a": (1, in, r), "lora_b": (out, 1, r)}}}`; an Embedding's weight is named `embedding`.
  """
  flat: dict[Path, Any] = {}
  for path, leaf in _nodes(model)[0]:
    if _is_node(leaf):
      flat.update({(*path, k): v for k, v in _node_dict(leaf).items()})
    elif eqx.is_array(leaf):
      flat[path] = leaf
  return unflatten(flat)


def _rebuilt(node: Any, path: Path, entry: Mapping[str, Any], config: LoraConfig | None) -> Any:
  """A layer with the leaves of its module dict: wrapped when the dict holds adapters, plain when it holds the
  weight without adapters, and otherwise as it was (e.g. only a trained bias given)."""
  where = path_str(path)
  base = node.base if isinstance(node, _WRAPPERS) else node
  name = _weight_name(node)
  a_key, b_key = LORA_KEYS
  m_key = MAGNITUDE_KEY
  own = _node_dict(base)
  extra = sorted(set(entry) - set(own) - {a_key, b_key, m_key, TOKENS_KEY})
  if extra:
    raise ValueError(f"from_params: the module dict at {where!r} holds {extra}; the model's layer there "
                     f"({type(base).__name__}) has {sorted(own)} (and optionally {a_key} / {b_key} / {m_key}).")
  for k in set(own) & set(entry):
    if tuple(entry[k].shape) != tuple(own[k].shape):
      raise ValueError(f"from_params: {where}/{k} has shape {tuple(entry[k].shape)}; the model's is "
                       f"{tuple(own[k].shape)}.")
  leaves = {**own, **entry}
  base = eqx.tree_at(lambda m: [m.weight] + ([m.bias] if "bias" in own else []), base,
                     [leaves[name]] + ([leaves["bias"]] if "bias" in own else []))
  if TOKENS_KEY in entry:
    return _with_tokens(base, path, {**leaves, TOKENS_KEY: entry[TOKENS_KEY]}, config)
  if a_key not in entry and b_key not in entry:
    return base if name in entry or not isinstance(node, _WRAPPERS) else eqx.tree_at(lambda m: m.base, node, base)
  if not (a_key in entry and b_key in entry):
    raise ValueError(f"from_params: {where!r} has only one of {a_key} / {b_key}; the adapter is incomplete.")
  if config is None:
    raise ValueError(f"from_params: {where!r} holds adapters; pass the `config` they were made with (for the scale).")
  a, b, magnitude = entry[a_key], entry[b_key], entry.get(m_key)
  _ops.check_adapter(where, base.weight.shape, a.shape, b.shape, config.rank_for(where))
  check_magnitude(where, config, magnitude, _ops.magnitude_shape(a.shape, b.shape, base.weight.shape))
  if isinstance(base, eqx.nn.Embedding):
    return LoraEmbedding(base, a, b, config.scale_for(where), lora_magnitude=magnitude)
  return LoraLinear(base, a, b, config.scale_for(where), config.lora_dropout, lora_magnitude=magnitude)


def _with_tokens(base: Any, path: Path, leaves: Mapping[str, Any], config: LoraConfig | None) -> TokensEmbedding:
  """The `TokensEmbedding` of `base` with the `trainable_tokens` leaf of its module dict `leaves`, checked."""
  fn = "jlora.equinox.from_params"
  _tokens.check_alone(leaves, path, fn)
  if type(base) is not eqx.nn.Embedding:
    raise ValueError(f"{fn}: `params` holds trainable tokens at {path_str(path)!r}, where the model has a "
                     f"{type(base).__name__}, not eqx.nn.Embedding (whose lookup is exactly its table's rows); pass "
                     "the params made for this model.")
  if config is None:
    raise ValueError(f"{fn}: {path_str(path)!r} holds trainable tokens; pass the `config` they were made with (for "
                     "their ids).")
  tk = next(_tokens.tokens(unflatten({(*path, k): v for k, v in leaves.items()}), config))
  return TokensEmbedding(base, tk.delta, tk.ids)


def from_params(model: Any, params: Mapping[str, Any], config: LoraConfig | None = None) -> Any:
  """`model` with the arrays of a jlora params dict: the inverse of `to_params`.

  Layers whose module dict holds `lora_a` / `lora_b` come back as `LoraLinear` /
  `LoraEmbedding` (adapters checked against the weight and the config's rank),
  Embeddings whose dict holds `trainable_tokens` as `TokensEmbedding`,
  layers whose dict holds the weight without adapters as plain layers; any
  other array is replaced by the dict's leaf at its path. What `params` lacks
  stays as it is in `model`, so a part of a tree (the trainable half of
  `jlora.split`) is fine. Use it on the base model after
  `jlora.load_adapter(path, to_params(base))` or `jlora.load_peft(..., name_map=...)`.

  Args:
    model: an Equinox model (with or without adapters) of the same structure.
    params: the params dict, e.g. from `to_params` or a loader.
    config: the config of the adapters in `params` (needed when it holds any).

  Raises:
    ValueError: a leaf of `params` has no place in the model, or does not fit it.
  """
  refuse_parameters("jlora.equinox.from_params", config)
  flat = flatten(stringify(params))
  entries: dict[Path, dict[str, Any]] = {}
  nodes, treedef = _nodes(model)
  layers = {path for path, leaf in nodes if _is_node(leaf)}
  for p, v in flat.items():
    if p[:-1] in layers:
      entries.setdefault(p[:-1], {})[p[-1]] = v
  used = {(*m, k) for m, entry in entries.items() for k in entry}
  out = []
  for path, leaf in nodes:
    if _is_node(leaf) and path in entries:
      leaf = _rebuilt(leaf, path, entries[path], config)
    elif eqx.is_array(leaf) and path in flat:
      if tuple(flat[path].shape) != tuple(leaf.shape):
        raise ValueError(f"from_params: {path_str(path)} has shape {tuple(flat[path].shape)}; the model's is "
                         f"{tuple(leaf.shape)}.")
      leaf = flat[path]
      used.add(path)
    out.append(leaf)
  unused = sorted(path_str(p) for p in set(flat) - used)
  if unused:
    raise ValueError(f"from_params: `params` holds leaves the model has no place for: {unused[:6]}"
                     f"{' …' if len(unused) > 6 else ''}. Pass the model the params were made from.")
  return jax.tree_util.tree_unflatten(treedef, out)


def init(key: jax.Array, model: Any, config: LoraConfig, *, dtype: Any = jnp.float32) -> Any:
  """`model` with each targeted `eqx.nn.Linear` / `eqx.nn.Embedding` wrapped with a new adapter.

  Targets are matched on the module paths of `to_params` (`"query_proj"`,
  `"layers.0"`, regexes, `"all-linear"`: every Linear but an output head, i.e.
  a layer named `lm_head`, `classifier`, `score`, `qa_outputs` or `head`).
  Adapters are drawn as `jlora.init_tree` draws them for the same weights (for
  a 2-D `Linear`, `init_tree` on `to_params(model)` gives the same values);
  base arrays are the same objects (PiSSA writes the residual). LoRA dropout
  acts when a `LoraLinear` call gets a `key`. With `use_dora=True` each wrapper
  also holds DoRA's `lora_magnitude` (`(out, 1)` for a Linear, `(1, dim)` for an
  Embedding), starting at the column norms so the model is unchanged; `merge` folds it.
  With `config.trainable_token_indices`, each table it names (the rules of
  `jlora.init`: a list names the model's one `eqx.nn.Embedding`, or the one named
  `embed_tokens`) becomes a `TokensEmbedding` with a zero `trainable_tokens`.

  Args:
    key: PRNG key for the adapter init.
    model: an Equinox model without adapters.
    config: the LoRA config.
    dtype: adapter dtype (float32 by default, whatever the base dtype).

  Raises:
    TypeError: `config` is not a `LoraConfig`.
    ValueError: as `jlora.init` (nothing matched: the message lists the layers;
      rank too large; a `trainable_token_indices` name that is no Embedding, an
      id outside its rows, a table LoRA adapts too; ...), or the model already
      holds adapters.
  """
  if not isinstance(config, LoraConfig):
    raise TypeError(f"`config` must be a jlora.LoraConfig, got {type(config).__name__}.")
  refuse_parameters("jlora.equinox.init", config)
  nodes = [(path, leaf) for path, leaf in _nodes(model)[0] if _is_node(leaf)]
  if any(isinstance(leaf, _WRAPPERS) for _, leaf in nodes):
    raise ValueError("jlora.equinox.init: `model` already holds LoRA adapters; pass the base model, or "
                     "jlora.equinox.merge(model) to fold them in first.")
  sites = []
  for path, node in nodes:
    n = node.weight.ndim - 2  # leading axes of layers stacked by eqx.filter_vmap
    embed = isinstance(node, eqx.nn.Embedding)
    axes = ((n,), (n + 1,)) if embed else ((n + 1,), (n,))
    sites.append(site(path, _weight_name(node), node.weight.shape, axes, kind="embed" if embed else "dense"))
  params = add_adapters(key, to_params(model), config, sites, dtype=dtype, masks="jlora.equinox.init")
  embeds = [_tokens.Embedding(path, "embedding", tuple(node.weight.shape), "" if type(node) is eqx.nn.Embedding else
                              f"it is a {type(node).__name__}, not eqx.nn.Embedding, whose lookup is exactly its "
                              "table's rows") for path, node in nodes if isinstance(node, eqx.nn.Embedding)]
  others = [(path, "dense") for path, node in nodes if not isinstance(node, eqx.nn.Embedding)]
  _tokens.add(params, _tokens.resolve(config, embeds, others, "jlora.equinox.init"), dtype=dtype,
              fn="jlora.equinox.init")
  return from_params(model, params, config)


def merge(model: Any) -> Any:
  """Folds every adapter into its layer, `W ← W0 + s·δ` (float32 sum, cast back), and unwraps it.

  A DoRA adapter folds as `W ← m·(W0 + s·δ)/‖W0 + s·δ‖` (`jlora.merge`'s rule).

  `δ = (A·B)ᵀ` in a Linear's `(out, in)` layout, `A·B` for an Embedding. The
  result has the base model's structure: plain `eqx.nn.Linear` / `Embedding`.
  """

  def fold(node: Any) -> Any:
    if isinstance(node, TokensEmbedding):
      return eqx.tree_at(lambda m: m.weight, node.base, node.weight)
    if not isinstance(node, _WRAPPERS):
      return node
    leaves = _leaves(node)
    return eqx.tree_at(lambda m: m.weight, node.base, variant_of_leaves(leaves).fold(node.base.weight, leaves,
                                                                                     node.scale))

  return jax.tree.map(fold, model, is_leaf=lambda x: isinstance(x, _WRAPPERS))


def trainable_mask(model: Any, config: LoraConfig | None = None) -> Any:
  """The filter spec of the trainable leaves: a bool tree like `model`, `True` on every adapter.

  With `config`, also on the biases that `config.bias` trains and the leaves of
  `modules_to_save` modules (as `jlora.trainable_mask`). Use it with
  `eqx.partition(model, mask)` and differentiate the first half only.
  """
  params = to_params(model)
  mask = flatten(_tree_mask(params, config)) if config is not None else {
      p: is_lora_key(p[-1]) for p in flatten(params)}
  nodes, treedef = _nodes(model)
  out = []
  for path, leaf in nodes:
    if _is_node(leaf):
      entry = {k: mask[(*path, k)] for k in _node_dict(leaf)}
      a_key, b_key = LORA_KEYS
      base = leaf.base if isinstance(leaf, _WRAPPERS) else leaf
      spec = jax.tree.map(lambda _: False, base)
      spec = eqx.tree_at(lambda m: m.weight, spec, entry[_weight_name(leaf)])
      if "bias" in entry:
        spec = eqx.tree_at(lambda m: m.bias, spec, entry["bias"])
      if isinstance(leaf, TokensEmbedding):
        spec = eqx.tree_at(lambda m: (m.base, m.trainable_tokens), leaf, (spec, entry[TOKENS_KEY]))
      elif isinstance(leaf, _WRAPPERS):
        spec = eqx.tree_at(lambda m: (m.base, m.lora_a, m.lora_b), leaf, (spec, entry[a_key], entry[b_key]))
        if leaf.lora_magnitude is not None:
          m_key = MAGNITUDE_KEY
          spec = eqx.tree_at(lambda m: m.lora_magnitude, spec, entry[m_key])
        spec = eqx.tree_at(lambda m: m.inference, spec, False) if isinstance(leaf, LoraLinear) else spec
      out.append(spec)
    else:
      out.append(bool(mask.get(path, False)) and eqx.is_array(leaf))
  return jax.tree_util.tree_unflatten(treedef, out)
