"""Fault injection: saves killed (SIGKILL) at random write steps and at every rename, and loads racing a saver.

A *zygote* subprocess imports jax, orbax and jlora once and forks one child per
save, so that each save starts in milliseconds. In a child every file-system
write step (`open` for writing, `os.rename` / `replace` / `remove` / `unlink` /
`rmdir` / `mkdir` / `makedirs` / `fsync`, also inside orbax and `shutil.rmtree`)
is counted, and the child kills itself with SIGKILL just before the k-th one,
k drawn with a fixed seed. After each kill the test process loads the target,
which must hold exactly the version that was there before or the one being
saved: tensors *and* config (each version has its own `lora_alpha`, so new
tensors beside an old config would be caught).

The renames are the commit points of every writer (jlora's atomic files and
directories, orbax's versions), so they are also enumerated: for every save kind
(adapter, adapter-set entry, quantized base, training checkpoint, PEFT, merged
model), for the first save into a new directory and for a save over an existing
version, a child is killed just before and just after each of its renames
(`os.rename`, `os.replace`, and jlora's `renameat2` exchange). After each kill the
target loads as the old version or the new one (nothing, for a first save), the
next save succeeds, and no temporary of jlora's is left.
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import jlora

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KILLED = -signal.SIGKILL
CONFIG = {"r": 4, "target_modules": ["fc"], "bias": "all"}


# ----------------------------------------------------------------- the versions
def _params(version: int) -> dict:
  """A numpy params tree: a fixed base, and adapters and biases that differ with `version`."""
  base = np.random.default_rng(0)
  rng = np.random.default_rng(version)
  return {
      "fc": {"kernel": base.standard_normal((16, 8), np.float32), "bias": rng.standard_normal(8, np.float32),
             "lora_a": rng.standard_normal((16, 4), np.float32), "lora_b": rng.standard_normal((4, 8), np.float32)},
      "head": {"kernel": base.standard_normal((8, 3), np.float32), "bias": rng.standard_normal(3, np.float32)},
  }


def _config(version: int) -> jlora.LoraConfig:
  return jlora.LoraConfig(lora_alpha=float(version), **CONFIG)


def _base() -> dict:
  p = _params(0)
  return {"fc": {"kernel": p["fc"]["kernel"], "bias": p["fc"]["bias"]}, "head": p["head"]}


_ENTRY = "task"  # the adapter-set entry's name
_GPT2 = {"model_type": "gpt2", "n_layer": 1, "n_embd": 8, "n_head": 2, "vocab_size": 11, "n_positions": 8}


def _quantized(version: int) -> dict:
  """A partly quantized base that differs with `version`: an int8 kernel and a plain leaf."""
  rng = np.random.default_rng(version)
  tree = {"fc": {"kernel": rng.standard_normal((16, 8), np.float32)}, "head": {"bias": rng.standard_normal(3, np.float32)}}
  return jlora.quantize(tree, "int8")


def _state(version: int):
  """A training state whose trainable leaves are those of `_params(version)`, at step `version`."""
  from jlora.train import _state as state_lib

  trainable, _ = jlora.split(_params(version), _config(version))
  return state_lib.State(trainable, {"mu": trainable}, version, np.array([version, 7], np.uint32))


def _merged(version: int):
  """A tiny GPT-2 and its params drawn with key `version`."""
  import jax

  from jlora import models

  return models.from_config(_GPT2, key=jax.random.key(version))


def _save(kind: str, target: str, version: int) -> None:
  params, config = _params(version), _config(version)
  if kind == "adapter":
    jlora.save_adapter(target, params, config)
  elif kind == "adapter_set":  # an entry of an adapter set, as `jlora train` writes them (base checksums included)
    jlora.save_adapter(os.path.join(target, _ENTRY), params, config, base_checksums=True)
  elif kind == "quantized":
    jlora.save_quantized(target, _quantized(version))
  elif kind == "train":
    from jlora.train import _state as state_lib

    with state_lib.Checkpoints(target) as checkpoints:
      checkpoints.save(_state(version), data_position=(0, version), fingerprint={"run": "faults"})
  elif kind == "peft":
    jlora.save_peft(target, None, params, config, name_map="flax")
  elif kind == "merged":
    from jlora import models

    model, merged = _merged(version)
    models.save_pretrained(target, model, merged)
  else:
    raise ValueError(kind)


def _same(a, b) -> bool:
  import jax

  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return jax.tree.structure(a) == jax.tree.structure(b) and all(
      np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def _load(kind: str, target: str) -> tuple[int | None, object]:
  """`(version number the files claim or None, a loader of comparable contents)` of the target; ValueError if none."""
  if kind == "adapter":
    params, config = jlora.load_adapter(target, _base())
    return config.lora_alpha, params
  if kind == "adapter_set":
    adapters = jlora.load_adapter_set(target, _base())
    return adapters.config(_ENTRY).lora_alpha, adapters.params(_ENTRY, jlora.split(_base(), _config(1))[1])
  if kind == "quantized":
    return None, jlora.load_quantized(target)
  if kind == "train":
    from jlora.train import _state as state_lib

    steps = state_lib.list_steps(target)
    if not steps:
      raise ValueError(f"no step in {target}")
    with state_lib.Checkpoints(target, read_only=True) as checkpoints:  # a reader beside the saves
      state = checkpoints.restore(_state(1), steps[-1])
    return state.step, (state.trainable, state.opt_state, np.asarray(state.rng))
  if kind == "peft":
    params, config = jlora.load_peft(target, None, _base(), name_map="flax")
    return config.lora_alpha, params
  from jlora import models

  return None, models.from_pretrained(target)[1]


def _expected(kind: str, version: int):
  if kind in ("adapter", "adapter_set", "peft"):
    return _params(version)
  if kind == "quantized":
    return _quantized(version)
  if kind == "train":
    state = _state(version)
    return state.trainable, state.opt_state, state.rng
  return _merged(version)[1]


def _visible(kind: str, target: str, candidates: list[int | None]) -> int | None:
  """Which of `candidates` the target holds (tensors and config); None when nothing loadable is there."""
  try:
    claimed, loaded = _load(kind, target)
  except ValueError as e:
    assert None in candidates, f"{target} does not load: {e}"
    return None
  for v in candidates:
    if v is None:
      continue
    if _same(loaded, _expected(kind, v)):
      assert claimed in (None, v), f"version {v}'s tensors with the config (or step) of version {claimed}"
      return v
  pytest.fail(f"{target} holds none of the versions {candidates} (it claims {claimed})")


# -------------------------------------------------------------- zygote and child
def _arm_renames(kill: tuple[str, int] | None, counter: list[int], *, exchange: bool) -> None:
  """Counts renames in this (child) process; with `kill=("before" | "after", k)` SIGKILLs it around the k-th.

  Renames are `os.rename`, `os.replace` (also inside orbax) and, unless the
  fallback is forced (`exchange=False`), jlora's `renameat2` exchange
  (`jlora.formats.atomic._exchange`).
  """
  from jlora.formats import atomic as _io

  def counted(fn):
    def wrapper(*args, **kwargs):
      counter[0] += 1
      if kill == ("before", counter[0]):
        os.kill(os.getpid(), signal.SIGKILL)
      out = fn(*args, **kwargs)
      if kill == ("after", counter[0]):
        os.kill(os.getpid(), signal.SIGKILL)
      return out
    return wrapper

  os.rename, os.replace = counted(os.rename), counted(os.replace)
  if exchange:
    _io._exchange = counted(_io._exchange)


def _arm(kill_at: int | str | None, counter: list[int]) -> None:
  """Counts write steps in this (child) process; SIGKILLs it before write step `kill_at`.

  `kill_at="after_backup"` kills right after `_io`'s fallback moved the old
  directory to its backup (between the two renames of the swap).
  """
  import builtins
  import shutil

  def step() -> None:
    counter[0] += 1
    if isinstance(kill_at, int) and counter[0] >= kill_at:
      os.kill(os.getpid(), signal.SIGKILL)

  def counted(fn):
    def wrapper(*args, **kwargs):
      step()
      out = fn(*args, **kwargs)
      if kill_at == "after_backup" and fn.__name__ == "rename" and ".jlora-previous-" in os.fspath(args[1]):
        os.kill(os.getpid(), signal.SIGKILL)
      return out
    return wrapper

  for name in ("rename", "replace", "remove", "unlink", "rmdir", "mkdir", "makedirs", "fsync"):
    setattr(os, name, counted(getattr(os, name)))
  shutil.rmtree = counted(shutil.rmtree)
  real_open = builtins.open

  def open_(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+"):
      step()
    return real_open(file, mode, *args, **kwargs)

  builtins.open = open_


def _child(request: dict) -> None:
  counter = [0]
  if request.get("fallback"):
    from jlora.formats import atomic as _io

    _io._exchange = lambda a, b: False
  if request.get("renames"):
    kill = request.get("kill_rename")
    _arm_renames(None if kill is None else tuple(kill), counter, exchange=not request.get("fallback"))
  elif request.get("kill_at") is not None or request.get("count_to"):
    _arm(request.get("kill_at"), counter)
  for version in request["versions"]:
    _save(request["kind"], request["target"], version)
  if request.get("count_to"):
    with open(request["count_to"], "w") as f:
      f.write(str(counter[0]))


def _zygote() -> None:
  """Reads JSON requests on stdin; forks a child for each; answers `{"code": exit code}` (or `{"pid": pid}`)."""
  import jax  # noqa: F401  (imported before forking: children start warm)
  import orbax.checkpoint  # noqa: F401

  import jlora.models
  import jlora.train._state  # noqa: F401

  for line in sys.stdin:
    request = json.loads(line)
    if request.get("wait_for"):
      _, status = os.waitpid(request["wait_for"], 0)
      print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), flush=True)
      continue
    pid = os.fork()
    if pid == 0:
      os.dup2(2, 1)  # the protocol owns stdout
      code = 0
      try:
        _child(request)
      except BaseException:
        import traceback

        traceback.print_exc()
        code = 3
      os._exit(code)
    if request.get("background"):
      print(json.dumps({"pid": pid}), flush=True)
      continue
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), flush=True)


class Zygote:
  """The forking server (in its own process group, so that a hung child dies with it)."""

  def __init__(self, log: str, timeout: float = 120.0):
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    self.log, self.log_path, self.timeout = open(log, "w"), log, timeout
    self.proc = subprocess.Popen([sys.executable, "-c", "from tests.test_faults import _zygote; _zygote()"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env,
                                 cwd=ROOT, start_new_session=True)

  def _fail(self, what: str) -> None:
    os.killpg(self.proc.pid, signal.SIGKILL)
    with open(self.log_path) as f:
      pytest.fail(f"the zygote {what}:\n{f.read()[-3000:]}")

  def request(self, **request) -> dict:
    self.proc.stdin.write(json.dumps(request) + "\n")
    self.proc.stdin.flush()
    if not select.select([self.proc.stdout], [], [], self.timeout)[0]:
      self._fail(f"did not answer {request} within {self.timeout} s")
    line = self.proc.stdout.readline()
    if not line:
      self._fail("died")
    return json.loads(line)

  def save(self, kind: str, target, versions: list[int], **options) -> int:
    code = self.request(kind=kind, target=str(target), versions=versions, **options)["code"]
    if code not in (0, KILLED):
      with open(self.log_path) as f:
        pytest.fail(f"the saving child failed (exit {code}):\n{f.read()[-3000:]}")
    return code

  def close(self) -> None:
    self.proc.stdin.close()
    try:
      self.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
      os.killpg(self.proc.pid, signal.SIGKILL)
    self.log.close()


def _running(pid: int) -> bool:
  """Whether a process (a child of the zygote, not of this one) still runs (a zombie does not)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except FileNotFoundError:
    return False


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
  z = Zygote(str(tmp_path_factory.mktemp("zygote") / "log.txt"))
  yield z
  z.close()


