"""`jlora train` on a device mesh: the same steps as on one device, on 8 virtual devices and on two processes.

A tiny scanned Llama (`configs/mesh.yaml`, two adapted projections, dropout on) trains
with a constant learning rate, so a 3-step run is the first 3 steps of a 4-step one.
One 8-device interpreter trains the reference on one device (3 steps, then resumed to
4), on a (2, 2, 2) and an (8, 1, 1) mesh, and tries the mistakes a mesh allows. Two
real processes (2 × 4 CPU devices, gloo) train the (2, 2, 2) run with `jlora train`
(`jax.distributed` started from `JAX_COORDINATOR_ADDRESS`); a fresh 8-device
interpreter compares it, resumes it on a (4, 2, 1) mesh and restores its checkpoint
onto one device.
"""

import dataclasses
import json
import os
import sys
import textwrap

import numpy as np
import pytest

from jlora import train
from jlora.train import _mesh
from tests.multidevice import once_per_session, run_devices, start_processes

FAST = ["train.quiet=true", "train.log_every=1", "data.max_train=64", "data.max_eval=16", "train.eval_batch_size=16",
        "optimizer.schedule=constant", "optimizer.warmup_steps=0", "checkpointing.every=1", "checkpointing.keep=4",
        "outputs.plot=false", "outputs.peft=false", "lora.target_modules=[q_proj, v_proj]"]
TOL = 1e-5

_COMMON = f"""
import dataclasses, json, os, shutil, sys
import jax, numpy as np
import jlora
from jlora import train
from jlora.train import _data, _mesh_config, _setup, _state, _tasks

FAST = {FAST!r}


def config(out, mesh, *extra, file="configs/mesh.yaml"):
  c = train.load(file, [*FAST, f"outputs.dir={{out}}", *extra])
  mesh = _mesh_config.MeshConfig(*mesh) if isinstance(mesh, tuple) else mesh
  return dataclasses.replace(c, mesh=mesh)


def run(out, mesh, *extra, file="configs/mesh.yaml"):
  losses = []
  result = train.run(config(out, mesh, *extra, file=file), on_step=lambda s, l: losses.append(l), log=lambda s: None)
  return {{"losses": losses, "resumed_from": result["resumed_from"], "adapter": adapter(out)}}


def flat(tree):
  return {{jax.tree_util.keystr(p): np.asarray(v).tolist() for p, v in jax.tree_util.tree_leaves_with_path(tree)}}


def adapter(out):
  # The saved adapter, loaded with the public API onto the run's base rebuilt on one device.
  cfg = train.load(f"{{out}}/config.yaml")
  base = _setup.base_model(cfg, _tasks.get(cfg.lora.task_type))
  params, lora = jlora.load_adapter(f"{{out}}/adapter", base.params)
  return flat(jlora.split(params, lora)[0])
"""

