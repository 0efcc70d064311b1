"""Adapter checkpoints: round trips, layout, failed saves, refusals, checksums and bit flips, base checks, shardings.

Saves killed at random points and loads racing a saver are in `test_faults.py`.
"""

import json
import os
import random
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import jlora
from jlora.formats import checkpoint
from jlora.formats import integrity as _integrity
from jlora.formats.checkpoint import load_adapter, save_adapter
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


def _as_trained(params, cfg):
  """Every trainable leaf (adapters, trained biases, saved modules) moved by noise, as training would move it."""
  trainable, frozen = jlora.split(params, cfg)
  leaves, treedef = jax.tree.flatten(trainable)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  moved = [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  return jlora.combine(jax.tree.unflatten(treedef, moved), frozen)


@pytest.mark.parametrize("name", ["mlp", "attention", "einsum", "conv", "embed"])  # scan: below
def test_round_trip_every_layer_kind(tmp_path, name):
  _, base, cfg, params = _setup(name)
  save_adapter(tmp_path / "ckpt", params, cfg)
  loaded, cfg2 = load_adapter(tmp_path / "ckpt", base)
  assert cfg2 == cfg
  _same_trees(loaded, params)  # outputs are compared after training below


@pytest.mark.parametrize("name", ["mlp", "scan"])
def test_round_trip_of_trained_leaves(tmp_path, name):
  extra = {"bias": "all", "modules_to_save": ["head"], "target_modules": ["fc_0", "fc_1"]} if name == "mlp" \
      else {"bias": "lora_only"}
  case, base, cfg, params = _setup(name, **extra)
  trained = _as_trained(params, cfg)
  moved = ["fc_0/lora_b", "fc_0/bias", "head/kernel"] if name == "mlp" else ["layers/up/lora_a", "layers/up/bias"]
  for path in moved:
    a, b = (jlora.core.tree.flatten(t)[tuple(path.split("/"))] for t in (trained, params))
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


def _numpy_params(version, width=64, r=8):
  """A model-free params tree (numpy) whose adapters and bias differ with `version`."""
  base, rng = np.random.default_rng(0), np.random.default_rng(version)
  return {"fc": {"kernel": base.standard_normal((width, width), np.float32), "bias": rng.standard_normal(width, np.float32),
                 "lora_a": rng.standard_normal((width, r), np.float32), "lora_b": rng.standard_normal((r, width), np.float32)}}


def _numpy_base(width=64):
  """The base `_numpy_params` were made on: the same kernel, its own (untrained) bias."""
  return {"fc": {"kernel": _numpy_params(0, width)["fc"]["kernel"], "bias": np.zeros(width, np.float32)}}


NUMPY_CFG = jlora.LoraConfig(r=8, target_modules=["fc"], bias="all")


def _files(path):
  return {os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs}


def test_on_disk_layout_versions_and_metadata(tmp_path):
  target = tmp_path / "ckpt"
  for version in (1, 2, 3):
    save_adapter(target, _numpy_params(version), NUMPY_CFG)
  # A marker, and only the newest orbax step: each save commits a new step, then deletes the older ones.
  assert sorted(os.listdir(target)) == ["3", "jlora_adapter.json"]
  assert json.loads((target / "jlora_adapter.json").read_text())["format"] == "jlora.adapter"
  files = _files(target / "3")
  assert {"meta/metadata", "state/_METADATA", "commit_success.txt"} <= files
  meta = json.loads((target / "3" / "meta" / "metadata").read_text())
  assert meta["config"] == NUMPY_CFG.to_dict() and meta["version"] == 2
  trainable = jlora.split(_numpy_params(3), NUMPY_CFG)[0]
  assert meta["trainable_sha256"] == _integrity.digests(jlora.core.tree.flatten(trainable))
  assert meta["base"] == {"fc/bias": [[64], "float32"], "fc/kernel": [[64, 64], "float32"]}
  assert meta["base_sha256"] is None
  loaded, cfg = load_adapter(target, _numpy_base())
  _same_trees(jax.tree.map(np.asarray, loaded), _numpy_params(3))
  assert cfg == NUMPY_CFG


def test_failure_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
  from orbax.checkpoint._src.path import atomicity

  target = tmp_path / "ckpt"

  async def fail(self):
    raise OSError("disk on fire")

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", fail)
  with pytest.raises(OSError, match="disk on fire"):
    save_adapter(target, _numpy_params(1), NUMPY_CFG)  # the first save: nothing to keep, nothing loadable
  with pytest.raises(ValueError, match="holds no complete version"):
    load_adapter(target, _numpy_base())
  monkeypatch.undo()
  save_adapter(target, _numpy_params(1), NUMPY_CFG)
  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", fail)
  with pytest.raises(OSError, match="disk on fire"):
    save_adapter(target, _numpy_params(2), NUMPY_CFG)
  assert any("orbax-checkpoint-tmp" in e for e in os.listdir(target))  # the uncommitted version is never read
  _same_trees(jax.tree.map(np.asarray, load_adapter(target, _numpy_base())[0]), _numpy_params(1))
  monkeypatch.undo()
  save_adapter(target, _numpy_params(3), NUMPY_CFG)  # a later save commits and removes the leftovers
  _same_trees(jax.tree.map(np.asarray, load_adapter(target, _numpy_base())[0]), _numpy_params(3))
  assert sorted(os.listdir(target)) == ["2", "jlora_adapter.json"]  # step 2, committed now


def test_refuses_to_replace_what_jlora_did_not_write(tmp_path, monkeypatch):
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "notes.txt").write_text("keep me")
  monkeypatch.chdir(mine)
  with pytest.raises(ValueError, match=r"holds files that are not a jlora adapter checkpoint \(notes\.txt; no "
                                       r"jlora_adapter\.json\).*nothing of yours is overwritten"):
    save_adapter(".", _numpy_params(1), NUMPY_CFG)
  assert sorted(os.listdir(mine)) == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"
  (tmp_path / "file").write_text("x")
  with pytest.raises(ValueError, match="exists and is not a directory"):
    save_adapter(tmp_path / "file", _numpy_params(1), NUMPY_CFG)
  assert (tmp_path / "file").read_text() == "x"
  jlora.save_peft(tmp_path / "peft", None, _numpy_params(1), NUMPY_CFG, name_map="flax")  # jlora's, but not this kind
  before = {f: (tmp_path / "peft" / f).read_bytes() for f in _files(tmp_path / "peft")}
  with pytest.raises(ValueError, match=r"\(\.jlora-manifest\.json, adapter_config\.json, adapter_model\.safetensors"):
    save_adapter(tmp_path / "peft", _numpy_params(1), NUMPY_CFG)
  assert {f: (tmp_path / "peft" / f).read_bytes() for f in _files(tmp_path / "peft")} == before
  old = tmp_path / "v1"  # the format of the previous jlora
  (old / "state").mkdir(parents=True)
  (old / "jlora_checkpoint.json").write_text("{}")
  with pytest.raises(ValueError, match=r"older jlora \(format 1"):
    save_adapter(old, _numpy_params(1), NUMPY_CFG)
  with pytest.raises(ValueError, match=r"not a jlora adapter checkpoint.*older jlora \(format 1"):
    load_adapter(old, _numpy_base())
  (tmp_path / "empty").mkdir()  # an empty directory holds nothing to lose, even the working directory
  monkeypatch.chdir(tmp_path / "empty")
  save_adapter(".", _numpy_params(1), NUMPY_CFG)
  assert os.getcwd() == str(tmp_path / "empty") and sorted(os.listdir(".")) == ["1", "jlora_adapter.json"]
  _same_trees(jax.tree.map(np.asarray, load_adapter(".", _numpy_base())[0]), _numpy_params(1))


