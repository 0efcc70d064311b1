"""jlora vs Hugging Face PEFT: one LoRA training step on GPT-2 of the same shape, same threads, same run.

Needs the `hf` extra (CPU torch, transformers, peft). Both sides train LoRA (r=8,
alpha=16) with AdamW on next-token cross-entropy; the torch side uses
`torch.set_num_threads(os.cpu_count())`, the JAX side XLA's CPU thread pool of
the same cores. Both are timed in the same process, in interleaved rounds, and
calls another process disturbed are redone (see `_timing.py`).

Run: python benchmarks/peft_compare.py [--quick] [--out benchmarks/results/peft_cpu.json]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

import jax
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _timing import measure_side_by_side, paired_ratio, write_report

import jlora
from jlora import models

TARGETS = {"all_linear": ["c_attn", "c_proj", "c_fc"], "c_attn": ["c_attn"]}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--out", default="benchmarks/results/peft_cpu.json")
  args = parser.parse_args()
  import peft
  import torch
  import transformers

  torch.set_num_threads(os.cpu_count() or 1)
  layers, d, batch, seq, repeats = (2, 128, 2, 64, 3) if args.quick else (4, 768, 4, 256, 10)
  hf = {"model_type": "gpt2", "n_layer": layers, "n_embd": d, "n_head": max(d // 64, 2), "vocab_size": 8192,
        "n_positions": seq, "n_ctx": seq}
  ids = np.random.default_rng(0).integers(0, hf["vocab_size"], (batch, seq + 1))
  report = {"shape": {**hf, "batch": batch, "seq": seq, "r": 8}, "threads": torch.get_num_threads(), "ms": {}}

  for name, targets in TARGETS.items():
    # PEFT on transformers' GPT-2.
    torch.manual_seed(0)
    config = transformers.GPT2Config(**{k: v for k, v in hf.items() if k != "model_type"})
    tmodel = peft.get_peft_model(transformers.GPT2LMHeadModel(config),
                                 peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets, fan_in_fan_out=True))
    topt = torch.optim.AdamW([p for p in tmodel.parameters() if p.requires_grad], lr=1e-4)
    tids = torch.tensor(ids[:, :-1]).long()
    tlabels = torch.tensor(ids[:, 1:]).long()

    def torch_step(tmodel=tmodel, topt=topt, tids=tids, tlabels=tlabels):
      logits = tmodel(input_ids=tids).logits
      loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tlabels.reshape(-1))
      loss.backward()
      topt.step()
      topt.zero_grad(set_to_none=True)
      return None

    # jlora on jlora.models' GPT-2 of the same shape.
    model, base = models.from_config(hf, key=jax.random.key(0))
    cfg = jlora.LoraConfig(r=8, lora_alpha=16, target_modules=targets)
    params = jlora.init(jax.random.key(1), model, base, cfg, ids[:, :-1])
    trainable, frozen = jlora.split(params, cfg)
    tx = optax.adamw(1e-4)

    @jax.jit
    def jax_step(t, s, x=ids[:, :-1], y=ids[:, 1:], frozen=frozen, cfg=cfg, model=model, tx=tx):
      def loss(t):
        logits = jlora.apply(model, jlora.combine(t, frozen), cfg, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

      g = jax.grad(loss)(t)
      u, s = tx.update(g, s, t)
      return optax.apply_updates(t, u), s

    box = [(trainable, tx.init(trainable))]

    def jlora_step(box=box, jax_step=jax_step):
      box[0] = jax_step(*box[0])
      return box[0]

    t = measure_side_by_side({"peft": torch_step, "jlora": jlora_step}, repeats=repeats)
    ratio = paired_ratio(t, "jlora", "peft")
    report["ms"][f"peft/{name}"] = t["peft"].median_ms
    report["ms"][f"jlora/{name}"] = t["jlora"].median_ms
    report[f"ratio/jlora_to_peft/{name}"] = ratio
    print(f"{name:10s} PEFT {t['peft'].median_ms:8.1f} ms   jlora {t['jlora'].median_ms:8.1f} ms   "
          f"jlora/PEFT {ratio:.2f}   (redone calls: {t['peft'].disturbed}, {t['jlora'].disturbed})", flush=True)
  write_report(report, args.out)


if __name__ == "__main__":
  main()
