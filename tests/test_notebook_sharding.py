"""`notebooks/sharding.ipynb`: jlora on a (data, fsdp, tensor) = (2, 2, 2) mesh of 8 virtual CPU devices.

The notebook is committed with the outputs of a normal run; the test checks them, then re-executes it with
`JLORA_NOTEBOOK_QUICK=1` (fewer training steps) and checks the numbers it prints. The expected specs are written
out by hand from the rule (A keeps the kernel's input-axis specs, B its output-axis specs, r replicated), not
derived from the code under test.
"""

import pathlib
import re

from tests import notebooks

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "sharding.ipynb"

# path -> (kernel spec, lora_a spec, lora_b spec) on the (2, 2, 2) mesh under models.DEFAULT_RULES (jlora's
# specs drop trailing None entries, the form jitted functions return)
RULE = {
  "model/embed_tokens/embedding": ("P('tensor', 'fsdp')", "P('tensor',)", "P(None, 'fsdp')"),
  "model/layers/self_attn/q_proj/kernel": ("P(None, 'fsdp', 'tensor')", "P(None, 'fsdp')",
                                           "P(None, None, 'tensor')"),
  "model/layers/self_attn/o_proj/kernel": ("P(None, 'tensor', 'fsdp')", "P(None, 'tensor')",
                                           "P(None, None, 'fsdp')"),
  "model/layers/mlp/up_proj/kernel": ("P(None, 'fsdp', 'tensor')", "P(None, 'fsdp')", "P(None, None, 'tensor')"),
  "model/layers/mlp/down_proj/kernel": ("P(None, 'tensor', 'fsdp')", "P(None, 'tensor')",
                                        "P(None, None, 'fsdp')"),
}
# path -> (logical axes, mesh spec) of base parameters
LOGICAL = {
  "model/embed_tokens/embedding": ("P('vocab', 'embed')", "P('tensor', 'fsdp')"),
  "model/layers/self_attn/q_proj/kernel": ("P('layers', 'embed', 'heads')", "P(None, 'fsdp', 'tensor')"),
  "model/layers/mlp/down_proj/kernel": ("P('layers', 'mlp', 'embed')", "P(None, 'tensor', 'fsdp')"),
  "lm_head/kernel": ("P('embed', 'vocab')", "P('fsdp', 'tensor')"),
}
SPEC = r"(P\([^)]*\))"


def _outputs(nb) -> str:
  return "\n".join(out.get("text", "") + str(out.get("data", {}).get("text/plain", ""))
                   for cell in nb.cells for out in cell.get("outputs", []))


def _one(pattern: str, text: str) -> tuple[str, ...]:
  found = re.findall(pattern, text, re.M)
  assert len(found) == 1, (pattern, found)
  return found[0] if isinstance(found[0], tuple) else (found[0],)


def _num(text: str) -> float:
  return float(text.replace(",", ""))


