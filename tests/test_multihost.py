"""Checkpoints written and read by every process of a two-process JAX run (2 × 4 CPU devices, gloo collectives).

Two real processes share one (2, 4) ("data", "model") mesh. They save an adapter
checkpoint and a training state (adapters + an adam state) whose leaves are
sharded over both processes, then load them back themselves: onto their mesh, and
onto an interleaved one where no process holds a saved shard whole (each block's
SHA-256 is checked on the gathered leaf). A fresh 8-device interpreter restores
them onto a (4, 2) mesh and onto one device. A second cluster loads a checkpoint
that one process saved, saves a version, and is SIGKILLed while saving the next.
The clusters run once per module; each test's checks run in one interpreter.
"""

import json
import os
import signal
import sys
import textwrap
import time

import numpy as np
import pytest

from tests.multidevice import run_devices, start_processes

_COMMON = """
import json, os, shutil, sys
import numpy as np
import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import jlora
from jlora.train._state import Checkpoints, State

R = 4
CONFIG = jlora.LoraConfig(r=R, target_modules=["query", "up", "head"])


def values(seed):
  # The global arrays: kernels (one stacked (L, in, out) by nn.scan), a frozen bias, adapters. Shards of an adapter
  # are over 1 KiB, so orbax writes them into each process's own files instead of inlining them.
  rng = np.random.default_rng(seed)
  f = lambda *s: rng.standard_normal(s).astype(np.float32)
  return {"attn": {"query": {"kernel": f(64, 128), "bias": f(128), "lora_a": f(64, R), "lora_b": f(R, 128)}},
          "layers": {"up": {"kernel": f(3, 64, 128), "lora_a": f(3, 64, R), "lora_b": f(3, R, 128)}},
          "out": {"head": {"kernel": f(128, 8), "lora_a": f(128, R), "lora_b": f(R, 8)}}}


def specs(i, o):
  # Kernels sharded (input axis on `i`, output axis on `o`); adapters by jlora's rule: A keeps the input (and
  # stack) specs, B the output specs, r replicated.
  return {"attn": {"query": {"kernel": P(i, o), "bias": P(o), "lora_a": P(i, None), "lora_b": P(None, o)}},
          "layers": {"up": {"kernel": P(None, i, o), "lora_a": P(None, i, None), "lora_b": P(None, None, o)}},
          "out": {"head": {"kernel": P(o, None), "lora_a": P(o, None), "lora_b": P(None, None)}}}


def place(tree, mesh, spec):
  return jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, NamedSharding(mesh, s), lambda i: x[i]),
                      tree, spec)


def base_of(tree):
  return {g: {m: {k: v for k, v in d.items() if not k.startswith("lora")} for m, d in mods.items()}
          for g, mods in tree.items()}


def adam(trainable, count):
  # An adam state of `trainable` at step 5 (mu, nu: other values, same shardings).
  mu, nu = jax.tree.map(lambda x: x * 0.5, trainable), jax.tree.map(lambda x: x * x, trainable)
  return State(trainable, (optax.ScaleByAdamState(count, mu, nu), optax.EmptyState()), 5, np.array([1, 2], np.uint32))


def same_shards(got, want):
  # Each shard this process holds equals the global array there (checks trees of jax.Arrays against numpy).
  def one(a, w):
    assert a.shape == w.shape and a.dtype == w.dtype, (a.shape, w.shape, a.dtype, w.dtype)
    for s in a.addressable_shards:
      np.testing.assert_array_equal(np.asarray(s.data), w[s.index])
  jax.tree.map(one, got, want)


def cluster():
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(os.environ["JLORA_TEST_COORDINATOR"], int(os.environ["JLORA_TEST_NUM_PROCESSES"]),
                             int(os.environ["JLORA_TEST_PROCESS_ID"]))
  return Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
"""

