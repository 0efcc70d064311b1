"""BERT encoder with task heads (Flax linen), Hugging Face module names.

Parameter paths mirror `transformers`: `embeddings/{word,position,token_type}_embeddings`,
`embeddings/LayerNorm`, `encoder/layer_0/attention/self/{query,key,value}`,
`encoder/layer_0/attention/output/{dense,LayerNorm}`, `encoder/layer_0/intermediate/dense`,
`encoder/layer_0/output/{dense,LayerNorm}`, `pooler/dense`. Task models wrap the encoder
as `bert` and add a `classifier` (as `BertFor{Sequence,Token}Classification`); the
sentence-embedding model is a bare `BertModel` with attention-mask-weighted mean pooling
(as sentence-transformers), optionally L2-normalized.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jlora.models._checkpoint import HFSpec, hashable, name_map
from jlora.models._layers import activation, attention

__all__ = [
  "TASKS",
  "BertConfig",
  "BertForSentenceEmbedding",
  "BertForSequenceClassification",
  "BertForTokenClassification",
  "BertModel",
]

TASKS = ("SEQ_CLS", "TOKEN_CLS", "FEATURE_EXTRACTION")


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The subset of Hugging Face's `BertConfig` that the model uses."""

  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  pad_token_id: int = 0
  num_labels: int = 2
  architectures: tuple[str, ...] = ("BertModel",)

  @classmethod
  def from_hf(cls, config: dict[str, Any]) -> BertConfig:
    """Reads a Hugging Face `config.json` dict.

    Raises:
      ValueError: for unsupported position embeddings or activations.
    """
    pos = config.get("position_embedding_type", "absolute")
    if pos != "absolute":
      raise ValueError(f"BERT `position_embedding_type={pos!r}` is not supported; only 'absolute'.")
    activation(config.get("hidden_act", "gelu"))
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: hashable(v) for k, v in config.items() if k in names}
    if "id2label" in config and "num_labels" not in config:
      kw["num_labels"] = len(config["id2label"])
    kw["architectures"] = tuple(config.get("architectures") or ("BertModel",))
    return cls(**kw)

  def to_hf(self) -> dict[str, Any]:
    """A Hugging Face `config.json` dict for this config."""
    out = dataclasses.asdict(self)
    out.pop("num_labels")
    labels = {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
    return {
      "model_type": "bert",
      **out,
      "architectures": list(self.architectures),
      "id2label": labels,
      "label2id": {v: int(k) for k, v in labels.items()},
    }


def _kw(dtype):
  return {"dtype": dtype, "param_dtype": dtype}


class BertEmbeddings(nn.Module):
  """Word + position + token-type embeddings, then LayerNorm (`embeddings`)."""

  config: BertConfig
  dtype: Any

  @nn.compact
  def __call__(self, input_ids, token_type_ids):
    c, init = self.config, nn.initializers.normal(0.02)
    embed = lambda n, name: nn.Embed(n, c.hidden_size, embedding_init=init, name=name, **_kw(self.dtype))  # noqa: E731
    positions = jnp.arange(input_ids.shape[1])[None]
    h = (
      embed(c.vocab_size, "word_embeddings")(input_ids)
      + embed(c.max_position_embeddings, "position_embeddings")(positions)
      + embed(c.type_vocab_size, "token_type_embeddings")(token_type_ids)
    )
    return nn.LayerNorm(epsilon=c.layer_norm_eps, name="LayerNorm", **_kw(self.dtype))(h)


class _DenseLayerNorm(nn.Module):
  """`LayerNorm(dense(x) + residual)`: BERT's `attention/output` and `output`."""

  config: BertConfig
  dtype: Any

  @nn.compact
  def __call__(self, x, residual):
    x = nn.Dense(self.config.hidden_size, name="dense", **_kw(self.dtype))(x)
    return nn.LayerNorm(epsilon=self.config.layer_norm_eps, name="LayerNorm", **_kw(self.dtype))(x + residual)


class _SelfAttention(nn.Module):
  config: BertConfig
  dtype: Any

  @nn.compact
  def __call__(self, h, mask):
    c = self.config
    b, t, d = h.shape
    heads = c.num_attention_heads
    q, k, v = (
      nn.Dense(d, name=n, **_kw(self.dtype))(h).reshape(b, t, heads, d // heads) for n in ("query", "key", "value")
    )
    return attention(q, k, v, mask, scale=(d // heads) ** -0.5).reshape(b, t, d)


class BertLayer(nn.Module):
  """One post-LayerNorm encoder layer (`encoder/layer_i`)."""

  config: BertConfig
  dtype: Any

  @nn.compact
  def __call__(self, h, mask):
    c = self.config
    a = _AttentionBlock(c, self.dtype, name="attention")(h, mask)
    inter = _Intermediate(c, self.dtype, name="intermediate")(a)
    return _DenseLayerNorm(c, self.dtype, name="output")(inter, a)


class _AttentionBlock(nn.Module):
  config: BertConfig
  dtype: Any

  @nn.compact
  def __call__(self, h, mask):
    y = _SelfAttention(self.config, self.dtype, name="self")(h, mask)
    return _DenseLayerNorm(self.config, self.dtype, name="output")(y, h)


class _Intermediate(nn.Module):
  config: BertConfig
  dtype: Any

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.config.intermediate_size, name="dense", **_kw(self.dtype))(x)
    return activation(self.config.hidden_act)(x)


class BertModel(nn.Module):
  """The BERT encoder; returns hidden states (B, T, d) and the pooled [CLS] (B, d) or None."""

  config: BertConfig
  dtype: Any = jnp.float32
  add_pooling_layer: bool = True

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None):
    h = _encode(self.config, self.dtype, input_ids, attention_mask, token_type_ids)
    pooled = None
    if self.add_pooling_layer:
      pooled = jnp.tanh(_Pooler(self.config, self.dtype, name="pooler")(h[:, 0]))
    return h, pooled


def _encode(c: BertConfig, dtype, input_ids, attention_mask, token_type_ids):
  """Embeddings + encoder, created in the scope of the calling compact module."""
  if token_type_ids is None:
    token_type_ids = jnp.zeros_like(input_ids)
  h = BertEmbeddings(c, dtype, name="embeddings")(input_ids, token_type_ids)
  mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
  return _Encoder(c, dtype, name="encoder")(h, mask)


class _Encoder(nn.Module):
  config: BertConfig
  dtype: Any

  @nn.compact
  def __call__(self, h, mask):
    for i in range(self.config.num_hidden_layers):
      h = BertLayer(self.config, self.dtype, name=f"layer_{i}")(h, mask)
    return h


class _Pooler(nn.Module):
  config: BertConfig
  dtype: Any

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.config.hidden_size, name="dense", **_kw(self.dtype))(x)


class BertForSequenceClassification(nn.Module):
  """`bert` + pooler + `classifier`; returns logits (B, num_labels)."""

  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None):
    _, pooled = BertModel(self.config, self.dtype, name="bert")(input_ids, attention_mask, token_type_ids)
    return nn.Dense(self.config.num_labels, name="classifier", **_kw(self.dtype))(pooled)

  def peft_name_map(self):
    """PEFT/`transformers` module names of this model (see `jlora._names`)."""
    return name_map(hf_spec(self))


