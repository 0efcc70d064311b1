"""The `jlora` command: `train`, `merge`, `export-peft` and `generate`.

  jlora train [CONFIG] [section.key=value ...] [--quiet]
  jlora merge RUN_DIR [--out DIR]
  jlora export-peft RUN_DIR [--out DIR]
  jlora generate SOURCE... --prompt TEXT [--prompt TEXT ...] [--prompts-file FILE] [--base] [--base-run RUN_DIR]
                 [--max-new-tokens N] [--temperature T] [--top-k K] [--seed S] [--json]

Without CONFIG, `jlora train` runs the packaged default job (`configs/default.yaml`:
LoRA-tune all-MiniLM-L6-v2 for code search over the Python standard library).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import sys
from collections.abc import Iterator, Sequence
from typing import Any

__all__ = ["main"]

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "default.yaml"
_TRAIN_HELP = """\
Trains a LoRA adapter as a YAML config says (read with yaml.safe_load) and writes into
outputs.dir: adapter/ (orbax), peft/ (PEFT safetensors), merged/ (optional, HF format),
metrics.jsonl, curves.png, summary.json, config.yaml and checkpoints/ (the training state).
A stopped run (Ctrl-C, or killed) resumes from its last checkpoint when started again.
outputs.dir must be new, empty, or a jlora run's (marked by .jlora-run.json); one run at a
time writes into it. Exit status: 0 done, 1 training diverged (non-finite), 2 a mistake
in the config, data or directory, 130 interrupted.

Override any key with section.key=value (values are YAML): train.steps=50 lora.r=16
lora.target_modules=[query,value] optimizer.learning_rate=3e-4 outputs.dir=runs/x