def test_random_bit_flips_raise_or_change_nothing(tmp_path):
  """Flip one bit of the largest data file, 30 times: each load raises a ValueError or returns the saved bits."""
  target = tmp_path / "ckpt"
  saved = _numpy_params(1, width=256)
  save_adapter(target, saved, NUMPY_CFG)
  (version,) = [e for e in os.listdir(target) if e.isdigit()]
  data_file = max((target / version / f for f in _files(target / version)), key=os.path.getsize)
  assert data_file.parent.name == "d" and os.path.getsize(data_file) > 4096  # tensorstore data: adapter bytes
  original = data_file.read_bytes()
  base = _numpy_base(256)
  rng = random.Random(0)
  outcomes = []
  for _ in range(30):
    damaged = bytearray(original)
    bit = rng.randrange(len(damaged) * 8)
    damaged[bit // 8] ^= 1 << (bit % 8)
    data_file.write_bytes(bytes(damaged))
    try:
      loaded, _ = load_adapter(target, base)
    except ValueError as e:
      assert str(target) in str(e) and "is damaged" in str(e), e
      outcomes.append("error")
      continue
    _same_trees(jax.tree.map(np.asarray, loaded), saved)
    outcomes.append("same")
  data_file.write_bytes(original)
  assert outcomes.count("error") >= 20, outcomes  # nearly every flip hits the tensors' bytes and is caught
  _same_trees(jax.tree.map(np.asarray, load_adapter(target, base)[0]), saved)


def test_checksum_mismatch_names_the_leaf_and_edited_metadata_is_refused(tmp_path, monkeypatch):
  target = tmp_path / "ckpt"
  save_adapter(target, _numpy_params(1), NUMPY_CFG)
  meta_file = target / "1" / "meta" / "metadata"
  meta = json.loads(meta_file.read_text())
  meta["config"]["lora_alpha"] = 16.0  # valid JSON, valid config: only the seal notices
  meta_file.write_text(json.dumps(meta))
  with pytest.raises(ValueError, match=r"version 1 of the adapter checkpoint .*ckpt' is damaged: its metadata does "
                                       r"not match its SHA-256"):
    load_adapter(target, _numpy_base())
  save_adapter(target, _numpy_params(2), NUMPY_CFG)
  real = checkpoint.restore_item

  def tampered(root, version, item, args):  # what a flipped bit inside one array's bytes reads as
    out = real(root, version, item, args)
    if item == "state":
      out["fc"]["lora_b"] = out["fc"]["lora_b"].at[0, 0].add(1.0)
    return out

  monkeypatch.setattr(checkpoint, "restore_item", tampered)
  with pytest.raises(ValueError, match=r"version 2 .* is damaged: leaf 'fc/lora_b' does not match its checksum"):
    load_adapter(target, _numpy_base())


def test_orbax_is_imported_only_when_used():
  code = "import sys, jlora; print(sorted(m for m in sys.modules if m.split('.')[0] == 'orbax'))"
  out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True,
                       text=True, timeout=120)
  assert out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]


