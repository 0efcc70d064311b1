"""`jlora compare`: one job trained several ways, side by side: full fine-tuning and LoRA / DoRA / QLoRA at ranks.

Each variant is a `jlora train` run of the same config (same model, data, steps and
evaluation) with a few keys changed, in its own run directory `OUT/<variant>`:

| variant     | what changes                                                                          |
|-------------|---------------------------------------------------------------------------------------|
| `full`      | `train.method: full` (every weight), then the `full_overrides` (e.g. a lower learning rate); the settings only adapters have (`model.quantize`, `lora.init_from`, `optimizer.lora_plus_ratio`) are dropped |
| `lora-r<R>` | `lora.r: R` and `lora.lora_alpha` with it, so that the scale `s` stays the config's (`α/r`, or `α/√r` with rsLoRA) |
| `dora-r<R>` | as `lora-r<R>`, with `lora.use_dora: true`                                             |
| `qlora-r<R>`| as `lora-r<R>`, over the base quantized as `model.quantize` says (`nf4` if it is unset) |

Every variant writes only inside `OUT`: `outputs.dir: OUT/<variant>`, `outputs.peft: false`,
`outputs.merged: false`, `outputs.adapter_set: null`. Before the first variant trains,
everything is checked and nothing is written: the methods and ranks, each variant's
config, `OUT` (new, empty, or a comparison's: `.jlora-compare.json`, the rules of
`jlora.train._rundir`) and every variant's run directory (`jlora.train._run.check`: new, or
a run of exactly that variant; a directory holding any other run is refused, never
started over). Then the variants run one after another: a finished one (its outputs
are those of its fingerprint at `train.steps`) is read back, not trained again; an
interrupted one resumes from its last checkpoint. After each variant the comparison is
written (atomically): `compare.md` (the table), `compare.json` (`VARIANT_KEYS` per
variant) and `compare.png` (quality against trainable parameters and against rank).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from jlora.core.safe_load import dump_yaml
from jlora.train import _report, _rundir
from jlora.train._load import apply_overrides
from jlora.train._run import check, run
from jlora.train._schema import Config

__all__ = ["ADAPTER_METHODS", "METHODS", "VARIANT_KEYS", "Variant", "compare", "markdown", "plot", "variants"]

ADAPTER_METHODS = ("lora", "dora", "qlora")
METHODS = ("full", *ADAPTER_METHODS)
# The keys of each variant in compare.json.
VARIANT_KEYS = ("variant", "method", "r", "dir", "status", "after", "trainable", "total", "percent", "step_s",
                "tokens_per_s", "step_bytes", "saved_bytes", "saved", "train_s", "wall_s", "steps")


class Variant(NamedTuple):
  """One run of a comparison: its name (`full`, `lora-r8`, ...), method, rank (None for `full`) and config."""

  name: str
  method: str
  r: int | None
  config: Config


def _listed(values: Any, what: str, example: str) -> list:
  if isinstance(values, str):
    values = [v.strip() for v in values.split(",") if v.strip()]
  if not isinstance(values, Sequence) or not values:
    raise ValueError(f"`{what}` must list at least one value (comma-separated, e.g. {example}), got {values!r}.")
  twice = sorted({str(v) for v in values if list(values).count(v) > 1})
  if twice:
    raise ValueError(f"`{what}` lists {twice} more than once; give each once, e.g. {example}.")
  return list(values)


def _methods(methods: Any) -> list[str]:
  methods = _listed(methods, "methods", "full,lora")
  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    raise ValueError(f"`methods`: unknown method(s) {unknown}; choose from {list(METHODS)} (e.g. full,lora).")
  return methods


def _ranks(ranks: Any) -> list[int]:
  ranks = _listed(ranks, "ranks", "4,8,16,32")
  out = []
  for r in ranks:
    try:
      value = int(r) if not isinstance(r, bool) and float(r) == int(float(r)) else None
    except (TypeError, ValueError):
      value = None
    if value is None or value <= 0:
      raise ValueError(f"`ranks`: every rank must be an integer >= 1 (the LoRA rank r), got {r!r}; e.g. 4,8,16,32.")
    out.append(value)
  return out


def _scaled_alpha(config: Config, r: int) -> float | int:
  """`lora_alpha` for rank `r` that keeps the config's scale (`α/r`, or `α/√r` with rsLoRA)."""
  lora = config.lora
  grow = math.sqrt(r / lora.r) if lora.use_rslora else r / lora.r
  alpha = lora.lora_alpha * grow
  return int(alpha) if float(alpha).is_integer() else alpha


