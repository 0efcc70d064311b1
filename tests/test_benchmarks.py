"""The benchmark timer: interleaved rounds, and it notices another process taking the CPU (no timing is asserted)."""

import itertools
import pathlib
import subprocess
import sys
import time

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))
from _timing import measure, measure_side_by_side, paired_ratio


@pytest.mark.skipif(not pathlib.Path("/proc/stat").exists(), reason="reads /proc/stat")
def test_disturbed_rounds_are_redone():
  hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
  try:
    time.sleep(0.3)
    result = measure(lambda: time.sleep(0.05), repeats=3, warmup=0, max_redo=2)
  finally:
    for hog in hogs:
      hog.kill()
  assert result.disturbed == 2, result
  assert result.rounds == 3 and result.steal_fraction > 0.1


def test_side_by_side_rounds_interleave_without_repeats():
  calls = []
  fns = {name: (lambda name=name: calls.append(name)) for name in "abcd"}
  timings = measure_side_by_side(fns, repeats=6, warmup=0, max_redo=0)  # no redone calls when tests run in parallel
  rounds = [calls[i:i + 4] for i in range(0, len(calls), 4)]
  assert len(rounds) == 6 and all(sorted(r) == list("abcd") for r in rounds)
  assert all(x != y for x, y in itertools.pairwise(calls)), calls  # never one function twice in a row
  assert len({tuple(r) for r in rounds}) > 1  # the order changes between rounds
  assert all(len(t.samples_ms) == 6 and t.min_ms <= t.median_ms for t in timings.values())
  assert paired_ratio(timings, "a", "a") == 1.0


def test_benchmark_suite_runs_on_the_tiny_size():
  import run

  report = run.bench_size("tiny", repeats=1)
  ratios = {k: v for k, v in report.items() if k.startswith("ratio/")}
  assert len(ratios) == 9 and all(0 < v < float("inf") for v in ratios.values()), ratios
  assert report["ratio/adapter_to_full_bytes"] < 0.2  # r=8 adapters on a d=64 model
  assert set(report["ms"]) == {"train/full_ft", "train/frozen_base_bound", "train/lora_qv", "train/lora_all_linear",
                               "train/lora_all_materialized", "forward/base", "forward/lora_unmerged",
                               "forward/lora_merged"}
  table = run.markdown({"sizes": {"tiny": report}})
  assert table.count("\n") == 2 and "| tiny (d=64, L=2) |" in table


def test_accelerator_script_runs_on_the_tiny_size():
  import accelerator

  report = accelerator.bench_size("tiny", repeats=1)
  ratios = {k: v for k, v in report.items() if k.startswith("ratio/")}
  assert len(ratios) == 7 and all(0 < v < float("inf") for v in ratios.values()), ratios
  assert report["shape"]["dtype"] == "bfloat16" and report["shape"]["adapter_dtype"] == "float32"
  assert report["ratio/qlora_nf4_to_lora_bytes"] < 1  # the NF4 base is smaller than the bf16 one
  table = accelerator.markdown({"device": "cpu", "backend": "cpu", "jax": "x", "sizes": {"tiny": report}})
  assert table.count("\n") == 4 and "| tiny |" in table
