"""What a run leaves behind besides the adapter: `metrics.jsonl`, `curves.png` and the printed summary."""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Mapping
from typing import Any

from jlora.formats import atomic as _io

__all__ = ["Metrics", "can_plot", "dir_bytes", "human_bytes", "plot", "summary_text"]


class Metrics:
  """Appends JSON lines to `path`; on resume, drops the lines of steps after the restored one.

  The drop rewrites the file atomically (`jlora.formats.atomic`), so a run killed at any point
  leaves either the old lines or the kept ones. A last line cut short by a kill is
  ignored when reading.

  Args:
    path: the `metrics.jsonl` file.
    resume_step: the step the run resumes from (lines with a larger `step` are
      dropped, since those steps are recomputed); None starts a new file.
  """

  def __init__(self, path: str, *, resume_step: int | None):
    self.path = path
    keep = []
    if resume_step is not None and os.path.isfile(path):
      keep = [row for row in self.read() if row.get("step", 0) <= resume_step]
    _io.write_text(path, "".join(json.dumps(row) + "\n" for row in keep))

  def read(self) -> list[dict[str, Any]]:
    """All complete rows written so far."""
    rows = []
    with open(self.path, encoding="utf-8") as f:
      for line in f:
        try:
          rows.append(json.loads(line))
        except ValueError:  # a line cut short by a killed run
          continue
    return rows

  def write(self, row: Mapping[str, Any]) -> None:
    """Appends one row (flushed, so a killed run keeps it)."""
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps(dict(row)) + "\n")


def can_plot() -> bool:
  """Whether matplotlib (the optional `train` extra) is installed."""
  return importlib.util.find_spec("matplotlib") is not None


def plot(rows: list[dict[str, Any]], path: str, *, headline: str) -> bool:
  """Writes the training loss and the eval headline metric against step to `path` (a PNG file, not atomic).

  Returns:
    False (and writes nothing) when matplotlib is not installed.
  """
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return False
  train = [r for r in rows if r.get("kind") == "train"]
  evals = [r for r in rows if r.get("kind") == "eval"]
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
  axes[0].plot([r["step"] for r in train], [r["loss"] for r in train])
  axes[0].set(xlabel="step", ylabel="training loss", title="loss")
  axes[1].plot([r["step"] for r in evals], [r[headline] for r in evals], marker="o")
  axes[1].set(xlabel="step", ylabel=headline, title=f"held-out {headline}")
  fig.tight_layout()
  fig.savefig(path, dpi=100, format="png")
  plt.close(fig)
  return True


def dir_bytes(path: str) -> int:
  """Total size of the files under `path` (or of the file `path`)."""
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def human_bytes(n: float) -> str:
  """`1.2 MB`-style size (decimal units)."""
  for unit in ("B", "kB", "MB", "GB"):
    if n < 1000 or unit == "GB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1000
  return f"{n:.1f} GB"


def summary_text(r: Mapping[str, Any]) -> str:
  """The end-of-run summary from a result dict."""
  before, after = r["before"], r["after"]
  metric_lines = [f"  {k:<16}{before[k]:.4f} -> {after[k]:.4f}" for k in after]
  lines = [
    f"jlora train: {r['task']} on {r['model']}, {r['steps']} steps" + (f" (resumed at {r['resumed_from']})"
                                                                        if r["resumed_from"] else ""),
    f"  trainable     {r['trainable']:,} of {r['total']:,} parameters ({r['percent']:.3f}%)",
    f"  adapter       {human_bytes(r['adapter_bytes'])} on disk ({r['adapter_dir']}) vs "
    f"{human_bytes(r['full_bytes'])} {r['full_what']}" if "adapter_bytes" in r else
    f"  model         {human_bytes(r['model_bytes'])} on disk ({r['model_dir']}: every weight, full fine-tuning)",
    f"held-out {r['eval_examples']} examples, before -> after:",
    *metric_lines,
    *([f"  merged vs factored max |diff|: {r['merge_diff']:.2e}"] if r.get("merge_diff") is not None else []),
    f"  wall time {r['wall_s']:.1f}s (training steps {r['train_s']:.1f}s), {r['tokens_per_s']:,.0f} tokens/s" + (
      f", {1e3 * r['step_s']:,.0f} ms/step" if r.get("step_s") else "") + (
      f", step memory {human_bytes(r['step_bytes'])} (XLA)" if r.get("step_bytes") else ""),
    f"  outputs in {r['dir']}",
    *([f"  adapter also saved as {r['adapter_set_entry']}"] if r.get("adapter_set_entry") else []),
  ]
  return "\n".join(lines)
