"""The many-adapters and DoRA benchmarks (`benchmarks/adapters.py`, `benchmarks/dora.py`) run in quick mode (no timing is asserted)."""

import json
import math
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_adapters_benchmark_quick_mode_writes_every_measure(tmp_path):
  out = tmp_path / "adapters.json"
  proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "adapters.py"), "--quick", "--out", str(out)],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  report = json.loads(out.read_text())
  assert list(report["sizes"]) == ["tiny"] and report["repeats"] == 3
  tiny = report["sizes"]["tiny"]
  ratios = {k: v for k, v in tiny.items() if k.startswith("ratio/")}
  assert set(ratios) == {"ratio/mixed_n1_to_single", "ratio/mixed_n4_to_single", "ratio/mixed_n16_to_single",
                         "ratio/mixed_n8_to_loop", "ratio/token_mixed_n8_to_loop", "ratio/switched_to_plain_step",
                         "ratio/train_bank_n4_to_single"}
  assert all(0 < v < math.inf for v in ratios.values()), ratios
  assert set(tiny["ms"]) == {"fwd/single", "fwd/mixed_n1", "fwd/mixed_n4", "fwd/mixed_n16", "batch/mixed_n8",
                             "batch/loop_n8", "token/mixed_n8", "token/loop_n8",
                             "switch/bank_scalar_step", "train/bank_n4", "train/single"}
  # switching by a traced id never recompiles; a config (lora_alpha) is static: one compile per distinct one
  assert tiny["switch/bank_scalar_new_compiles"] == 0
  assert tiny["switch/apply_same_config_new_compiles"] == 0
  assert tiny["switch/apply_distinct_alpha_new_compiles"] == 7
  table = report["markdown"]
  assert table.count("\n") == 13 and "tiny (d=64, L=2, 16×8)" in table and table in proc.stdout


def test_dora_benchmark_quick_mode_writes_every_ratio(tmp_path):
  out = tmp_path / "dora.json"
  proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dora.py"), "--quick", "--out", str(out)],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  tiny = json.loads(out.read_text())["sizes"]["tiny"]
  ratios = {k: v for k, v in tiny.items() if k.startswith("ratio/")}
  assert set(ratios) == {"ratio/dora_to_lora_train", "ratio/dora_to_lora_fwd", "ratio/dora_unmerged_to_merged_fwd",
                         "ratio/lora_unmerged_to_merged_fwd"}
  assert all(0 < v < math.inf for v in ratios.values()), ratios
  assert tiny["merge_diff/dora"] < 1e-4 and tiny["merge_diff/lora"] < 1e-4  # the timed forwards are the right ones