With a `mesh` section (e.g. mesh.data=-1: data parallel over every device) the run is
sharded over a (data, fsdp, tensor) device mesh; on several hosts, start the same command
on each (srun, a TPU pod, or JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID).

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
  except FileNotFoundError as e:
    print(f"jlora train: {e}", file=sys.stderr)
    return 2
  try:
    train.run(config)
  except train.Interrupted as e:
    print(f"jlora train: {e}", file=sys.stderr)
    return 130
  except train.Diverged as e:
    print(f"jlora train: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print("jlora train: interrupted outside the training steps; checkpoints saved so far are kept.", file=sys.stderr)
    return 130
  return 0


def _run_config(path: str) -> Any:
  from jlora import train

  cfg_file = os.path.join(path, "config.yaml")
  if not os.path.isfile(cfg_file):
    raise ValueError(f"`{path}` is not a finished `jlora train` output directory (no config.yaml; a run writes it "
                     "with the adapter, at the end).")
  return train.load(cfg_file)


def _load_run(path: str, adapter: str | None) -> tuple[Any, dict, Any]:
  """The base model (`jlora.train._model.Model`), the params with the trained adapter, and the LoRA config of a run."""
  import jlora.formats.checkpoint
  from jlora.train import _setup, _tasks

  config = _run_config(path)
  base = _setup.base_model(config, _tasks.get(config.lora.task_type))  # the run's keys: same random init and heads
  params, lora = jlora.formats.checkpoint.load_adapter(adapter or os.path.join(path, "adapter"), base.params)
  trainable, frozen = jlora.split(params, lora)  # a QLoRA run's adapter was trained over the quantized base
  return base, jlora.combine(trainable, _setup.quantized(config, frozen)), lora


@contextlib.contextmanager
def _run_lock(run_dir: str, out: str) -> Iterator[None]:
  """Holds the run directory's lock while writing inside it (not while a `jlora train` writes there)."""
  from jlora.train._rundir import MARKER, RunDir

  inside = os.path.dirname(os.path.abspath(out)) == os.path.abspath(run_dir)
  if not inside or not os.path.isfile(os.path.join(run_dir, MARKER)):  # elsewhere, or a run of an older jlora
    yield
    return
  with RunDir.open(run_dir):
    yield


def _merge(args: argparse.Namespace) -> int:
  import jlora
  from jlora import models

  base, params, lora = _load_run(args.run_dir, args.adapter)
  out = args.out or os.path.join(args.run_dir, "merged")
  with _run_lock(args.run_dir, out):
    models.save_pretrained(out, base.model, jlora.dequantize(jlora.merge(params, lora)), copy_from=base.checkpoint)
  print(f"merged model (Hugging Face format) written to {out}")
  return 0


def _export_peft(args: argparse.Namespace) -> int:
  import jlora

  base, params, lora = _load_run(args.run_dir, args.adapter)
  out = args.out or os.path.join(args.run_dir, "peft")
  with _run_lock(args.run_dir, out):
    jlora.save_peft(out, base.model, params, lora)
  print(f"PEFT adapter (adapter_config.json + adapter_model.safetensors) written to {out}")
  return 0


_GENERATE_HELP = """\
Runs every prompt through every chosen adapter (and the base model with --base) in ONE
batched, jitted generation: the adapters are stacked (jlora.stack_adapters) and each row
picks its own, so with greedy decoding each row is exactly what its adapter generates alone.

A SOURCE is PATH or NAME=PATH, where PATH is
  a `jlora train` run directory (config.yaml + adapter/): its adapter, named after the directory;
  an adapter checkpoint (jlora.save_adapter's directory, e.g. ADAPTER_SET/NAME): named after it;
  an adapter-set directory (one checkpoint per subdirectory, as outputs.adapter_set writes): all of them.
The base model and tokenizer are rebuilt from the config.yaml of --base-run (default: the first
SOURCE that is a run, or a run's adapter/); every run among the SOURCEs must have the same base
(model section; train.seed for a random init) and every adapter is checked against it. Only
CAUSAL_LM runs generate. Prompts are left-padded; generation stops at the tokenizer's EOS.

Example:
  jlora train configs/causal_lm_tiny.yaml outputs.dir=runs/a outputs.adapter_set=adapters
  jlora train configs/causal_lm_tiny.yaml outputs.dir=runs/b outputs.adapter_set=adapters \\
      lora.init_from=adapters/a
  jlora generate adapters --base-run runs/a --base --prompt "def parse(" --prompt "class Queue"
"""


def _generate(args: argparse.Namespace) -> int:
  import json

  from jlora.train import _generate as gen

  prompts = gen.read_prompts(args.prompt, args.prompts_file)
  rows = gen.generate(args.sources, prompts, base_run=args.base_run, with_base=args.base,
                      max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                      seed=args.seed)
  if args.json:
    for row in rows:
      print(json.dumps(row._asdict(), ensure_ascii=False))
  else:
    print(gen.table(rows))
  return 0


def _add_generate(sub: Any) -> None:
  g = sub.add_parser("generate", help="run prompts through adapters of runs / adapter sets, mixed in one batch",
                     description=_GENERATE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
  g.add_argument("sources", nargs="*", metavar="SOURCE",
                 help="a run directory, an adapter checkpoint or an adapter-set directory (PATH or NAME=PATH)")
  g.add_argument("-p", "--prompt", action="append", default=[], help="a prompt (repeatable)")
  g.add_argument("--prompts-file", metavar="FILE", help="a UTF-8 text file: one prompt per line (blank lines skipped)")
  g.add_argument("--base", action="store_true", help="also generate with the base model (no adapter), as __base__")
  g.add_argument("--base-run", metavar="RUN_DIR", help="the run whose config.yaml gives the base model and tokenizer "
                 "(default: the first SOURCE that is a run)")
  g.add_argument("-n", "--max-new-tokens", type=int, default=32, metavar="N", help="tokens to generate (default 32)")
  g.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0: greedy (default); > 0: sampling")
  g.add_argument("--top-k", type=int, metavar="K", help="sample among the K most likely tokens")
  g.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the sampling key (default 0)")
  g.add_argument("--json", action="store_true", help="print JSON lines {adapter, prompt, completion, tokens}")
  g.set_defaults(func=_generate)


def parser() -> argparse.ArgumentParser:
  """The argument parser of `jlora` (its help explains every config section and key)."""
  from jlora.train._load import describe

  top = argparse.ArgumentParser(prog="jlora", description="LoRA fine-tuning for JAX/Flax.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Run `jlora train --help` for the config sections and keys.")
  sub = top.add_subparsers(dest="command", metavar="{train,merge,export-peft,generate}")
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
  _add_generate(sub)
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
  except (ValueError, TypeError, ImportError) as e:  # a mistake in the config, data, directory or install: one line
    print(f"jlora {args.command}: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