@pytest.mark.parametrize("change, match", [
    ("shape", r"check failed: shapes: 'fc_1/bias' is \(32,\) in the checkpoint's base, \(16,\) in `params` \(2 more "
              r"differ\)"),
    ("dtype", r"check failed: dtypes: 'fc_0/bias' is float32 in the checkpoint's base, bfloat16 in `params` \(5 more"),
    ("missing", r"check failed: paths: 'head/bias' is in the checkpoint's base but not in `params`\)"),
    ("extra", r"check failed: paths: 'head/scale' is in `params` but not in the checkpoint's base\)"),
    ("contents", r"check failed: contents: 'fc_1/kernel' holds other values than the base the adapter was saved with"),
])
def test_mismatching_base_names_the_check_and_the_leaf(tmp_path, change, match):
  case, base, cfg, params = _setup("mlp")
  save_adapter(tmp_path / "ckpt", params, cfg, base_checksums=True)
  other = {k: dict(v) for k, v in base.items()}
  if change == "shape":
    other = zoo.MLP(features=(32, 16, 8)).init(jax.random.key(0), case.inputs)["params"]
  elif change == "dtype":
    other = jax.tree.map(lambda x: x.astype(jnp.bfloat16), base)
  elif change == "missing":
    del other["head"]["bias"]
  elif change == "extra":
    other["head"]["scale"] = jnp.ones(8)
  else:
    other["fc_1"]["kernel"] = other["fc_1"]["kernel"].at[3, 1].add(1e-3)
  with pytest.raises(ValueError, match=match):
    load_adapter(tmp_path / "ckpt", other)


