"""`jlora.save_quantized` / `jlora.load_quantized`: exact round trips, packed size, refusals, damage, bad paths."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.formats import quantized as _quant_io
from jlora.quant.array import QuantizedArray
from tests.models.helpers import CONFIGS, random_model, tokens

_IS_Q = lambda x: isinstance(x, QuantizedArray)  # noqa: E731


@pytest.fixture(scope="module")
def llama():
  model, base = random_model(CONFIGS["llama"], scan_layers=True)
  return model, base, jnp.asarray(tokens((2, 6)))


def _quantized(base, method):
  if method == "nf4":  # a bfloat16 base: plain leaves and the kernels' original dtype stay bfloat16
    return jlora.quantize(jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16), base), "nf4", block_size=16)
  if method == "int4":  # float32, single-level scales
    return jlora.quantize(base, "int4", block_size=16, double_quant=False)
  return jlora.quantize(base, "int8", stack=lambda path, leaf: int("layers" in path))


def _same_bits(a, b):
  """Same tree (QuantizedArray metadata included: it is the treedef's aux data) and bitwise equal leaves."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))


def _files(path):
  return {os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs}


def _size(path):
  return sum(os.path.getsize(os.path.join(path, f)) for f in _files(path))


@pytest.mark.parametrize("method", ["nf4", "int4", "int8"])
def test_round_trip_is_exact_and_the_model_computes_the_same(tmp_path, llama, method):
  model, base, x = llama
  q = _quantized(base, method)
  jlora.save_quantized(tmp_path / "q", q)
  loaded = jlora.load_quantized(tmp_path / "q")
  _same_bits(loaded, q)
  kernel = loaded["model"]["layers"]["mlp"]["down_proj"]["kernel"]
  assert isinstance(kernel, QuantizedArray) and kernel.meta == q["model"]["layers"]["mlp"]["down_proj"]["kernel"].meta
  assert kernel.method == method and kernel.shape == (2, 48, 32)
  norm = loaded["model"]["norm"]["scale"]
  assert not _IS_Q(norm) and norm.dtype == (jnp.bfloat16 if method == "nf4" else jnp.float32)
  assert all(leaf.sharding == jax.sharding.SingleDeviceSharding(jax.devices()[0]) for leaf in jax.tree.leaves(loaded))
  _same_bits(jlora.dequantize(loaded), jlora.dequantize(q))
  run = jax.jit(lambda p: model.apply({"params": p}, x))  # one compile for both trees: the same treedef and dtypes
  np.testing.assert_array_equal(run(loaded), run(q))
  meta = json.loads((tmp_path / "q" / "1" / "meta" / "metadata").read_text())
  entry = next(e for e in meta["leaves"] if e["name"] == "model/layers/mlp/down_proj/kernel")
  want = {"method": method, "last_dim": 32, "dtype": "bfloat16" if method == "nf4" else "float32",
          "block_size": None if method == "int8" else 16, "double_quant": method == "nf4"}
  assert entry["quantized"] == want and meta["format"] == "jlora.quantized" and meta["version"] == 1
  jlora.save_quantized(tmp_path / "q", q)  # a second save commits version 2 and removes version 1
  assert sorted(os.listdir(tmp_path / "q")) == ["2", "jlora_quantized.json"]


def test_nf4_checkpoint_is_packed_on_disk(tmp_path):
  base = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (512, 1024), jnp.bfloat16),
                    "bias": jnp.zeros((1024,), jnp.bfloat16)}}
  bf16_bytes = sum(x.nbytes for x in jax.tree.leaves(base))
  q = jlora.quantize(base, "nf4")
  jlora.save_quantized(tmp_path / "q", q)
  on_disk = _size(tmp_path / "q")
  # 4.13 bits per parameter against 16, plus a few kB of metadata: about 0.27 of the bfloat16 bytes.
  assert on_disk < 0.3 * bf16_bytes, (on_disk, bf16_bytes)
  _same_bits(jlora.load_quantized(tmp_path / "q"), q)


