"""The `jlora` command: `train`, `merge`, `export-peft`, `generate`, `compare` and `plan`.

  jlora train [CONFIG] [section.key=value ...] [--quiet]
  jlora compare [CONFIG] [section.key=value ...] [--methods full,lora] [--ranks 4,8,16,32] [--out DIR]
                [--full KEY=VALUE ...] [--quiet]
  jlora merge RUN_DIR [--out DIR]
  jlora export-peft RUN_DIR [--out DIR]
  jlora generate SOURCE... --prompt TEXT [--prompt TEXT ...] [--prompts-file FILE] [--base] [--base-run RUN_DIR]
                 [--max-new-tokens N] [--temperature T] [--top-k K] [--seed S] [--json]
  jlora plan CONFIG --topology GEN:AxB[xC] [section.key=value ...] [--bound] [--json]

Without CONFIG, `jlora train` runs the packaged default job (`configs/default.yaml`:
LoRA-tune all-MiniLM-L6-v2 for code search over the Python standard library).

Exit status (every failure is one line on stderr, `jlora COMMAND: ...`, naming the key or path and the fix):
  0    done
  1    training diverged: a non-finite loss, training state or merged-vs-factored check; nothing non-finite
       is saved, the checkpoints before it are kept
  2    a mistake in the config, data, run directory, paths or install, or a file that cannot be read or
       written (found before the first step where it can be; argparse's usage errors too)
  3    no space left on the device (or disk quota exceeded) while writing; the line names the path and the
       free space. Free space (or move outputs.dir) and run the same command again: it resumes from the
       last checkpoint
  130  interrupted (Ctrl-C); the finished steps are saved and the same command resumes

Checked before the first training step (nothing is written before all of it passes):
  - the config: valid YAML (the file and line of a mistake), no key twice (both lines), at most 256 KiB
    and 100,000 values after expanding YAML aliases (alias bombs are refused at once, naming the key);
    every key known and every value of its type and range (1e3, 1e-3, .5 and 5. are numbers); paths
    and names without NUL bytes, at most 255 bytes per path component and 4095 per path, and
    outputs.adapter_name without '/'
  - the data: every line of data.train_file / data.eval_file (UTF-8: a bad byte is reported with its line
    and byte offset; one JSON object with the task's fields), enough examples for one batch
  - outputs.dir: new, empty, or a jlora run's (.jlora-run.json), not under a file, writable, a symbolic
    link only to an existing directory, no file jlora wrote there changed since, no other run writing
  - every output location: checkpoints/ (only jlora's steps), adapter/ (absent, empty or jlora's
    checkpoint), peft/ (with outputs.peft) and merged/ (with outputs.merged) absent, empty or written by
    jlora, none of them a symbolic link; the outputs.adapter_set entry (not under a file, absent, or a
    jlora adapter with outputs.replace_adapter=true, not a symbolic link)
  - the model, adapters and optimizer: model.path / model.config / model.options, the task's model
    types, lora.init_from (its config and base); train.seq_len within the model's positions, the
    encoded data within the available memory, one batch's attention scores within the device's memory
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import pathlib
import re
import shutil
import sys
from collections.abc import Iterator, Sequence
from typing import Any

__all__ = ["EXIT_DISK_FULL", "EXIT_DIVERGED", "EXIT_INTERRUPTED", "EXIT_MISTAKE", "main"]

EXIT_DIVERGED, EXIT_MISTAKE, EXIT_DISK_FULL, EXIT_INTERRUPTED = 1, 2, 3, 130

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "default.yaml"
_TRAIN_HELP = """\
Trains a LoRA adapter as a YAML config says and writes into outputs.dir: adapter/ (orbax),
peft/ (PEFT safetensors), merged/ (optional, HF format), metrics.jsonl, curves.png,
summary.json, config.yaml and checkpoints/ (the training state). A stopped run (Ctrl-C, or
killed) resumes from its last checkpoint when started again. outputs.dir must be new, empty,
or a jlora run's (marked by .jlora-run.json); one run at a time writes into it.

Override any key with section.key=value (values are YAML): train.steps=50 lora.r=16
lora.target_modules=[query,value] optimizer.learning_rate=3e-4 outputs.dir=runs/x

With a `mesh` section (e.g. mesh.data=-1: data parallel over every device) the run is
sharded over a (data, fsdp, tensor) device mesh; on several hosts, start the same command
on each (srun, a TPU pod, or JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID).

