"""The documentation runs as written: the README's and every docs page's Python blocks, the site's strict build,
the docstring examples of public modules, the example script and the notebook.

A ```python block runs unless the line right above its fence marks it (an HTML comment, invisible on the page):
`<!-- test: skip -->` (needs a package or a checkpoint the suite does not have, or trains for minutes),
`<!-- test: checkpoint -->` (run by `test_checkpoint_blocks_run`, in nav order, on a tiny Llama checkpoint written
here), `<!-- test: mesh -->` (run on 8 virtual devices by `tests/test_sharding.py`).
"""

import pathlib
import re
import subprocess
import sys

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
MARKS = ("skip", "checkpoint", "mesh")
_BLOCK = re.compile(r"^(?:<!-- test: (?P<mark>[\w-]+) -->\n)?```python\n(?P<code>.*?)^```[ \t]*$", flags=re.M | re.S)


def _nav_pages(nav) -> list[str]:
  """The docs pages of mkdocs.yml's `nav`, in the order a reader meets them."""
  pages = []
  for entry in nav:
    for value in entry.values() if isinstance(entry, dict) else [entry]:
      pages += _nav_pages(value) if isinstance(value, list) else [value]
  return pages


NAV = _nav_pages(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"])
PAGES = ["README.md"] + [f"docs/{page}" for page in NAV]


def _blocks(page: str) -> list[tuple[str | None, str, int]]:
  """`(mark, code, line of the code's first line)` of each ```python block of a page."""
  text = (ROOT / page).read_text()
  return [(m["mark"], m["code"], text.count("\n", 0, m.start("code")) + 1) for m in _BLOCK.finditer(text)]


def _run(blocks, page: str, scope: dict) -> None:
  for _, code, line in blocks:
    exec(compile("\n" * (line - 1) + code, str(ROOT / page), "exec"), scope)  # tracebacks name the page's line


@pytest.mark.parametrize("page", [p for p in PAGES if any(mark is None for mark, _, _ in _blocks(p))])
def test_python_blocks_run(page):
  """The unmarked blocks of a page run in order in one scope, as a reader follows them."""
  _run([b for b in _blocks(page) if b[0] is None], page, {"__name__": "docs"})


def test_blocks_are_marked_with_known_marks_and_render():
  """A typo in a mark would silently stop a block from running; an info string after ```python (PEFT-style
  ```python notest) does not render as code in mkdocs."""
  assert any(mark is None for mark, _, _ in _blocks("README.md")), "the README has a quickstart"
  for page in PAGES:
    text = (ROOT / page).read_text()
    assert not re.findall(r"^```python\S*[ \t]+\S", text, flags=re.M), page
    marks = re.findall(r"^<!-- test: ([\w-]+) -->", text, flags=re.M)
    assert set(marks) <= set(MARKS), page
    assert len(marks) == sum(mark is not None for mark, _, _ in _blocks(page)), f"{page}: a mark not right above a fence"
  assert sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")) == sorted(NAV), "every page is in mkdocs.yml's nav"


def _public_names() -> dict[str, set[str]]:
  import importlib

  modules = ("jlora", "jlora.nnx", "jlora.equinox", "jlora.haiku", "jlora.models", "jlora.train")
  names = {m: set(importlib.import_module(m).__all__) for m in modules}
  names["jlora"] |= {"nnx", "equinox", "haiku", "models", "train", "__version__"}
  return names


def test_pages_name_only_public_api():
  """Every `jlora.X`, `jlora.nnx.X`, ... a page or the README mentions exists and is public (the code blocks also
  run, but prose and skipped blocks would drift silently): no page points users into a private module."""
  names = _public_names()
  for page in PAGES:
    text = (ROOT / page).read_text()
    for module, attr in re.findall(r"(?<![\w/.-])(jlora(?:\.(?:nnx|equinox|haiku|models|train))?)\.(\w+)", text):
      if module == "jlora" and attr in ("nnx", "equinox", "haiku", "models", "train"):
        continue
      assert attr in names[module], f"{page}: `{module}.{attr}` is not a public name of {module}"


def test_site_builds_strictly(tmp_path):
  """`mkdocs build --strict`, offline (nothing in mkdocs.yml is fetched), with the API reference generated from the
  docstrings; every public name has its entry."""
  site = tmp_path / "site"
  proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-f", str(ROOT / "mkdocs.yml"),
                         "-d", str(site)], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  for module, public in _public_names().items():
    page = (site / "api" / (module.split(".")[-1] if module != "jlora" else "jlora") / "index.html").read_text()
    missing = sorted(n for n in public if f'id="{module}.{n}"' not in page and n not in ("nnx", "equinox", "haiku",
                                                                                          "models", "train", "__version__"))
    assert not missing, f"no API reference entry for {module}: {missing}"
  assert (site / "getting-started" / "index.html").exists() and not (site / "_griffe").exists()


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


@pytest.mark.parametrize("module", ["jlora", "jlora.nnx", "jlora.equinox", "jlora.haiku", "jlora.models", "jlora.train"])
def test_api_reference_examples_run(module):
  """The examples the API reference shows (the docstrings of the public module and of each public name, with their
  methods) run as doctests, each in the globals of the module that defines it."""
  import doctest
  import importlib
  import inspect

  mod = importlib.import_module(module)
  tests = doctest.DocTestFinder(recurse=False).find(mod, module)
  for name in mod.__all__:
    obj = getattr(mod, name)
    if inspect.isclass(obj) or inspect.isfunction(obj):
      tests += doctest.DocTestFinder().find(obj, f"{module}.{name}", module=inspect.getmodule(obj))
  runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
  for test in tests:
    runner.run(test)
  result = runner.summarize(verbose=False)
  assert result.failed == 0 and result.attempted > 0


@pytest.mark.parametrize("name", ["jlora.train._schema"])
def test_docstring_examples_run(name):
  """Module docstrings the API reference does not show (the public names' examples run above)."""
  import doctest
  import importlib

  result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0


def test_readme_commands_are_the_ci_commands():
  readme = (ROOT / "README.md").read_text()
  ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
  assert f"```bash\n{ci}\n```" in readme
  assert f"```bash\n{ci}\n```" in (DOCS / "getting-started.md").read_text()


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


def test_checkpoint_blocks_run(tmp_path, monkeypatch):
  """The reference-model and saving pages' checkpoint blocks, in nav order and one scope, on a tiny Llama
  checkpoint and tokenizer written here."""
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
  blocks = [(page, b) for page in PAGES for b in _blocks(page) if b[0] == "checkpoint"]
  assert len(blocks) == 3
  scope = {"__name__": "docs"}
  for page, (mark, code, line) in blocks:
    _run([(mark, code.replace("path/to/llama", str(ckpt)), line)], page, scope)
  assert scope["out"].shape[-1] >= 20 and (tmp_path / "merged" / "model.safetensors").exists()
  assert (tmp_path / "peft_out" / "adapter_model.safetensors").exists()
  assert set(scope["params"]) == set(scope["base"])
