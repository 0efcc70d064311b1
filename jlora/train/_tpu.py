"""TPU slices without a TPU: the published figures of each chip generation, and a named slice's devices.

`devices("v5e:2x4")` gives the 8 devices of a v5e slice on any host where `libtpu` is
installed (`pip install "jlora[plan]"`), for `jax.jit(...).lower(...).compile()` to build
that slice's program (`jax.experimental.topologies`, as MaxText's `train_compile.py`).
Nothing reaches the network: before libtpu starts, `offline()` sets `TPU_SKIP_MDS_QUERY=1`
(no metadata-server query) and names one local worker (`TPU_WORKER_HOSTNAMES=localhost`,
`TPU_WORKER_ID=0`, `TPU_ACCELERATOR_TYPE`), which also keeps libtpu from warning that it
cannot find them, and lets several processes load libtpu at once (`ALLOW_MULTIPLE_LIBTPU_LOAD=1`:
its lock file guards TPU chips, and a plan holds none).

The chip figures (per chip, from Google Cloud's TPU pages, cited in `Chip.source`):

| generation | bf16 peak | HBM | HBM bandwidth | ICI bandwidth (bidirectional) |
|---|---|---|---|---|
| v4  | 275 TFLOP/s | 32 GiB | 1,200 GB/s | 537 GB/s (2 x the pod's 1.1 PB/s all-reduce / 4,096 chips) |
| v5e | 197 TFLOP/s | 16 GB  | 819 GB/s   | 400 GB/s |
| v5p | 459 TFLOP/s | 95 GiB | 2,765 GB/s | 1,200 GB/s |
| v6e | 918 TFLOP/s | 32 GB  | 1,638 GB/s | 800 GB/s |
"""

from __future__ import annotations

import os
import re
from typing import Any, NamedTuple

__all__ = ["CHIPS", "Chip", "devices", "offline", "parse"]


class Chip(NamedTuple):
  """Published per-chip figures of one TPU generation."""

  name: str  # the generation as in a topology name: v4, v5e, v5p, v6e
  peak_flops: float  # bf16 FLOP/s
  hbm_bytes: float
  hbm_bandwidth: float  # bytes/s
  ici_bandwidth: float  # bytes/s, bidirectional, per chip
  accelerator_type: str  # the prefix of its Cloud accelerator types (v5litepod-8)
  megacore: bool  # two TensorCores driven as one device
  source: str


_DOCS = "https://cloud.google.com/tpu/docs/"
CHIPS: dict[str, Chip] = {
  "v4": Chip("v4", 275e12, 32 * 2**30, 1200e9, 2 * 1.1e15 / 4096, "v4", True, _DOCS + "v4"),
  "v5e": Chip("v5e", 197e12, 16e9, 819e9, 400e9, "v5litepod", False, _DOCS + "v5e"),
  "v5p": Chip("v5p", 459e12, 95 * 2**30, 2765e9, 1200e9, "v5p", True, _DOCS + "v5p"),
  "v6e": Chip("v6e", 918e12, 32e9, 1638e9, 800e9, "v6e", False, _DOCS + "v6e"),
}
_NAME = re.compile(r"^(v[0-9][a-z]?):([0-9]+(?:x[0-9]+){1,2})$")


def parse(topology: str) -> tuple[Chip, tuple[int, ...]]:
  """`(chip, dims)` of a topology name such as `v5e:2x4` or `v5p:2x2x2`.

  Raises:
    ValueError: a name of another form or an unknown generation, naming what is known.
  """
  m = _NAME.match(topology.strip()) if isinstance(topology, str) else None
  example = "e.g. v5e:2x4 (8 chips), v5p:2x2x2, v6e:2x4, v4:2x2x1"
  if m is None:
    raise ValueError(f"`--topology` must be GENERATION:AxB[xC] ({example}), got {topology!r}.")
  if m.group(1) not in CHIPS:
    raise ValueError(f"`--topology` {topology!r}: unknown TPU generation {m.group(1)!r}; known: {list(CHIPS)} "
                     f"({example}).")
  dims = tuple(int(n) for n in m.group(2).split("x"))
  if min(dims) < 1:
    raise ValueError(f"`--topology` {topology!r}: every size must be at least 1 ({example}).")
  return CHIPS[m.group(1)], dims


def offline(chip: Chip, chips: int) -> None:
  """Sets the environment libtpu reads so that it starts offline (call before its first use in the process)."""
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{chip.accelerator_type}-{chips}")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_WORKER_ID", "0")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no TPU is held: plans may compile side by side


def devices(topology: str) -> tuple[Chip, list[Any]]:
  """The chip and the compile-only devices of a TPU slice (one per chip), on any host with libtpu.

  Raises:
    ValueError: a bad topology name, or one libtpu does not accept.
    ImportError: libtpu is not installed (the message gives the install command).
  """
  chip, dims = parse(topology)
  try:
    import libtpu  # noqa: F401  (only whether it is there)
  except ImportError:
    raise ImportError('`jlora plan` compiles for TPU with libtpu, which is not installed; run `pip install '
                      '"jlora[plan]"` (or `pip install "jax[tpu]==<your jax version>"`).') from None
  n = 1
  for d in dims:
    n *= d
  offline(chip, n)
  from jax.experimental import topologies

  full = dims + (1,) * (3 - len(dims))
  kwargs: dict[str, Any] = {"chips_per_host_bounds": tuple(min(2, d) for d in full[:2]) + (1,)}
  if chip.megacore:
    kwargs["chip_config_name"] = "megacore"
  try:
    found = topologies.get_topology_desc(platform="tpu", topology_name=topology.strip(), **kwargs).devices
  except Exception as e:  # libtpu's own errors (JaxRuntimeError) name what it expected
    raise ValueError(f"`--topology` {topology!r}: libtpu refused it ({' '.join(str(e).split())[:300]}).") from None
  return chip, list(found)