_ONE_INTERPRETER = _COMMON + """
root, out = sys.argv[1], {}
out["one"] = run(f"{root}/one", None, "train.steps=3")
out["one4"] = run(f"{root}/one", None, "train.steps=4")  # resumed at 3
out["222"] = run(f"{root}/222", (2, 2, 2), "train.steps=3")
out["811"] = run(f"{root}/811", (8, 1, 1), "train.steps=3")
# One step of the (2, 2, 2) run by hand: where each array lives before and after it.
import optax
from jlora import models
from jlora.train import _loop, _mesh
c = config(f"{root}/222", (2, 2, 2))
layout, task = _mesh.start(c.mesh), _tasks.get("CAUSAL_LM")
setup = _setup.prepare(c, task, _data.examples(c.data, task), layout=layout)
opt = setup.opt_state()
spec = lambda tree: jax.tree.map(lambda x: str(getattr(x, "sharding", x).spec), tree)
rule = spec(jlora.split(jlora.adapter_shardings(jlora.combine(setup.trainable, setup.frozen), rank_axis="fsdp"),
                        c.lora)[0])
mu = spec(optax.tree_utils.tree_get(opt, "mu"))  # adamw's first moment of the trainable leaves
frozen = spec(setup.frozen)
base = spec(models.mesh_shardings(setup.base.model, setup.base.params, layout.mesh, rules=layout.rules))
step = _loop.make_train_step(setup, temperature=0.05, dropout=True, shardings=_mesh.shardings((setup.trainable, opt)))
batch = layout.batch(setup.train_arrays, np.arange(16))
t, o, loss, _ = step(setup.trainable, opt, setup.frozen, batch, jax.random.key(0))
out["placement"] = {"trainable": spec(t) == rule, "opt_state": spec(o) == spec(opt), "mu": mu == rule,
                    "frozen": all(frozen[k] == base[k] for k in frozen), "loss": str(loss.sharding.spec),
                    "batch": str(batch["ids"].sharding.spec), "q_a": rule["model"]["layers"]["self_attn"]["q_proj"]["lora_a"],
                    "q_b": spec(t)["model"]["layers"]["self_attn"]["q_proj"]["lora_b"],
                    "q_b_compute": spec(layout.gathered(_mesh.shardings(setup.trainable)))["model"]["layers"][
                        "self_attn"]["q_proj"]["lora_b"],
                    "v_b_mu": mu["model"]["layers"]["self_attn"]["v_proj"]["lora_b"],
                    "q_kernel": frozen["model"]["layers"]["self_attn"]["q_proj"]["kernel"]}
# Mixtral: LoRA on every expert (`target_parameters`), the experts split over `fsdp` (DEFAULT_RULES), the same steps
moe = "configs/mixtral_tiny.yaml"
out["moe_one"] = run(f"{root}/moe_one", None, "train.steps=2", file=moe)
out["moe_222"] = run(f"{root}/moe_222", (2, 2, 2), "train.steps=2", file=moe)
c = config(f"{root}/moe_222", (2, 2, 2), file=moe)
setup = _setup.prepare(c, task, _data.examples(c.data, task), layout=_mesh.start(c.mesh))
experts = lambda tree: spec(tree)["model"]["layers_0"]["mlp"]["experts"]
out["moe_placement"] = {"kernel": experts(setup.frozen)["gate_up_proj"], "a": experts(setup.trainable)["gate_up_proj_lora_a"],
                        "b": experts(setup.trainable)["gate_up_proj_lora_b"]}
# Full fine-tuning (`train.method=full`) on the (2, 2, 2) mesh and on one device: every weight trains.
import safetensors.numpy
for name, mesh in (("full_one", None), ("full_222", (2, 2, 2))):
  losses = []
  train.run(config(f"{root}/{name}", mesh, "train.method=full", "train.steps=2", "optimizer.learning_rate=1e-3"),
            on_step=lambda s, l: losses.append(l), log=lambda s: None)
  weights = safetensors.numpy.load_file(f"{root}/{name}/model/model.safetensors")
  out[name] = {"losses": losses, "weights": {k: v.tolist() for k, v in weights.items()}}
errors = {}
for name, mesh, extra in [("sizes", (3, 1, 1), []), ("rest", (-1, 3, 1), []),
                          ("batch", (8, 1, 1), ["train.batch_size=12"]),
                          ("distributed", _mesh_config.MeshConfig(distributed=True), [])]:
  try:
    train.run(config(f"{root}/{name}", mesh, "train.steps=1", *extra), log=lambda s: None)
  except ValueError as e:
    errors[name] = [str(e), os.path.exists(f"{root}/{name}")]
out["errors"] = errors
print(json.dumps(out))
"""