def test_base_contents_are_checked_only_when_saved_with_checksums(tmp_path):
  _, base, cfg, params = _setup("mlp")
  other = {**base, "fc_0": {**base["fc_0"], "kernel": base["fc_0"]["kernel"] + 1.0}}  # same paths, shapes, dtypes
  save_adapter(tmp_path / "plain", params, cfg)
  loaded, _ = load_adapter(tmp_path / "plain", other)  # off by default: the fingerprint cannot tell
  assert loaded["fc_0"]["kernel"] is other["fc_0"]["kernel"]
  save_adapter(tmp_path / "hashed", params, cfg, base_checksums=True)
  meta = json.loads((tmp_path / "hashed" / "1" / "meta" / "metadata").read_text())
  assert meta["base_sha256"] == _integrity.digests(jlora.core.tree.flatten(jlora.split(params, cfg)[1]))
  _same_trees(load_adapter(tmp_path / "hashed", base)[0], params)
  with pytest.raises(ValueError, match=r"check failed: contents: 'fc_0/kernel'"):
    load_adapter(tmp_path / "hashed", other)
  # Trained leaves (here the biases) are not part of the contents check: the base's own bias differs from them.
  save_adapter(tmp_path / "bias", _numpy_params(1), NUMPY_CFG, base_checksums=True)
  _same_trees(jax.tree.map(np.asarray, load_adapter(tmp_path / "bias", _numpy_base())[0]), _numpy_params(1))
  with pytest.raises(TypeError, match="`base_checksums` must be True or False"):
    save_adapter(tmp_path / "x", params, cfg, base_checksums="yes")


def test_bad_paths_and_nothing_to_save(tmp_path):
  case, base, cfg, params = _setup("mlp")
  with pytest.raises(ValueError, match="no adapter checkpoint"):
    load_adapter(tmp_path / "nope", base)
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match=r"not a jlora adapter checkpoint \(no jlora_adapter\.json\)\. Write one"):
    load_adapter(tmp_path / "empty", base)
  with pytest.raises(ValueError, match="holds no trainable leaf"):
    save_adapter(tmp_path / "x", base, cfg)
  with pytest.raises(ValueError, match="has rank 4 but the config gives r=2"):
    save_adapter(tmp_path / "x", params, jlora.LoraConfig(r=2, target_modules=case.targets))
  with pytest.raises(TypeError, match=r"`config` must be a jlora\.LoraConfig"):
    save_adapter(tmp_path / "x", params, cfg.to_dict())
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
  assert loaded["fc_0"]["lora_a"].sharding.spec == PartitionSpec()
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
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import jlora
from jlora.formats.checkpoint import load_adapter, save_adapter
rng = np.random.default_rng(0)
up = {"kernel": rng.standard_normal((3, 16, 32), np.float32), "bias": np.zeros((3, 32), np.float32)}  # nn.scan: 3 layers
base = {"layers": {"up": up}, "head": {"kernel": rng.standard_normal((16, 8), np.float32)}}
adapters = {"lora_a": rng.standard_normal((3, 16, 4), np.float32), "lora_b": rng.standard_normal((3, 4, 32), np.float32)}
params = {"layers": {"up": {**up, **adapters}}, "head": base["head"]}
save_adapter(sys.argv[1], params, jlora.LoraConfig(r=4, target_modules=["up"]))
mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
def place(path, x):
  if path[-1].key == "kernel" and x.ndim == 3:  # stacked (L, in, out): shard in on data, out on model
    return jax.device_put(x, NamedSharding(mesh, P(None, "data", "model")))
  return jax.device_put(x, NamedSharding(mesh, P()))
sharded = jax.tree_util.tree_map_with_path(place, base)
loaded, _ = load_adapter(sys.argv[1], sharded)
got = loaded["layers"]["up"]
assert got["lora_a"].sharding.spec == P(None, "data"), got["lora_a"].sharding
assert got["lora_b"].sharding.spec == P(None, None, "model"), got["lora_b"].sharding
assert len(got["lora_b"].addressable_shards) == 4 and got["lora_b"].addressable_shards[0].data.shape == (3, 4, 16)
for name in adapters:
  np.testing.assert_array_equal(got[name], adapters[name])
assert got["kernel"] is sharded["layers"]["up"]["kernel"]
odd = {"layers": {"up": {"lora_b": NamedSharding(mesh, P("data"))}}}  # 3 layers do not split over 2 devices
try:
  load_adapter(sys.argv[1], sharded, shardings=odd)
  raise SystemExit("an indivisible sharding was accepted")
except ValueError as e:
  assert "`shardings`: the sharding for 'layers/up/lora_b' does not fit its shape (3, 4, 32)" in str(e), e