def test_integer_keys_keys_with_slashes_and_a_sharding(tmp_path):
  kernel = jax.random.normal(jax.random.key(1), (8, 64))
  layers = {i: {"kernel": kernel + i} for i in range(2)}  # NNX-style integer keys; Haiku-style "/" in keys
  params = {"layers": jlora.quantize(layers, "nf4", block_size=32, double_quant=False),
            "mlp/~/linear": {"w": kernel, "b%": jnp.arange(3, dtype=jnp.int32)}}
  assert _IS_Q(params["layers"][1]["kernel"])
  jlora.save_quantized(tmp_path / "q", params)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[-1])
  loaded = jlora.load_quantized(tmp_path / "q", shardings=sharding)
  assert list(loaded) == ["layers", "mlp/~/linear"] and list(loaded["layers"]) == [0, 1]
  _same_bits(loaded, params)
  assert all(leaf.sharding == sharding for leaf in jax.tree.leaves(loaded))
  meta = json.loads((tmp_path / "q" / "1" / "meta" / "metadata").read_text())
  assert [e["name"] for e in meta["leaves"]] == ["layers/0/kernel", "layers/1/kernel", "mlp%2F~%2Flinear/w",
                                                 "mlp%2F~%2Flinear/b%25"]
  assert meta["leaves"][1]["keys"] == ["layers", 1, "kernel"]
  with pytest.raises(TypeError, match=r"`shardings` must be a jax\.sharding\.Sharding"):
    jlora.load_quantized(tmp_path / "q", shardings={"0": sharding})


def test_refuses_to_write_into_a_directory_it_did_not_write(tmp_path):
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "notes.txt").write_text("keep me")
  q = jlora.quantize({"dense": {"kernel": jnp.ones((4, 8))}}, "int8")
  with pytest.raises(ValueError, match=r"`path`: .*holds files that are not a jlora quantized checkpoint \(notes\.txt; "
                                       r"no jlora_quantized\.json\).*nothing of yours is overwritten"):
    jlora.save_quantized(mine, q)
  assert sorted(os.listdir(mine)) == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"
  adapter = tmp_path / "adapter"  # jlora's own, but another kind of checkpoint
  jlora.save_adapter(adapter, {"fc": {"kernel": np.ones((4, 4), np.float32), "lora_a": np.ones((4, 2), np.float32),
                                      "lora_b": np.zeros((2, 4), np.float32)}}, jlora.LoraConfig(r=2, target_modules=["fc"]))
  before = {f: (adapter / f).read_bytes() for f in _files(adapter)}
  with pytest.raises(ValueError, match=r"no jlora_quantized\.json"):
    jlora.save_quantized(adapter, q)
  assert {f: (adapter / f).read_bytes() for f in _files(adapter)} == before
  with pytest.raises(ValueError, match=r"is not a jlora quantized checkpoint \(no jlora_quantized\.json\)"):
    jlora.load_quantized(adapter)


