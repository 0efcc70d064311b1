"""Session-wide settings of the test suite.

The suite is compile-bound: many tests, and the subprocesses of the `jlora train`
and fault-injection tests, compile the same small programs again. XLA's persistent
compilation cache, in a directory made fresh for this session (and inherited by the
pytest-xdist workers and every subprocess through the environment), compiles each
program once (measured: the suite took 12.7 min on 2 cores without it, 7.5 with it).
It changes what is timed, never what is computed: a cached executable is the one the
compiler builds for the same program.
"""

import os
import shutil
import tempfile

import pytest

_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # the controller sets it; workers and subprocesses inherit it
  _OWN_CACHE = tempfile.mkdtemp(prefix="jlora-tests-xla-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


def pytest_unconfigure(config):
  if _OWN_CACHE is not None:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


# The fast subset, `pytest -m "not slow"` (docs/development.md): what it leaves out is listed here, in one place.
# Whole files that run subprocesses, several devices or processes, notebooks, benchmarks, the docs build, the
# training application end to end or the fault injection; plus single tests of that nature in other files.
SLOW_FILES = {
    "test_bench_adapters.py", "test_benchmarks.py", "test_notebook_adapters.py", "test_notebook_sharding.py",
    "test_train_mesh.py", "test_sharding_models.py", "test_models_sharding.py", "test_multihost.py",
    "test_trainloop.py", "test_train_rundir.py", "test_train_faults.py", "test_train_hostile.py", "test_cli.py",
    "test_cli_adapters.py", "test_faults.py", "test_docs.py", "test_hf_equivalence.py", "test_generate.py",
}
SLOW_TESTS = {
    "test_notebook_is_committed_executed_and_still_runs", "test_on_eight_devices",
    "test_docs_mesh_example_runs_on_eight_devices", "test_mixed_generation_equals_generation_per_adapter",
    "test_jlora_train_quantizes_the_base_and_exports_what_it_trained",
}


def pytest_collection_modifyitems(config, items):
  for item in items:
    if item.path.name in SLOW_FILES or getattr(item, "originalname", item.name) in SLOW_TESTS:
      item.add_marker(pytest.mark.slow)


@pytest.fixture
def restore_layer_registry():
  """Layer classes a test registers with `jlora.register_layer` are gone after it."""
  from jlora.frontends import layers

  saved = dict(layers._REGISTRY)
  yield
  layers._REGISTRY.clear()
  layers._REGISTRY.update(saved)
