"""Reading a compiled XLA program's text: collectives, matmul FLOPs and argument bytes, loops counted in full.

`compiled.as_text()` of a jitted step is one HLO module per device: computations
(`ENTRY`, loop bodies, fusions) of instructions `%name = type op(operands), attrs`.
XLA's own `cost_analysis()` counts the body of a `while` loop (a scanned layer stack,
a collective matmul's windows) once; here each computation counts as often as it runs:
a loop body `trip count` times (read from its condition, `counter < constant`), fusions
and calls as often as their caller.

* A collective's bytes are the bytes of its result per device (an all-reduce returns
  what it reduces; a reduce-scatter its shard; an all-gather the gathered array);
  asynchronous pairs (`-start` / `-done`) count once, at `-done`.
* Matmul FLOPs are those of every `dot` and `convolution` (2 per multiply-add, only the
  positions a dilated or padded window really multiplies, as XLA's cost analysis counts).
* Argument bytes are those of the entry computation's parameters in the device's layout
  (tiles padded, e.g. TPU's `T(8,128)`): their sum is `memory_analysis().argument_size_in_bytes`.

The module is a leaf: it imports nothing of jlora.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

__all__ = ["OPS", "Costs", "Instruction", "Module", "argument_bytes", "collective_bytes", "collectives", "costs", "parse",
           "shape_bytes"]

OPS = ("all-reduce", "reduce-scatter", "all-gather", "all-to-all", "collective-permute")
_DTYPES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
           "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPES) + r")\[([0-9,]*)\](\{[^}]*\})?")
_HEADER = re.compile(r"^(ENTRY )?%(\S+) ")
_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\(.*?\)|\S+) ([a-z][a-z0-9-]*)\((.*)$")
_CALLS = re.compile(r"\b(calls|body|true_computation|false_computation|called_computations|branch_computations)="
                    r"(\{[^}]*\}|%[\w.-]+)")


class Instruction(NamedTuple):
  """One HLO instruction: name, result type text, opcode, the text inside its parentheses, and the rest."""

  name: str
  type: str
  op: str
  args: str
  attrs: str

  @property
  def operands(self) -> tuple[str, ...]:
    return tuple(re.findall(r"%([\w.-]+)", self.args))


class Module(NamedTuple):
  """A parsed HLO module: `{computation: [instructions]}`, the entry computation's name and each one's run count."""

  computations: dict[str, list[Instruction]]
  entry: str
  runs: dict[str, int]

  def instructions(self) -> Iterator[tuple[Instruction, int]]:
    """Every instruction with how often it runs per step (0 for computations never reached, e.g. reducers)."""
    for name, body in self.computations.items():
      for ins in body:
        yield ins, self.runs.get(name, 0)


def shape_bytes(type_text: str, *, padded: bool = False) -> int:
  """Bytes of the arrays in an HLO type (`bf16[8,128]{1,0:T(8,128)(2,1)}`, tuples summed); `padded`: with tiles."""
  return sum(_array_bytes(d, dims, layout if padded else None) for d, dims, layout in _ARRAY.findall(type_text))


def _dims(type_text: str) -> list[int]:
  m = _ARRAY.search(type_text)
  return [int(n) for n in m.group(2).split(",") if n] if m else []


def _array_bytes(dtype: str, dims_text: str, layout: str | None) -> int:
  dims = [int(n) for n in dims_text.split(",") if n]
  if not layout or ":" not in layout:
    return _DTYPES[dtype] * int(np.prod(dims or [1]))
  minor_to_major, rest = layout[1:-1].split(":", 1)
  order = [int(n) for n in minor_to_major.split(",") if n]
  physical = [dims[a] for a in reversed(order)]  # major to minor
  tile = re.search(r"T\(([0-9,]+)\)", rest)
  if tile:
    t = [int(n) for n in tile.group(1).split(",")]
    physical = [1] * max(0, len(t) - len(physical)) + physical
    for i in range(1, len(t) + 1):
      physical[-i] = -(-physical[-i] // t[-i]) * t[-i]
  return _DTYPES[dtype] * int(np.prod(physical or [1]))


def _split_call(text: str) -> tuple[str, str]:
  """`(inside, rest)` of `inside), rest` (the text after an opcode's opening parenthesis)."""
  depth = 1
  for i, c in enumerate(text):
    depth += c == "("
    depth -= c == ")"
    if depth == 0:
      return text[:i], text[i + 1:]
  return text, ""


def parse(text: str) -> Module:
  """Parses the text of one HLO module (`compiled.as_text()`) and counts how often each computation runs."""
  computations: dict[str, list[Instruction]] = {}
  entry, current = "", None
  for line in text.splitlines():
    header = _HEADER.match(line)
    if header and line.rstrip().endswith("{"):
      current = header.group(2)
      computations[current] = []
      entry = current if header.group(1) else entry
      continue
    m = _INSTR.match(line) if current is not None else None
    if m:
      computations[current].append(Instruction(m.group(1), m.group(2), m.group(3), *_split_call(m.group(4))))
  runs: Counter = Counter()
  _count(computations, entry, 1, runs)
  return Module(computations, entry, dict(runs))


def _trip_count(computations: dict[str, list[Instruction]], condition: str) -> int:
  """The trip count of a `while` whose condition is `counter < constant` (counter from 0); 1 where not."""
  body = {i.name: i for i in computations.get(condition, [])}
  for ins in body.values():
    if ins.op == "compare" and "direction=LT" in ins.attrs and len(ins.operands) == 2:
      bound = body.get(ins.operands[1])
      if bound is not None and bound.op == "constant" and re.fullmatch(r"-?\d+", bound.args.strip()):
        return max(1, int(bound.args))
  return 1


def _count(computations: dict[str, list[Instruction]], name: str, times: int, runs: Counter) -> None:
  runs[name] += times
  for ins in computations.get(name, []):
    if ins.op == "while":
      body = re.search(r"body=%([\w.-]+)", ins.attrs)
      cond = re.search(r"condition=%([\w.-]+)", ins.attrs)
      if body:
        n = _trip_count(computations, cond.group(1)) if cond else 1
        _count(computations, body.group(1), times * n, runs)
      continue
    for _, target in _CALLS.findall(ins.attrs):
      for callee in re.findall(r"%([\w.-]+)", target):
        _count(computations, callee, times, runs)


def collectives(hlo_text: str | Module) -> list[tuple[str, int, str]]:
  """`(op, bytes per device, result type)` of every collective run in a step, once per run (loops in full).

  TPU programs split one asynchronous collective into several fusions (start, continuations,
  done) that each hold a copy of it with the same `channel_id`: such copies count once, as often
  as the least-run of them runs. A copy overlapped into a loop body (e.g. the next weights'
  all-gather spread over a layer loop's iterations) is counted once per iteration: an upper bound.
  """
  module = hlo_text if isinstance(hlo_text, Module) else parse(hlo_text)
  out, channels = [], {}
  for ins, n in module.instructions():
    op = ins.op.removesuffix("-done")
    if op not in OPS or ins.op.endswith("-start") or not n:
      continue
    channel = re.search(r"channel_id=(\d+)", ins.attrs)
    if channel is None:
      out += [(op, shape_bytes(ins.type), ins.type)] * n
      continue
    key = (op, channel.group(1), ins.type.split("{")[0])
    channels[key] = min(n, channels.get(key, n))
  for (op, _, type_text), n in channels.items():
    out += [(op, shape_bytes(type_text), type_text)] * n
  return out


def collective_bytes(hlo_text: str | Module) -> Counter:
  """Total bytes per device moved by each kind of collective in a step (`Counter({'all-reduce': n, ...})`)."""
  total: Counter = Counter()
  for op, n, _ in collectives(hlo_text):
    total[op] += n
  return total


def argument_bytes(hlo_text: str) -> list[int]:
  """Bytes of each parameter of the entry computation in the device's layout (tiles padded), in order."""
  start = hlo_text.index("entry_computation_layout={(") + len("entry_computation_layout={(")
  depth, end = 1, start
  while depth:
    depth += hlo_text[end] in "({["
    depth -= hlo_text[end] in ")}]"
    end += 1
  params = hlo_text[start:end - 1].split(")->")[0]
  return [_array_bytes(d, dims, layout) for d, dims, layout in _ARRAY.findall(params)]


_NO_TRAFFIC = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call", "conditional",
               "after-all", "partition-id", "replica-id", "iota"}


