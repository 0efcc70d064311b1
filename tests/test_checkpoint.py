"""Orbax adapter checkpoints: round trips, atomic saves under failure and SIGKILL, size, base checks, shardings."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import jlora
from jlora import checkpoint
from jlora.checkpoint import load_adapter, save_adapter
from tests import zoo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = {c.name: c for c in zoo.cases()}


_BASES = {}


def _build(case):
  """`zoo.build(case)`, jitted and built once per process (the arrays are immutable, the dicts copied)."""
  if case.name not in _BASES:
    _BASES[case.name] = jax.jit(case.model.init)(jax.random.key(0), case.inputs)["params"]
  return jax.tree.map(lambda x: x, _BASES[case.name])


def _setup(name="mlp", key=1, **kwargs):
  case = CASES[name]
  base = _build(case)
  kwargs.setdefault("target_modules", case.targets)
  cfg = jlora.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kwargs)
  return case, base, cfg, jlora.init(jax.random.key(key), case.model, base, cfg, case.inputs)


def _same_trees(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _train(case, params, cfg, steps=3):
  trainable, frozen = jlora.split(params, cfg)
  tx = optax.adam(1e-2)
  state = tx.init(trainable)

  @jax.jit
  def step(t, s):
    grads = jax.grad(lambda t: jnp.mean(jlora.apply(case.model, jlora.combine(t, frozen), cfg, case.inputs) ** 2))(t)
    updates, s = tx.update(grads, s, t)
    return optax.apply_updates(t, updates), s

  for _ in range(steps):
    trainable, state = step(trainable, state)
  return jlora.combine(trainable, frozen)


@pytest.mark.parametrize("name", ["mlp", "attention", "einsum", "conv", "embed"])  # scan: below
def test_round_trip_every_layer_kind(tmp_path, name):
  _, base, cfg, params = _setup(name)
  save_adapter(tmp_path / "ckpt", params, cfg)
  loaded, cfg2 = load_adapter(tmp_path / "ckpt", base)
  assert cfg2 == cfg
  _same_trees(loaded, params)  # outputs are compared after training below


@pytest.mark.parametrize("name", ["mlp", "scan"])
def test_round_trip_after_training(tmp_path, name):
  extra = {"bias": "all", "modules_to_save": ["head"], "target_modules": ["fc_0", "fc_1"]} if name == "mlp" \
      else {"bias": "lora_only"}
  case, base, cfg, params = _setup(name, **extra)
  trained = _train(case, params, cfg)
  moved = ["fc_0/lora_b", "fc_0/bias", "head/kernel"] if name == "mlp" else ["layers/up/lora_a", "layers/up/bias"]
  for path in moved:
    a, b = (jlora.checkpoint.flatten(t)[tuple(path.split("/"))] for t in (trained, params))
    assert not np.allclose(a, b), path
  save_adapter(tmp_path / "ckpt", trained, cfg)
  loaded, cfg2 = load_adapter(tmp_path / "ckpt", base)
  _same_trees(loaded, trained)
  # Jitted (the config static: one compile when cfg2 == cfg) rather than dispatched primitive by primitive.
  forward = jax.jit(lambda p, c: jlora.apply(case.model, p, c, case.inputs), static_argnums=1)
  np.testing.assert_array_equal(forward(loaded, cfg2), forward(trained, cfg))
  # Onto a tree that already holds other adapters: they (and the trained leaves) are replaced.
  _, _, _, other = _setup(name, key=7, **extra)
  again, _ = load_adapter(tmp_path / "ckpt", other)
  _same_trees(again, trained)
  # The base leaves of the result are the very arrays passed in.
  assert loaded["fc_1"]["kernel"] is base["fc_1"]["kernel"] if name == "mlp" else \
      loaded["embed"]["embedding"] is base["embed"]["embedding"]


def test_only_trainable_leaves_are_written_and_size_is_raw_bytes(tmp_path):
  model = zoo.MLP(features=(512, 1024, 1024, 8))
  x = jnp.ones((2, 512))
  base = model.init(jax.random.key(0), x)["params"]
  cfg = jlora.LoraConfig(r=64, target_modules=["fc_0", "fc_1"], init_lora_weights=False)
  params = jlora.init(jax.random.key(1), model, base, cfg, x)
  save_adapter(tmp_path / "ckpt", params, cfg)
  raw = sum(leaf.nbytes for leaf in jax.tree.leaves(jlora.split(params, cfg)[0]))
  on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tmp_path / "ckpt") for f in fs)
  base_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(base))
  assert raw == (512 + 512 + 512 + 1024) * 64 * 4  # fc_0 (512 -> 512), fc_1 (512 -> 1024)
  # Metadata adds a few kB; orbax's zstd chunks compress float32 a little (about 9% for random adapters).
  assert 0.85 * raw <= on_disk <= 1.03 * raw, (on_disk, raw)
  assert on_disk < base_bytes / 4


def test_failure_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
  _, base, cfg, first = _setup("mlp", key=1)
  _, _, _, second = _setup("mlp", key=2)
  save_adapter(tmp_path / "ckpt", first, cfg)

  def fail(tmp, target):
    assert os.path.isfile(os.path.join(tmp, "jlora_checkpoint.json"))  # the new checkpoint was fully written
    raise OSError("disk on fire")

  monkeypatch.setattr(checkpoint, "_finalize", fail)
  with pytest.raises(OSError, match="disk on fire"):
    save_adapter(tmp_path / "ckpt", second, cfg)
  assert os.listdir(tmp_path) == ["ckpt"]  # the temporary directory is gone
  _same_trees(load_adapter(tmp_path / "ckpt", base)[0], first)
  monkeypatch.undo()
  save_adapter(tmp_path / "ckpt", second, cfg)  # a later save replaces it
  _same_trees(load_adapter(tmp_path / "ckpt", base)[0], second)


_WRITER = """
import os, sys, time
import jax, jlora
from jlora import checkpoint
from tests import zoo
case = zoo.cases()[0]
base = zoo.build(case)
cfg = jlora.LoraConfig(r=4, lora_alpha=8, target_modules=case.targets, init_lora_weights=False)
params = jlora.init(jax.random.key(2), case.model, base, cfg, case.inputs)
def stall(tmp, target):  # the new checkpoint is complete in tmp; die before it is renamed into place
  open(sys.argv[2], "w").close()
  time.sleep(600)
