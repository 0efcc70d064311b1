"""The package's shape: imports flow one way, the core never looks the models up, modules stay small."""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "jlora"
# Layers, lowest first: a module may import only from its own layer or the ones before it.
LAYERS = {"core": 0, "models": 1, "train": 2}


def _layer(path: pathlib.Path) -> str:
  rel = path.relative_to(PACKAGE).parts
  if rel[0] == "models":
    return "models"
  if rel[0] in ("train", "cli.py", "__main__.py"):
    return "train"
  return "core"


def _imported(tree: ast.AST) -> list[str]:
  names = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names += [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
  return names


def test_imports_flow_one_way_and_the_core_does_not_look_up_models():
  for path in sorted(PACKAGE.rglob("*.py")):
    source = path.read_text()
    here = LAYERS[_layer(path)]
    for name in _imported(ast.parse(source)):
      parts = name.split(".")
      if parts[0] != "jlora" or len(parts) < 2:
        continue
      target = "models" if parts[1] == "models" else "train" if parts[1] in ("train", "cli") else "core"
      assert LAYERS[target] <= here, f"{path.relative_to(ROOT)} imports {name} ({target} is above {_layer(path)})"
    if _layer(path) == "core":
      assert "sys.modules" not in source, f"{path.relative_to(ROOT)} looks modules up at run time"


def test_import_jlora_is_light():
  """`import jlora` loads neither orbax (lazy), nor the models, the CLI, nor the `train` extra's packages."""
  code = "import sys, jlora; print(' '.join(sorted(m for m in sys.modules)))"
  loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              cwd=ROOT).stdout.split())
  heavy = {"orbax", "orbax.checkpoint", "matplotlib", "tqdm", "tokenizers", "torch", "jlora.models", "jlora.train",
           "jlora.cli", "equinox", "haiku", "jlora.equinox", "jlora.haiku", "jlora.nnx"}
  assert "jlora" in loaded and not loaded & heavy, sorted(loaded & heavy)


def test_no_module_is_large():
  sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
  assert max(sizes.values()) <= 360, {p: n for p, n in sizes.items() if n > 360}