class Costs(NamedTuple):
  """Per-device costs of a step from its HLO: each summed over every run, and with each computation counted once.

  `*_once` is what XLA's `cost_analysis()` sees of the same instructions (a loop body once), so
  `cost_analysis()[k] + total - once` corrects its figure for loops.
  """

  matmul_flops: float
  matmul_flops_once: float
  bytes: float  # operands + results of the instructions outside fusions (HBM traffic, at most)
  bytes_once: float


def costs(hlo_text: str | Module) -> Costs:
  """Matmul FLOPs and memory traffic of a step, loops counted in full and once.

  Traffic counts the operands and results of the instructions outside fusions, in HBM
  (buffers in on-chip memory, `S(1)`, are left out); an operand that is only sliced (a
  `dynamic-slice` of a layer stack, directly or inside a fusion) counts the slice.
  """
  module = hlo_text if isinstance(hlo_text, Module) else parse(hlo_text)
  fused = {callee for body in module.computations.values() for ins in body if ins.op == "fusion"
           for callee in re.findall(r"calls=%([\w.-]+)", ins.attrs)}
  memo: dict[str, dict[int, int]] = {}
  read = {name: _parameter_reads(module.computations[name], module.computations, memo) for name in fused
          if name in module.computations}
  carried = {name: {_key(i.type) for i in module.computations[name] if i.op.removesuffix("-done") in OPS}
             for name in fused if name in module.computations}  # an async collective's buffers, in flight
  flops = flops_once = traffic = traffic_once = 0.0
  for name, body in module.computations.items():
    n = module.runs.get(name, 0)
    if not n:
      continue
    types = {ins.name: ins.type for ins in body}
    for ins in body:
      f = _matmul_flops(ins, types)
      flops, flops_once = flops + n * f, flops_once + f
      if name not in fused and ins.op not in _NO_TRAFFIC and not ins.op.endswith("-start"):
        b = _traffic(ins, types, read, carried)
        traffic, traffic_once = traffic + n * b, traffic_once + b
  return Costs(flops, flops_once, traffic, traffic_once)