def _variant(config: Config, method: str, r: int | None, out: str, full_overrides: Sequence[str]) -> Variant:
  name = "full" if method == "full" else f"{method}-r{r}"
  d = config.to_dict()
  d["outputs"] = {**d["outputs"], "dir": os.path.join(out, name), "peft": False, "merged": False,
                  "adapter_set": None, "adapter_name": None, "replace_adapter": False}
  if method == "full":
    d["train"] = {**d["train"], "method": "full"}
    d["model"] = {**d["model"], "quantize": None}
    d["optimizer"] = {**d["optimizer"], "lora_plus_ratio": None}
    d["lora"] = {k: v for k, v in d["lora"].items() if k != "init_from"}
    d = apply_overrides(d, full_overrides)
  else:
    d["train"] = {**d["train"], "method": "lora"}
    d["lora"] = {**d["lora"], "r": r, "lora_alpha": _scaled_alpha(config, r), "use_dora": method == "dora"}
    if method == "qlora":
      d["model"] = {**d["model"], "quantize": config.model.quantize or "nf4"}
  try:
    return Variant(name, method, r, Config.from_dict(d, source=f"variant `{name}`"))
  except (TypeError, ValueError) as e:
    raise type(e)(f"{e} (the comparison's config, with the variant's changes)") from None


def variants(config: Config, methods: Any = ("full", "lora"), ranks: Any = None, *, out: str,
             full_overrides: Sequence[str] = ()) -> list[Variant]:
  """The variants of a comparison, validated, in the order they run: `full` first, then each method by rank.

  Args:
    config: the job (`jlora.train.load`).
    methods: a subset of `METHODS` (a sequence, or a comma-separated string).
    ranks: the ranks of the adapter methods (integers >= 1, or a comma-separated string);
      None: the config's `lora.r`.
    out: the comparison's directory (each variant runs in `out/<variant>`).
    full_overrides: `section.key=value` overrides of the `full` variant only.

  Raises:
    ValueError: an unknown method, a rank that is not an integer >= 1, a value listed
      twice, a `mesh` section, `checkpointing.resume: false`, or a variant's config that
      does not validate (naming the variant and the key).
  """
  methods = _methods(methods)
  ranks = _ranks([config.lora.r] if ranks is None else ranks)
  if config.mesh is not None:
    raise ValueError("`jlora compare` runs its variants on one device, one after another; remove the `mesh` section "
                     "(or train each variant with `jlora train` on the mesh).")
  if not config.checkpointing.resume:
    raise ValueError("`checkpointing.resume: false` would start variants over; `jlora compare` resumes each "
                     "variant from its own run directory. Remove the override, or choose a new `--out`.")
  if full_overrides and "full" not in methods:
    raise ValueError(f"`full_overrides` {list(full_overrides)} change the `full` variant, which `methods` "
                     f"{methods} leaves out; add `full` or drop them.")
  found = [_variant(config, "full", None, out, full_overrides)] if "full" in methods else []
  found += [_variant(config, m, r, out, ()) for m in methods if m != "full" for r in ranks]
  return found


