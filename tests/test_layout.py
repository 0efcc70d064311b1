"""The package's shape: a subpackage per concern, imports flowing one way, `import jlora` light.

Ranks, lowest first: a module imports only from its own subpackage, from lower ranks, or from a *leaf* (a module
that imports nothing of jlora, e.g. the `QuantizedArray` box or the atomic file writer), which anyone may use.
Same-rank subpackages never import one another: the front-ends know no file format, the formats no front-end.
"""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "jlora"
RANKS = {"core": 0, "frontends": 1, "quant": 1, "formats": 1, "parallel": 1, "adapters": 2, "models": 3, "train": 4}
# The top level holds only public modules; every implementation module lives in a subpackage.
PUBLIC_TOP = {"__init__.py", "__main__.py", "cli.py", "nnx.py", "equinox.py", "haiku.py"}
# Where each public top-level module belongs (`jlora.haiku` also re-exports EVA's Haiku door, an adapters-rank
# function, as `jlora` itself re-exports every rank).
TOP = {"nnx": "frontends", "equinox": "frontends", "haiku": "adapters", "cli": "train", "__main__": "train"}


def _module(path: pathlib.Path) -> str:
  return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _package(module: str) -> str | None:
  parts = module.split(".")
  if len(parts) < 2:
    return None
  return TOP.get(parts[1], parts[1]) if parts[1] in TOP or parts[1] in RANKS else None


def _imported(tree: ast.AST) -> list[str]:
  names = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names += [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
  return [n for n in names if n.split(".")[0] == "jlora"]


def _graph() -> dict[str, list[str]]:
  return {_module(p): _imported(ast.parse(p.read_text())) for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str, modules: set[str]) -> str:
  """The module an imported dotted name lives in (`jlora.core.ops.fold` -> `jlora.core.ops`)."""
  while name not in modules and "." in name:
    name = name.rsplit(".", 1)[0]
  return name


def test_top_level_holds_only_public_modules():
  top = {p.name for p in PACKAGE.glob("*.py")}
  assert top == PUBLIC_TOP, f"implementation modules belong in a subpackage: {sorted(top - PUBLIC_TOP)}"
  for sub in PACKAGE.iterdir():
    if sub.is_dir() and sub.name != "__pycache__":
      assert sub.name in RANKS, f"jlora/{sub.name}/ has no rank in tests/test_layout.py"
      doc = ast.get_docstring(ast.parse((sub / "__init__.py").read_text()))
      assert doc, f"jlora/{sub.name}/__init__.py must say what the subpackage holds"


def test_the_core_does_not_look_modules_up():
  for path in sorted((PACKAGE / "core").rglob("*.py")):
    assert "sys.modules" not in path.read_text(), f"{path.relative_to(ROOT)} looks modules up at run time"


def test_imports_flow_one_way():
  graph = _graph()
  modules = set(graph)
  leaves = {m for m, names in graph.items() if not [n for n in names if _resolve(n, modules) != "jlora"]}
  for module, names in graph.items():
    here = _package(module)
    if here is None:
      continue
    for name in names:
      target = _resolve(name, modules)
      there = _package(target)
      if there is None or there == here or target in leaves:
        continue
      assert RANKS[there] < RANKS[here], (
          f"{module} imports {name}: {there} (rank {RANKS[there]}) is not below {here} (rank {RANKS[here]})")


def test_no_module_imports_itself_in_a_cycle():
  graph = _graph()
  modules = set(graph)
  edges = {m: {_resolve(n, modules) for n in names} - {m, "jlora"} for m, names in graph.items()}
  state: dict[str, int] = {}

  def visit(m: str, stack: list[str]) -> None:
    state[m] = 1
    for n in edges.get(m, ()):
      if n.startswith("jlora.") and n.count(".") and state.get(n) == 1 and not n.endswith("__init__"):
        if _package(n) != _package(m):
          raise AssertionError(f"import cycle across subpackages: {' -> '.join([*stack, m, n])}")
      elif state.get(n) is None and n in edges:
        visit(n, [*stack, m])
    state[m] = 2

  for m in sorted(edges):
    if m not in state:
      visit(m, [])


def test_import_jlora_is_light():
  """`import jlora` loads neither orbax (lazy), nor the models, the CLI, nor the `train` extra's packages."""
  code = "import sys, jlora; print(' '.join(sorted(m for m in sys.modules)))"
  loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              cwd=ROOT).stdout.split())
  heavy = {"orbax", "orbax.checkpoint", "matplotlib", "tqdm", "tokenizers", "torch", "jlora.models", "jlora.train",
           "jlora.cli", "equinox", "haiku", "jlora.equinox", "jlora.haiku", "jlora.nnx", "flax.nnx"}
  assert "jlora" in loaded and not loaded & heavy, sorted(loaded & heavy)


def test_modules_stay_readable():
  """A ceiling that flags a module holding more than one concept; not a target to cut concepts to."""
  sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
  assert max(sizes.values()) <= 600, {p: n for p, n in sizes.items() if n > 600}
