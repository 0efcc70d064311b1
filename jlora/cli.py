"""The `jlora` command: `train`, `merge` and `export-peft`.

  jlora train [CONFIG] [section.key=value ...] [--quiet]
  jlora merge RUN_DIR [--out DIR]
  jlora export-peft RUN_DIR [--out DIR]

Without CONFIG, `jlora train` runs the packaged default job (`configs/default.yaml`:
LoRA-tune all-MiniLM-L6-v2 for code search over the Python standard library).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
from collections.abc import Sequence

__all__ = ["main"]

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "default.yaml"
_TRAIN_HELP = """\
Trains a LoRA adapter as a YAML config says (read with yaml.safe_load) and writes into
outputs.dir: adapter/ (orbax), peft/ (PEFT safetensors), merged/ (optional, HF format),
metrics.jsonl, curves.png, summary.json and checkpoints/ (the training state). A stopped
run (Ctrl-C, or killed) resumes from its last checkpoint when started again.

Override any key with section.key=value (values are YAML): train.steps=50 lora.r=16
lora.target_modules=[query,value] optimizer.learning_rate=3e-4 outputs.dir=runs/x

Sections and keys:
"""


def _train(args: argparse.Namespace) -> int:
  from jlora import train

  config_path, overrides = args.config, list(args.overrides)
  if config_path is not None and "=" in config_path and not os.path.exists(config_path):
    config_path, overrides = None, [config_path, *overrides]  # `jlora train train.steps=5`: default config
  text = None
  if config_path is None:  # the default job: configs/default.yaml of a checkout, else its embedded copy
    if DEFAULT_CONFIG.is_file():
      config_path = os.fspath(DEFAULT_CONFIG)
    else:
      from jlora.train._default import DEFAULT_YAML as text
  if args.quiet:
    overrides.append("train.quiet=true")
  try:
    config = train.load(config_path, overrides, text=text)
  except (ValueError, TypeError, FileNotFoundError) as e:
    print(f"jlora train: {e}", file=sys.stderr)
    return 2
  try:
    train.run(config)
  except train.Interrupted as e:
    print(f"jlora train: {e}", file=sys.stderr)
    return 130
  except KeyboardInterrupt:
    print("jlora train: interrupted outside the training steps; checkpoints saved so far are kept.", file=sys.stderr)
    return 130
  return 0


def _run_dir(path: str) -> tuple[object, str]:
  from jlora import train

  cfg_file = os.path.join(path, "config.yaml")
  if not os.path.isfile(cfg_file):
    raise ValueError(f"`{path}` is not a `jlora train` output directory (no config.yaml).")
  return train.load(cfg_file), os.path.join(path, "adapter")


def _load_run(path: str, adapter: str | None):
  """The model, the params with the trained adapter, the LoRA config and the base checkpoint dir of a run."""
  import jax

  import jlora.checkpoint
  from jlora.train import _data, _tasks

  config, default_adapter = _run_dir(path)
  task = config.lora.task_type.value
  train_rows, eval_rows = _data.examples(config.data, task)
  num_labels = _data.num_labels(task, train_rows, eval_rows)
  model_key = jax.random.split(jax.random.key(config.train.seed), 3)[0]  # as `jlora train` (random init, heads)
  base = _tasks.build_model(config.model, task, num_labels=num_labels, key=model_key)
  params, lora = jlora.checkpoint.load_adapter(adapter or default_adapter, base.params)
  return base.model, params, lora, base.checkpoint


def _merge(args: argparse.Namespace) -> int:
  import jlora
  from jlora.train._loop import save_merged

  model, params, lora, checkpoint = _load_run(args.run_dir, args.adapter)
  out = args.out or os.path.join(args.run_dir, "merged")
  save_merged(out, model, jlora.merge(params, lora), checkpoint)
  print(f"merged model (Hugging Face format) written to {out}")
  return 0


def _export_peft(args: argparse.Namespace) -> int:
  import jlora

  model, params, lora, _ = _load_run(args.run_dir, args.adapter)
  out = args.out or os.path.join(args.run_dir, "peft")
  jlora.save_peft(out, params, lora, model=model)
  print(f"PEFT adapter (adapter_config.json + adapter_model.safetensors) written to {out}")
  return 0


def parser() -> argparse.ArgumentParser:
  """The argument parser of `jlora` (its help explains every config section and key)."""
  from jlora.train._schema import describe

  top = argparse.ArgumentParser(prog="jlora", description="LoRA fine-tuning for JAX/Flax.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Run `jlora train --help` for the config sections and keys.")
  sub = top.add_subparsers(dest="command", metavar="{train,merge,export-peft}")
  tr = sub.add_parser("train", help="train a LoRA adapter from a YAML config (default: the MiniLM code-search job)",
                      description=_TRAIN_HELP + describe(), formatter_class=argparse.RawDescriptionHelpFormatter)
  tr.add_argument("config", nargs="?", help="YAML config (default: configs/default.yaml)")
  tr.add_argument("overrides", nargs="*", help="section.key=value overrides")
  tr.add_argument("-q", "--quiet", action="store_true", help="no progress bar (same as train.quiet=true)")
  tr.set_defaults(func=_train)
  for name, func, what in (("merge", _merge, "the merged model in Hugging Face format (config.json + "
                            "model.safetensors)"), ("export-peft", _export_peft, "the adapter in PEFT format")):
    p = sub.add_parser(name, help=f"write {what} from a `jlora train` run directory",
                       description=f"Rebuilds the base model of RUN_DIR/config.yaml, loads the adapter and writes {what}.")
    p.add_argument("run_dir", help="a `jlora train` output directory (holds config.yaml and adapter/)")
    p.add_argument("--adapter", help="adapter checkpoint directory (default: RUN_DIR/adapter)")
    p.add_argument("--out", help=f"output directory (default: RUN_DIR/{'merged' if name == 'merge' else 'peft'})")
    p.set_defaults(func=func)
  return top


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of the `jlora` console script; returns the exit status."""
  top = parser()
  args, extra = top.parse_known_args(argv)
  if extra and (args.command != "train" or any(a.startswith("-") or "=" not in a for a in extra)):
    top.error(f"unrecognized arguments: {' '.join(extra)}")
  if extra:  # overrides after an option, e.g. `jlora train cfg.yaml -q train.steps=5`
    args.overrides = [*args.overrides, *extra]
  if args.command is None:
    parser().print_help()
    return 2
  try:
    return args.func(args)
  except ValueError as e:
    print(f"jlora {args.command}: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
