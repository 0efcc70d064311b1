"""EVA, Explained Variance Adaptation (Paischer et al. 2024; PEFT's `init_lora_weights="eva"`): a data-driven init.

Each adapted layer's `A` starts as the top principal components of that layer's
inputs, read over a few batches of the data to be trained on, and `B = 0` (the model
is unchanged at init). The ranks are then redistributed across layers: every layer
may take up to `round(r·rho)` components, and of all layers' components the
`Σ r_l` that explain the largest share of their layer's input variance are kept
(layers whose components explain little get a lower rank, or none).

As in PEFT (`peft.tuners.lora.eva`):

* the components are an incremental PCA of the inputs, one step per batch
  (`(rows, d_in)`: the input's leading axes flattened; token positions that a mask
  leaves out do not count), with the mean and variance updated incrementally;
* a layer's components have converged when each of those its current rank needs
  has a cosine similarity of at least `tau` with the previous step's; the
  batches are cycled until every layer has converged; a layer that has converged
  is no longer updated (unless a redistribution raises its rank);
* layers that receive the same input (e.g. the query, key and value projections)
  share one PCA;
* `whiten` divides each component by the square root of its singular value;
  `adjust_scaling_factors` multiplies a layer's `lora_alpha` by `new_rank / r`;
* layers EVA cannot read (embeddings, convolutions, einsums, `(out, in)`
  weights) keep the config's default draw (`init_lora_weights=True`), with a
  warning naming them; a layer given rank 0 loses its adapter.

Where jlora differs: each step takes the exact SVD (PEFT's `torch.svd_lowrank`
with `q = 2k` is randomized; with `d_in <= 2k` the two agree, which is how the
tests compare them), and the batches are cycled at most `max_steps` times.

The layer inputs are read through the one adapted call (`jlora.core.adapted.OBSERVE`):
a jitted step runs the model's forward with placeholder adapters (`B = 0`, so the
base model's activations) and updates every layer's PCA state inside the same
program, so no activation leaves the device.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jlora.adapters.run import apply
from jlora.core import adapted as _adapted
from jlora.core import ops as _ops
from jlora.core.config import LoraConfig
from jlora.core.fields import EVA_DEFAULTS
from jlora.core.init import init_tree
from jlora.core.targets import Site, path_str
from jlora.core.tree import Params, flatten, has_adapters, slots, unflatten
from jlora.frontends.linen import init

__all__ = ["get_eva_state_dict", "haiku_init_eva", "init_eva"]

Inputs = Callable[[Any], tuple[tuple, dict]]


class _Door(NamedTuple):
  """How EVA reaches a kind of model: `add(key, config, args, kwargs)` gives the params with (placeholder) adapters,
  `run(params, config, args, kwargs)` the model's factored forward."""

  add: Callable[[jax.Array, LoraConfig, tuple, dict], Params]
  run: Callable[[Params, LoraConfig, tuple, dict], Any]


def _linen(model: nn.Module, params: Params, variables, dtype) -> _Door:
  return _Door(lambda key, cfg, a, k: init(key, model, params, cfg, *a, dtype=dtype, variables=variables, **k),
               lambda p, cfg, a, k: apply(model, p, cfg, *a, variables=variables, **k))


class _State(NamedTuple):
  """One layer input's incremental PCA (PEFT's `IncrementalPCA`), `k` components of `d` features."""

  n: jax.Array  # () rows seen
  mean: jax.Array  # (d,)
  var: jax.Array  # (d,)
  components: jax.Array  # (k, d), rows of unit norm, each signed so that its largest entry is positive
  singular: jax.Array  # (k,)
  ratio: jax.Array  # (k,) explained variance ratio
  converged: jax.Array  # (k,) bool: cosine with the previous step's component >= tau


def _fresh(k: int, d: int) -> _State:
  z = jnp.zeros
  return _State(z(()), z((d,)), z((d,)), z((k, d)), z((k,)), z((k,)), z((k,), bool))