# ------------------------------------------------------------------------- tests
def _write_steps(zygote, kind: str, tmp_path, **options) -> int:
  """How many write steps a save over an existing version takes."""
  scratch, count = tmp_path / f"count-{kind}", tmp_path / f"count-{kind}.txt"
  assert zygote.save(kind, scratch, [1]) == 0
  assert zygote.save(kind, scratch, [2], count_to=str(count), **options) == 0
  steps = int(count.read_text())
  assert steps >= 5, steps  # orbax's and _io's writes were seen
  return steps


@pytest.mark.parametrize("kind, fallback, trials", [("adapter", False, 24), ("peft", False, 14), ("peft", True, 14)])
def test_kill_at_random_write_steps_leaves_old_or_new(zygote, tmp_path, kind, fallback, trials):
  options = {"fallback": True} if fallback else {}
  steps = _write_steps(zygote, kind, tmp_path, **options)
  rng = random.Random(f"{kind}-{fallback}")
  target = tmp_path / "target"
  current: int | None = None
  seen = {"old": 0, "new": 0}
  for version in range(1, trials + 1):
    # The first save of all is killed too (nothing before it); a few saves run to the end.
    kill_at = rng.randint(1, steps) if rng.random() < 0.85 else None
    code = zygote.save(kind, target, [version], kill_at=kill_at, **options)
    now = _visible(kind, str(target), [current, version] if code == KILLED else [version])
    if current is not None and code == KILLED:
      seen["new" if now == version else "old"] += 1
    current = now
  assert seen["old"] >= 2 and seen["new"] >= 1, seen  # kills landed both before and after the commit
  assert _visible(kind, str(target), [current]) == current
  zygote.save(kind, target, [99], **options)  # a complete save after all this leaves only the new version
  assert _visible(kind, str(target), [99]) == 99
  if kind == "adapter":  # one orbax step left: the older ones (some half-deleted by kills) are gone
    entries = sorted(os.listdir(target))
    assert len(entries) == 2 and entries[0].isdigit() and entries[1] == "jlora_adapter.json", entries
  assert sorted(os.listdir(tmp_path)) == ["count-" + kind, f"count-{kind}.txt", "target"], "no temporary left"