Sections and keys:
"""
_EXIT_HELP = __doc__[__doc__.index("Exit status"):] if __doc__ else ""  # the module docstring's (None under -OO)


def _load_config(args: argparse.Namespace) -> Any:
  """The config of `jlora train` / `jlora compare`: CONFIG (default: the default job) with the overrides.

  Raises:
    FileNotFoundError: CONFIG does not exist.
  """
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
  return train.load(config_path, overrides, text=text)


def _training(command: str, args: argparse.Namespace, start: Any) -> int:
  """Runs `start(config)` (training: one run or several) on the command's config; maps how it ended to the exit
  status and one line."""
  from jlora import train

  try:
    config = _load_config(args)
  except FileNotFoundError as e:
    print(f"jlora {command}: {e}", file=sys.stderr)
    return 2
  try:
    with _quiet_write_failures():
      start(config)
  except train.Interrupted as e:
    print(f"jlora {command}: {e}", file=sys.stderr)
    return EXIT_INTERRUPTED
  except train.Diverged as e:
    print(f"jlora {command}: {e}", file=sys.stderr)
    return EXIT_DIVERGED
  except KeyboardInterrupt:
    print(f"jlora {command}: interrupted outside the training steps; checkpoints saved so far are kept.",
          file=sys.stderr)
    return EXIT_INTERRUPTED
  except Exception as e:
    path = _disk_full(e)
    if path is None:
      raise
    out_dir = getattr(args, "out", None) or config.outputs.dir
    print(f"jlora {command}: {_no_space(path or os.path.abspath(out_dir))}", file=sys.stderr)
    return EXIT_DISK_FULL
  return 0


def _train(args: argparse.Namespace) -> int:
  from jlora import train

  return _training("train", args, train.run)


_NO_SPACE = re.compile(r"No space left on device|Disk quota exceeded|os_error_code='?(?:28|122)\b")


def _disk_full(error: BaseException) -> str | None:
  """The path a write failed on for lack of space ("" where unknown), or None when `error` is not that.

  Follows the chain of causes: orbax and tensorstore report ENOSPC in their own errors' text.
  """
  seen: set[int] = set()
  e: BaseException | None = error
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
      return os.fsdecode(e.filename) if e.filename else ""
    if _NO_SPACE.search(str(e)):
      found = re.search(r"""["'](/[^"']+)["']""", str(e))
      return found.group(1) if found else ""
    e = e.__cause__ or e.__context__
  return None


@contextlib.contextmanager
def _quiet_write_failures() -> Iterator[None]:
  """Keeps the echoes of a failed checkpoint write off stderr while a run trains; its one line says it all.

  orbax's writer threads log each failed write (the full traceback, at ERROR, through absl),
  asyncio logs the tasks whose error nobody retrieved, and tensorstore's callbacks that
  complete after orbax closed its event loop report "Event loop is closed" as unraisable
  exceptions, before and after the error reaches `jlora train`: a full disk printed 19 to
  263 lines. Dropped here: absl and asyncio records about a full disk (and, after a full
  disk, the "Event loop is closed" reports, which `jlora.train.run` drops while it writes).
  Everything else passes as before. After a full disk the filters stay for the rest of the
  process (which ends): orbax's tasks may still report.
  """
  import logging

  from jlora.formats.versioned import is_closed_loop_report

  def keep(record: logging.LogRecord) -> bool:
    text = record.getMessage() + (logging.Formatter().formatException(record.exc_info) if record.exc_info else "")
    return not _NO_SPACE.search(text)

  loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
  for logger in loggers:
    logger.addFilter(keep)
  try:
    yield
  except BaseException as e:
    if _disk_full(e) is not None:
      previous = sys.unraisablehook
      sys.unraisablehook = lambda report: None if is_closed_loop_report(report) else previous(report)
      raise
    for logger in loggers:
      logger.removeFilter(keep)
    raise
  for logger in loggers:
    logger.removeFilter(keep)


def _bytes(n: int) -> str:
  scale, unit = next((s, u) for s, u in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB"), (1, "bytes")) if n >= s or s == 1)
  return f"{n:,} bytes" if scale == 1 else f"{n / scale:,.1f} {unit}"


def _no_space(path: str) -> str:
  """The one line for a full disk: the path, the free space of its file system, and what to do."""
  existing = path
  while existing and not os.path.exists(existing):
    existing = os.path.dirname(existing) if os.path.dirname(existing) != existing else ""
  try:
    usage = shutil.disk_usage(existing or ".")
    free = f"{_bytes(usage.free)} free of {_bytes(usage.total)}"
  except OSError:
    free = "free space unknown"
  return (f"no space left on the device while writing {path!r} ({free} there; a disk quota counts too). Free some "
          "space or set `outputs.dir` on another disk, then run the same command again: it resumes from the last "
          "checkpoint.")


def _run_config(path: str) -> Any:
  from jlora import train

  cfg_file = os.path.join(path, "config.yaml")
  if not os.path.isfile(cfg_file):
    raise ValueError(f"`{path}` is not a finished `jlora train` output directory (no config.yaml; a run writes it "
                     "with the adapter, at the end).")
  config = train.load(cfg_file)
  if config.train.method == "full":
    raise ValueError(f"`{path}` is a full fine-tuning run (`train.method: full`): it has no adapter; the trained "
                     f"model is {os.path.join(path, 'model')} (Hugging Face format: config.json + model.safetensors).")
  return config


def _load_run(path: str, adapter: str | None) -> tuple[Any, dict, Any]:
  """The base model (`jlora.train._model.Model`), the params with the trained adapter, and the LoRA config of a run."""
  import jlora.formats.checkpoint
  from jlora.train import _setup, _tasks

  config = _run_config(path)
  base = _setup.base_model(config, _tasks.get(config.lora.task_type))  # the run's keys: same random init and heads
  params, lora = jlora.formats.checkpoint.load_adapter(adapter or os.path.join(path, "adapter"), base.params)
  trainable, frozen = jlora.split(params, lora)  # a QLoRA run's adapter was trained over the quantized base
  return base, jlora.combine(trainable, _setup.quantized(config, frozen, base.model)), lora


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


# ---------------------------------------------------------------- jlora plan (self-contained)
_PLAN_HELP = """\
Compiles the training step that `jlora train CONFIG` would run for a TPU slice, on this host (no
TPU, no network: libtpu's compiler, `pip install "jlora[plan]"`), from the model's shapes alone
(no weights are read), and prints per chip: memory (arguments: base, adapters, optimizer state,
batch; temporaries; outputs) against the chip's HBM, FLOPs, memory traffic and collectives, and
an estimated step time and tokens/s from a roofline of the chip's published peaks. These are
compiler figures and estimates, not measurements. The config's `mesh` section is laid over the
slice's chips (without one: data parallel over all of them). Overrides as for `jlora train`.

Example:
  jlora plan configs/plan_llama3_8b.yaml --topology v5e:2x4
  jlora plan configs/plan_llama3_8b.yaml --topology v5p:2x2x1 model.quantize=nf4 --json
"""


def _plan(args: argparse.Namespace) -> int:
  import json

  from jlora import train

  config = train.load(args.config, list(args.overrides))
  log = None if args.json else (lambda text: print(text, file=sys.stderr, flush=True))
  result = train.plan(config, args.topology, bound=args.bound, hlo_path=args.hlo, log=log)
  print(json.dumps(result.to_dict(), indent=2) if args.json else result.text())
  return 0


def _add_plan(sub: Any) -> None:
  p = sub.add_parser("plan", help="compile a config's training step for a TPU slice here: memory, FLOPs, collectives, "
                     "estimated step time", description=_PLAN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("config", help="a `jlora train` YAML config")
  p.add_argument("overrides", nargs="*", help="section.key=value overrides")
  p.add_argument("--topology", required=True, metavar="GEN:AxB[xC]", help="the TPU slice, e.g. v5e:2x4, v5p:2x2x1, "
                 "v6e:2x4, v4:2x2x1")
  p.add_argument("--bound", action="store_true", help="also compile the frozen-base bound (gradient only through the "
                 "embeddings' output) and compare the estimates")
  p.add_argument("--json", action="store_true", help="print the figures as JSON")
  p.add_argument("--hlo", metavar="FILE", help="also write the compiled step's HLO text to FILE")
  p.set_defaults(func=_plan)


_COMPARE_HELP = """\
Trains the same job several ways, one after another, and writes a table and a plot side by
side: full fine-tuning (train.method=full: every weight) and LoRA / DoRA / QLoRA at each
rank (lora.r=R, lora_alpha scaled with it so that the scale alpha/r stays the config's).
Same model, data, steps and evaluation; each variant is a `jlora train` run in OUT/<variant>
(full, lora-r4, lora-r8, ...), and OUT gets compare.md, compare.json and compare.png
(held-out quality against trainable parameters and against rank). Per variant: the held-out
metrics, trainable parameters (count and % of the model), step time and tokens/s, the
compiled step's memory (XLA's buffer assignment), the saved bytes (adapter/, or the full
model's weights) and wall time.

Everything is checked before anything is written: an unknown method, a rank < 1, OUT or a
variant's directory holding files that are not jlora's or another run is one line, exit 2.
Running the same command again skips the finished variants and resumes an interrupted one.

Example (the default job; full fine-tuning at a learning rate for all weights):
  jlora compare --methods full,lora --ranks 4,8,16,32 --full optimizer.learning_rate=1e-4
"""


def _compare(args: argparse.Namespace) -> int:
  from jlora import train

  return _training("compare", args, lambda config: train.compare(config, methods=args.methods, ranks=args.ranks,
                                                                 out=args.out, full_overrides=args.full))


def _add_compare(sub: Any) -> None:
  c = sub.add_parser("compare", help="train full fine-tuning and LoRA at several ranks side by side; table and plot",
                     description=_COMPARE_HELP, epilog=_EXIT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
  c.add_argument("config", nargs="?", help="YAML config (default: configs/default.yaml)")
  c.add_argument("overrides", nargs="*", help="section.key=value overrides of every variant")
  c.add_argument("--methods", default="full,lora", metavar="M,M", help="comma-separated, of full, lora, dora, qlora "
                 "(default: full,lora)")
  c.add_argument("--ranks", metavar="R,R", help="comma-separated LoRA ranks of lora/dora/qlora (default: the "
                 "config's lora.r)")
  c.add_argument("--out", metavar="DIR", help="the comparison's directory (default: outputs.dir + '-compare')")
  c.add_argument("--full", action="append", default=[], metavar="KEY=VALUE", help="an override of the full "
                 "fine-tuning variant only (repeatable), e.g. --full optimizer.learning_rate=1e-4")
  c.add_argument("-q", "--quiet", action="store_true", help="no progress bars (same as train.quiet=true)")
  c.set_defaults(func=_compare)


def parser() -> argparse.ArgumentParser:
  """The argument parser of `jlora` (its help explains every config section and key)."""
  from jlora.train._load import describe

  top = argparse.ArgumentParser(prog="jlora", description="LoRA fine-tuning for JAX/Flax.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Run `jlora train --help` for the config sections and keys, the exit "
                                "statuses and what is checked before training starts.")
  sub = top.add_subparsers(dest="command", metavar="{train,merge,export-peft,generate,compare,plan}")
  tr = sub.add_parser("train", help="train a LoRA adapter from a YAML config (default: the MiniLM code-search job)",
                      description=_TRAIN_HELP + describe(), epilog=_EXIT_HELP,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
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
  _add_compare(sub)
  _add_plan(sub)
  return top


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of the `jlora` console script; returns the exit status."""
  top = parser()
  args, extra = top.parse_known_args(argv)
  if extra and (args.command not in ("train", "compare", "plan") or any(a.startswith("-") or "=" not in a for a in extra)):
    top.error(f"unrecognized arguments: {' '.join(extra)}")
  if extra:  # overrides after an option, e.g. `jlora train cfg.yaml -q train.steps=5`
    args.overrides = [*args.overrides, *extra]
  if args.command is None:
    parser().print_help()
    return 2
  try:
    return args.func(args)
  except (ValueError, TypeError, ImportError, OSError) as e:  # a mistake in the config, data, directory or install
    if _disk_full(e) is not None:
      print(f"jlora {args.command}: {_no_space(_disk_full(e) or os.getcwd())}", file=sys.stderr)
      return EXIT_DISK_FULL
    text = " ".join(str(e).split())  # one line, whatever the message
    if isinstance(e, OSError) and e.strerror and e.filename is not None:  # not `[Errno 13] Permission denied: ...`
      text = f"{os.fsdecode(e.filename)!r}: {e.strerror}"
    print(f"jlora {args.command}: {text}", file=sys.stderr)
    return EXIT_MISTAKE


if __name__ == "__main__":
  sys.exit(main())