checkpoint._finalize = stall
checkpoint.save_adapter(sys.argv[1], params, cfg)
"""


def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path):
  _, base, cfg, first = _setup("mlp", key=1)
  target, marker = tmp_path / "ckpt", tmp_path / "marker"
  save_adapter(target, first, cfg)
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_WRITER), str(target), str(marker)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  deadline = time.time() + 120
  while not marker.exists():
    if proc.poll() is not None or time.time() > deadline:
      proc.kill()
      pytest.fail(f"writer did not reach the rename: {proc.communicate()[0].decode()[-2000:]}")
    time.sleep(0.1)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  leftovers = [e for e in os.listdir(tmp_path) if e.startswith(".ckpt.jlora-tmp-")]
  assert len(leftovers) == 1
  _same_trees(load_adapter(target, base)[0], first)
  save_adapter(target, first, cfg)  # the next save removes what the dead writer left
  assert sorted(os.listdir(tmp_path)) == ["ckpt", "marker"]


@pytest.mark.parametrize("change, match", [
    ("shape", r"'fc_1/bias': shape \(32,\) in the checkpoint's base, \(16,\) given \(and 2 more mismatches\)"),
    ("dtype", r"'fc_0/bias': dtype float32 in the checkpoint's base, bfloat16 given"),
    ("missing", r"'head/bias': in the checkpoint's base \(8,\) float32, absent from `params`"),
])
def test_mismatching_base(tmp_path, change, match):
  case, base, cfg, params = _setup("mlp")
  save_adapter(tmp_path / "ckpt", params, cfg)
  if change == "shape":
    other = zoo.MLP(features=(32, 16, 8)).init(jax.random.key(0), case.inputs)["params"]
  elif change == "dtype":
    other = jax.tree.map(lambda x: x.astype(jnp.bfloat16), base)
  else:
    other = {k: dict(v) for k, v in base.items()}
    del other["head"]["bias"]
  with pytest.raises(ValueError, match=match):
    load_adapter(tmp_path / "ckpt", other)


def test_bad_paths_and_nothing_to_save(tmp_path):
  case, base, cfg, params = _setup("mlp")
  with pytest.raises(ValueError, match="no adapter checkpoint"):
    load_adapter(tmp_path / "nope", base)
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="not a jlora adapter checkpoint"):
    load_adapter(tmp_path / "empty", base)
  with pytest.raises(ValueError, match="holds no trainable leaf"):
    save_adapter(tmp_path / "x", base, cfg)
  with pytest.raises(ValueError, match="has rank 4 but the config gives r=2"):
    save_adapter(tmp_path / "x", params, jlora.LoraConfig(r=2, target_modules=case.targets))
  assert sorted(os.listdir(tmp_path)) == ["empty"]


def test_restore_into_shardings(tmp_path):
  _, base, cfg, params = _setup("mlp")
  save_adapter(tmp_path / "ckpt", params, cfg)
  mesh = Mesh(np.array(jax.devices()[:1]), ("x",))
  replicated = NamedSharding(mesh, PartitionSpec())
  loaded, _ = load_adapter(tmp_path / "ckpt", base, shardings=replicated)
  _same_trees(loaded, params)
  assert loaded["fc_0"]["lora_a"].sharding == replicated
  # Default: adapters follow their kernel's NamedSharding (A: input axes, B: output axes, r replicated).
  sharded = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, PartitionSpec(*[None] * (x.ndim - 1), "x"))),
                         base)
  loaded, _ = load_adapter(tmp_path / "ckpt", sharded)
  assert loaded["fc_0"]["lora_a"].sharding.spec == PartitionSpec(None, None)
  assert loaded["fc_0"]["lora_b"].sharding.spec == PartitionSpec(None, "x")
  # A tree of shardings shaped like the trainable half; missing entries use the default.
  tree = {"fc_1": {"lora_b": NamedSharding(mesh, PartitionSpec("x", None))}}
  loaded, _ = load_adapter(tmp_path / "ckpt", base, shardings=tree)
  assert loaded["fc_1"]["lora_b"].sharding.spec == PartitionSpec("x", None)
  _same_trees(loaded, params)
  with pytest.raises(TypeError, match=r"must be a jax\.sharding\.Sharding"):
    load_adapter(tmp_path / "ckpt", base, shardings={"fc_1": {"lora_b": "x"}})


_SHARDED = """
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import jlora
from tests import zoo
case = [c for c in zoo.cases() if c.name == "scan"][0]
base = zoo.build(case)
cfg = jlora.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
params = jlora.init(jax.random.key(1), case.model, base, cfg, case.inputs)
from jlora.checkpoint import save_adapter, load_adapter
save_adapter(sys.argv[1], params, cfg)
mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
def place(path, x):
  if path[-1].key == "kernel" and x.ndim == 3:  # stacked (L, in, out): shard in on data, out on model
    return jax.device_put(x, NamedSharding(mesh, P(None, "data", "model")))
  return jax.device_put(x, NamedSharding(mesh, P()))
sharded = jax.tree_util.tree_map_with_path(place, base)
loaded, _ = load_adapter(sys.argv[1], sharded)
up = loaded["layers"]["up"]
assert up["lora_a"].sharding.spec == P(None, "data", None), up["lora_a"].sharding
assert up["lora_b"].sharding.spec == P(None, None, "model"), up["lora_b"].sharding
assert len(up["lora_b"].addressable_shards) == 4
np.testing.assert_array_equal(up["lora_b"], params["layers"]["up"]["lora_b"])
forward = jax.jit(lambda p: jlora.apply(case.model, p, cfg, case.inputs))
np.testing.assert_allclose(forward(loaded), forward(params), atol=1e-5)
print("OK")
"""


def test_restore_into_shards_on_four_devices(tmp_path):
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  out = subprocess.run([sys.executable, "-c", textwrap.dedent(_SHARDED), str(tmp_path / "ckpt")], env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