def _pca_step(state: _State, x: jax.Array, w: jax.Array, tau: float, active: jax.Array) -> _State:
  """One `IncrementalPCA.partial_fit` over the rows of `x (N, d)` with weights `w (N,)` of 0 or 1.

  A zero row leaves an SVD's singular values and right vectors unchanged, so the rows a mask leaves out are
  zeroed instead of removed (fixed shapes, one compile). Skipped (the state returned) when not `active`, or when
  fewer rows than components count, as PEFT skips such a batch.
  """
  k = state.components.shape[0]
  x = x.astype(jnp.float32)
  w = w.astype(jnp.float32)
  n_new = jnp.sum(w)
  safe = jnp.maximum(n_new, 1.0)
  n, n_total = state.n, state.n + n_new
  new_sum = jnp.sum(x * w[:, None], axis=0)  # exact sums (no reduced-precision matmul on TPU)
  batch_mean = new_sum / safe
  centered = (x - batch_mean) * w[:, None]
  new_var = jnp.sum(centered**2, axis=0)  # unnormalized; the mean of the weighted rows is batch_mean exactly
  started = n > 0
  old_sum = state.mean * n
  spread = (old_sum * (n_new / jnp.maximum(n, 1.0)) - new_sum) ** 2 * (n / jnp.maximum(n_new, 1.0)) / n_total
  var = jnp.where(started, (state.var * n + new_var + spread) / n_total, new_var / n_total)
  mean = (old_sum + new_sum) / n_total
  correction = jnp.sqrt(n / n_total * n_new) * (state.mean - batch_mean)
  stacked = jnp.concatenate([state.singular[:, None] * state.components, centered, correction[None]], axis=0)
  _, s, vt = jnp.linalg.svd(stacked, full_matrices=False)
  rows = jnp.arange(vt.shape[0])
  signs = jnp.sign(vt[rows, jnp.argmax(jnp.abs(vt), axis=1)])  # PEFT's `svd_flip(u_based_decision=False)`
  vt = vt * signs[:, None]
  components, singular = vt[:k], s[:k]
  ratio = singular**2 / jnp.sum(var * n_total)
  cosine = jnp.sum(components * state.components, axis=1) / jnp.maximum(
      jnp.linalg.norm(components, axis=1) * jnp.linalg.norm(state.components, axis=1), 1e-8)
  converged = jnp.where(started, cosine >= tau, state.converged)
  new = _State(n_total, mean, var, components, singular, ratio, converged)
  do = active & (n_new >= k)
  return jax.tree.map(lambda a, b: jnp.where(do, a, b), new, state)


