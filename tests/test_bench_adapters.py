"""The many-adapters, DoRA and mesh benchmarks (`benchmarks/{adapters,dora,sharding}.py`) in quick mode.

No timing is asserted. The mesh benchmark's collective-byte and per-device-memory
measures are properties of the compiled programs, not timings, so they are checked
against their goals.
"""

import json
import math
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _quick(script: str, tmp_path) -> tuple[dict, str]:
  """Runs `benchmarks/<script> --quick`; returns its JSON report and its stdout."""
  out = tmp_path / "report.json"
  proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--out", str(out)],
                        cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(out.read_text()), proc.stdout


def test_adapters_benchmark_quick_mode_writes_every_measure(tmp_path):
  report, stdout = _quick("adapters.py", tmp_path)
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
  assert table.count("\n") == 13 and "tiny (d=64, L=2, 16×8)" in table and table in stdout


def test_dora_benchmark_quick_mode_writes_every_ratio(tmp_path):
  tiny = _quick("dora.py", tmp_path)[0]["sizes"]["tiny"]
  ratios = {k: v for k, v in tiny.items() if k.startswith("ratio/")}
  assert set(ratios) == {"ratio/dora_to_lora_train", "ratio/dora_to_lora_fwd", "ratio/dora_unmerged_to_merged_fwd",
                         "ratio/dora_cached_to_merged_fwd", "ratio/dora_unmerged_to_merged_token",
                         "ratio/dora_cached_to_merged_token", "ratio/lora_unmerged_to_merged_fwd"}
  assert all(0 < v < math.inf for v in ratios.values()), ratios
  assert tiny["merge_diff/dora"] < 1e-4 and tiny["merge_diff/lora"] < 1e-4  # the timed forwards are the right ones


def test_sharding_benchmark_quick_mode_meets_the_byte_goals(tmp_path):
  report, stdout = _quick("sharding.py", tmp_path)
  assert report["devices"] == 8 and list(report["sizes"]) == ["tiny"]
  meshes = report["sizes"]["tiny"]["meshes"]
  assert set(meshes) == {"single", "dp (8,1,1)", "fsdp (2,4,1)", "dp·fsdp·tp (2,2,2)"}
  for name, m in meshes.items():
    if name == "single":
      continue
    ratios = {k: v for k, v in m.items() if k.startswith("ratio/")}
    assert len(ratios) == 6 and all(0 < v < math.inf for v in ratios.values()), (name, ratios)
    assert m["ratio/grad_reduce_bytes_to_adapter"] <= 1.1, (name, m)  # gradients: adapter-sized
    assert m["ratio/reduce_bytes_lora_to_full"] < 0.5, (name, m)
  assert meshes["fsdp (2,4,1)"]["ratio/argument_bytes_to_single"] < 0.5  # the frozen base split 4 ways
  assert report["markdown"].count("\n") == 5 and report["markdown"] in stdout