_SAVE = _COMMON + """
from jax.experimental import multihost_utils
from jlora.formats.versioned import seal
mesh, out = cluster(), sys.argv[1]
truth = values(0)
params = place(truth, mesh, specs("data", "model"))
assert not params["layers"]["up"]["lora_b"].is_fully_addressable
jlora.save_adapter(os.path.join(out, "adapter"), params, CONFIG)
spec = jlora.split(specs("data", "model"), CONFIG)[0]
expected = adam(jlora.split(truth, CONFIG)[0], np.int32(7))
state = jax.tree.map(lambda x, s: place(x, mesh, s), expected.trainable, spec)
moments = [place(m, mesh, spec) for m in (expected.opt_state[0].mu, expected.opt_state[0].nu)]
count = jax.make_array_from_callback((), NamedSharding(mesh, P()), lambda i: np.int32(7))
state = expected._replace(trainable=state, opt_state=(optax.ScaleByAdamState(count, *moments), optax.EmptyState()))
with Checkpoints(os.path.join(out, "train")) as checkpoints:
  assert checkpoints.save(state, data_position=(0, 3), fingerprint={"run": "multihost"})
jlora.save_quantized(os.path.join(out, "quantized"), base_of(params))  # plain sharded leaves: a block digest per shard
if jax.process_index() == 0:  # a copy whose digest of one block (process 1's) is wrong; a directory of someone else's
  shutil.copytree(os.path.join(out, "adapter"), os.path.join(out, "edited"))
  path = os.path.join(out, "edited", "1", "meta", "metadata")
  with open(path) as f:
    meta = json.load(f)
  del meta["sha256"]
  meta["trainable_blocks_sha256"]["layers/up/lora_b"]["0:3,0:4,96:128"] = "0" * 64
  with open(path, "w") as f:
    json.dump({**meta, "sha256": seal(meta)}, f)
  os.makedirs(os.path.join(out, "foreign"))
  with open(os.path.join(out, "foreign", "notes.txt"), "w") as f:
    f.write("not jlora's")
multihost_utils.sync_global_devices("edited")
try:  # process 0 checks the directory; process 1 raises its error too, instead of waiting for it
  jlora.save_adapter(os.path.join(out, "foreign"), params, CONFIG)
  raise SystemExit("a directory holding foreign files was accepted")
except ValueError as e:
  assert "holds files that are not a jlora adapter checkpoint (notes.txt; no jlora_adapter.json)" in str(e), e
# Loaded back by both processes: onto their own mesh (each saved block lies in one process's shards) ...
loaded, _ = jlora.load_adapter(os.path.join(out, "adapter"), place(base_of(truth), mesh, base_of(specs("data", "model"))))
same_shards(loaded, truth)
# ... and onto an interleaved mesh: the devices of a row alternate between the processes, so the shards of
# `attn/query/lora_b` alternate too and no process holds a saved block whole.
inter = Mesh(np.array(jax.devices()).reshape(2, 4).T, ("data", "model"))
base = place(base_of(truth), inter, base_of(specs("data", "model")))
split = {"attn": {"query": {"lora_b": NamedSharding(inter, P(None, ("data", "model")))}}}
loaded, _ = jlora.load_adapter(os.path.join(out, "adapter"), base, shardings=split)
same_shards(loaded, truth)
assert loaded["attn"]["query"]["lora_b"].sharding.spec == P(None, ("data", "model"))
try:
  jlora.load_adapter(os.path.join(out, "edited"), base, shardings=split)
  raise SystemExit("a wrong block digest was accepted")
except ValueError as e:
  assert "version 1 of the adapter checkpoint" in str(e) and "leaf 'layers/up/lora_b' does not match" in str(e), e
template = jax.tree.map(lambda x: jax.device_put(np.zeros(x.shape, x.dtype), x.sharding), jax.tree.map(
    lambda x, s: place(x, inter, s), expected.trainable, jlora.split(specs("model", "data"), CONFIG)[0]))
template = adam(template, jax.device_put(np.int32(0), NamedSharding(inter, P())))
with Checkpoints(os.path.join(out, "train")) as checkpoints:
  restored = checkpoints.restore(template, 5)
same_shards((restored.trainable, restored.opt_state), (expected.trainable, expected.opt_state))
same_shards(jlora.load_quantized(os.path.join(out, "quantized"), shardings=NamedSharding(inter, P())), base_of(truth))
print("OK", jax.process_index())
"""