def _check(text: str, quick: bool) -> None:
  assert "8 devices: [CpuDevice(id=0)" in text and f"| quick run: {quick}" in text, text[:500]

  # 1. Base parameters: logical axes and mesh specs; each device holds about a quarter of the base.
  for path, (logical, spec) in LOGICAL.items():
    assert _one(rf"^{re.escape(path)} +\([\d, ]+\) +{SPEC} +{SPEC}$", text) == (logical, spec), path
  whole, low, high = map(_num, _one(r"^base: ([\d,]+) bytes in all; per device ([\d,]+) to ([\d,]+) bytes", text))
  assert whole / 4 <= low <= high < 0.3 * whole, (whole, low, high)

  # 2. The rule, per adapted weight; no adapter replicated.
  for path, specs in RULE.items():
    assert _one(rf"^{re.escape(path)} +{SPEC} +{SPEC} +{SPEC}$", text) == specs, path
  assert "fully replicated leaves: 0" in text

  # 3. Training: the loss goes down; the sharded SGD step equals the one-device step; Adam's first step is looser
  #    but bounded (each update is at most lr = 1e-2 in size).
  steps = [(int(s), float(v)) for s, v in re.findall(r"^step +(\d+) +loss ([\d.]+)$", text, re.M)]
  n = 12 if quick else 30
  assert [s for s, _ in steps] == sorted({*range(0, n, 5), n - 1}), steps
  first, last = map(float, _one(r"^loss decreased: True \(([\d.]+) -> ([\d.]+)\)$", text))
  assert (first, last) == (steps[0][1], steps[-1][1]), steps
  assert first > 4 and last < 0.5 * first, steps  # from about chance (ln 256 = 5.5) to under half of it
  assert "Adam moments sharded like their adapters: True" in text
  mesh_loss, one_loss = map(float, _one(r"^loss: ([\d.]+) on the mesh, ([\d.]+) on one device$", text))
  assert abs(mesh_loss - one_loss) <= 2e-6
  (sgd,) = _one(r"^max \|sharded step - one-device step\| \(sgd, adapters, momentum, loss\) = (\S+)$", text)
  assert float(sgd) <= 1e-5, sgd
  (adam,) = _one(r"^max \|sharded step - one-device step\| \(adam, first step\) += (\S+)$", text)
  assert float(adam) < 2e-2, adam
  assert "updated q_proj lora_b: P(None, None, 'tensor') on the mesh, on {CpuDevice(id=0)} alone" in text

  # 4. Collectives: the LoRA step's reductions beyond the frozen base's are adapter-sized; full fine-tuning's more.
  table = {name: [_num(v) for v in values] for name, *values in
           re.findall(r"^(LoRA step|full fine-tuning|frozen base alone) +([\d,]+) +([\d,]+) +([\d,]+) +([\d,]+) "
                      r"+([\d,]+)$", text, re.M)}
  assert list(table) == ["LoRA step", "full fine-tuning", "frozen base alone"], table
  assert table["frozen base alone"][0] > 0 and table["frozen base alone"][1] > 0  # FSDP gathers, tensor reduces
  lora, full = map(_num, _one(r"^gradient reductions beyond the frozen base: LoRA ([\d,]+) bytes, full fine-tuning "
                              r"([\d,]+) bytes$", text))
  adapter, base = map(_num, _one(r"^adapter bytes ([\d,]+), base bytes ([\d,]+)$", text))
  assert base == whole and 0 < lora <= 1.1 * adapter and full > 3 * lora, (lora, full, adapter)
  reduced = {name: values[1] + values[2] for name, values in table.items()}  # all-reduce + reduce-scatter
  assert reduced["LoRA step"] - reduced["frozen base alone"] == lora, (reduced, lora)
  assert reduced["full fine-tuning"] - reduced["frozen base alone"] == full, (reduced, full)

  # 5. Merge: no collective at all in the compiled merge; kernels keep their specs; same outputs.
  assert "collectives in the compiled merge: [] | all-gathers: 0" in text
  for path, (kernel, _, _) in RULE.items():
    assert _one(rf"^{re.escape(path)} +{SPEC} +-> {SPEC}$", text) == (kernel, kernel), path
  assert "every merged kernel keeps its sharding: True" in text
  (diff,) = _one(r"^max \|merged model - model with adapters\| \(logits\) = (\S+)$", text)
  assert float(diff) <= 1e-4, diff

  # 6. Saved on (2, 2, 2), loaded onto (4, 2, 1) by the rule and onto one device, with equal values.
  assert ("mesh (4, 2, 1): q_proj kernel P(None, 'fsdp', 'tensor') | lora_a P(None, 'fsdp'), "
          "lora_b P(None, None, 'tensor')") in text
  assert ("one device: q_proj kernel on {CpuDevice(id=0)} | lora_a on {CpuDevice(id=0)}, "
          "lora_b on {CpuDevice(id=0)}") in text
  assert text.count("values equal to the trained adapters: True | config equal: True") == 2

  _one(rf"^whole notebook: (\d+)s wall, \d+s CPU \(quick run: {quick}\)$", text)


def test_sharding_notebook_is_committed_executed_and_still_runs(monkeypatch):
  nb = notebooks.committed(NOTEBOOK)
  stderr = [out["text"] for cell in nb.cells for out in cell.get("outputs", []) if out.get("name") == "stderr"]
  assert not stderr, stderr  # the committed outputs read cleanly
  committed = _outputs(nb)
  _check(committed, quick=False)
  (wall,) = _one(r"^whole notebook: (\d+)s wall", committed)
  assert int(wall) < 90, "the committed run should take under 90 s on 2 CPU cores"

  notebooks.rerun_quick(nb, monkeypatch)
  _check(_outputs(nb), quick=True)