# Each of the two processes: the standard variables jlora's `mesh.distributed: null` reads, then the CLI.
_LAUNCH = """
import os, sys
os.environ.update(JAX_COORDINATOR_ADDRESS=os.environ["JLORA_TEST_COORDINATOR"],
                  JAX_NUM_PROCESSES=os.environ["JLORA_TEST_NUM_PROCESSES"],
                  JAX_PROCESS_ID=os.environ["JLORA_TEST_PROCESS_ID"])
from jlora import cli
sys.exit(cli.main(sys.argv[1:]))
"""

_AFTER_TWO = _COMMON + """
two, root, out = sys.argv[1], sys.argv[2], {}
out["adapter"] = adapter(two)
out["losses"] = [r["loss"] for r in map(json.loads, open(f"{two}/metrics.jsonl")) if r["kind"] == "train"]
# Its last checkpoint, restored onto one device.
task = _tasks.get("CAUSAL_LM")
setup = _setup.prepare(config(two, None), task, _data.examples(config(two, None).data, task))
template = _state.State(setup.trainable, setup.opt_state(), 0, np.zeros(2, np.uint32))
with _state.Checkpoints(f"{two}/checkpoints") as ckpt:
  restored = ckpt.restore(template, 3)
out["restored"] = flat(restored.trainable)
out["restored_devices"] = sorted({str(d) for x in jax.tree.leaves(restored) if hasattr(x, "devices")
                                  for d in x.devices()})
# Resumed on a (4, 2, 1) mesh for a 4th step.
shutil.copytree(two, f"{root}/421")
out["421"] = run(f"{root}/421", (4, 2, 1), "train.steps=4")
print(json.dumps(out))
"""


def _close(a: dict, b: dict) -> None:
  assert a.keys() == b.keys() and a
  for k in a:
    np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), atol=TOL, rtol=0, err_msg=k)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("mesh")
  return json.loads(once_per_session("train_mesh", lambda: run_devices(_ONE_INTERPRETER, 8, str(root)))
                    .splitlines()[-1])


def test_a_mesh_runs_take_the_one_device_steps(runs):
  out = runs
  one, one4 = out["one"], out["one4"]
  assert len(one["losses"]) == 3 and one4["resumed_from"] == 3 and len(one4["losses"]) == 1
  assert not np.allclose(one["adapter"]["['model']['layers']['self_attn']['q_proj']['lora_b']"], 0)  # it trained
  for name in ("222", "811"):
    np.testing.assert_allclose(out[name]["losses"], one["losses"], atol=TOL, rtol=0, err_msg=name)
    _close(out[name]["adapter"], one["adapter"])


def test_a_arrays_stay_where_the_rules_put_them(runs):
  placement = runs["placement"]
  assert all(placement[k] for k in ("trainable", "opt_state", "mu", "frozen")), placement
  assert placement["batch"] == "P(('data', 'fsdp'), None)" and placement["loss"] == "P()"
  assert placement["q_kernel"] == "P(None, 'fsdp', 'tensor')"  # (L, embed, heads): FSDP and TP
  assert placement["q_a"] == "P(None, 'fsdp')"  # A: the kernel's input axis, rank replicated (trailing None dropped)
  # B: the kernel's output axis over `tensor`, and its rank over `fsdp` (ZeRO-style: the rule alone would leave B
  # whole on each `fsdp` device); its AdamW moments follow.
  assert placement["q_b"] == placement["v_b_mu"] == "P(None, 'fsdp', 'tensor')"
  # the step gathers it whole along the rank for its matmuls (the TPU compiler's loop over a split rank is costly)
  assert placement["q_b_compute"] == "P(None, None, 'tensor')"


def test_a_mixtral_with_lora_on_every_expert_takes_the_one_device_steps_with_experts_split(runs):
  np.testing.assert_allclose(runs["moe_222"]["losses"], runs["moe_one"]["losses"], atol=TOL, rtol=0)
  _close(runs["moe_222"]["adapter"], runs["moe_one"]["adapter"])
  # (experts, embed, 2·ff): each device holds whole experts, their hidden axis over `tensor`; the per-expert adapters
  # A (experts, embed, 1, r) and B (experts, 1, 2·ff, r) follow their kernel
  assert runs["moe_placement"] == {"kernel": "P('fsdp', None, 'tensor')", "a": "P('fsdp',)",
                                   "b": "P('fsdp', None, 'tensor')"}