def _hbm_bytes(type_text: str) -> int:
  """Bytes of the arrays of a type that live in HBM (memory space 0: no `S(n)` in their layout)."""
  return sum(_array_bytes(d, dims, None) for d, dims, layout in _ARRAY.findall(type_text)
             if not re.search(r"S\([1-9]", layout or ""))


def _parameter_reads(body: list[Instruction], computations: dict[str, list[Instruction]] | None = None,
                     memo: dict[str, dict[int, int]] | None = None) -> dict[int, int]:
  """`{parameter number: bytes read}` of a fused computation's parameters that are only sliced, and (key -1) the
  bytes an in-place `dynamic-update-slice` at its root writes.

  A parameter handed to a nested fusion counts what that fusion reads of it (TPU
  programs slice a layer stack inside a loop fusion inside the matmul's fusion).
  """
  computations, memo = computations or {}, {} if memo is None else memo

  def nested(callee: str) -> dict[int, int]:
    if callee not in memo:
      memo[callee] = {}  # (no recursion through a cycle)
      memo[callee] = _parameter_reads(computations.get(callee, []), computations, memo)
    return memo[callee]

  def reads(use: Instruction, name: str) -> int | None:
    """Bytes `use` reads of operand `name`, when it reads only part of it."""
    if use.op in ("dynamic-slice", "slice", "gather") and use.operands[0] == name and name not in use.operands[1:]:
      return _hbm_bytes(use.type)
    callee = re.search(r"calls=%([\w.-]+)", use.attrs) if use.op == "fusion" else None
    if callee is None:
      return None
    inner = nested(callee.group(1))
    parts = [inner.get(k) for k, o in enumerate(use.operands) if o == name]
    return None if None in parts else sum(parts)

  params = {ins.name: int(ins.args) for ins in body if ins.op == "parameter" and ins.args.strip().isdigit()}
  types = {ins.name: ins.type for ins in body}
  root = body[-1] if body else None
  while root is not None and root.op == "bitcast" and root.operands:
    root = next((i for i in body if i.name == root.operands[0]), None)
  inplace = {}
  if root is not None and root.op == "dynamic-update-slice" and root.operands[0] in params:
    inplace = {params[root.operands[0]]: 0, -1: 2 * _hbm_bytes(types.get(root.operands[1], ""))}
  users: dict[str, list[Instruction]] = {}
  for ins in body:
    for o in ins.operands:
      users.setdefault(o, []).append(ins)
  out = {}
  for name, k in params.items():
    parts = [reads(u, name) for u in users.get(name, [])]
    if parts and None not in parts:
      out[k] = sum(parts)
  return {**out, **inplace}


def _key(type_text: str) -> tuple:
  return tuple((d, dims) for d, dims, _ in _ARRAY.findall(type_text))