print("OK")
"""


def test_restore_into_shards_on_four_devices(tmp_path):
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  out = subprocess.run([sys.executable, "-c", textwrap.dedent(_SHARDED), str(tmp_path / "ckpt")], env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


# ------------------------------------------------------------- only what jlora wrote (issue 22)
def _loads_as(path, version):
  loaded, _ = load_adapter(path, _numpy_base())
  _same_trees(jax.tree.map(np.asarray, loaded), _numpy_params(version))


@pytest.mark.parametrize("name", ["42", "0", "1000", "007", "run_3"])
def test_a_numbered_folder_of_the_user_is_refused_never_deleted(tmp_path, name):
  """Orbax takes `42/` for a version and would delete it; jlora refuses the save, names it, and reads around it."""
  target = tmp_path / "ckpt"
  save_adapter(target, _numpy_params(1), NUMPY_CFG)
  (target / name).mkdir()
  (target / name / "mine.txt").write_text("keep me")
  with pytest.raises(ValueError, match=rf"the jlora adapter checkpoint .*ckpt' holds entries jlora did not write: "
                                       rf"'{name}' \(named by a number: orbax would take it for a version of the "
                                       rf"checkpoint and delete it at the next save\).*move them out of"):
    save_adapter(target, _numpy_params(2), NUMPY_CFG)
  assert (target / name / "mine.txt").read_text() == "keep me"
  _loads_as(target, 1)  # the newest version jlora wrote, not the user's folder (`1000` sorts after it)
  os.rename(target / name, tmp_path / name)  # moved out, as the message says: the next save goes through
  save_adapter(target, _numpy_params(2), NUMPY_CFG)
  _loads_as(target, 2)
  assert sorted(os.listdir(target)) == ["2", "jlora_adapter.json"]
  assert (tmp_path / name / "mine.txt").read_text() == "keep me"


def test_a_file_of_the_user_or_a_marker_jlora_did_not_write_is_refused(tmp_path):
  target = tmp_path / "ckpt"
  save_adapter(target, _numpy_params(1), NUMPY_CFG)
  (target / "notes.txt").write_text("mine")
  with pytest.raises(ValueError, match=r"holds entries jlora did not write: 'notes.txt'\. jlora saves nothing"):
    save_adapter(target, _numpy_params(2), NUMPY_CFG)
  assert (target / "notes.txt").read_text() == "mine"
  _loads_as(target, 1)
  fake = tmp_path / "fake"  # a marker written by hand beside the user's files does not make them jlora's
  fake.mkdir()
  (fake / "data.csv").write_text("1,2")
  for text in ("{}", "not json", json.dumps({"format": "jlora.quantized"})):
    (fake / "jlora_adapter.json").write_text(text)
    with pytest.raises(ValueError, match=r"holds a jlora_adapter.json that jlora did not write .*nothing of yours is "
                                         r"overwritten or deleted"):
      save_adapter(fake, _numpy_params(1), NUMPY_CFG)
  (fake / "jlora_adapter.json").write_text(json.dumps({"format": "jlora.adapter", "version": 2}))
  with pytest.raises(ValueError, match=r"holds entries jlora did not write: 'data.csv'"):
    save_adapter(fake, _numpy_params(1), NUMPY_CFG)
  assert sorted(os.listdir(fake)) == ["data.csv", "jlora_adapter.json"] and (fake / "data.csv").read_text() == "1,2"


def test_the_marker_lists_the_versions_and_a_marker_without_the_list_still_saves(tmp_path):
  target = tmp_path / "ckpt"
  save_adapter(target, _numpy_params(1), NUMPY_CFG)
  save_adapter(target, _numpy_params(2), NUMPY_CFG)
  marker = json.loads((target / "jlora_adapter.json").read_text())
  assert marker["format"] == "jlora.adapter" and marker["steps"] == [1, 2]  # written before orbax began version 2
  del marker["steps"]  # as the jlora before issue 22 wrote it: its versions are recognised by their contents
  (target / "jlora_adapter.json").write_text(json.dumps(marker))
  _loads_as(target, 2)
  (target / "5").mkdir()  # but not a folder of the user's
  with pytest.raises(ValueError, match=r"'5' \(named by a number"):
    save_adapter(target, _numpy_params(3), NUMPY_CFG)
  os.rmdir(target / "5")
  save_adapter(target, _numpy_params(3), NUMPY_CFG)
  _loads_as(target, 3)
  assert json.loads((target / "jlora_adapter.json").read_text())["steps"] == [2, 3]


def _dead_pid():
  proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
  return int(proc.stdout)


@pytest.mark.parametrize("existing", [False, True])
def test_the_temporary_marker_of_a_killed_save_is_cleaned_up(tmp_path, existing):
  """A save killed while committing its marker leaves `.jlora_adapter.json.jlora-tmp-PID-…`: the next save goes on."""
  target = tmp_path / "ckpt"
  if existing:
    save_adapter(target, _numpy_params(1), NUMPY_CFG)
  target.mkdir(exist_ok=True)
  dead = target / f".jlora_adapter.json.jlora-tmp-{_dead_pid()}-0123abcd"
  dead.write_text('{"format": "jlora.adapter"')  # half written
  alive = target / ".jlora_adapter.json.jlora-tmp-1-89abcdef"  # a writer that still runs (PID 1): left alone
  alive.write_text("{")
  save_adapter(target, _numpy_params(2), NUMPY_CFG)
  _loads_as(target, 2)
  assert not dead.exists() and alive.exists()
  assert sorted(os.listdir(target)) == [alive.name, str(2 if existing else 1), "jlora_adapter.json"]


def test_save_adapter_of_float64_numpy_leaves_loads(tmp_path):
  """Without x64 a float64 leaf is stored as float32: its checksum is of what is stored, so it loads."""
  params = jax.tree.map(lambda x: x.astype(np.float64), _numpy_params(1))
  save_adapter(tmp_path / "ckpt", params, NUMPY_CFG)
  loaded, _ = load_adapter(tmp_path / "ckpt", jax.tree.map(lambda x: x.astype(np.float64), _numpy_base()))
  for m in ("lora_a", "lora_b", "bias"):
    assert loaded["fc"][m].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(loaded["fc"][m]), params["fc"][m].astype(np.float32))


_DAMAGED = """
import gc, os, sys
import numpy as np
import jlora
rng = np.random.default_rng(0)
params = {f"fc{i}": {"kernel": rng.standard_normal((512, 512), np.float32),
                     "lora_a": rng.standard_normal((512, 8), np.float32),
                     "lora_b": rng.standard_normal((8, 512), np.float32)} for i in range(6)}