class BertForTokenClassification(nn.Module):
  """`bert` (no pooler) + `classifier`; returns logits (B, T, num_labels)."""

  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None):
    h, _ = BertModel(self.config, self.dtype, False, name="bert")(input_ids, attention_mask, token_type_ids)
    return nn.Dense(self.config.num_labels, name="classifier", **_kw(self.dtype))(h)

  def peft_name_map(self):
    """PEFT/`transformers` module names of this model (see `jlora._names`)."""
    return name_map(hf_spec(self))


class BertForSentenceEmbedding(nn.Module):
  """A bare `BertModel` (no pooler) with attention-mask-weighted mean pooling.

  Returns sentence embeddings (B, d), L2-normalized when `normalize` is set (as
  sentence-transformers' `Normalize` module).
  """

  config: BertConfig
  dtype: Any = jnp.float32
  normalize: bool = False

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None):
    h = _encode(self.config, self.dtype, input_ids, attention_mask, token_type_ids)
    m = jnp.ones(input_ids.shape, h.dtype) if attention_mask is None else attention_mask.astype(h.dtype)
    emb = (h * m[..., None]).sum(1) / jnp.maximum(m.sum(1, keepdims=True), 1e-9)
    if self.normalize:
      emb = emb / jnp.maximum(jnp.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
    return emb

  def peft_name_map(self):
    """PEFT/`transformers` module names of this model (see `jlora._names`)."""
    return name_map(hf_spec(self))


def build(
  config: BertConfig,
  *,
  dtype: Any = jnp.float32,
  task: str | None = None,
  normalize: bool = False,
  num_labels: int | None = None,
) -> nn.Module:
  """Builds the BERT model for `task`.

  Args:
    config: the architecture.
    dtype: parameter and compute dtype.
    task: `SEQ_CLS`, `TOKEN_CLS` or `FEATURE_EXTRACTION`; default from the config's
      `architectures` (`BertModel` -> `FEATURE_EXTRACTION`).
    normalize: L2-normalize sentence embeddings (`FEATURE_EXTRACTION` only).
    num_labels: override the config's label count (a new classifier head).

  Raises:
    ValueError: for an unknown task.
  """
  if num_labels is not None:
    config = dataclasses.replace(config, num_labels=num_labels)
  if task is None:
    arch = config.architectures[0] if config.architectures else ""
    task = {"BertForSequenceClassification": "SEQ_CLS", "BertForTokenClassification": "TOKEN_CLS"}.get(
      arch, "FEATURE_EXTRACTION"
    )
  if task == "SEQ_CLS":
    return BertForSequenceClassification(config, dtype)
  if task == "TOKEN_CLS":
    return BertForTokenClassification(config, dtype)
  if task == "FEATURE_EXTRACTION":
    return BertForSentenceEmbedding(config, dtype, normalize)
  raise ValueError(f"Unsupported BERT `task={task!r}`; supported: {list(TASKS)}.")


def example_inputs(model: nn.Module) -> tuple:
  """Inputs for `model.init`."""
  return (jnp.zeros((1, 2), jnp.int32),)


def hf_spec(model: nn.Module) -> HFSpec:
  """The Hugging Face layout of the task model (`bert.` prefix optional when loading)."""
  if isinstance(model, BertForSentenceEmbedding):
    return HFSpec(
      base_prefix="bert.",
      list_names=("layer",),
      ignore=(r".*position_ids", r"pooler\..*", r"classifier\..*", r"cls\..*"),
    )
  return HFSpec(
    base_prefix="bert.",
    list_names=("layer",),
    ignore=(r".*position_ids", r"cls\..*", r"pooler\..*"),
    new_head=(r"classifier/.*", r"bert/pooler/.*"),
  )


def default_options(config: dict[str, Any], path: str) -> dict[str, Any]:
  """`normalize=True` when the sentence-transformers `modules.json` has a Normalize step."""
  modules = os.path.join(path, "modules.json")
  if os.path.isfile(modules):
    with open(modules) as f:
      if any(m.get("type", "").endswith("Normalize") for m in json.load(f)):
        return {"normalize": True}
  return {}


Config = BertConfig
