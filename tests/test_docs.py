"""The README's Python snippets and the example run as written."""

import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_readme_python_blocks_run():
  """Every ```python block runs; the blocks of one `##` section share a scope, as a reader follows them."""
  text = (ROOT / "README.md").read_text()
  sections = re.split(r"\n## ", text)
  assert re.findall(r"```python\n(.*?)```", text, flags=re.S), "the README has a quickstart"
  for section in sections:
    scope = {"__name__": "readme"}
    for block in re.findall(r"```python\n(.*?)```", section, flags=re.S):
      exec(compile(block, "README.md", "exec"), scope)


def test_quickstart_example_learns_and_keeps_base():
  sys.path.insert(0, str(ROOT / "examples"))
  try:
    import quickstart
  finally:
    sys.path.pop(0)
  out = quickstart.main(steps=60)
  assert out["loss_after"] < 0.5 * out["loss_before"]
  assert out["acc_after"] > out["acc_before"] + 0.3
  assert out["base_identical"]
  assert out["merge_diff"] < 1e-4


@pytest.mark.parametrize("name", ["jlora.frontends.linen", "jlora.frontends.apply_fn", "jlora.adapters.adapter_set", "jlora.core.optim", "jlora.models", "jlora.train._schema"])
def test_docstring_examples_run(name):
  import doctest
  import importlib

  result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0


def test_readme_commands_are_the_ci_commands():
  readme = (ROOT / "README.md").read_text()
  ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
  assert f"```bash\n{ci}\n```" in readme


def _outputs(nb) -> str:
  """The text and image kinds of a notebook's outputs, joined."""
  parts = []
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      parts.append(out.get("text", "") + str(out.get("data", {}).get("text/plain", "")))
      parts += [f"<{kind}>" for kind in out.get("data", {}) if kind.startswith("image/")]
  return "\n".join(parts)


def test_notebook_is_committed_executed_and_still_runs():
  import nbclient
  import nbformat

  nb = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
  committed = _outputs(nb)
  # A reader of the committed notebook sees the summary table, the plots and the equivalence check.
  for text in ("trainable params:", "<image/png>", "max |merged - factored| =", "reloaded adapter gives identical"):
    assert text in committed, text
  nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
  fresh = _outputs(nb)
  (diff,) = re.findall(r"max \|merged - factored\| = (\S+)", fresh)
  assert float(diff) < 1e-4
  assert "reloaded adapter gives identical outputs: True" in fresh


def test_readme_checkpoint_block_runs(tmp_path, monkeypatch):
  """The README's reference-model block, on a tiny Llama checkpoint and tokenizer written here."""
  import json

  import tokenizers

  from tests.models.helpers import CONFIGS, write_checkpoint

  ckpt = tmp_path / "llama"
  write_checkpoint(ckpt, CONFIGS["llama"])
  vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "The", "capital", "of", "France", "is"])}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.save(str(ckpt / "tokenizer.json"))
  (ckpt / "tokenizer_config.json").write_text(json.dumps({"pad_token": "[PAD]"}))
  monkeypatch.chdir(tmp_path)
  blocks = re.findall(r"```python checkpoint\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
  assert len(blocks) == 3
  scope = {"__name__": "readme"}
  exec(compile("".join(blocks).replace("path/to/llama", str(ckpt)), "README.md", "exec"), scope)
  assert scope["out"].shape[-1] >= 20 and (tmp_path / "merged" / "model.safetensors").exists()
  assert (tmp_path / "peft_out" / "adapter_model.safetensors").exists()
  assert set(scope["params"]) == set(scope["base"])
