"""save_pretrained writes one unit: interrupted writes keep the old directory, foreign files are never replaced."""

import json
import os

import jax
import numpy as np
import pytest

import jlora.models._save as save_module
from jlora import models
from tests.models.helpers import CONFIGS, zero_model


def _snapshot(path):
  """{relative path: bytes} of every file below `path`."""
  out = {}
  for root, _, files in os.walk(path):
    for name in files:
      full = os.path.join(root, name)
      with open(full, "rb") as f:
        out[os.path.relpath(full, path)] = f.read()
  return out


def _shifted(params):
  return jax.tree.map(lambda x: x + 1.0, params)


def _base_checkpoint(path):
  """A base checkpoint as the Hub has them: weights, config, model card, tokenizer, sentence-transformers files."""
  model, params = zero_model(CONFIGS["bert"])
  models.save_pretrained(path, model, params)
  os.remove(path / ".jlora-manifest.json")  # as if downloaded: jlora did not write it
  files = {
    "tokenizer.json": "{}", "vocab.txt": "[PAD]\n", "modules.json": "[]", "README.md": "# base",
    "pytorch_model.bin": "weights", "model.safetensors.index.json": "{}", ".gitattributes": "*.bin lfs",
    "1_Pooling/config.json": '{"pooling_mode_mean_tokens": true}', "onnx/model.onnx": "weights",
  }
  for name, text in files.items():
    (path / name).parent.mkdir(exist_ok=True)
    (path / name).write_text(text)
  return model, params


def test_copy_from_brings_the_base_files_but_not_its_weights(tmp_path):
  model, params = _base_checkpoint(tmp_path / "base")
  merged = _shifted(params)
  models.save_pretrained(tmp_path / "merged", model, merged, copy_from=tmp_path / "base")
  entries = sorted(os.listdir(tmp_path / "merged"))
  assert entries == [".jlora-manifest.json", "1_Pooling", "config.json", "model.safetensors", "modules.json",
                     "tokenizer.json", "vocab.txt"]
  assert (tmp_path / "merged" / "1_Pooling" / "config.json").read_text() == '{"pooling_mode_mean_tokens": true}'
  manifest = json.loads((tmp_path / "merged" / ".jlora-manifest.json").read_text())
  assert manifest["entries"] == entries[1:]
  _, loaded = models.from_pretrained(tmp_path / "merged")
  np.testing.assert_array_equal(loaded["encoder"]["layer_0"]["output"]["dense"]["kernel"],
                                merged["encoder"]["layer_0"]["output"]["dense"]["kernel"])
  models.save_pretrained(tmp_path / "merged", model, params, copy_from=tmp_path / "base")  # jlora's own: replaced
  _, again = models.from_pretrained(tmp_path / "merged")
  np.testing.assert_array_equal(again["embeddings"]["LayerNorm"]["scale"], params["embeddings"]["LayerNorm"]["scale"])
  with pytest.raises(ValueError, match=r"`copy_from`: .*nowhere' is not a directory"):
    models.save_pretrained(tmp_path / "other", model, params, copy_from=tmp_path / "nowhere")
  assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("fail_in", ["save_file", "copy2"])
def test_interrupted_write_leaves_the_old_directory(tmp_path, monkeypatch, fail_in):
  model, params = _base_checkpoint(tmp_path / "base")
  target = tmp_path / "out"
  models.save_pretrained(target, model, params, copy_from=tmp_path / "base")
  before = _snapshot(target)
  real = {"save_file": save_module.safetensors.numpy.save_file, "copy2": save_module.shutil.copy2}[fail_in]

  def crash(*args, **kwargs):
    real(*args, **kwargs)  # half the work is on disk
    raise KeyboardInterrupt("killed mid-write")

  target_module = save_module.safetensors.numpy if fail_in == "save_file" else save_module.shutil
  monkeypatch.setattr(target_module, fail_in, crash)
  with pytest.raises(KeyboardInterrupt):
    models.save_pretrained(target, model, _shifted(params), copy_from=tmp_path / "base")
  monkeypatch.undo()
  assert _snapshot(target) == before
  assert sorted(os.listdir(tmp_path)) == ["base", "out"]  # no temporary directory left beside it


def test_foreign_files_are_refused_and_untouched(tmp_path):
  model, params = zero_model(CONFIGS["gpt2"])
  target = tmp_path / "mine"
  target.mkdir()
  (target / "notes.txt").write_text("my notes")
  (target / "config.json").write_text("{}")
  with pytest.raises(ValueError, match=r"`path`: .*mine' holds files jlora did not write \(config\.json, notes\.txt\)"
                     r".*Choose a new or empty directory"):
    models.save_pretrained(target, model, params)
  assert _snapshot(target) == {"notes.txt": b"my notes", "config.json": b"{}"}