def _cluster(script: str, *args: str) -> None:
  """Runs `script` as both processes of a cluster; once one fails the other is killed (it would wait in a collective)."""
  procs = start_processes([sys.executable, "-c", textwrap.dedent(script), *args], 2, 4)
  deadline = time.monotonic() + 300
  while any(p.poll() is None for p in procs) and not any(p.returncode for p in procs) and time.monotonic() < deadline:
    time.sleep(0.05)
  for p in procs:
    if p.poll() is None:
      p.kill()
  for p, (stdout, stderr) in zip(procs, [p.communicate(timeout=60) for p in procs]):
    assert p.returncode == 0 and "OK" in stdout, f"process exited {p.returncode}:\n{stdout[-2000:]}\n{stderr[-4000:]}"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A directory holding `adapter/` and `train/`, saved by both processes of one cluster (which loaded them back)."""
  out = tmp_path_factory.mktemp("multihost")
  _cluster(_SAVE, str(out))
  return out


_LOAD = _COMMON + """
from jax.sharding import SingleDeviceSharding
out = sys.argv[1]
truth = values(0)
adapter = os.path.join(out, "adapter")
mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
# Another mesh shape, kernels sharded the other way round: adapters restore straight into the rule's shards.
loaded, config = jlora.load_adapter(adapter, place(base_of(truth), mesh, base_of(specs("model", "data"))))
assert config == CONFIG
jax.tree.map(lambda a, w: np.testing.assert_array_equal(np.asarray(a), w), loaded, truth)
want = jax.tree.map(lambda s: NamedSharding(mesh, s), specs("model", "data"))
jax.tree.map(lambda a, s: a.sharding.is_equivalent_to(s, a.ndim) or sys.exit(f"{a.sharding} != {s}"), loaded, want)
# One device: every element of every array comes back, bit for bit.
one = jax.devices()[3]
loaded, _ = jlora.load_adapter(adapter, jax.device_put(base_of(truth), one))
jax.tree.map(lambda a, w: np.testing.assert_array_equal(np.asarray(a), w), loaded, truth)
assert all(x.sharding == SingleDeviceSharding(one) for x in jax.tree.leaves(loaded))
trainable = jlora.split(truth, CONFIG)[0]
# The training state, onto the other mesh and onto one device (the template's shardings).
expected = adam(trainable, np.int32(7))
zeros = jax.tree.map(np.zeros_like, expected.trainable)
for template in (adam(place(zeros, mesh, jlora.split(specs("model", "data"), CONFIG)[0]),
                      jax.device_put(np.int32(0), NamedSharding(mesh, P()))),
                 jax.device_put(adam(zeros, np.int32(0)), one)):
  with Checkpoints(os.path.join(out, "train")) as checkpoints:
    state = checkpoints.restore(template, 5)
  assert state.step == 5 and state.rng.tolist() == [1, 2]
  jax.tree.map(lambda a, w: np.testing.assert_array_equal(np.asarray(a), w), (state.trainable, state.opt_state),
               (expected.trainable, expected.opt_state))
  jax.tree.map(lambda a, t: a.sharding == t.sharding or sys.exit(f"{a.sharding} != {t.sharding}"),
               (state.trainable, state.opt_state), (template.trainable, template.opt_state))
quantized = jlora.load_quantized(os.path.join(out, "quantized"))
jax.tree.map(lambda a, w: np.testing.assert_array_equal(np.asarray(a), w), quantized, base_of(truth))
print("OK")
"""


def test_saved_by_two_processes_restores_onto_another_mesh_and_one_device(saved):
  assert "OK" in run_devices(_LOAD, 8, str(saved))


def _blocks(names: dict) -> list[tuple[slice, ...]]:
  return [tuple(slice(*map(int, part.split(":"))) for part in name.split(",")) for name in names]


_ALL_IN_FILES = _COMMON + """
import orbax.checkpoint as ocp
from jax.sharding import SingleDeviceSharding
out = sys.argv[1]
truth = values(0)
trainable = jlora.split(truth, CONFIG)[0]
one = SingleDeviceSharding(jax.devices()[0])
# Read by orbax alone onto one device, every element of every array equals the global array the processes held.
with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
  for step, tree in ((os.path.join(out, "adapter", "1"), trainable),
                     (os.path.join(out, "train", "5"), {"trainable": trainable, "opt_state": adam(trainable, 7).opt_state})):
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=one), tree)
    raw = ckptr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    jax.tree.map(lambda a, w: np.testing.assert_array_equal(np.asarray(a), w), raw, tree)