base = {m: {"kernel": p["kernel"]} for m, p in params.items()}
root, kind = sys.argv[1:]
if kind == "adapter":
  jlora.save_adapter(root, params, jlora.LoraConfig(r=8, target_modules=list(params)))
  load = lambda: jlora.load_adapter(root, base)
else:  # a training checkpoint of `jlora train`
  from jlora.train import _state
  state = _state.State(params, {"mu": params}, 1, np.zeros(2, np.uint32))
  with _state.Checkpoints(root) as checkpoints:
    checkpoints.save(state, data_position=(0, 0), fingerprint={})
  def load():
    with _state.Checkpoints(root, read_only=True) as checkpoints:
      checkpoints.restore(state, 1)
data = os.path.join(root, "1", "state", "ocdbt.process_0", "d")
for name in os.listdir(data):
  with open(os.path.join(data, name), "wb") as f:
    f.write(b"damaged " * 8)
for _ in range(3):
  try:
    load()
  except ValueError as e:
    print("jlora:", e, flush=True)

class Yours:
  def __del__(self):
    raise RuntimeError("the user's own unraisable error")

Yours()  # reported as before: jlora drops orbax's reports only
gc.collect()
"""


@pytest.mark.parametrize("kind, error", [("adapter", "is damaged: its 'state' item could not be read"),
                                         ("train", "checkpoint step 1 cannot be restored")])
def test_a_damaged_checkpoint_prints_jloras_error_and_no_orbax_tracebacks(tmp_path, kind, error):
  """Orbax's abandoned reads used to print ~65 lines of "Exception ignored in: <coroutine …>" (or of "Task
  exception was never retrieved") per load beside jlora's error."""
  out = subprocess.run([sys.executable, "-c", _DAMAGED, str(tmp_path / "ckpt"), kind], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.count(error) == 3, out.stdout + out.stderr[-3000:]
  assert "Exception ignored" not in out.stderr.replace("Exception ignored in: <function Yours.__del__", ""), \
      out.stderr[-3000:]
  assert "never retrieved" not in out.stderr, out.stderr[-3000:]
  assert "the user's own unraisable error" in out.stderr and "Yours.__del__" in out.stderr
  assert len(out.stderr.splitlines()) < 12, out.stderr[-3000:]