def _finished(variant: Variant, fingerprint: dict) -> dict | None:
  """The summary of a variant whose run directory holds its finished outputs (else None)."""
  path = os.path.abspath(variant.config.outputs.dir)
  marker = _rundir.inspect(path)
  if not marker or marker.get("outputs") != {"fingerprint": fingerprint, "step": variant.config.train.steps}:
    return None
  try:
    with open(os.path.join(path, "summary.json"), encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None  # run it again: `run` rewrites the outputs of a finished state without training


def _row(variant: Variant, summary: dict, status: str) -> dict[str, Any]:
  full = variant.method == "full"
  saved = "model/model.safetensors" if full else "adapter/"
  return {"variant": variant.name, "method": variant.method, "r": variant.r, "dir": summary["dir"], "status": status,
          "after": summary["after"], "before": summary["before"], "trainable": summary["trainable"],
          "total": summary["total"], "percent": summary["percent"], "step_s": summary.get("step_s"),
          "tokens_per_s": summary["tokens_per_s"], "step_bytes": summary.get("step_bytes"),
          "saved_bytes": summary["model_bytes" if full else "adapter_bytes"], "saved": saved,
          "train_s": summary["train_s"], "wall_s": summary["wall_s"], "steps": summary["steps"],
          "resumed_from": summary.get("resumed_from")}


def compare(config: Config, *, methods: Any = ("full", "lora"), ranks: Any = None, out: str | os.PathLike | None = None,
            full_overrides: Sequence[str] = (), log: Callable[[str], None] = print) -> dict[str, Any]:
  """Trains the variants of `config` one after another and writes the comparison into `out`.

  Args:
    config: the job (`jlora.train.load`); its `outputs.dir` only names the default `out`.
    methods: which of `METHODS` to run (sequence or comma-separated string).
    ranks: the ranks of `lora`, `dora` and `qlora` (default: the config's `lora.r`).
    out: the comparison's directory (default: `outputs.dir` + `-compare`): `compare.md`,
      `compare.json`, `compare.png`, the marker `.jlora-compare.json`, and one `jlora train`
      run directory per variant.
    full_overrides: `section.key=value` overrides of the `full` variant only, e.g.
      `["optimizer.learning_rate=1e-4"]` (full fine-tuning wants a lower one than LoRA).
    log: where progress, each run's summary and the table go.

  Returns:
    The comparison (what `compare.json` holds): `task`, `model`, `headline`, `before`
    (the base model's metrics), `variants` (one dict per variant with `VARIANT_KEYS`),
    `files` and `wall_s`.

  Raises:
    ValueError: bad methods or ranks, a config a variant cannot run, or a directory that
      is not jlora's or holds another run (found before anything is written).
    Interrupted: after Ctrl-C; the finished variants and the interrupted one's
      checkpoint are kept: the same call resumes.
    Diverged: a variant's loss became non-finite (the earlier variants are kept).
  """
  t0 = time.perf_counter()
  out = os.path.abspath(os.fspath(out if out is not None else config.outputs.dir.rstrip("/") + "-compare"))
  runs = variants(config, methods, ranks, out=out, full_overrides=full_overrides)
  _rundir.inspect(out, _rundir.COMPARE)
  checked = {}
  for v in runs:  # every refusal before anything is written
    try:
      checked[v.name] = check(v.config)
    except ValueError as e:
      raise ValueError(f"variant `{v.name}` ({v.config.outputs.dir}): {e} Nothing was written; `jlora compare` never "
                       "starts a run over: choose another `--out`, or move that directory away.") from None
  rows: list[dict[str, Any]] = []
  report: dict[str, Any] = {}
  with _rundir.RunDir.open(out, _rundir.COMPARE) as root:
    root.update(variants=[v.name for v in runs])
    for i, v in enumerate(runs, 1):
      done = _finished(v, checked[v.name].fingerprint)
      log(f"jlora compare [{i}/{len(runs)}] {v.name}: " + ("finished earlier, read back" if done else
                                                           f"training in {v.config.outputs.dir}"))
      summary = done if done is not None else run(v.config, log=log)
      status = "read back" if done else f"resumed at step {summary['resumed_from']}" if summary["resumed_from"] \
        else "trained"
      rows.append(_row(v, summary, status))
      report = _write(root, config, summary, rows, t0)
  log(markdown(report))
  return report


def _write(root: _rundir.RunDir, config: Config, summary: dict, rows: list[dict], t0: float) -> dict[str, Any]:
  """Writes compare.json, compare.md and compare.png (when matplotlib is installed); returns the comparison."""
  report = {"task": summary["task"], "model": summary["model"], "headline": summary["headline"],
            "eval_examples": summary["eval_examples"], "before": rows[0]["before"],
            "variants": [{k: r[k] for k in (*VARIANT_KEYS, "resumed_from")} for r in rows],
            "files": {name: root.join(name) for name in ("compare.md", "compare.json")},
            "wall_s": time.perf_counter() - t0, "config": json.loads(json.dumps(config.to_dict(), default=str))}
  if _report.can_plot():
    root.write("compare.png", lambda tmp: plot(report, tmp))
    report["files"]["compare.png"] = root.join("compare.png")
  root.write_text("compare.json", json.dumps(report, indent=2) + "\n")
  root.write_text("compare.md", markdown(report) + "\n\nThe config the variants derive from:\n\n```yaml\n"
                  + dump_yaml(config.to_dict(), sort_keys=False) + "```\n")
  return report


def _ms(seconds: float | None) -> str:
  return "–" if seconds is None else f"{1e3 * seconds:,.0f} ms"


def _size(n: int | None) -> str:
  return "–" if n is None else _report.human_bytes(n)


def markdown(report: dict[str, Any]) -> str:
  """The comparison as a markdown table, one row per variant (after training), with the base model's line first."""
  metrics = list(report["before"])
  head = ["variant", *metrics, "trainable params", "% of model", "step time", "tokens/s", "step memory (XLA)",
          "saved", "wall time"]
  lines = [f"{report['task']} on {report['model']}, {report['variants'][0]['steps']} steps per variant; held-out "
           f"{report['eval_examples']} examples.", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  lines.append("| base model (before training) | " + " | ".join(f"{report['before'][m]:.4f}" for m in metrics)
               + " |" + " |" * (len(head) - len(metrics) - 1))
  for r in report["variants"]:
    cells = [r["variant"], *(f"{r['after'][m]:.4f}" for m in metrics), f"{r['trainable']:,}", f"{r['percent']:.2f}%",
             _ms(r["step_s"]), f"{r['tokens_per_s']:,.0f}", _size(r["step_bytes"]),
             f"{_size(r['saved_bytes'])} ({r['saved']})", f"{r['wall_s']:,.0f} s"]
    lines.append("| " + " | ".join(cells) + " |")
  lines += ["", "step time and tokens/s: mean over the steps after the first (compiling) one; step memory: the compiled "
            "training step's buffers (XLA's memory analysis: arguments + outputs + temporaries - donated); saved: what "
            "the run keeps (the adapter checkpoint, or the whole model's weights); wall time: the run that produced "
            f"the outputs. The variants' runs took {sum(r['wall_s'] for r in report['variants']):,.0f} s in all; "
            f"this call of `jlora compare` {report['wall_s']:,.0f} s."]
  return "\n".join(lines)


def plot(report: dict[str, Any], path: str) -> None:
  """Writes the headline metric against trainable parameters and against rank (a PNG file, not atomic)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  headline, rows = report["headline"], report["variants"]
  fig, (by_params, by_rank) = plt.subplots(1, 2, figsize=(11, 4))
  for ax in (by_params, by_rank):
    ax.axhline(report["before"][headline], color="grey", linestyle=":", label="base model (before training)")
  full = [r for r in rows if r["method"] == "full"]
  for r in full:
    by_rank.axhline(r["after"][headline], color="black", linestyle="--", label="full fine-tuning")
  for method in ("full", *ADAPTER_METHODS):
    mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["trainable"])
    if not mine:
      continue
    x, y = [r["trainable"] for r in mine], [r["after"][headline] for r in mine]
    by_params.plot(x, y, marker="o", label=method)
    for r in mine:
      by_params.annotate(r["variant"], (r["trainable"], r["after"][headline]), textcoords="offset points",
                         xytext=(4, 4), fontsize=8)
    if method != "full":
      by_rank.plot([r["r"] for r in mine], y, marker="o", label=method)
  by_params.set(xscale="log", xlabel="trainable parameters (log scale)", ylabel=f"held-out {headline}",
                title=f"{headline} vs trainable parameters")
  by_rank.set(xscale="log", xlabel="rank r (log scale)", ylabel=f"held-out {headline}", title=f"{headline} vs rank")
  ranks = sorted({r["r"] for r in rows if r["r"] is not None})
  if ranks:
    by_rank.set_xticks(ranks, [str(r) for r in ranks])
  for ax in (by_params, by_rank):
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100, format="png")
  plt.close(fig)
