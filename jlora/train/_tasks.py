"""What `jlora train` does per `lora.task_type`: one `Task` entry per task in `TASKS`.

A task says which example fields it reads, how they become arrays, the model's inputs,
the training loss, the per-batch evaluation outputs and their reduction to metrics (the
first one is the headline), and which model types can do it. Adding a task is adding
one entry here. Losses and evaluation take `forward`, the model's forward pass with the
params bound (the factored `jlora.apply_fn` while training, `model.apply` of the
merged params for the final check), so the same code serves both.

| task               | loss                                          | metrics (first = the headline)   |
|--------------------|-----------------------------------------------|----------------------------------|
| FEATURE_EXTRACTION | symmetric InfoNCE, in-batch negatives         | recall@1, MRR over the eval set  |
| CAUSAL_LM          | next-token cross-entropy on real tokens       | loss, perplexity                 |
| SEQ_2_SEQ_LM       | teacher-forced cross-entropy on target tokens | loss, token accuracy             |
| SEQ_CLS            | cross-entropy                                 | accuracy, loss                   |

Batch arrays are int32: `query_ids/query_mask/doc_ids/doc_mask` (B, seq_len) for
FEATURE_EXTRACTION, `ids/mask` (B, seq_len) otherwise, plus `labels` (B, target_len)
(-100 on padding) for SEQ_2_SEQ_LM and `label` (B,) for SEQ_CLS. Evaluation batches
also carry `weight` (B,): 1 on real rows, 0 on the padding rows of the last batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jlora import models
from jlora.train._data import Dataset, tokenize

__all__ = ["TASKS", "Forward", "Task", "get"]

Forward = Callable[..., jax.Array]
Batch = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Task:
  """Everything that differs between tasks.

  Attributes:
    name: the `lora.task_type` value.
    fields: the example fields (and `jsonl` keys) it reads.
    stdlib_source: the offline `data.source` that gives those fields.
    model_types: the `model_type`s that can do it.
    headline: the metric the summary and `curves.png` lead with.
    encode: `(rows, tokenizer, seq_len, target_len) -> arrays`.
    inputs: `(batch, model) -> (args, kwargs)` of the model call (init, merged check).
    loss: `(forward, batch, model, temperature) -> scalar` float32 training loss.
    eval_outputs: `(forward, batch, model) -> {name: array}` of one eval batch.
    metrics: `(outputs of all eval batches, n real rows) -> {metric: float}`.
    tokens: `(batch) -> int` real tokens, for throughput.
    model_options: `(num_labels) -> extra jlora.models options`.
  """

  name: str
  fields: tuple[str, ...]
  stdlib_source: str
  model_types: tuple[str, ...]
  headline: str
  encode: Callable[[Sequence[dict], Any, int, int], Dataset]
  inputs: Callable[[Batch, nn.Module], tuple[tuple, dict]]
  loss: Callable[[Forward, Batch, nn.Module, float], jax.Array]
  eval_outputs: Callable[[Forward, Batch, nn.Module], dict[str, jax.Array]]
  metrics: Callable[[list[dict[str, np.ndarray]], int], dict[str, float]]
  tokens: Callable[[Batch], int]
  model_options: Callable[[int | None], dict] = lambda num_labels: {}


def _ce(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Summed cross-entropy and summed weight (float32)."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), jnp.maximum(labels, 0))
  return (ce * weights).sum(), weights.sum()


def _text_only(rows: Sequence[dict], tok: Any, seq_len: int, target_len: int) -> Dataset:
  ids, mask = tokenize(tok, [r["text"] for r in rows], seq_len)
  return {"ids": ids, "mask": mask}


def _ids_mask(batch: Batch, model: nn.Module) -> tuple[tuple, dict]:
  return (batch["ids"], batch["mask"]), {}


def _mask_tokens(batch: Batch) -> int:
  return int(batch["mask"].sum())


def _sum_outputs(outputs: list[dict[str, np.ndarray]]) -> tuple[float, float]:
  """`(mean loss, accuracy)` from summed `loss`, `correct` and `n` of all batches."""
  total = {k: float(sum(np.asarray(o[k]) for o in outputs)) for k in ("loss", "correct", "n")}
  return total["loss"] / max(total["n"], 1.0), total["correct"] / max(total["n"], 1.0)


# ---------------------------------------------------------------- FEATURE_EXTRACTION
def _pairs_encode(rows: Sequence[dict], tok: Any, seq_len: int, target_len: int) -> Dataset:
  q, qm = tokenize(tok, [r["query"] for r in rows], seq_len)
  d, dm = tokenize(tok, [r["document"] for r in rows], seq_len)
  return {"query_ids": q, "query_mask": qm, "doc_ids": d, "doc_mask": dm}


def _embed_pair(forward: Forward, batch: Batch) -> tuple[jax.Array, jax.Array]:
  ids = jnp.concatenate([batch["query_ids"], batch["doc_ids"]])
  mask = jnp.concatenate([batch["query_mask"], batch["doc_mask"]])
  emb = forward(ids, mask).astype(jnp.float32)
  emb = emb / jnp.maximum(jnp.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
  return jnp.split(emb, 2)


def _infonce(forward: Forward, batch: Batch, model: nn.Module, temperature: float) -> jax.Array:
  q, d = _embed_pair(forward, batch)
  logits = q @ d.T / temperature
  labels = jnp.arange(q.shape[0])
  ce = optax.softmax_cross_entropy_with_integer_labels
  return 0.5 * (ce(logits, labels).mean() + ce(logits.T, labels).mean())


def _retrieval_metrics(outputs: list[dict[str, np.ndarray]], n: int) -> dict[str, float]:
  q = np.concatenate([o["query"] for o in outputs])[:n]
  d = np.concatenate([o["doc"] for o in outputs])[:n]
  sim = q @ d.T
  rank = (sim > np.diag(sim)[:, None]).sum(1)  # documents scored above the right one
  return {"recall@1": float((rank == 0).mean()), "mrr": float((1.0 / (rank + 1)).mean())}


FEATURE_EXTRACTION = Task(
  name="FEATURE_EXTRACTION", fields=("query", "document"), stdlib_source="stdlib_code_search",
  model_types=("bert",), headline="recall@1", encode=_pairs_encode,
  inputs=lambda batch, model: ((batch["query_ids"], batch["query_mask"]), {}),
  loss=_infonce,
  eval_outputs=lambda forward, batch, model: dict(zip(("query", "doc"), _embed_pair(forward, batch))),
  metrics=_retrieval_metrics,
  tokens=lambda batch: int(batch["query_mask"].sum() + batch["doc_mask"].sum()),
  model_options=lambda num_labels: {"task": "FEATURE_EXTRACTION"},
)


# ---------------------------------------------------------------- CAUSAL_LM
def _next_token_terms(forward: Forward, batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array]:
  logits = forward(batch["ids"], batch["mask"])[:, :-1]
  labels, weights = batch["ids"][:, 1:], batch["mask"][:, 1:].astype(jnp.float32)
  total, count = _ce(logits, labels, weights)
  return total, count, ((logits.argmax(-1) == labels) * weights).sum()


def _causal_loss(forward: Forward, batch: Batch, model: nn.Module, temperature: float) -> jax.Array:
  total, count, _ = _next_token_terms(forward, batch)
  return total / jnp.maximum(count, 1.0)


def _causal_eval(forward: Forward, batch: Batch, model: nn.Module) -> dict[str, jax.Array]:
  total, count, correct = _next_token_terms(forward, {**batch, "mask": batch["mask"] * batch["weight"][:, None]})
  return {"loss": total, "correct": correct, "n": count}


def _causal_metrics(outputs: list[dict[str, np.ndarray]], n: int) -> dict[str, float]:
  loss, _ = _sum_outputs(outputs)
  return {"loss": loss, "perplexity": float(np.exp(min(loss, 50.0)))}


CAUSAL_LM = Task(
  name="CAUSAL_LM", fields=("text",), stdlib_source="stdlib_docstrings",
  model_types=tuple(t for t in models.SUPPORTED_MODEL_TYPES if t not in ("bert", "t5")), headline="loss",
  encode=_text_only, inputs=_ids_mask, loss=_causal_loss, eval_outputs=_causal_eval, metrics=_causal_metrics,
  tokens=_mask_tokens,
)


# ---------------------------------------------------------------- SEQ_2_SEQ_LM
def _s2s_encode(rows: Sequence[dict], tok: Any, seq_len: int, target_len: int) -> Dataset:
  ids, mask = tokenize(tok, [r["input"] for r in rows], seq_len)
  tgt, tmask = tokenize(tok, [r["target"] for r in rows], target_len)
  return {"ids": ids, "mask": mask, "labels": np.where(tmask > 0, tgt, -100).astype(np.int32)}


def _s2s_inputs(batch: Batch, model: nn.Module) -> tuple[tuple, dict]:
  dec = models.t5.shift_right(batch["labels"], model.config)
  return (batch["ids"], batch["mask"]), {"decoder_input_ids": dec, "decoder_attention_mask": jnp.ones_like(dec)}


def _s2s_terms(forward: Forward, batch: Batch, model: nn.Module) -> tuple[jax.Array, jax.Array, jax.Array]:
  args, kwargs = _s2s_inputs(batch, model)
  logits, labels = forward(*args, **kwargs), batch["labels"]
  weights = (labels != -100).astype(jnp.float32)
  total, count = _ce(logits, labels, weights)
  return total, count, ((logits.argmax(-1) == labels) * weights).sum()


def _s2s_loss(forward: Forward, batch: Batch, model: nn.Module, temperature: float) -> jax.Array:
  total, count, _ = _s2s_terms(forward, batch, model)
  return total / jnp.maximum(count, 1.0)


def _s2s_eval(forward: Forward, batch: Batch, model: nn.Module) -> dict[str, jax.Array]:
  labels = jnp.where(batch["weight"][:, None] > 0, batch["labels"], -100)
  total, count, correct = _s2s_terms(forward, {**batch, "labels": labels}, model)
  return {"loss": total, "correct": correct, "n": count}


def _s2s_metrics(outputs: list[dict[str, np.ndarray]], n: int) -> dict[str, float]:
  loss, accuracy = _sum_outputs(outputs)
  return {"loss": loss, "token_accuracy": accuracy}


SEQ_2_SEQ_LM = Task(
  name="SEQ_2_SEQ_LM", fields=("input", "target"), stdlib_source="stdlib_name_from_doc", model_types=("t5",),
  headline="loss", encode=_s2s_encode, inputs=_s2s_inputs, loss=_s2s_loss, eval_outputs=_s2s_eval,
  metrics=_s2s_metrics, tokens=lambda batch: _mask_tokens(batch) + int((batch["labels"] != -100).sum()),
)


# ---------------------------------------------------------------- SEQ_CLS
def _cls_encode(rows: Sequence[dict], tok: Any, seq_len: int, target_len: int) -> Dataset:
  return {**_text_only(rows, tok, seq_len, target_len), "label": np.asarray([r["label"] for r in rows], np.int32)}


def _cls_eval(forward: Forward, batch: Batch, model: nn.Module) -> dict[str, jax.Array]:
  w = batch["weight"].astype(jnp.float32)
  logits = forward(batch["ids"], batch["mask"]).astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
  return {"loss": (ce * w).sum(), "correct": ((logits.argmax(-1) == batch["label"]) * w).sum(), "n": w.sum()}


def _cls_metrics(outputs: list[dict[str, np.ndarray]], n: int) -> dict[str, float]:
  loss, accuracy = _sum_outputs(outputs)
  return {"accuracy": accuracy, "loss": loss}


SEQ_CLS = Task(
  name="SEQ_CLS", fields=("text", "label"), stdlib_source="stdlib_module_family", model_types=("bert",),
  headline="accuracy", encode=_cls_encode, inputs=_ids_mask,
  loss=lambda forward, batch, model, temperature: optax.softmax_cross_entropy_with_integer_labels(
    forward(batch["ids"], batch["mask"]).astype(jnp.float32), batch["label"]).mean(),
  eval_outputs=_cls_eval, metrics=_cls_metrics, tokens=_mask_tokens,
  model_options=lambda num_labels: {"task": "SEQ_CLS", "num_labels": num_labels},
)

TASKS: dict[str, Task] = {t.name: t for t in (FEATURE_EXTRACTION, CAUSAL_LM, SEQ_2_SEQ_LM, SEQ_CLS)}


def get(task_type: Any) -> Task:
  """The `Task` of a `lora.task_type` (a `jlora.TaskType` or its name).

  Raises:
    ValueError: no task type, or one `jlora train` does not train.
  """
  if task_type is None:
    raise ValueError(f"`lora.task_type` is required by `jlora train`; one of {list(TASKS)}.")
  name = getattr(task_type, "value", task_type)
  if name not in TASKS:
    raise ValueError(f"`lora.task_type: {name}` is not trained by `jlora train`; use one of {list(TASKS)}.")
  return TASKS[name]