def test_a_full_fine_tuning_on_a_mesh_takes_the_one_device_steps(runs):
  """Every weight trains on a (2, 2, 2) mesh of 8 virtual devices as on one: the optimizer state follows the params."""
  np.testing.assert_allclose(runs["full_222"]["losses"], runs["full_one"]["losses"], rtol=1e-4, atol=1e-6)
  one, mesh = runs["full_one"]["weights"], runs["full_222"]["weights"]
  assert one.keys() == mesh.keys() and one
  diff = np.concatenate([np.abs(np.asarray(mesh[k]) - np.asarray(one[k])).ravel() for k in one])
  # Adam moves a weight by about the learning rate whatever its gradient's size, so a gradient at rounding level
  # (summed in another order on the mesh) may move it the other way: at most 2 x 1e-3 per step, in a few weights.
  assert diff.max() <= 4e-3 + 1e-6 and np.mean(diff > 1e-5) < 0.01, (diff.max(), np.mean(diff > 1e-5))


def test_c_mesh_mistakes_are_refused_before_anything_is_written(runs):
  out = runs
  errors = out["errors"]
  assert set(errors) == {"sizes", "rest", "batch", "distributed"}
  assert not any(written for _, written in errors.values())
  assert "axis sizes (data=3, fsdp=1, tensor=1) multiply to 3, but there are 8 devices" in errors["sizes"][0]
  assert "`mesh.data=-1`" in errors["sizes"][0]
  assert "`mesh.data: -1` takes the devices left over" in errors["rest"][0]
  assert "does not divide the 8 devices" in errors["rest"][0]
  assert "`train.batch_size` is 12" in errors["batch"][0] and "data × fsdp = 8 × 1 = 8" in errors["batch"][0]
  assert "train.batch_size=16" in errors["batch"][0]
  assert "must run before any other JAX call" in errors["distributed"][0]


def test_b_two_processes_train_save_and_resume_anywhere(runs, tmp_path):
  out = runs
  two = tmp_path / "two"
  argv = [sys.executable, "-c", _LAUNCH, "train", "configs/mesh.yaml", *FAST, "train.steps=3", "outputs.peft=true",
          f"outputs.dir={two}"]
  procs = start_processes(argv, 2, 4)
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (stdout, stderr) in zip(procs, outs):
    assert p.returncode == 0, f"{stdout[-2000:]}\n{stderr[-4000:]}"
  assert "jlora train: CAUSAL_LM on llama, 3 steps" in outs[0][0] and "jlora train" not in outs[1][0]  # process 0
  assert (two / "peft" / "adapter_model.safetensors").exists() and (two / "summary.json").exists()
  assert sorted(os.listdir(two / "checkpoints")) == ["1", "2", "3"]
  after = json.loads(run_devices(_AFTER_TWO, 8, str(two), str(tmp_path)).splitlines()[-1])
  np.testing.assert_allclose(after["losses"], out["one"]["losses"], atol=TOL, rtol=0)
  _close(after["adapter"], out["222"]["adapter"])
  _close(after["adapter"], out["one"]["adapter"])
  _close(after["restored"], out["one"]["adapter"])
  assert len(after["restored_devices"]) == 1
  resumed = after["421"]
  assert resumed["resumed_from"] == 3
  np.testing.assert_allclose(resumed["losses"], out["one4"]["losses"], atol=TOL, rtol=0)
  _close(resumed["adapter"], out["one4"]["adapter"])