def test_damaged_array_file_is_a_clear_error(tmp_path):
  target = tmp_path / "q"
  q = jlora.quantize({"dense": {"kernel": jax.random.normal(jax.random.key(2), (256, 256))}}, "nf4")
  jlora.save_quantized(target, q)
  data = max((target / "1" / f for f in _files(target / "1")), key=os.path.getsize)
  assert data.parent.name == "d" and os.path.getsize(data) > 4096  # tensorstore's data file: the codes
  original = data.read_bytes()
  damaged = bytearray(original)
  for i in range(len(damaged) // 2, len(damaged) // 2 + 64):
    damaged[i] ^= 0xFF
  data.write_bytes(bytes(damaged))
  with pytest.raises(ValueError, match=r"version 1 of the quantized checkpoint '.*q' is damaged: leaf 'dense/kernel' \(its '(codes|scale|scale2|offset)'\)"):
    jlora.load_quantized(target)
  data.write_bytes(original)
  _same_bits(jlora.load_quantized(target), q)


def test_checksum_mismatch_names_the_leaf_and_edited_metadata_is_refused(tmp_path, monkeypatch):
  target = tmp_path / "q"
  q = jlora.quantize({"dense": {"kernel": jnp.arange(32.0).reshape(4, 8)}}, "int8")
  jlora.save_quantized(target, q)
  real = _quant_io.restore_item

  def tampered(root, version, item, args):  # what a flip inside the bytes of one array (not its framing) reads as
    out = real(root, version, item, args)
    if item == "arrays":
      out["a0"] = out["a0"].at[0, 0].add(1)
    return out

  monkeypatch.setattr(_quant_io, "restore_item", tampered)
  with pytest.raises(ValueError, match=r"is damaged: leaf 'dense/kernel' \(its 'codes'\) does not match its checksum"):
    jlora.load_quantized(target)
  monkeypatch.undo()
  meta_file = target / "1" / "meta" / "metadata"
  meta = json.loads(meta_file.read_text())
  meta["leaves"][0]["quantized"]["last_dim"] = 7  # valid JSON, plausible metadata: only the seal notices
  meta_file.write_text(json.dumps(meta))
  with pytest.raises(ValueError, match="is damaged: its metadata does not match its SHA-256"):
    jlora.load_quantized(target)


def test_failed_save_keeps_the_previous_version(tmp_path, monkeypatch):
  from orbax.checkpoint._src.path import atomicity

  target = tmp_path / "q"
  first = {"w": jnp.arange(4.0)}
  jlora.save_quantized(target, first)

  async def fail(self):
    raise OSError("disk on fire")

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", fail)
  with pytest.raises(OSError, match="disk on fire"):
    jlora.save_quantized(target, {"w": jnp.zeros(4)})
  _same_bits(jlora.load_quantized(target), first)


def test_bad_paths_and_bad_params(tmp_path):
  q = {"w": jnp.ones(3)}
  with pytest.raises(ValueError, match=r"`path`: no quantized checkpoint at .*nope"):
    jlora.load_quantized(tmp_path / "nope")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match=r"`path`: .* is not a jlora quantized checkpoint \(no jlora_quantized\.json\)"):
    jlora.load_quantized(tmp_path / "empty")
  (tmp_path / "file").write_text("x")
  with pytest.raises(ValueError, match=r"`path`: .* exists and is not a directory"):
    jlora.save_quantized(tmp_path / "file", q)
  assert (tmp_path / "file").read_text() == "x"
  with pytest.raises(TypeError, match="`params` must be a nested dict"):
    jlora.save_quantized(tmp_path / "x", [jnp.ones(3)])
  with pytest.raises(TypeError, match=r"the leaf at 'a/b' is a str, not an array"):
    jlora.save_quantized(tmp_path / "x", {"a": {"b": "text"}})
  with pytest.raises(ValueError, match="holds no leaf"):
    jlora.save_quantized(tmp_path / "x", {})
  with pytest.raises(ValueError, match="collide"):
    jlora.save_quantized(tmp_path / "x", {0: jnp.ones(2), "0": jnp.ones(2)})
  assert sorted(os.listdir(tmp_path)) == ["empty", "file"]


@pytest.mark.parametrize("name", ["42", "0", "1000"])
def test_a_numbered_folder_of_the_user_is_refused_never_deleted(tmp_path, name):
  """Orbax takes `42/` for a version and would delete it at the next save: jlora refuses, and reads around it."""
  target = tmp_path / "q"
  v1 = jlora.quantize({"dense": {"kernel": jnp.ones((4, 8))}}, "int8")
  jlora.save_quantized(target, v1)
  (target / name).mkdir()
  (target / name / "mine.txt").write_text("keep me")
  (target / "notes.txt").write_text("mine too")
  with pytest.raises(ValueError, match=rf"the jlora quantized checkpoint .*/q' holds entries jlora did not write: "
                                       rf"'{name}' \(named by a number: orbax would take it for a version .*\), "
                                       r"'notes.txt'\. jlora saves nothing into it"):
    jlora.save_quantized(target, jlora.quantize({"dense": {"kernel": 2 * jnp.ones((4, 8))}}, "int8"))
  assert (target / name / "mine.txt").read_text() == "keep me" and (target / "notes.txt").read_text() == "mine too"
  _same_bits(jlora.load_quantized(target), v1)
  os.rename(target / name, tmp_path / name)
  os.rename(target / "notes.txt", tmp_path / "notes.txt")
  v2 = jlora.quantize({"dense": {"kernel": 2 * jnp.ones((4, 8))}}, "int8")
  jlora.save_quantized(target, v2)
  _same_bits(jlora.load_quantized(target), v2)
  assert sorted(os.listdir(target)) == ["2", "jlora_quantized.json"]