# The failure itself: files holding only process 0's half of `layers/up/lora_b` (the other half zeros) under the
# metadata of the two-process save must not load.
half = jax.tree.map(lambda x: x, truth)
half["layers"]["up"]["lora_b"] = np.concatenate([half["layers"]["up"]["lora_b"][..., :64], np.zeros((3, R, 64), np.float32)], -1)
jlora.save_adapter(os.path.join(out, "half"), half, CONFIG)
shutil.copyfile(os.path.join(out, "adapter", "1", "meta", "metadata"), os.path.join(out, "half", "1", "meta", "metadata"))
try:
  jlora.load_adapter(os.path.join(out, "half"), base_of(truth))
  raise SystemExit("half of lora_b passed the checks")
except ValueError as e:
  assert "version 1 of the adapter checkpoint" in str(e) and "leaf 'layers/up/lora_b' does not match" in str(e), e
print("OK")
"""


def test_every_element_is_in_the_files_and_under_a_checksum(saved):
  """Against "only 1/world_size of lora_B was saved while file checks passed" (PyTorch FSDP/DeepSpeed reports)."""
  with open(saved / "adapter" / "1" / "meta" / "metadata") as f:
    meta = json.load(f)
  blocks = meta["trainable_blocks_sha256"]  # leaves spread over the processes: one digest per saved shard
  assert sorted(blocks) == sorted(meta["trainable"]) and meta["trainable_sha256"] == {}
  for name, (shape, _) in meta["trainable"].items():
    count = np.zeros(shape, np.int32)
    for index in _blocks(blocks[name]):
      count[index] += 1
    assert (count == 1).all(), name  # every element in exactly one block
  assert len(blocks["layers/up/lora_b"]) == 4 and len(blocks["out/head/lora_b"]) == 1  # sharded 4 ways; replicated
  for process in (0, 1):  # both processes wrote data files of their own
    assert os.listdir(saved / "adapter" / "1" / "state" / f"ocdbt.process_{process}" / "d")
  with open(saved / "train" / "5" / "meta" / "metadata") as f:
    meta = json.load(f)
  assert len(meta["block_digests"]) == 19 and meta["digests"] == {}  # 6 adapters × (value, mu, nu) + adam's count
  with open(saved / "quantized" / "1" / "meta" / "metadata") as f:
    meta = json.load(f)
  assert all(e["sha256"] is None and len(e["blocks_sha256"]) > 1 for e in meta["arrays"])  # every leaf is sharded
  assert "OK" in run_devices(_ALL_IN_FILES, 1, str(saved))


_KILLED = _COMMON + """
import orbax.checkpoint._src.path.atomicity as atomicity
mesh, out = cluster(), sys.argv[1]
# A checkpoint one process saved (whole-array digests), loaded onto the mesh: each leaf is gathered to be checked.
loaded, _ = jlora.load_adapter(os.path.join(out, "single"), place(base_of(values(0)), mesh,
                                                                  base_of(specs("data", "model"))))
same_shards(loaded, values(0))
root = os.path.join(out, "adapter")
jlora.save_adapter(root, place(values(1), mesh, specs("data", "model")), CONFIG)
print("saved 1", flush=True)
rng = np.random.default_rng(2)  # random: orbax compresses the data, which must take a while to write
big = {f"m{i}": {"kernel": np.ones((1024, 2048), np.float32), "lora_a": rng.random((1024, 512), np.float32),
                 "lora_b": rng.random((512, 2048), np.float32)} for i in range(6)}
spec = {"kernel": P("data", "model"), "lora_a": P("data", None), "lora_b": P(None, "model")}
big = place(big, mesh, {k: spec for k in big})
async def held(self):  # orbax's commit of version 2 waits: the kill always lands before it
  import asyncio
  await asyncio.sleep(600)