def _traffic(ins: Instruction, types: dict[str, str], read: dict[str, dict[int, int]],
             carried: dict[str, set]) -> int:
  """HBM bytes an instruction outside fusions reads and writes.

  A fusion that holds an asynchronous collective (TPU's start / continuation / done pieces)
  passes the collective's buffers along: arrays that are both an operand and a result, or
  are the collective's result, are in flight, not read or written by the fusion.
  """
  if ins.op in ("dynamic-slice", "slice", "gather"):
    return 2 * _hbm_bytes(ins.type)
  if ins.op == "slice-done":  # an asynchronous slice (e.g. a prefetch into on-chip memory): its operand is the
    return shape_bytes(ins.type) + _hbm_bytes(ins.type)  # start's tuple, source included; it reads the slice only
  if ins.op == "dynamic-update-slice":
    return 2 * _hbm_bytes(types.get(ins.operands[1], ""))
  callee = re.search(r"calls=%([\w.-]+)", ins.attrs) if ins.op == "fusion" else None
  callee = callee.group(1) if callee else None
  sliced = read.get(callee, {})
  ins_ = [(k, types.get(o, "")) for k, o in enumerate(ins.operands)]
  outs = [f"{d}[{dims}]{layout}" for d, dims, layout in _ARRAY.findall(ins.type)]
  if carried.get(callee):
    skip = {a for part in carried[callee] for a in part} | {(d, dims) for _, t in ins_ for d, dims, _ in
                                                             _ARRAY.findall(t)}
    skip &= {(d, dims) for d, dims, _ in _ARRAY.findall(ins.type)} | {a for part in carried[callee] for a in part}
    ins_ = [(k, t) for k, t in ins_ if not set(_key(t)) & skip]
    outs = [t for t in outs if not set(_key(t)) & skip]
  written = sliced[-1] if -1 in sliced else sum(_hbm_bytes(t) for t in outs)
  return written + sum(sliced.get(k, _hbm_bytes(t)) for k, t in ins_)


def _matmul_flops(ins: Instruction, types: dict[str, str]) -> float:
  """2 x the multiply-adds of a `dot` or `convolution` (0 for other instructions)."""
  if ins.op == "dot":
    lhs = _dims(types.get(ins.operands[0], ""))
    contracting = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", ins.attrs)
    k = np.prod([lhs[int(i)] for i in contracting.group(1).split(",") if i]) if contracting and lhs else 1
    return 2.0 * float(np.prod(_dims(ins.type) or [1])) * float(k)
  if ins.op != "convolution":
    return 0.0
  labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", ins.attrs)
  lhs, rhs = _dims(types.get(ins.operands[0], "")), _dims(types.get(ins.operands[1], ""))
  out = _dims(ins.type)
  if not labels or not lhs or not rhs or not out:
    return 0.0
  lhs_l, rhs_l, out_l = labels.groups()
  window = _window(ins.attrs)
  groups = int((re.search(r"feature_group_count=(\d+)", ins.attrs) or [0, 1])[1])
  batch_groups = int((re.search(r"batch_group_count=(\d+)", ins.attrs) or [0, 1])[1])
  valid = 1.0
  for k in range(sum(c.isdigit() for c in lhs_l)):
    size, n_in, n_out = rhs[rhs_l.index(str(k))], lhs[lhs_l.index(str(k))], out[out_l.index(str(k))]
    stride, lo = _window_entry(window, "stride", k, 1), _window_entry(window, "pad", k, 0)
    lhs_dilate, rhs_dilate = _window_entry(window, "lhs_dilate", k, 1), _window_entry(window, "rhs_dilate", k, 1)
    pos = np.arange(n_out)[:, None] * stride - lo + np.arange(size)[None, :] * rhs_dilate
    valid *= float(np.count_nonzero((pos % lhs_dilate == 0) & (pos >= 0) & (pos // lhs_dilate < n_in)))
  features_in = lhs[lhs_l.index("f")] / groups
  batch = lhs[lhs_l.index("b")] / batch_groups
  return 2.0 * features_in * out[out_l.index("f")] * batch * valid


def _window_entry(window: dict[str, list[list[int]]], key: str, k: int, default: int) -> int:
  """Spatial dimension `k`'s `key` (its low padding for `pad`), or `default`."""
  return window[key][k][0] if key in window and k < len(window[key]) else default


def _window(attrs: str) -> dict[str, list[list[int]]]:
  """`window={size=4x2 stride=3x1 pad=0_1x0_0}` as `{"size": [[4], [2]], "pad": [[0, 1], [0, 0]], ...}`."""
  m = re.search(r"window=\{([^}]*)\}", attrs)
  out: dict[str, list[list[int]]] = {}
  for item in (m.group(1).split() if m else []):
    key, _, value = item.partition("=")
    out[key] = [[int(x) for x in part.split("_")] for part in value.split("x")]
  return out
