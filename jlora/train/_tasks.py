"""Per-task model building, losses and evaluation metrics; the task is `lora.task_type`.

`loss(forward, batch, temperature)` and `metrics(forward, batch)` take `forward`,
the model's forward pass with the params already bound (`jlora.apply` for the
factored LoRA model, `model.apply` for the merged one), so the same code trains,
evaluates before and after, and checks the merged model.

| task               | loss                                          | metrics (first = the headline)   |
|--------------------|-----------------------------------------------|----------------------------------|
| FEATURE_EXTRACTION | symmetric InfoNCE, in-batch negatives         | recall@1, MRR over the eval set  |
| CAUSAL_LM          | next-token cross-entropy on real tokens       | loss, perplexity                 |
| SEQ_2_SEQ_LM       | teacher-forced cross-entropy on target tokens | loss, token accuracy             |
| SEQ_CLS            | cross-entropy                                 | accuracy, loss                   |
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jlora import models
from jlora.train import _data

__all__ = ["HEADLINE", "Model", "build_model", "eval_outputs", "loss", "metrics", "tokens"]

Forward = Callable[..., jax.Array]
# The headline metric of each task and whether higher is better.
HEADLINE = {
  "FEATURE_EXTRACTION": ("recall@1", True),
  "CAUSAL_LM": ("loss", False),
  "SEQ_2_SEQ_LM": ("loss", False),
  "SEQ_CLS": ("accuracy", True),
}
_MODEL_TASKS = {"FEATURE_EXTRACTION", "SEQ_CLS"}  # BERT `task=` options


@dataclasses.dataclass(frozen=True)
class Model:
  """A base model to adapt: `model`, its `params`, a `tokenizer`, and `checkpoint` (its directory, if any)."""

  model: nn.Module
  params: dict
  tokenizer: Any
  checkpoint: str | None
  model_type: str


def _dtype(name: str) -> Any:
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def build_model(cfg: Any, task: str, *, num_labels: int | None, key: jax.Array) -> Model:
  """Loads or initializes the base model of a `ModelConfig` for `task`.

  Raises:
    ValueError: a missing `model.path` / `model.config`, or a model type that cannot do `task`.
  """
  options = dict(cfg.options)
  if cfg.source == "random":
    if "model_type" not in cfg.config:
      raise ValueError("`model.source: random` needs `model.config` with a `model_type`, e.g. "
                       "{model_type: gpt2, n_layer: 2, n_embd: 64, n_head: 4, vocab_size: 259}.")
    model_type, path = cfg.config["model_type"], None
  else:
    path = models.minilm_path() if cfg.source == "minilm" else cfg.path
    if not path:
      raise ValueError("`model.source: pretrained` needs `model.path`, a local Hugging Face checkpoint directory.")
    if not os.path.isfile(os.path.join(path, "config.json")):
      raise ValueError(f"`model.path`: {path!r} is not a Hugging Face checkpoint directory (no config.json).")
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
      model_type = json.load(f).get("model_type")
  kinds = {"bert": ("FEATURE_EXTRACTION", "SEQ_CLS"), "t5": ("SEQ_2_SEQ_LM",)}
  allowed = kinds.get(model_type, ("CAUSAL_LM",))
  if task not in allowed:
    raise ValueError(f"`lora.task_type: {task}` does not fit `{model_type}` models; they do {list(allowed)}.")
  if task in _MODEL_TASKS:
    options.setdefault("task", task)
    if task == "SEQ_CLS":
      options.setdefault("num_labels", num_labels)
  if cfg.source == "random":
    model, params = models.from_config(cfg.config, key=key, dtype=_dtype(cfg.dtype), **options)
  else:
    model, params = models.from_pretrained(path, key=key, dtype=_dtype(cfg.dtype), **options)
  tok_path = cfg.tokenizer or ("bytes" if cfg.source == "random" else path)
  tokenizer = _data.ByteTokenizer() if tok_path == "bytes" else models.Tokenizer.from_pretrained(tok_path)
  return Model(model, params, tokenizer, path, model_type)


def _forward_args(task: str, batch: dict, t5_config: Any = None) -> tuple[tuple, dict]:
  if task == "SEQ_2_SEQ_LM":
    dec = models.t5.shift_right(batch["labels"], t5_config)
    return (batch["ids"], batch["mask"]), {"decoder_input_ids": dec, "decoder_attention_mask": jnp.ones_like(dec)}
  return (batch["ids"], batch["mask"]), {}


def example_inputs(task: str, batch: dict, model: nn.Module) -> tuple[tuple, dict]:
  """Positional and keyword model inputs for a batch (for `jlora.init` and the merged check)."""
  if task == "FEATURE_EXTRACTION":
    return (batch["query_ids"], batch["query_mask"]), {}
  return _forward_args(task, batch, getattr(model, "config", None))


def _ce(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Summed cross-entropy and summed weight (float32)."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), jnp.maximum(labels, 0))
  return (ce * weights).sum(), weights.sum()


def _lm_terms(forward: Forward, task: str, batch: dict, model: nn.Module) -> tuple[jax.Array, ...]:
  args, kwargs = _forward_args(task, batch, getattr(model, "config", None))
  logits = forward(*args, **kwargs)
  if task == "CAUSAL_LM":
    labels, weights = batch["ids"][:, 1:], batch["mask"][:, 1:].astype(jnp.float32)
    logits = logits[:, :-1]
  else:
    labels = batch["labels"]
    weights = (labels != -100).astype(jnp.float32)
  total, count = _ce(logits, labels, weights)
  correct = ((logits.argmax(-1) == labels) * weights).sum()
  return total, count, correct


def _embed_pair(forward: Forward, batch: dict) -> tuple[jax.Array, jax.Array]:
  ids = jnp.concatenate([batch["query_ids"], batch["doc_ids"]])
  mask = jnp.concatenate([batch["query_mask"], batch["doc_mask"]])
  emb = forward(ids, mask).astype(jnp.float32)
  emb = emb / jnp.maximum(jnp.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
  return jnp.split(emb, 2)


def loss(forward: Forward, task: str, batch: dict, model: nn.Module, *, temperature: float = 0.05) -> jax.Array:
  """The training loss of one batch (a float32 scalar)."""
  if task == "FEATURE_EXTRACTION":
    q, d = _embed_pair(forward, batch)
    logits = q @ d.T / temperature
    labels = jnp.arange(q.shape[0])
    ce = optax.softmax_cross_entropy_with_integer_labels
    return 0.5 * (ce(logits, labels).mean() + ce(logits.T, labels).mean())
  if task == "SEQ_CLS":
    logits = forward(batch["ids"], batch["mask"])
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["label"]).mean()
  total, count, _ = _lm_terms(forward, task, batch, model)
  return total / jnp.maximum(count, 1.0)


def eval_outputs(forward: Forward, task: str, batch: dict, model: nn.Module) -> dict[str, jax.Array]:
  """Per-batch evaluation outputs, reduced over batches by `metrics`.

  `batch["weight"]` (B,) is 1 on real rows and 0 on padding rows of the last batch.
  """
  w = batch["weight"].astype(jnp.float32)
  if task == "FEATURE_EXTRACTION":
    q, d = _embed_pair(forward, batch)
    return {"query": q, "doc": d}
  if task == "SEQ_CLS":
    logits = forward(batch["ids"], batch["mask"]).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    return {"loss": (ce * w).sum(), "correct": ((logits.argmax(-1) == batch["label"]) * w).sum(), "n": w.sum()}
  sub = {**batch}
  if task == "CAUSAL_LM":
    sub["mask"] = batch["mask"] * batch["weight"][:, None]
  else:
    sub["labels"] = jnp.where(batch["weight"][:, None] > 0, batch["labels"], -100)
  total, count, correct = _lm_terms(forward, task, sub, model)
  return {"loss": total, "correct": correct, "n": count}


def metrics(task: str, outputs: list[dict[str, np.ndarray]], n: int) -> dict[str, float]:
  """Reduces `eval_outputs` of all eval batches (the first `n` rows are real) to metrics."""
  if task == "FEATURE_EXTRACTION":
    q = np.concatenate([o["query"] for o in outputs])[:n]
    d = np.concatenate([o["doc"] for o in outputs])[:n]
    sim = q @ d.T
    rank = (sim > np.diag(sim)[:, None]).sum(1)  # documents scored above the right one
    return {"recall@1": float((rank == 0).mean()), "mrr": float((1.0 / (rank + 1)).mean())}
  total = {k: float(sum(np.asarray(o[k]) for o in outputs)) for k in ("loss", "correct", "n")}
  loss_ = total["loss"] / max(total["n"], 1.0)
  acc = total["correct"] / max(total["n"], 1.0)
  if task == "SEQ_CLS":
    return {"accuracy": acc, "loss": loss_}
  if task == "CAUSAL_LM":
    return {"loss": loss_, "perplexity": float(np.exp(min(loss_, 50.0)))}
  return {"loss": loss_, "token_accuracy": acc}


def tokens(task: str, batch: dict[str, np.ndarray]) -> int:
  """Real (non-padding) tokens in a batch, for throughput."""
  if task == "FEATURE_EXTRACTION":
    return int(batch["query_mask"].sum() + batch["doc_mask"].sum())
  extra = int((batch["labels"] != -100).sum()) if "labels" in batch else 0
  return int(batch["mask"].sum()) + extra