@pytest.mark.parametrize("kind", ["peft", "merged"])
def test_fallback_two_interrupted_saves_in_a_row_keep_the_old_version(zygote, tmp_path, kind):
  """Without `renameat2`, a save killed between its two renames, twice in a row, still leaves version 1 loadable.

  Read-only: `load_peft` and `models.from_pretrained` read the backup while the target is missing.
  """
  target = tmp_path / kind
  assert zygote.save(kind, target, [1], fallback=True) == 0
  for version in (2, 3):
    assert zygote.save(kind, target, [version], fallback=True, kill_at="after_backup") == KILLED
    assert not target.exists(), "killed between the renames: the old directory is in its backup"
    assert _visible(kind, str(target), [1]) == 1
    assert not target.exists(), "reading moved nothing"
  assert zygote.save(kind, target, [4], fallback=True) == 0
  assert _visible(kind, str(target), [4]) == 4
  assert sorted(os.listdir(tmp_path)) == [kind], "the backups and temporaries are gone"


def test_load_while_another_process_saves(zygote, tmp_path):
  """Loads racing a process that saves 40 versions return one of the saved versions exactly (or retry)."""
  target = tmp_path / "adapter"
  assert zygote.save("adapter", target, [1]) == 0
  versions = list(range(2, 42))
  pid = zygote.request(kind="adapter", target=str(target), versions=versions, background=True)["pid"]
  seen = []
  deadline = time.time() + 120
  try:
    while time.time() < deadline:
      seen.append(_visible("adapter", str(target), [1, *versions]))
      if seen[-1] == versions[-1] or not _running(pid):
        break
  finally:
    code = zygote.request(wait_for=pid)["code"]
  assert code == 0
  assert seen == sorted(seen), "versions only move forward"
  assert len(set(seen)) >= 3, f"the loads did not overlap the saves: {seen}"
  assert _visible("adapter", str(target), [versions[-1]]) == versions[-1]


