"""`jlora plan`: a tiny model's LoRA step compiled for a TPU slice (v5e:2x2) on this CPU host, with libtpu.

The compile runs once, in a subprocess whose Python sockets refuse to connect (so the
plan is shown to open no network connection), and its JSON is shared by the tests.
Memory figures are checked against the arrays' sizes; bad topologies and meshes are refused.
"""

import importlib
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import pytest
import yaml

from jlora import models, train
from jlora.cli import main
from jlora.train import _tpu

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = {
  "model": {"source": "random", "tokenizer": "bytes", "dtype": "bfloat16", "options": {"scan_layers": True},
            "config": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
                       "max_position_embeddings": 64}},
  "lora": {"task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
  "train": {"batch_size": 8, "seq_len": 32},
  "mesh": {"data": 2, "fsdp": 2},
}
# Run in the child before anything else: every Python-level connection attempt raises.
NO_NETWORK = """
import socket
def refuse(*args, **kwargs):
  raise OSError("jlora plan tried to open a network connection")
socket.socket.connect = socket.socket.connect_ex = socket.socket.sendto = refuse
socket.create_connection = refuse
import sys
from jlora.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _run(args, tmp_path):
  env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
  env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
  return subprocess.run([sys.executable, "-c", NO_NETWORK, "plan", *args], capture_output=True, text=True, env=env,
                        cwd=tmp_path, timeout=600)


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
  path = tmp_path_factory.mktemp("plan") / "tiny.yaml"
  path.write_text(yaml.safe_dump(TINY))
  return path


@pytest.fixture(scope="module")
def planned(tiny_config):
  proc = _run([str(tiny_config), "--topology", "v5e:2x2", "--bound", "--json"], tiny_config.parent)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout)


def _expected_bytes(fsdp=2):
  """Per-chip bytes of the base and the adapters from their shapes: `embed` axes are split over `fsdp`, and an
  adapter leaf without one is split along its rank (r = 8) instead: every adapter leaf holds 1/fsdp per chip."""
  model, shapes = models.param_shapes(TINY["model"]["config"], dtype="bfloat16", scan_layers=True)
  config = train.load(None, [], text=yaml.safe_dump(TINY))
  x = jax.ShapeDtypeStruct((1, 32), "int32")
  import jlora

  full = jax.eval_shape(lambda p, x: jlora.init(jax.random.key(0), model, p, config.lora, x), shapes, x)
  axes = models.logical_axes(model, full)

  def per_chip(leaf, spec, adapter=False):
    div = math.prod(fsdp for name, n in zip(tuple(spec), leaf.shape) if name == "embed" and n % fsdp == 0)
    return leaf.size * leaf.dtype.itemsize / (fsdp if adapter else div)

  trainable, frozen = jlora.split(full, config.lora)
  total = lambda tree: sum(jax.tree.leaves(jax.tree.map(  # noqa: E731
    lambda leaf, spec: per_chip(leaf, spec, adapter=tree is trainable), tree,
    jlora.split(axes, config.lora)[0 if tree is trainable else 1], is_leaf=lambda v: isinstance(v, jax.ShapeDtypeStruct))))
  return total(frozen), total(trainable)


def test_memory_figures_match_the_arrays(planned):
  m = planned["memory_bytes"]
  base, adapters = _expected_bytes()
  assert m["base"] == pytest.approx(base, rel=1e-9)
  assert m["adapters"] == pytest.approx(adapters, rel=1e-9)
  # AdamW: two moments per adapter leaf, plus small counters
  assert 2 * adapters <= m["optimizer"] <= 2 * adapters + 1024
  assert m["batch"] == pytest.approx(2 * 4 * (8 // 4) * 32 + 8)  # ids + mask int32, a quarter of the rows; the key
  # the compiler's argument bytes are the parameters in their TPU layouts; tiles pad the arrays a little
  assert m["arguments"] == m["arguments_in_layout"]
  parts = m["base"] + m["adapters"] + m["optimizer"] + m["batch"]
  assert parts <= m["arguments"] <= 4 * parts
  assert m["padding"] == pytest.approx(m["arguments"] - parts)
  assert m["total"] == pytest.approx(m["arguments"] + m["temporaries"] + m["outputs"])
  assert planned["fits"] and m["total"] < planned["hbm_bytes"]


def test_work_collectives_and_estimate(planned):
  w, e = planned["work"], planned["estimate"]
  assert w["flops"] > w["xla_cost_analysis_flops"] > 0  # the scanned layers' loop body counted per layer
  assert planned["collective_bytes"].get("all-gather", 0) > 0  # FSDP gathers the base where a layer runs
  assert e["step_s"] == pytest.approx(max(e["compute_s"], e["memory_s"], e["collective_s"]))
  assert e["tokens"] == 8 * 32
  assert e["tokens_per_s"] == pytest.approx(e["tokens"] / e["step_s"])
  b = planned["frozen_base_bound"]
  assert 0 < b["flops"] < w["flops"]  # no adapter gradients, no optimizer
  assert planned["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1} and planned["chips"] == 4
  assert "not measurements" in planned["caveat"]


def test_text_report(tiny_config):
  proc = _run([str(tiny_config), "--topology", "v5e:2x2", "train.batch_size=4"], tiny_config.parent)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "not measurements" in proc.stdout and "fits" in proc.stdout and "tokens/s for 128 tokens" in proc.stdout


@pytest.mark.parametrize("topology, match", [
  ("v9x:2x2", "unknown TPU generation 'v9x'"),
  ("v5e-8", "must be GENERATION:AxB"),
  ("v5e:2x0", "at least 1"),
])
def test_bad_topology_is_refused(topology, match):
  with pytest.raises(ValueError, match=match):
    _tpu.parse(topology)


def test_cli_refuses_bad_input(tiny_config, capsys):
  assert main(["plan", str(tiny_config), "--topology", "v9x:2x2"]) == 2
  assert "unknown TPU generation" in capsys.readouterr().err
  assert main(["plan", str(tiny_config), "--topology", "v5e:2x2", "lora.r=0"]) == 2
  assert "lora" in capsys.readouterr().err


def test_mesh_and_batch_that_do_not_fit_the_slice(tiny_config):
  proc = _run([str(tiny_config), "--topology", "v5e:2x2", "mesh.data=3"], tiny_config.parent)
  assert proc.returncode == 2 and "4 devices" in proc.stderr
  proc = _run([str(tiny_config), "--topology", "v5e:2x2", "train.batch_size=6"], tiny_config.parent)
  assert proc.returncode == 2 and "train.batch_size" in proc.stderr


def test_a_step_the_compiler_refuses_for_hbm_is_reported_as_not_fitting():
  plan = importlib.import_module("jlora.train._plan")
  parts = {"base": 2.0 * 2**30, "adapters": 1e6, "optimizer": 2e6, "batch": 1e3}
  error = RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
                       "(17.38G) exceeds available HBM (15.75G).")
  m = plan._out_of_memory(error, parts)
  assert m["temporaries"] == pytest.approx(17.38 * 2**30) and m["usable_hbm"] == pytest.approx(15.75 * 2**30)
  assert m["total"] == pytest.approx(sum(parts.values()) + 17.38 * 2**30)
  with pytest.raises(ValueError, match="something else"):
    plan._out_of_memory(ValueError("something else"), parts)


def test_full_fine_tuning_plans_every_weight_as_trainable(tiny_config):
  """`train.method=full` plans the step `jlora train` runs for it: every weight trains, nothing is frozen, and the
  optimizer holds two moments per weight."""
  proc = _run([str(tiny_config), "--topology", "v5e:2x2", "train.method=full", "--json"], tiny_config.parent)
  assert proc.returncode == 0, proc.stderr[-3000:]
  plan = json.loads(proc.stdout)
  m = plan["memory_bytes"]
  base, _ = _expected_bytes()
  assert plan["method"] == "full fine-tuning"
  assert m["base"] == 0
  assert m["adapters"] == pytest.approx(base, rel=1e-9)  # the trainable tree: the whole base, sharded as it is
  assert 2 * base <= m["optimizer"] <= 2 * base + 1024


def test_an_asynchronous_slice_reads_the_slice_not_its_source():
  """TPU programs prefetch slices of HBM buffers into on-chip memory (`S(1)`) with `slice-start` / `slice-done`; the
  done's operand is the start's tuple, whose first element is the whole source. The traffic is the 4 MB slice read
  (its write stays on chip), not the 16 MB source (what v6e's 8B step over-counted by 85 GB)."""
  from jlora.parallel import hlo

  text = """HloModule m

ENTRY %main (p: s8[16777216]) -> s8[4194304] {
  %p = s8[16777216]{0:T(1024)(128)(4,1)} parameter(0)
  %slice-start.1 = ((s8[16777216]{0:T(1024)(128)(4,1)}), s8[4194304]{0:T(1024)(128)(4,1)S(1)}, s32[]{:S(2)}) slice-start(%p), slice={[0:4194304]}
  ROOT %slice-done.1 = s8[4194304]{0:T(1024)(128)(4,1)S(1)} slice-done(%slice-start.1)
}
"""
  assert hlo.costs(text).bytes == 4194304
  assert hlo.costs(text.replace("S(1)}", "}")).bytes == 2 * 4194304  # into HBM: read and written


def test_a_layer_stack_sliced_inside_a_nested_fusion_counts_the_slice():
  """TPU programs fuse a matmul with a loop fusion that slices the layer's input out of the stack of all layers' inputs
  (and normalises it). The matmul's fusion reads one layer's slice (8 KB), not the stack (32 KB): v6e's 8B step
  over-counted 150 GB this way, in the base's projections and in the adapters' `x·A` alike."""
  from jlora.parallel import hlo

  text = """HloModule m

%slice_norm (s.1: bf16[4,16,128], i.1: s32[]) -> bf16[16,128] {
  %s.1 = bf16[4,16,128]{2,1,0} parameter(0)
  %i.1 = s32[] parameter(1)
  %z.1 = s32[] constant(0)
  %d.1 = bf16[1,16,128]{2,1,0} dynamic-slice(%s.1, %i.1, %z.1, %z.1), dynamic_slice_sizes={1,16,128}
  ROOT %b.1 = bf16[16,128]{1,0} bitcast(%d.1)
}

%matmul (s.2: bf16[4,16,128], i.2: s32[], w.2: bf16[128,8]) -> bf16[16,8] {
  %s.2 = bf16[4,16,128]{2,1,0} parameter(0)
  %i.2 = s32[] parameter(1)
  %w.2 = bf16[128,8]{1,0} parameter(2)
  %x.2 = bf16[16,128]{1,0} fusion(%s.2, %i.2), kind=kLoop, calls=%slice_norm
  ROOT %c.2 = bf16[16,8]{1,0} convolution(%x.2, %w.2), dim_labels=bf_io->bf
}

ENTRY %main (stack: bf16[4,16,128], i: s32[], w: bf16[128,8]) -> bf16[16,8] {
  %stack = bf16[4,16,128]{2,1,0} parameter(0)
  %i = s32[] parameter(1)
  %w = bf16[128,8]{1,0} parameter(2)
  ROOT %f = bf16[16,8]{1,0} fusion(%stack, %i, %w), kind=kOutput, calls=%matmul
}
"""
  slice_, weight, out = 16 * 128 * 2, 128 * 8 * 2, 16 * 8 * 2
  assert hlo.costs(text).bytes == slice_ + weight + out + 4  # the index too
  # the stack also read whole inside the nested fusion: the whole stack counts
  whole = text.replace("ROOT %b.1 = bf16[16,128]{1,0} bitcast(%d.1)",
                       "%n.1 = bf16[4,16,128]{2,1,0} negate(%s.1)\n  ROOT %b.1 = bf16[16,128]{1,0} bitcast(%d.1)")
  assert hlo.costs(whole).bytes == 4 * slice_ + weight + out + 4
