"""Fixtures of the model tests."""

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
def _float32_matmuls(float32_matmuls):
  """Every reference-model test runs with float32 matmuls (tests/conftest.py)."""
