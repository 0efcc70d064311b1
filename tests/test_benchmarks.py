"""The benchmark timer notices another process taking the CPU (no timing is asserted)."""

import pathlib
import subprocess
import sys
import time

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))
from _timing import measure


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
