"""BERT encoder with task heads (Flax linen), Hugging Face module names.

Parameter paths mirror `transformers`: `embeddings/{word,position,token_type}_embeddings`,
`embeddings/LayerNorm`, `encoder/layer_0/attention/self/{query,key,value}`,
`encoder/layer_0/attention/output/{dense,LayerNorm}`, `encoder/layer_0/intermediate/dense`,
`encoder/layer_0/output/{dense,LayerNorm}`, `pooler/dense`. Tasks (`build(task=...)`):

* `HIDDEN_STATES`: :class:`BertModel`, the encoder output per token as `transformers.BertModel`
  returns it (a :class:`BertOutput`);
* `FEATURE_EXTRACTION`: a bare encoder with attention-mask-weighted mean pooling (as
  sentence-transformers), optionally L2-normalized: sentence embeddings (B, d);
* `SEQ_CLS` / `TOKEN_CLS`: the encoder as `bert` plus a `classifier`, as
  `BertFor{Sequence,Token}Classification`.

Inputs are checked against the embedding tables (token ids, token type ids, sequence length
against `max_position_embeddings`); see `jlora.models._checks` for what is checked under `jit`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jlora.models._arch import Architecture, AxisTable, HFModel, config_fields
from jlora.models._bert_layers import BertDense, encode
from jlora.models._checkpoint import HFSpec
from jlora.models._checks import Limit
from jlora.models._layers import activation, dtypes

__all__ = [
  "ARCHITECTURE",
  "TASKS",
  "BertConfig",
  "BertForSentenceEmbedding",
  "BertForSequenceClassification",
  "BertForTokenClassification",
  "BertModel",
  "BertOutput",
]

TASKS = ("SEQ_CLS", "TOKEN_CLS", "FEATURE_EXTRACTION", "HIDDEN_STATES")


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
    kw = config_fields(cls, config)
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


class BertOutput(NamedTuple):
  """What :class:`BertModel` returns, the fields of `transformers.BertModel`'s output.

  Attributes:
    last_hidden_state: (B, T, d) the last encoder layer's output per token.
    pooler_output: (B, d) `tanh(pooler.dense(last_hidden_state[:, 0]))`, the [CLS] token
      through the pooling layer; None when the model has no pooling layer.
  """

  last_hidden_state: jax.Array
  pooler_output: jax.Array | None


class _Bert(HFModel):
  """Base of the BERT models: their input tables and Hugging Face layout (`bert.` prefix optional)."""

  config: BertConfig
  _new_head = ("classifier/.*", "bert/pooler/.*")  # class attributes, not fields
  param_axes: ClassVar[AxisTable] = {  # logical axis names (models._partitioning), shared by every task
    "word_embeddings/embedding": ("vocab", "embed"),
    "position_embeddings/embedding": (None, "embed"),
    "token_type_embeddings/embedding": (None, "embed"),
    "LayerNorm/scale": ("norm",),
    "LayerNorm/bias": ("norm",),
    "self/query/kernel": ("embed", "heads"),
    "self/query/bias": ("heads",),
    "self/key/kernel": ("embed", "kv"),
    "self/key/bias": ("kv",),
    "self/value/kernel": ("embed", "kv"),
    "self/value/bias": ("kv",),
    "attention/output/dense/kernel": ("heads", "embed"),
    "attention/output/dense/bias": ("embed",),
    "intermediate/dense/kernel": ("embed", "mlp"),
    "intermediate/dense/bias": ("mlp",),
    "output/dense/kernel": ("mlp", "embed"),  # a layer's output block (the longer attention/output/... wins there)
    "output/dense/bias": ("embed",),
    "pooler/dense/kernel": ("embed", None),
    "pooler/dense/bias": (None,),
    "classifier/kernel": ("embed", None),
    "classifier/bias": (None,),
  }
  _head_hint = ""

  def input_limits(self) -> dict[str, Limit]:
    """Token ids below `vocab_size`, token type ids below `type_vocab_size`, at most `max_position_embeddings` tokens."""
    c = self.config
    return {
      "input_ids": Limit(c.vocab_size, "vocab_size"),
      "token_type_ids": Limit(c.type_vocab_size, "type_vocab_size"),
      "positions": Limit(c.max_position_embeddings, "max_position_embeddings"),
    }

  def hf_spec(self) -> HFSpec:
    """The Hugging Face layout; tensors of heads this model lacks are skipped when loading."""
    return HFSpec(
      base_prefix="bert.",
      list_names=("layer",),
      ignore=(r".*position_ids", r"cls\..*", r"pooler\..*", r"classifier\..*"),
      new_head=self._new_head,
      head_hint=self._head_hint,
    )


class BertModel(_Bert):
  """The BERT encoder (`task="HIDDEN_STATES"`), as `transformers.BertModel`.

  Attributes:
    config: the architecture.
    dtype: dtype of parameters and computation.
    add_pooling_layer: whether there is a `pooler` (then `pooler_output` is computed).

  Call:
    `model.apply({'params': params}, input_ids, attention_mask=None, token_type_ids=None)`:
    input_ids (B, T) int, attention_mask (B, T) 0/1, token_type_ids (B, T) int (default 0).
    Returns a :class:`BertOutput`: last_hidden_state (B, T, d), pooler_output (B, d) or None.

  Raises:
    ValueError: for more than `max_position_embeddings` tokens; outside `jit` also for ids
      outside `0..vocab_size-1` or token type ids outside `0..type_vocab_size-1`.
  """

  add_pooling_layer: bool = True
  _new_head = ("pooler/.*",)
  _head_hint = ", or build it with `add_pooling_layer=False` (then `pooler_output` is None)"

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None) -> BertOutput:
    h = encode(self, input_ids, attention_mask, token_type_ids)
    pooled = None
    if self.add_pooling_layer:
      pooled = jnp.tanh(BertDense(self.config, self.dtype, self.config.hidden_size, name="pooler")(h[:, 0]))
    return BertOutput(h, pooled)


class BertForSequenceClassification(_Bert):
  """`bert` + pooler + `classifier`; returns logits (B, num_labels)."""

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None):
    out = BertModel(self.config, self.dtype, name="bert")(input_ids, attention_mask, token_type_ids)
    return nn.Dense(self.config.num_labels, name="classifier", **dtypes(self.dtype))(out.pooler_output)


class BertForTokenClassification(_Bert):
  """`bert` (no pooler) + `classifier`; returns logits (B, T, num_labels)."""

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None):
    out = BertModel(self.config, self.dtype, False, name="bert")(input_ids, attention_mask, token_type_ids)
    return nn.Dense(self.config.num_labels, name="classifier", **dtypes(self.dtype))(out.last_hidden_state)


class BertForSentenceEmbedding(_Bert):
  """A bare BERT encoder (no pooler) with attention-mask-weighted mean pooling (`FEATURE_EXTRACTION`).

  Returns sentence embeddings (B, d), L2-normalized when `normalize` is set (as
  sentence-transformers' `Normalize` module).
  """

  normalize: bool = False
  _new_head = ()

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None):
    h = encode(self, input_ids, attention_mask, token_type_ids)
    m = jnp.ones(input_ids.shape, h.dtype) if attention_mask is None else attention_mask.astype(h.dtype)
    emb = (h * m[..., None]).sum(1) / jnp.maximum(m.sum(1, keepdims=True), 1e-9)
    if self.normalize:
      emb = emb / jnp.maximum(jnp.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
    return emb


def build(
  config: BertConfig,
  *,
  dtype: Any = jnp.float32,
  task: str | None = None,
  normalize: bool = False,
  num_labels: int | None = None,
  add_pooling_layer: bool | None = None,
) -> _Bert:
  """Builds the BERT model for `task`.

  Args:
    config: the architecture.
    dtype: parameter and compute dtype.
    task: `SEQ_CLS`, `TOKEN_CLS`, `FEATURE_EXTRACTION` (mean-pooled sentence embeddings) or
      `HIDDEN_STATES` (:class:`BertModel`: per-token outputs and the pooled [CLS]); default
      from the config's `architectures` (`BertModel` -> `FEATURE_EXTRACTION`).
    normalize: L2-normalize sentence embeddings (`FEATURE_EXTRACTION` only; ignored otherwise).
    num_labels: override the config's label count (a new classifier head).
    add_pooling_layer: `HIDDEN_STATES` only: whether the model has a pooler (default True,
      as `transformers.BertModel`).

  Raises:
    ValueError: for an unknown task, or `add_pooling_layer` with another task.
  """
  if num_labels is not None:
    config = dataclasses.replace(config, num_labels=num_labels)
  if task is None:
    arch = config.architectures[0] if config.architectures else ""
    task = {"BertForSequenceClassification": "SEQ_CLS", "BertForTokenClassification": "TOKEN_CLS"}.get(
      arch, "FEATURE_EXTRACTION"
    )
  if task not in TASKS:
    raise ValueError(f"Unsupported BERT `task={task!r}`; supported: {list(TASKS)}.")
  if add_pooling_layer is not None and task != "HIDDEN_STATES":
    raise ValueError(
      f"`add_pooling_layer={add_pooling_layer}` applies to `task='HIDDEN_STATES'` only, got `task={task!r}`; "
      "drop it (SEQ_CLS always has a pooler, the other tasks none)."
    )
  if task == "SEQ_CLS":
    return BertForSequenceClassification(config, dtype)
  if task == "TOKEN_CLS":
    return BertForTokenClassification(config, dtype)
  if task == "HIDDEN_STATES":
    return BertModel(config, dtype, True if add_pooling_layer is None else add_pooling_layer)
  return BertForSentenceEmbedding(config, dtype, normalize)


def default_options(config: dict[str, Any], path: str) -> dict[str, Any]:
  """`normalize=True` when the sentence-transformers `modules.json` has a Normalize step."""
  modules = os.path.join(path, "modules.json")
  if os.path.isfile(modules):
    with open(modules) as f:
      if any(m.get("type", "").endswith("Normalize") for m in json.load(f)):
        return {"normalize": True}
  return {}


ARCHITECTURE = Architecture(
  config=BertConfig,
  build=build,
  options=("task", "normalize", "num_labels", "add_pooling_layer"),
  default_options=default_options,
)