def test_processes_of_a_cluster_need_a_mesh_section(tmp_path):
  code = textwrap.dedent(f"""
    import dataclasses, os
    import jax
    jax.distributed.initialize(os.environ["JLORA_TEST_COORDINATOR"], int(os.environ["JLORA_TEST_NUM_PROCESSES"]),
                               int(os.environ["JLORA_TEST_PROCESS_ID"]))
    from jlora import train
    config = train.load("configs/mesh.yaml", ["outputs.dir={tmp_path}"])
    try:
      train.run(dataclasses.replace(config, mesh=None))
    except ValueError as e:
      print(e)
  """)
  procs = start_processes([sys.executable, "-c", code], 2, 1)
  for p in procs:
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr[-4000:]
    assert "This process is one of 2 (jax.distributed is initialized), but the config has no `mesh` section" in stdout
  assert not tmp_path.exists() or not os.listdir(tmp_path)


def test_mesh_section_is_optional_and_checked():
  assert train.Config.from_dict({}).mesh is None and "mesh" not in train.Config.from_dict({}).to_dict()
  config = train.load(None, ["mesh.fsdp=2", "mesh.rules=[[mlp, null], [heads, [fsdp, tensor]]]"])
  assert (config.mesh.data, config.mesh.fsdp, config.mesh.tensor, config.mesh.distributed) == (-1, 2, 1, None)
  assert config.mesh.logical_rules == (("mlp", None), ("heads", ("fsdp", "tensor")))
  assert train.Config.from_dict(config.to_dict()) == config
  assert dataclasses.replace(config, mesh=None).to_dict() == train.load(None).to_dict()
  bad = [("mesh.data=0", ValueError, r"`mesh.data` must be -1 \(the devices left over\) or an integer >= 1, got 0"),
         ("mesh.tensor=-1", ValueError, r"only one axis size may be -1.*\['data', 'tensor'\].*`mesh.tensor=1`"),
         ("mesh.rules=[[mlp]]", ValueError, r"`mesh.rules\[0\]` must be a pair \[logical_name, mesh axis"),
         ("mesh.rules=[[mlp, model]]", ValueError, r"mesh axes of 'mlp' must be one of \['data', 'fsdp', 'tensor'\]"),
         ("mesh.rules=[[mlp, [fsdp, fsdp]]]", ValueError, r"a list of distinct ones"),
         ("mesh.rules=mlp", TypeError, r"`mesh.rules` must be a list or null, got 'mlp'"),
         ("mesh.distributed=auto", TypeError, r"`mesh.distributed` must be true/false or null, got 'auto'"),
         ("mesh.devices=8", ValueError, r"unknown key\(s\) \['mesh.devices'\]")]
  for override, kind, match in bad:
    with pytest.raises(kind, match=match):
      train.load(None, [override])


def test_launcher_reads_the_standard_environment():
  assert _mesh.launcher({}) is None
  assert _mesh.launcher({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}) == "JAX_COORDINATOR_ADDRESS"
  assert _mesh.launcher({"SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "8"}) == "SLURM_STEP_NUM_TASKS"
  assert _mesh.launcher({"SLURM_NTASKS": "8"}) is None  # the batch script itself (outside srun) is one process
  assert _mesh.launcher({"SLURM_STEP_NUM_TASKS": "1"}) is None
  assert _mesh.launcher({"TPU_WORKER_HOSTNAMES": "t1,t2,t3,t4"}) == "TPU_WORKER_HOSTNAMES"
  assert _mesh.launcher({"TPU_WORKER_HOSTNAMES": "localhost"}) is None
  assert _mesh.launcher({"TPU_PROCESS_ADDRESSES": "10.0.0.1:8476,10.0.0.2:8476"}) == "TPU_PROCESS_ADDRESSES"
  assert _mesh.launcher({"OMPI_COMM_WORLD_SIZE": "2"}) == "OMPI_COMM_WORLD_SIZE"
  assert _mesh.launcher({"OMPI_COMM_WORLD_SIZE": "x"}) is None