def _leftovers(root) -> list[str]:
  """Temporaries and backups of jlora and orbax under `root` (and beside it)."""
  tags = (".jlora-tmp-", ".jlora-previous-", ".orbax-checkpoint-tmp")
  found = [os.path.join(d, n) for d, dirs, files in os.walk(root) for n in dirs + files if any(t in n for t in tags)]
  return found + [n for n in os.listdir(os.path.dirname(root)) if any(t in n for t in tags)]


KINDS = [("adapter", False), ("adapter_set", False), ("quantized", False), ("train", False), ("peft", False),
         ("peft", True), ("merged", False), ("merged", True)]


@pytest.mark.parametrize("kind, fallback", KINDS)
def test_kill_before_and_after_every_rename_then_the_next_save_succeeds(zygote, tmp_path, kind, fallback):
  """Every rename of a save (first into a new directory, or over a version) is a kill point; none blocks the next."""
  options = {"fallback": True} if fallback else {}
  count = tmp_path / "count.txt"
  killed = 0
  for first in (True, False):
    scratch = tmp_path / f"count-{first}"
    if not first:
      assert zygote.save(kind, scratch, [1], **options) == 0
    assert zygote.save(kind, scratch, [2], renames=True, count_to=str(count), **options) == 0
    renames = int(count.read_text())
    assert renames >= 1 + (kind in ("adapter", "adapter_set", "quantized")), renames  # the marker, the commit
    target, version = tmp_path / f"target-{first}", 1
    for k in range(1, renames + 1):
      for when in ("before", "after"):
        if first:
          target = tmp_path / f"first-{when}-{k}"
          old = None
        else:
          if version == 1:
            assert zygote.save(kind, target, [version], **options) == 0
          old = version
        new = version + 1
        assert zygote.save(kind, target, [new], renames=True, kill_rename=[when, k], **options) == KILLED
        killed += 1
        assert _visible(kind, str(target), [old, new]) in (old, new)
        version = new + 1
        assert zygote.save(kind, target, [version], **options) == 0, f"the save after a kill {when} rename {k}"
        assert _visible(kind, str(target), [version]) == version
        assert _leftovers(str(target)) == [], f"killed {when} rename {k} of {renames}"
  assert killed >= 4, killed  # first save and save over a version, before and after each rename