def _eva_input(site: Site, a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> str:
  """'' if EVA can read this call's input as `(rows, d_in)` rows for `A: in_shape + (r,)`, else why not."""
  if site.kind not in ("dense", "dense_general"):
    return f"a {site.kind} layer"
  if _ops.layout(a_shape, b_shape, site.kernel_shape)[0] != "concat":
    return "a kernel whose input axes do not come first (the broadcast adapter layout)"
  return ""


class _Plan(NamedTuple):
  """What the model calls, found by one abstract forward."""

  hooks: dict[str, tuple[int, int]]  # layer path -> (k, d_in): the layers that get a PCA
  aliases: dict[str, str]  # layer path -> the hook path whose input (the same array) it shares
  skipped: dict[str, str]  # adapted layer path -> why EVA cannot read it


def _rows(site: Site, x: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """`(x (N, d_in), w (N,))`: the call's input as rows, and the mask's weight of each row."""
  x2, lead = _ops.as_matrix(site.kind, x, site.axis)
  if x2.ndim == 1:
    x2 = x2[None]
  if mask is None:
    return x2, jnp.ones(x2.shape[:1], jnp.float32)
  if tuple(lead) != tuple(mask.shape):
    raise ValueError(
        f"jlora.init_eva: the layer at {path_str(site.path)!r} is called with an input of shape {tuple(x.shape)}, "
        f"whose leading axes {tuple(lead)} are not the mask's {tuple(mask.shape)} (from `attention_mask` / "
        "`labels`). Pass `mask=` a function giving each batch's mask in the layers' leading shape, or "
        "`mask=lambda batch: None` to count every row."
    )
  return x2, mask.reshape(-1).astype(jnp.float32)


def _default_inputs(batch: Any) -> tuple[tuple, dict]:
  if isinstance(batch, Mapping):
    return (), {k: v for k, v in batch.items() if k != "labels"}
  if isinstance(batch, (tuple, list)):
    return tuple(batch), {}
  return (batch,), {}


def _default_mask(eva: Mapping[str, Any]) -> Callable[[Any], Any]:
  """PEFT's `prepare_model_inputs_fn_language_modeling`: `attention_mask`, and `labels != label_mask_value`."""

  def mask(batch: Any) -> Any:
    if not isinstance(batch, Mapping):
      return None
    out = None
    if batch.get("attention_mask") is not None:
      out = np.asarray(batch["attention_mask"]).astype(bool)
    if eva["use_label_mask"] and batch.get("labels") is not None:
      keep = np.asarray(batch["labels"]) != eva["label_mask_value"]
      out = keep if out is None else out & keep
    return out

  return mask


def _distribution(plan: _Plan, states: Mapping[str, _State], limits: Mapping[str, int], budget: int) -> dict[str, int]:
  """PEFT's rank redistribution: of every layer's first `limits[layer]` explained variance ratios, the `budget`
  largest are kept; a layer's rank is how many of its own were kept (a layer sharing an input with a hook gives
  the hook the larger count, as PEFT does)."""
  owners = {**{h: h for h in plan.hooks}, **plan.aliases}
  keys, values = [], []
  for layer, hook in owners.items():
    ratio = np.asarray(states[hook].ratio)[: limits[hook]]
    keys += [layer] * len(ratio)
    values += list(ratio)
  order = np.argsort(-np.asarray(values, np.float64), kind="stable")
  counts = collections.Counter(keys[i] for i in order[:budget])
  ranks = {layer: counts.get(layer, 0) for layer in owners}
  for layer, hook in plan.aliases.items():
    if ranks[hook] < ranks[layer]:
      ranks[hook], ranks[layer] = ranks[layer], ranks[hook]
  return ranks


def _batches(batches: Any) -> Sequence:
  if not isinstance(batches, Sequence) or isinstance(batches, (str, bytes)):
    raise TypeError(f"jlora.init_eva: `batches` must be a list of batches (EVA cycles through them until the "
                    f"components converge), got {type(batches).__name__}; e.g. "
                    "`list(itertools.islice(loader, 8))`.")
  if not batches:
    raise ValueError("jlora.init_eva: `batches` is empty; give at least one batch of the training data.")
  return batches


def get_eva_state_dict(model: nn.Module, params: Params, config: LoraConfig, batches: Sequence[Any], *,
                       inputs: Inputs | None = None, mask: Callable[[Any], Any] | None = None,
                       variables: Mapping[str, Any] | None = None, max_steps: int = 1000) -> dict[str, jax.Array]:
  """EVA's components per adapted layer, with the ranks it redistributed (PEFT's `get_eva_state_dict`).

  Args:
    model: the linen module.
    params: its base params (no adapters).
    config: the LoRA config (`init_lora_weights="eva"`; `eva_config` as PEFT's `EvaConfig`, defaults where unset).
    batches: a list of batches of the training data, cycled until the components converge.
    inputs: `inputs(batch) -> (args, kwargs)` for the model's `apply`, e.g.
      `lambda b: ((b["input_ids"],), {"deterministic": True})`. Default: a dict's entries but `labels` as keyword
      arguments; a tuple as positional arguments; anything else as the one argument.
    mask: `mask(batch) -> (leading shape) bool or None`: which rows (token positions) count. Default, PEFT's:
      a dict's `attention_mask`, and with `use_label_mask` its `labels != label_mask_value`; None counts every row.
    variables: other collections the model needs (e.g. `{'batch_stats': ...}`).
    max_steps: the most forward passes before a layer that has not converged is an error.

  Returns:
    `{layer path 'a/b/c': components (rank, d_in)}` (PEFT's `lora_A` layout; rank 0 for a layer EVA gives none),
    for every adapted layer EVA reads.

  Raises:
    ValueError: `init_lora_weights` is not `"eva"`; `params` already holds adapters; a layer's `round(r·rho)`
      exceeds its input features; a layer inside `nn.scan` or `nn.remat` (EVA reads each layer's inputs apart);
      a mask that does not fit a layer's input; components that have not converged after `max_steps` batches.
    TypeError: `batches` is not a list.
  """
  _check(config, params, max_steps)
  door = _linen(model, params, variables, jnp.float32)
  return _read(jax.random.PRNGKey(0), door, params, config, batches, inputs, mask, max_steps)[1]


def _check(config: LoraConfig, params: Params, max_steps: Any) -> None:
  if config.init_lora_weights != "eva":
    raise ValueError(f"jlora.init_eva: the config's init_lora_weights is {config.init_lora_weights!r}; EVA runs for "
                     "LoraConfig(init_lora_weights='eva', eva_config=...), as PEFT's initialize_lora_eva_weights.")
  if has_adapters(params):
    raise ValueError("jlora.init_eva: `params` already holds adapters; pass the base params (EVA reads the base "
                     "model's activations and creates the adapters).")
  if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
    raise ValueError(f"jlora.init_eva: `max_steps` must be a positive int, got {max_steps!r}.")


def _read(key, door: _Door, params, config, batches, inputs, mask, max_steps) -> tuple[dict, dict]:
  """`(params with placeholder adapters, EVA's components)`; see `get_eva_state_dict`."""
  batches = _batches(batches)
  eva = dict(config.eva_config or EVA_DEFAULTS)
  inputs = inputs or _default_inputs
  mask = mask or _default_mask(eva)
  args, kwargs = inputs(batches[0])
  placeholder = dataclasses.replace(config, init_lora_weights=True)
  adapted = door.add(key, placeholder, args, kwargs)
  plan = _plan(door, adapted, placeholder, args, kwargs, eva, flatten(params))
  if plan.skipped:
    warnings.warn("jlora.init_eva: these adapted layers keep init_lora_weights=True, since EVA reads only dense "
                  "layers' inputs (as PEFT skips embeddings and convolutions): "
                  + ", ".join(f"{p!r} ({why})" for p, why in plan.skipped.items()), UserWarning, stacklevel=4)
  step = _stepper(door, placeholder, inputs, eva["tau"], plan)
  return adapted, _fit(step, adapted, batches, mask, plan, placeholder, eva, max_steps)


def _plan(door: _Door, adapted: Params, config: LoraConfig, args, kwargs, eva, base_flat) -> _Plan:
  """One abstract forward: which layers are called on which input, and the PCA size of each."""
  calls: list[tuple[Site, Any]] = []

  def record(site: Site, x: jax.Array) -> None:
    calls.append((site, x))  # keeps `x` alive, so no other array reuses its id

  def run(p):
    token = _adapted.OBSERVE.set(record)
    try:
      return door.run(p, config, args, kwargs)
    finally:
      _adapted.OBSERVE.reset(token)

  jax.eval_shape(run, adapted)
  flat = flatten(adapted)
  rho = eva["rho"]
  if rho > 1000:  # PEFT's cap for very large rho
    rho = min(rho, max(max(np.shape(v), default=1) for v in base_flat.values()) // config.r)
  seen: dict[int, str] = {}
  count = collections.Counter(path_str(site.path) for site, _ in calls)
  hooks: dict[str, tuple[int, int]] = {}
  aliases: dict[str, str] = {}
  skipped: dict[str, str] = {}
  for site, x in calls:
    where = path_str(site.path)
    kernel, a = flat[(*site.module, site.kernel_name)], flat[site.slot.leaf("lora_a")]
    if tuple(np.shape(kernel)) != tuple(site.kernel_shape):
      raise ValueError(
          f"jlora.init_eva: the layer at {where!r} runs inside a lifted transform (its kernel is "
          f"{tuple(np.shape(kernel))} in the params, {tuple(site.kernel_shape)} per call: nn.scan or nn.vmap), "
          "whose layers share one call site; EVA reads each layer's inputs apart. Build the model with its "
          "layers unrolled for EVA (jlora.models: scan_layers=False)."
      )
    why = _eva_input(site, np.shape(a), np.shape(flat[site.slot.leaf("lora_b")]))
    if why:
      skipped[where] = why
      continue
    d = math.prod(np.shape(a)[:-1])
    k = round(config.rank_for(where) * rho)
    if k > d:
      raise ValueError(
          f"jlora.init_eva: the layer at {where!r} may take round(r·rho) = {k} components, more than its {d} input "
          "features. Lower `eva_config['rho']`, or its rank with `rank_pattern`."
      )
    if where in hooks or where in aliases:
      continue
    owner = seen.get(id(x))
    if owner is not None and count[where] == 1 and count[owner] == 1:
      aliases[where] = owner
      hooks[owner] = (max(hooks[owner][0], k), d)
      continue
    seen[id(x)] = where
    hooks[where] = (k, d)
  return _Plan(hooks, aliases, {w: why for w, why in skipped.items() if w not in hooks})


def _stepper(door: _Door, config: LoraConfig, inputs: Inputs, tau: float, plan: _Plan) -> Callable:
  """The jitted `step(params, states, active, batch, mask) -> states`: one forward, every PCA updated in it."""

  @jax.jit
  def step(params, states, active, batch, mask):
    new = dict(states)

    def observe(site: Site, x: jax.Array) -> None:
      where = path_str(site.path)
      if where not in new:
        return
      x2, w = _rows(site, x, mask)
      new[where] = _pca_step(new[where], x2, w, tau, active[where])

    args, kwargs = inputs(batch)
    token = _adapted.OBSERVE.set(observe)
    try:
      door.run(params, config, args, kwargs)
    finally:
      _adapted.OBSERVE.reset(token)
    return new

  def checked(*a):
    try:
      return step(*a)
    except jax.errors.UnexpectedTracerError:
      raise ValueError(
          "jlora.init_eva: an adapted layer runs inside nn.remat (or another transform that traces it apart), so "
          "its inputs cannot be read out of it. Build the model without remat for EVA; the params are the same."
      ) from None

  return checked


def _fit(step, adapted: Params, batches: Sequence, mask, plan: _Plan, config: LoraConfig, eva, max_steps: int):
  """PEFT's loop: cycle the batches, stop updating a layer once the components its rank needs have converged,
  redistribute the ranks after each step."""
  states = {h: _fresh(k, d) for h, (k, d) in plan.hooks.items()}
  limits = {h: k for h, (k, _) in plan.hooks.items()}
  budget = sum(config.rank_for(w) for w in (*plan.hooks, *plan.aliases))
  ranks = {**limits, **{a: limits[o] for a, o in plan.aliases.items()}}
  steps = 0
  for batch in _cycle(batches):
    # a layer whose components (as many as its rank now needs) have converged is not updated; a redistribution
    # that raises its rank makes it active again
    done = {h: bool(np.all(np.asarray(states[h].converged)[: ranks[h]])) for h in plan.hooks}
    if all(done.values()):
      break
    if steps == max_steps:
      raise ValueError(_unconverged(states, ranks, plan, eva["tau"], max_steps))
    m = mask(batch)
    active = {h: jnp.asarray(not done[h]) for h in plan.hooks}
    states = step(adapted, states, active, batch, None if m is None else jnp.asarray(m))
    steps += 1
    bad = [h for h, st in states.items() if not bool(jnp.all(jnp.isfinite(st.components)))]
    if bad:
      raise ValueError(f"jlora.init_eva: the EVA components of {bad[:8]} are not finite after batch {steps - 1}: "
                       "their inputs overflow or hold NaN there (a bfloat16 model?). Check the model's outputs on "
                       "that batch, or run EVA in float32.")
    if all(float(s.n) > 0 for s in states.values()):
      ranks = _distribution(plan, states, limits, budget)
  out = {}
  for layer in (*plan.hooks, *plan.aliases):
    hook = plan.aliases.get(layer, layer)
    comps = states[hook].components[: ranks[layer]]
    if eva["whiten"]:
      singular = states[hook].singular[: ranks[layer]]
      if not bool(jnp.all(singular > 0)):
        raise ValueError(f"jlora.init_eva: whiten divides {layer!r}'s components by their singular values, and some "
                         f"of its {ranks[layer]} are 0 (its inputs span fewer directions); use whiten=False, or a "
                         "lower `r` there (rank_pattern).")
      comps = comps / jnp.sqrt(singular)[:, None]
    out[layer] = comps
  return out


def _cycle(batches: Sequence):
  while True:
    yield from batches


def _unconverged(states, ranks, plan: _Plan, tau: float, max_steps: int) -> str:
  rows = []
  for h, s in states.items():
    c = np.asarray(s.converged)[: ranks[h]]
    if not c.all():
      rows.append(f"{h!r} ({int((~c).sum())} of its {ranks[h]} components)")
  return (f"jlora.init_eva: after {max_steps} batches (max_steps) the EVA components of {len(rows)} layer(s) have "
          f"not converged to a cosine similarity of tau={tau}: {', '.join(rows[:8])}. Give more or larger batches, "
          "a lower `eva_config['tau']`, or a larger `max_steps`.")


def init_eva(key: jax.Array, model: nn.Module, params: Params, config: LoraConfig, batches: Sequence[Any] | None = None,
             *, eva_state_dict: Mapping[str, Any] | None = None, inputs: Inputs | None = None,
             mask: Callable[[Any], Any] | None = None, variables: Mapping[str, Any] | None = None,
             dtype: Any = jnp.float32, max_steps: int = 1000) -> tuple[dict, LoraConfig]:
  """Adds EVA-initialised adapters to a linen model's params (PEFT's `initialize_lora_eva_weights`).

  `A` of each dense layer EVA reads is its top principal components (`get_eva_state_dict`), `B = 0`, at the
  rank EVA gave it; the returned config records the ranks (`rank_pattern`), the adjusted alphas
  (`alpha_pattern`) and, when a layer got rank 0, the layers that keep an adapter (`target_modules`), so
  `jlora.apply`, `merge`, `save_peft` and PEFT read the adapter as it is.

  ```python
  config = jlora.LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights="eva")
  params, config = jlora.init_eva(key, model, base, config, batches)  # batches: a list of {"input_ids": ...}
  ```

  Args:
    key: PRNG key for the layers EVA does not read (`init_lora_weights=True` there).
    model, params, config, batches, inputs, mask, variables, max_steps: as for `get_eva_state_dict`; `batches`
      may be left out when `eva_state_dict` is given (then one batch, or `inputs`' example, is still needed to
      trace the model: pass `batches=[example]`).
    eva_state_dict: components computed before (`get_eva_state_dict`), instead of reading `batches`.
    dtype: adapter dtype.

  Returns:
    `(params, config)`: the params with adapters, and the config they were made with.

  Raises:
    ValueError: as `get_eva_state_dict`; an `eva_state_dict` entry for a layer the config does not adapt, or whose
      components do not fit its input features.
  """
  return _init_eva(key, _linen(model, params, variables, dtype), params, config, batches, eva_state_dict, inputs, mask,
                   max_steps)


def _init_eva(key, door: _Door, params, config, batches, eva_state_dict, inputs, mask, max_steps):
  _check(config, params, max_steps)
  if eva_state_dict is None:
    adapted, eva_state_dict = _read(key, door, params, config, batches, inputs, mask, max_steps)
  else:
    args, kwargs = (inputs or _default_inputs)(_batches(batches)[0])
    adapted = door.add(key, dataclasses.replace(config, init_lora_weights=True), args, kwargs)
  return _load(adapted, config, eva_state_dict)


def haiku_init_eva(key: jax.Array, fn: Callable[..., Any], params: Params, config: LoraConfig,
                   batches: Sequence[Any] | None = None, *, eva_state_dict: Mapping[str, Any] | None = None,
                   inputs: Inputs | None = None, mask: Callable[[Any], Any] | None = None, dtype: Any = jnp.float32,
                   max_steps: int = 1000) -> tuple[dict, LoraConfig]:
  """`jlora.init_eva` for a Haiku model (`jlora.haiku.init_eva`): EVA's adapters on its `hk.Linear` layers.

  Args:
    key: PRNG key for the layers EVA does not read.
    fn: `transformed.apply`; EVA runs `jlora.haiku.apply(fn, params, config, None, *args, **kwargs)` (no rng:
      the forward must be deterministic) with `(args, kwargs) = inputs(batch)`.
    params: the Haiku params (no adapters).
    config, batches, eva_state_dict, inputs, mask, dtype, max_steps: as for `jlora.init_eva`.

  Returns:
    `(params, config)`: the params with adapters (as `jlora.init_tree` places them), and their config.
  """
  from jlora.frontends.haiku import apply as haiku_apply  # Haiku is optional: imported only here

  door = _Door(lambda k, cfg, a, kw: init_tree(k, params, cfg, dtype=dtype),
               lambda p, cfg, a, kw: haiku_apply(fn, p, cfg, None, *a, **kw))
  return _init_eva(key, door, params, config, batches, eva_state_dict, inputs, mask, max_steps)


def _load(adapted: Params, config: LoraConfig, state: Mapping[str, Any]) -> tuple[dict, LoraConfig]:
  """PEFT's `_load_eva_state_dict`: each adapter resized to its EVA rank, `A` its components, `B` zero; the config's
  `rank_pattern` / `alpha_pattern` rewritten for every adapter, `target_modules` narrowed when a rank is 0."""
  eva = dict(config.eva_config or EVA_DEFAULTS)
  flat = flatten(adapted)
  state = dict(state)
  ranks, alphas, kept, dropped = {}, {}, [], []
  for slot in slots(adapted):
    where = slot.where
    r, alpha = config.rank_for(where), config.alpha_for(where)
    if where in state:
      comps = jnp.asarray(state.pop(where), jnp.float32)
      a_path, b_path = slot.leaf("lora_a"), slot.leaf("lora_b")
      a, b = flat[a_path], flat[b_path]
      if comps.ndim != 2 or comps.shape[1] != math.prod(a.shape[:-1]):
        raise ValueError(f"jlora.init_eva: `eva_state_dict[{where!r}]` has shape {tuple(comps.shape)}; the layer's "
                         f"A {tuple(a.shape)} needs (rank, {math.prod(a.shape[:-1])}).")
      new = comps.shape[0]
      if new == 0:
        for role in ("lora_a", "lora_b", "lora_magnitude"):
          flat.pop(slot.leaf(role), None)
        dropped.append(where)
        continue
      if new != r and eva["adjust_scaling_factors"]:
        alpha = alpha * new / r
      flat[a_path] = comps.T.reshape(a.shape[:-1] + (new,)).astype(a.dtype)
      flat[b_path] = jnp.zeros((new,) + b.shape[1:], b.dtype)
      r = new
    kept.append(where)
    if r != config.r:
      ranks[where] = r
    if alpha != config.lora_alpha:
      alphas[where] = alpha
  if state:
    raise ValueError(f"jlora.init_eva: `eva_state_dict` names layers the config does not adapt: {sorted(state)}; "
                     f"it adapts {kept + dropped}.")
  changes: dict[str, Any] = {"rank_pattern": ranks, "alpha_pattern": alphas}
  if dropped:
    changes.update(target_modules=tuple(kept), exclude_modules=None, layers_to_transform=None, layers_pattern=None)
  out = dataclasses.replace(config, **changes)
  for where in kept:  # a pattern key is matched against the end of a path: check every adapter reads its own
    if out.rank_for(where) != ranks.get(where, config.r) or out.alpha_for(where) != alphas.get(where, config.lora_alpha):
      raise ValueError(f"jlora.init_eva: the rewritten rank_pattern / alpha_pattern does not give {where!r} its EVA "
                       "rank (a key that is the end of another path); rename the module or give its rank there.")
  return unflatten(flat), out