atomicity.AtomicRenameTemporaryPath.finalize = held
print("saving 2", flush=True)
jlora.save_adapter(root, big, jlora.LoraConfig(r=512, target_modules=list(big)))
print("saved 2: the kill came too late", flush=True)
"""

_AFTER_KILL = _COMMON + """
from jlora.formats.versioned import versions
root = os.path.join(sys.argv[1], "adapter")
assert versions(root) == [1], os.listdir(root)
loaded, _ = jlora.load_adapter(root, base_of(values(1)))
jax.tree.map(lambda a, w: np.testing.assert_array_equal(np.asarray(a), w), loaded, values(1))
jlora.save_adapter(root, values(3), CONFIG)  # the next save into the same directory (leftovers cleaned by orbax)
assert versions(root) == [2] and sorted(os.listdir(root)) == ["2", "jlora_adapter.json"], os.listdir(root)
loaded, _ = jlora.load_adapter(root, base_of(values(3)))
jax.tree.map(lambda a, w: np.testing.assert_array_equal(np.asarray(a), w), loaded, values(3))
print("OK")
"""


def test_sigkill_during_a_sharded_save_keeps_the_previous_version(tmp_path):
  """Both processes are SIGKILLed once their first data files of version 2 are on disk (orbax's commit is held)."""
  run_devices(_COMMON + "jlora.save_adapter(sys.argv[1], values(0), CONFIG)", 1, str(tmp_path / "single"))
  procs = start_processes([sys.executable, "-c", textwrap.dedent(_KILLED), str(tmp_path)], 2, 4)
  root, deadline, written = tmp_path / "adapter", time.monotonic() + 240, []
  try:
    while not written and time.monotonic() < deadline and all(p.poll() is None for p in procs):
      written = [f for d in root.glob("2.*/state*/ocdbt.process_*/d") for f in d.iterdir()]
      time.sleep(0.005)
  finally:
    for p in procs:
      p.send_signal(signal.SIGKILL)
    logs = [p.communicate(timeout=60) for p in procs]
  assert written, f"version 2 wrote no data:\n{logs[0][0][-2000:]}\n{logs[0][1][-4000:]}"
  assert all("saving 2" in out and "saved 2" not in out for out, _ in logs), logs[0][0][-2000:]
  assert any(e.startswith("2.") for e in os.listdir(root))  # the killed save's leftovers
  assert "OK" in run_devices(_AFTER_KILL, 1, str(tmp_path))


_URLS = """
import os, fsspec, pytest
from fsspec.implementations.memory import MemoryFileSystem
fsspec.register_implementation("s3", MemoryFileSystem, clobber=True)  # an object store in memory, through etils.epath
from etils import epath
import jlora
from jlora.formats import versioned as _versioned
from jlora.train import _state
root = _versioned.container("s3://bucket/run/adapter/")
assert root == "s3://bucket/run/adapter", root
with pytest.raises(ValueError, match="no adapter checkpoint at 's3://bucket/run/adapter'"):
  jlora.load_adapter(root, {})
_versioned.check_target(root, "jlora_adapter.json", "adapter checkpoint")  # absent: accepted
_versioned._write_marker(root, "jlora_adapter.json", {"format": "jlora.adapter"})
assert _versioned.is_dir(root) and _versioned.is_file(root + "/jlora_adapter.json")
_versioned.check_target(root, "jlora_adapter.json", "adapter checkpoint")  # jlora's own: accepted
epath.Path("s3://bucket/mine/notes.txt").write_text("mine")
with pytest.raises(ValueError, match=r"holds files that are not a jlora adapter checkpoint \\(notes.txt; no jlora"):
  _versioned.check_target("s3://bucket/mine", "jlora_adapter.json", "adapter checkpoint")
with pytest.raises(ValueError, match="exists and is not a directory"):
  _versioned.check_target("s3://bucket/mine/notes.txt", "jlora_adapter.json", "adapter checkpoint")
with pytest.raises(ValueError, match="is not a jlora adapter checkpoint"):
  jlora.load_adapter("s3://bucket/mine", {})
assert epath.Path("s3://bucket/mine/notes.txt").read_text() == "mine"
epath.Path("s3://bucket/run/checkpoints/7/meta").mkdir(parents=True)
epath.Path("s3://bucket/run/checkpoints/7/meta/metadata").write_text('{"format": "jlora.train_state", "step": 7}')
assert _state.list_steps("s3://bucket/run/checkpoints") == [7]
assert _state.read_meta("s3://bucket/run/checkpoints", 7)["step"] == 7
assert not os.path.exists("s3:")  # nothing went to a local directory named after the URL
print("OK")
"""


def test_urls_go_through_etils_epath_not_the_local_disk():
  """jlora's own checks on a `s3://` URL (an in-memory fsspec store stands in for the bucket; orbax is not run)."""
  assert "OK" in run_devices(_URLS, 1)
