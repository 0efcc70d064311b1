"""Which modules get adapters: `Site`s found in a model, matched against a `LoraConfig`.

A module path is the tuple of module names from the root, which is also the path
of the module's parameters in the `'params'` collection, e.g.
`('encoder', 'layers_0', 'attention', 'query')`. Users write it with `.` (PEFT
style) or `/`; both forms are accepted everywhere.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from jlora.core.config import LoraConfig
from jlora.core.fields import ALL_LINEAR, pattern_lookup

__all__ = [
    "Slot", "Site", "LINEAR_KINDS", "HEAD_NAMES", "KERNEL_KEYS", "LORA_KEYS", "MAGNITUDE_KEY", "TOKENS_KEY", "LAYERS_KEY",
    "leaf_name", "stack_layers", "layer_stack",
    "pair_weight", "kernel_key", "lora_role", "is_pair_key", "is_tokens_key", "tokens_weight", "adapter_path", "is_head", "is_lora_key", "select_sites",
    "selects", "targets_parameter", "targets_slot", "is_saved", "matches", "layer_index", "path_str",
]

# Layer kinds: the linen classes jlora adapts.
LINEAR_KINDS = ("dense", "dense_general", "einsum")
# Names that mark the output head, which `"all-linear"` leaves alone (as PEFT does).
HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "head", "logits_dense")  # logits_dense: MaxText
# Names of a module's main weight (Flax, Haiku, Equinox/PyTorch-style trees), in order of preference.
KERNEL_KEYS = ("kernel", "embedding", "w", "weight")
LORA_KEYS = ("lora_a", "lora_b")
MAGNITUDE_KEY = "lora_magnitude"  # DoRA's trainable magnitude, beside A and B
TOKENS_KEY = "trainable_tokens"  # the trained rows of an embedding (`trainable_token_indices`), beside its table
# The layer mask of an adapter of a scanned stack under `layers_to_transform` (`S` = the stack axes, 1 at the layers
# it adapts, 0 elsewhere): part of the adapter (saved with it), never trained (`jlora.core.stacks`).
LAYERS_KEY = "lora_layers"


def is_head(module: Sequence[str]) -> bool:
  """Whether a module path names an output head (`HEAD_NAMES`), read from its last name (Haiku's `a/b/head` too)."""
  parts = _split(str(module[-1])) if module else ()
  return bool(parts) and parts[-1] in HEAD_NAMES


def adapter_path(module: tuple[str, ...], kernel_name: str) -> tuple[str, ...]:
  """The path an adapter is named by (see `Site.path`): the module's, plus the weight's name if not a main weight."""
  return tuple(module) if kernel_name in KERNEL_KEYS else (*module, kernel_name)


def leaf_name(role: str, kernel_name: str) -> str:
  """The name of a leaf of `role` (`lora_a`, `lora_b`, `lora_magnitude`) for a weight, beside it in its module dict:
  the role itself for a module's main weight (`KERNEL_KEYS`), else `<weight>_<role>`, so that a module holding
  several weights (gemma's FFN dict: `gating_einsum`, `linear`) gets one adapter per weight."""
  return role if kernel_name in KERNEL_KEYS else f"{kernel_name}_{role}"


def pair_weight(key: str) -> str | None:
  """The weight an `A`/`B` leaf name belongs to: None for `lora_a`/`lora_b` (the module's main weight), else the
  name its `<weight>_lora_a` / `_lora_b` prefix gives."""
  return None if key in LORA_KEYS else str(key)[:-len("_lora_a")]


def is_pair_key(key: str) -> bool:
  """Whether a leaf name is an `A` or `B` leaf (`lora_a`, `lora_b`, `<weight>_lora_a`, `<weight>_lora_b`)."""
  return key in LORA_KEYS or str(key).endswith(("_lora_a", "_lora_b"))


def is_tokens_key(key: str) -> bool:
  """Whether a leaf name is a trainable-tokens leaf (`trainable_tokens`, `<weight>_trainable_tokens`)."""
  return str(key) == TOKENS_KEY or str(key).endswith("_" + TOKENS_KEY)


def tokens_weight(key: str) -> str | None:
  """The weight a trainable-tokens leaf belongs to: None for `trainable_tokens` (the module's main weight), else
  the name its `<weight>_trainable_tokens` prefix gives."""
  return None if str(key) == TOKENS_KEY else str(key)[:-len("_" + TOKENS_KEY)]


def is_lora_key(key: str) -> bool:
  """Whether a leaf name is an adapter leaf: `A`, `B`, a DoRA magnitude (`lora_magnitude`, `<w>_lora_magnitude`),
  trainable token rows (`trainable_tokens`, `<w>_trainable_tokens`) or a scanned stack's layer mask (`lora_layers`):
  what `split` keeps as the adapter, `merge` folds and drops, and no base holds."""
  return (is_pair_key(key) or is_tokens_key(key)
          or any(str(key) == role or str(key).endswith("_" + role) for role in (MAGNITUDE_KEY, LAYERS_KEY)))


def lora_role(key: str) -> str:
  """`'lora_a'`, `'lora_b'`, `'lora_magnitude'`, `'trainable_tokens'` or `'lora_layers'`: what an adapter leaf is
  (its `jlora.labels` label), the role whose `leaf_name` it is."""
  key = str(key)
  return next(role for role in (*LORA_KEYS, MAGNITUDE_KEY, TOKENS_KEY, LAYERS_KEY)
              if key == role or key.endswith("_" + role))


def kernel_key(path: tuple[str, ...], node: Mapping) -> str:
  """The name of the weight that `lora_a`/`lora_b` fold into: a `KERNEL_KEYS` name, else the module's only matrix."""
  for key in KERNEL_KEYS:
    if key in node:
      return key
  matrices = [k for k, v in node.items() if not is_lora_key(k) and getattr(v, "ndim", 0) >= 2]
  if len(matrices) == 1:
    return matrices[0]
  raise ValueError(
      f"Module {'/'.join(path)!r} holds lora_a/lora_b but no single weight ({', '.join(KERNEL_KEYS)}) to adapt; "
      "pass the whole params tree (base and adapters), e.g. jlora.combine(trainable, frozen)."
  )


class Slot(NamedTuple):
  """Where one adapter lives in a params tree: the record every part of jlora names an adapter by.

  An adapter's leaves sit beside the weight they adapt, in that weight's module dict, named by role (`leaf_name`):
  `lora_a`, `lora_b`, `lora_magnitude` for a module's main weight (`KERNEL_KEYS`), `<weight>_lora_a`, ... for any
  other. A `Site` (the model's view) gives its `slot`; a tree's adapters are found as slots (`jlora.core.tree.slots`);
  an `Adapter` (its leaves read and checked) and a bank entry hold one.

  Attributes:
    module: the path of the module dict holding the weight and the adapter leaves.
    kernel_name: the weight the adapter folds into (`'kernel'`, `'embedding'`, `'gating_einsum'`, ...); None for
      the module's main weight when the tree at hand holds no weight to name it (the trainable half of `split`).
  """

  module: tuple[str, ...]
  kernel_name: str | None

  @property
  def path(self) -> tuple[str, ...]:
    """The adapter's name (see `Site.path`): the module path, plus the weight's name if not the main weight."""
    return self.module if self.kernel_name is None else adapter_path(self.module, self.kernel_name)

  @property
  def where(self) -> str:
    """`path` as `a/b/c`, for messages and `config.rank_for`."""
    return path_str(self.path)

  def key(self, role: str) -> str:
    """The name of this adapter's leaf of `role` (`lora_a`, `lora_b`, `lora_magnitude`) in its module dict."""
    return role if self.kernel_name is None else leaf_name(role, self.kernel_name)

  def leaf(self, role: str) -> tuple[str, ...]:
    """The full path of this adapter's leaf of `role` in the params tree."""
    return (*self.module, self.key(role))

  def resolve(self, node: Mapping) -> Slot:
    """This slot with `kernel_name` set, read from the module dict `node` that holds the weight (`kernel_key`)."""
    return self if self.kernel_name is not None else self._replace(kernel_name=kernel_key(self.module, node))

  @property
  def a_key(self) -> str:
    return self.key(LORA_KEYS[0])

  @property
  def b_key(self) -> str:
    return self.key(LORA_KEYS[1])

  @property
  def m_key(self) -> str:
    return self.key(MAGNITUDE_KEY)


class Site(NamedTuple):
  """One adaptable module, as seen inside the model (per layer, without scan axes).

  Attributes:
    path: the adapter's path, the name that `target_modules` matches: the
      module path, e.g. `('encoder', 'layers_0', 'query')`, followed by the
      weight's name when it is not the module's main weight (`KERNEL_KEYS`),
      e.g. `('layer_0', 'mlp', 'gating_einsum')`.
    kind: one of `dense`, `dense_general`, `einsum`, `ragged_dot`, `conv`, `embed`, or `parameter` (a weight
      that `target_parameters` names and that no known layer holds: `jlora.core.parameters`).
    kernel_name: the weight's param name: `'kernel'`, `'embedding'` for `nn.Embed`, ...
    kernel_shape: the kernel's shape as the module sees it.
    in_axes: kernel axes contracted with the input (`A` keeps them).
    out_axes: kernel axes that reach the output (`B` keeps them).
    batch_axes: `nn.Einsum` kernel axes shared by input and output (both keep them).
    is_head: the module's output is the model's output, or it has a head name.
    unsupported: why jlora cannot adapt this module ('' when it can).
    groups: `conv`: the convolution's feature groups (`feature_group_count`). With `groups > 1` the adapter is
      PEFT's: `A` a full convolution over all input features, `B` a grouped 1×1 one (`jlora.core.ops`).

  What a forward needs besides (given by the front-end to `jlora.core.adapted.adapted`; unused at init):

  Attributes:
    axis: `dense` / `dense_general`: the input axes of `x` contracted with the kernel's leading axes.
    equation: `einsum`: the equation the layer is called with (`"lhs,kernel->out"`).
    precision: the layer's matmul precision.
    conv: `conv`: the layer's own convolution, `conv(x, w) -> y` for a kernel `w: window + (c, k)` (its
      strides, padding, dilation; no bias; `x`'s features / `c` feature groups), used for `x·A` (DoRA: `x·W0` too).
    group_sizes: `ragged_dot`: the call's group sizes `(E,)` (tokens per expert, sorted by expert).
  """

  path: tuple[str, ...]
  kind: str
  kernel_name: str
  kernel_shape: tuple[int, ...]
  in_axes: tuple[int, ...]
  out_axes: tuple[int, ...]
  batch_axes: tuple[int, ...] = ()
  is_head: bool = False
  unsupported: str = ""
  axis: tuple[int, ...] = (-1,)
  equation: str | None = None
  precision: Any = None
  conv: Callable[[Any, Any], Any] | None = None
  group_sizes: Any = None
  groups: int = 1

  @property
  def module(self) -> tuple[str, ...]:
    """The path of the module dict that holds the weight (and gets the adapter leaves)."""
    return self.path if self.kernel_name in KERNEL_KEYS else self.path[:-1]

  @property
  def slot(self) -> Slot:
    """Where this site's adapter lives in the params tree."""
    return Slot(self.module, self.kernel_name)

  @property
  def broadcast(self) -> bool:
    """Whether the adapters take the broadcast layout (`jlora.core.ops`): an einsum, or a kernel whose input axes do
    not all come before its output axes (e.g. a PyTorch-style `(out, in)` weight)."""
    return self.kind == "einsum" or self.in_axes + self.out_axes != tuple(range(len(self.kernel_shape)))

  @property
  def fan_in(self) -> int:
    """`A`'s input size: the kernel's, or all input features for a grouped convolution (its `A` reads them all)."""
    return math.prod(self.kernel_shape[i] for i in self.in_axes) * self.groups

  @property
  def fan_out(self) -> int:
    return math.prod(self.kernel_shape[i] for i in self.out_axes)


def path_str(path: Sequence[str]) -> str:
  """`('a', 'b')` -> `'a/b'`."""
  return "/".join(str(p) for p in path)


def _split(name: str) -> tuple[str, ...]:
  return tuple(p for p in re.split(r"[./]", name) if p)


@functools.lru_cache(maxsize=4096)
def matches(spec: str | tuple[str, ...] | None, path: tuple[str, ...]) -> bool:
  """Whether a module path is matched by a `target_modules`-style spec.

  A tuple matches when one entry equals the module's name or a trailing part of
  its path (`"q"`, `"attn.q"`, `"attn/q"`); a string is a regex that must match
  the whole path, written with `.` or with `/`.
  """
  if spec is None:
    return False
  path = _split("/".join(str(p) for p in path))  # Haiku keys hold "/" ("block/mlp/linear"); integer keys
  if isinstance(spec, str):
    return any(re.fullmatch(spec, sep.join(path)) for sep in (".", "/"))
  for entry in spec:
    parts = _split(entry)
    if parts and len(parts) <= len(path) and path[-len(parts):] == parts:
      return True
  return False


def layer_index(path: Sequence[str], patterns: Sequence[str] | None = None) -> int | None:
  """The layer index that `layers_to_transform` reads from a module path.

  With `layers_pattern` (e.g. `("layers",)`), a component `layers_3`, `layers3`,
  or `layers` followed by a component `3` gives 3. Without it, the first
  component, other than the module's own name, that is a number or ends in `_N`.
  """
  comps = list(_split("/".join(str(p) for p in path)))  # Haiku keys hold "/"
  if patterns:
    alt = "|".join(re.escape(p) for p in patterns)
    for i, comp in enumerate(comps):
      m = re.fullmatch(rf"(?:{alt})_?(\d+)", comp)
      if m:
        return int(m.group(1))
      if comp in patterns and i + 1 < len(comps) and comps[i + 1].isdigit():
        return int(comps[i + 1])
    return None
  for comp in comps[:-1]:
    m = re.fullmatch(r"(?:.*_)?(\d+)", comp)
    if m:
      return int(m.group(1))
  return None


def _listing(sites: Iterable[Site], limit: int = 40) -> str:
  rows = [f"  {path_str(s.path)}  ({s.kind}{', head' if s.is_head else ''})" for s in sites]
  more = f"\n  ... and {len(rows) - limit} more" if len(rows) > limit else ""
  return "\n".join(rows[:limit]) + more


def _named(config: LoraConfig, path: tuple[str, ...], kind: str, is_head: bool) -> bool:
  """`target_modules` (names, regex, or all-linear without the head) minus `exclude_modules`."""
  if config.target_modules == ALL_LINEAR:
    hit = kind in LINEAR_KINDS and not is_head
  else:
    hit = matches(config.target_modules, path)
  return hit and not matches(config.exclude_modules, path)


def targets_parameter(config: LoraConfig, param: Sequence[str]) -> bool:
  """Whether `config.target_parameters` names the parameter at `param` (its module path, then the leaf's name):
  PEFT's rule, an entry equal to the path or to a trailing part of it (`"experts.w"`, `"moe/experts/w"`)."""
  return bool(config.target_parameters) and matches(config.target_parameters, tuple(str(p) for p in param))


def targets_slot(config: LoraConfig, slot: Slot) -> bool:
  """Whether `target_parameters` names the weight of an adapter's `slot` (a main weight whose name the tree at hand
  does not show, `kernel_name` None, is any of `KERNEL_KEYS`)."""
  names = (slot.kernel_name,) if slot.kernel_name is not None else KERNEL_KEYS
  return any(targets_parameter(config, (*slot.module, n)) for n in names)


def selects(config: LoraConfig, path: tuple[str, ...], kind: str, *, is_head: bool = False,
            param: Sequence[str] | None = None, masked: bool = False) -> bool:
  """Whether `config` adapts the module at `path`: the one rule that `init` and `apply` both use.

  Args:
    config: the LoRA config.
    path: the module path, e.g. `('layers_0', 'attn', 'query')`.
    kind: the layer kind (`dense`, `dense_general`, `einsum`, `conv`, `embed`).
    is_head: whether the module is the output head (`"all-linear"` skips it).
    param: the adapted weight's parameter path (module path, then its name), which `target_parameters` matches.
    masked: the adapter holds a layer mask (`LAYERS_KEY`, a scanned stack under `layers_to_transform`): its layers
      are picked by the mask, so only the names are checked here.
  """
  if param is not None and targets_parameter(config, param):
    return True
  if config.target_modules is None or not _named(config, path, kind, is_head):
    return False
  if config.layers_to_transform is None or (masked and layer_stack(path, config.layers_pattern)):
    return True  # a masked stack's layers are picked by its mask (`stack_layers`)
  return layer_index(path, config.layers_pattern) in config.layers_to_transform


def layer_stack(path: Sequence[str], patterns: Sequence[str] | None = None) -> bool:
  """Whether a stacked module (leading `nn.scan` / `nn.vmap` axes) is a list of layers for `layers_to_transform`: its
  path gives no layer index (`layer_index`), and, with `layers_pattern`, one of its components is the pattern
  itself (`("model", "layers", "self_attn", "q_proj")` for `"layers"`). Its layer index is then the position along
  its first (outermost) stack axis: the scan's iteration, counting from 0 as an unrolled `layers_i` does."""
  if layer_index(path, patterns) is not None:
    return False
  return not patterns or any(c in patterns for c in _split("/".join(str(p) for p in path)))


def stack_layers(config: LoraConfig, path: Sequence[str], stack: Sequence[int]) -> tuple[int, ...] | None:
  """The layers of a stacked module that `config.layers_to_transform` adapts, or None when it picks no layer inside
  the stack (no `layers_to_transform`, no stack, or a path that gives the index: `layer_stack`).

  Args:
    config: the LoRA config.
    path: the module's adapter path.
    stack: the shape of the kernel's leading stack axes, `(L, ...)`; layer `i` is index `i` of axis 0.
  """
  if config.layers_to_transform is None or not stack or not layer_stack(path, config.layers_pattern):
    return None
  return tuple(i for i in sorted(set(config.layers_to_transform)) if i < stack[0])


def is_saved(config: LoraConfig, path: tuple[str, ...]) -> bool:
  """Whether the module at `path` is, or lies inside, a `modules_to_save` module (trained in full, saved)."""
  return bool(config.modules_to_save) and any(matches(config.modules_to_save, path[:i]) for i in range(1, len(path) + 1))


def select_sites(config: LoraConfig, sites: Sequence[Site], stacked: Mapping[tuple[str, ...], tuple[int, ...]], *,
                 masks: str | None = None) -> list[Site]:
  """The sites that `config` adapts, with every user error caught here.

  Args:
    config: the LoRA config.
    sites: every adaptable module found in the model.
    stacked: the shape of the leading scan/vmap axes of each site's kernel (`()` when none).
    masks: who adds the adapters when it cannot honour a layer mask (e.g. `"jlora.nnx.init"`), or None when it can:
      then a stack whose layers `layers_to_transform` picks (`stack_layers`) is chosen when any of its layers is.

  Returns:
    The targeted sites, in model order.

  Raises:
    ValueError: nothing matched (the message lists the adaptable paths), a
      rank exceeds a module's dimensions, `layers_to_transform` finds no layer
      index or asks for a layer no targeted module has (beyond a stack's length),
      it meets a stack and `masks` names a caller without masks, or a module is
      both adapted and saved.
  """
  if not sites:
    raise ValueError(
        "The model has no adaptable layer (nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Conv, nn.Embed, or a class "
        "described with jlora.register_layer) on the inputs given to `jlora.init`. If its layers are classes of "
        "your own, describe them: jlora.register_layer(MyDense, jlora.Layer(weight='kernel', input='x'))."
    )
  if config.target_modules is None and not config.target_parameters:
    raise ValueError(
        "`target_modules` is not set. Name the layers to adapt, e.g. target_modules=[\"query\", \"value\"] "
        f"or \"all-linear\" (or weights by their parameter's name, `target_parameters`). Adaptable modules:\n"
        f"{_listing(sites)}"
    )
  by_param = [s for s in sites if not s.unsupported and targets_parameter(config, (*s.module, s.kernel_name))]
  every, sites = list(sites), [s for s in sites if s.kind != "parameter"]  # `parameter`: only target_parameters
  if config.target_modules is None:
    return _checked(config, by_param)
  named = [s for s in sites if _named(config, s.path, s.kind, s.is_head)]
  if config.target_modules == ALL_LINEAR:  # "every linear layer", less the weights named as parameters
    named = [s for s in named if s not in by_param]
  both = [s for s in named if s in by_param]
  if both:
    raise ValueError(
        f"{path_str(both[0].path)!r} is matched both by `target_modules` and by `target_parameters`; a weight is "
        "adapted once (PEFT refuses the same). Remove it from one of them."
    )
  if config.target_modules == ALL_LINEAR:  # what it cannot adapt, the front-end reports (jlora.core.unadapted)
    named = [s for s in named if not s.unsupported]
  if not named and config.target_modules == ALL_LINEAR and by_param:  # every linear weight is named as a parameter
    return _checked(config, by_param)
  if not named:
    raise ValueError(
        f"`target_modules`={config.target_modules!r} matched no module"
        f"{' (after exclude_modules)' if config.exclude_modules else ''}. Adaptable modules:\n{_listing(sites)}\n"
        "Give names or path suffixes from this list, a regex over the whole path, or \"all-linear\"."
    )
  chosen = named
  if config.layers_to_transform is not None:
    wanted = set(config.layers_to_transform)
    chosen, found, stacks = [], set(), {}
    for s in named:
      stack = tuple(stacked.get(s.path, ()))
      if stack and layer_stack(s.path, config.layers_pattern):
        if masks is not None:
          raise ValueError(
              f"{masks}: `layers_to_transform` cannot pick layers inside the scanned stack at {path_str(s.path)!r} "
              f"(its {stack[0]} layers share one parameter path), and this front-end has no per-layer mask. Adapt "
              "all layers, build the model unrolled, or use the linen front-end (jlora.init), which picks layers "
              "inside nn.scan stacks."
          )
        stacks[path_str(s.path)] = stack[0]
        found.update(range(stack[0]))
        if stack_layers(config, s.path, stack):
          chosen.append(s)
        continue
      if (i := layer_index(s.path, config.layers_pattern)) is not None:
        found.add(i)
      if selects(config, s.path, s.kind, is_head=s.is_head):
        chosen.append(s)
    found = sorted(found)
    if stacks and sorted(wanted - set(found)):
      shown = ", ".join(f"{p!r} (L={n})" for p, n in list(stacks.items())[:4]) + (" …" if len(stacks) > 4 else "")
      raise ValueError(
          f"`layers_to_transform`={sorted(wanted)} asks for layer(s) {sorted(wanted - set(found))}, beyond the "
          f"length L of the scanned stack(s) {shown}: a stack's layers are 0..L-1 along its first axis. Give "
          f"indices below {max(stacks.values())}, or check `layers_pattern`."
      )
    if not chosen:
      raise ValueError(
          f"`layers_to_transform`={list(config.layers_to_transform)} selected no module"
          f" (layers_pattern={config.layers_pattern!r}); layer indices found in the targeted paths: "
          f"{found or 'none'}. Targeted paths:\n{_listing(named)}\n"
          "Set `layers_pattern` to the name of your layer list (e.g. \"layers\" for layers_0, layers_1, ...)."
      )
    absent = sorted(wanted - set(found))
    if absent:
      raise ValueError(
          f"`layers_to_transform`={list(config.layers_to_transform)} asks for layer(s) {absent}, which no targeted "
          f"module has (layer indices found: {found}). Remove them, or check `layers_pattern`."
      )
  return _checked(config, [s for s in every if s in chosen or s in by_param])


def _checked(config: LoraConfig, chosen: list[Site]) -> list[Site]:
  """`chosen`, once each site is adaptable, its rank fits, it is not a `modules_to_save` module too, and no
  `rank_pattern` / `alpha_pattern` key names a target parameter by a path its adapter is not named by."""
  for s in chosen:
    param = path_str((*s.module, s.kernel_name))
    if s.path == s.module and targets_parameter(config, (*s.module, s.kernel_name)):
      for field in ("rank_pattern", "alpha_pattern"):
        for key in getattr(config, field):
          if pattern_lookup({key: 1}, param, 0) and not pattern_lookup({key: 1}, path_str(s.path), 0):
            raise ValueError(
                f"`{field}` key {key!r} names the parameter {param!r}, but jlora names the adapter of a module's "
                f"main weight ({s.kernel_name!r}) by the module's path, {path_str(s.path)!r}, which the key does "
                f"not match (PEFT would apply it); write the key for the module, e.g. {s.path[-1]!r}."
            )
    if s.unsupported:
      raise ValueError(f"Cannot adapt {path_str(s.path)!r} ({s.kind}): {s.unsupported}. Exclude it with `exclude_modules`.")
    r = config.rank_for(path_str(s.path))
    if r > min(s.fan_in, s.fan_out):
      raise ValueError(
          f"`r`={r} is larger than the dimensions of {path_str(s.path)!r} ({s.kind}, kernel {s.kernel_shape}: "
          f"fan-in {s.fan_in}, fan-out {s.fan_out}); use r <= {min(s.fan_in, s.fan_out)} "
          "or a `rank_pattern` entry for this module."
      )
    if s.groups > 1:
      _check_grouped(config, s, r)
    if is_saved(config, s.path):
      raise ValueError(
          f"{path_str(s.path)!r} is both in `target_modules` and in `modules_to_save`; "
          "a module is either adapted or fully trained. Exclude it from one of them."
      )
  return chosen


def _check_grouped(config: LoraConfig, s: Site, r: int) -> None:
  """PEFT's rules for a grouped convolution's adapter (`jlora.core.ops`): a rank divisible by the groups; plain
  LoRA (DoRA's norm needs `A·B` in the grouped kernel's layout, which it does not have) with a drawn init."""
  where, g = path_str(s.path), s.groups
  if r % g:
    fit = max(g, r - r % g)
    raise ValueError(
        f"`r`={r} at {where!r}: this convolution has feature_group_count={g}, and its adapter's B is a grouped 1×1 "
        f"convolution (as in PEFT), so the rank must be divisible by {g}; use r={fit} for it, e.g. "
        f"rank_pattern={{{s.path[-1]!r}: {fit}}}, or exclude it (exclude_modules)."
    )
  if config.use_dora:
    raise ValueError(
        f"DoRA at {where!r}: a grouped convolution's adapter (feature_group_count={g}) reads all input features, so "
        "W0 + s·A·B, whose norm DoRA needs, is not a kernel of the grouped layer (PEFT computes it from mismatched "
        "shapes); exclude the layer (exclude_modules) or use plain LoRA (use_dora=False)."
    )
  method = config.init_lora_weights
  if not any(type(m) is type(method) and m == method for m in _GROUPED_INITS):
    raise ValueError(
        f"init_lora_weights={method!r} is not supported for the grouped convolution at {where!r} "
        f"(feature_group_count={g}): its A and B are not a factorization of the grouped kernel; use True, False or "
        "'gaussian' (PEFT's drawn inits), or exclude the layer (exclude_modules)."
    )


_GROUPED_INITS = (True, False, "gaussian")
