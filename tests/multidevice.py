"""Running test code on several (virtual CPU) devices or processes, each in a fresh interpreter.

JAX fixes its device count when it starts, so code that needs a mesh runs in a
subprocess with `XLA_FLAGS=--xla_force_host_platform_device_count=N`. The
persistent compilation cache directory of the session (`tests/conftest.py`) is
inherited through the environment.
"""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

__all__ = ["ROOT", "env", "free_port", "once_per_session", "run_devices", "start_processes"]


def env(devices: int, **extra: str) -> dict[str, str]:
  """The environment of a CPU-only interpreter with `devices` virtual devices and jlora importable."""
  path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)
  return {**os.environ, "PYTHONPATH": path, "JAX_PLATFORMS": "cpu",
          "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", **extra}


def run_devices(code: str, devices: int = 8, *args: str, timeout: float = 600) -> str:
  """Runs `code` (dedented) with `devices` virtual CPU devices and returns its stdout; fails with its stderr."""
  out = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=env(devices), capture_output=True,
                       text=True, timeout=timeout, cwd=ROOT)
  if out.returncode != 0:
    raise AssertionError(f"subprocess exited {out.returncode}:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
  return out.stdout


def once_per_session(name: str, compute: Callable[[], str]) -> str:
  """`compute()` (text) once per test session: the first pytest-xdist worker to ask runs it, the others wait for it
  and read its result (a module fixture would run once per worker that gets one of the module's tests).

  The results live in the session's directory (`JLORA_TEST_SESSION_DIR`, made by `tests/conftest.py`); a `compute`
  that raises writes nothing, so the next caller runs it again.
  """
  root = os.environ.get("JLORA_TEST_SESSION_DIR")
  if root is None:  # not under this suite's conftest
    return compute()
  path = os.path.join(root, name)
  with open(path + ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not os.path.exists(path):
      text = compute()
      with open(path + ".tmp", "w") as f:
        f.write(text)
      os.replace(path + ".tmp", path)
    with open(path) as f:
      return f.read()


def free_port() -> int:
  """A TCP port that is free now on localhost (for `jax.distributed.initialize`)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_processes(argv: list[str], processes: int, devices: int, **extra: str) -> list[subprocess.Popen]:
  """Starts `processes` copies of `argv`, each with `devices` virtual CPU devices, as one JAX cluster.

  Each gets `JLORA_TEST_COORDINATOR` (localhost:port), `JLORA_TEST_PROCESS_ID` and
  `JLORA_TEST_NUM_PROCESSES` to pass to `jax.distributed.initialize`, and uses gloo
  CPU collectives (`JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo`).
  """
  port = free_port()
  return [subprocess.Popen(argv, env=env(devices, JLORA_TEST_COORDINATOR=f"127.0.0.1:{port}",
                                         JLORA_TEST_PROCESS_ID=str(i), JLORA_TEST_NUM_PROCESSES=str(processes),
                                         JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", **extra),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
          for i in range(processes)]
