"""Reading the collectives of a compiled XLA program: `jlora.parallel.hlo` (one reader for the benchmarks,
the tests and `jlora plan`).

A collective's bytes are the bytes of its result per device (an all-reduce
returns what it reduces; a reduce-scatter its shard; an all-gather the gathered
array). Asynchronous pairs (`all-reduce-start` / `-done`) count once; loop bodies
count once per iteration.
"""

from jlora.parallel.hlo import OPS, collective_bytes, collectives

__all__ = ["OPS", "collective_bytes", "collectives"]
