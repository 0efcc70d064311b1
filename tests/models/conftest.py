"""Fixtures of the model tests."""

import jax
import pytest

from tests.models.helpers import CONFIGS, write_checkpoint


@pytest.fixture
def checkpoint(tmp_path):
  """``checkpoint(name) -> path`` of a tiny random checkpoint for ``CONFIGS[name]``."""

  def make(name, seed=0):
    path = tmp_path / name
    write_checkpoint(path, CONFIGS[name], seed=seed)
    return path

  return make


@pytest.fixture(autouse=True)
def _float32_matmuls():
  with jax.default_matmul_precision("float32"):
    yield
