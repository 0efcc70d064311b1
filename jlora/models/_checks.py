"""Index checks at the model boundary: token ids, segment ids and positions against their tables.

An embedding lookup with an index outside its table gives NaN (or a clamped, wrong row)
instead of an error. The models check their integer inputs when the values are known,
i.e. **outside `jax.jit`** (eager `model.apply`, `jlora.apply`, before `generate`'s loop).
Inside `jit`, `grad` or `jax.eval_shape` the inputs are tracers and their values are not
checked (no `checkify`): that costs nothing and keeps `jlora.init` abstract. Sequence
lengths are static shapes, so a sequence longer than a learned position table is
refused inside `jit` too.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

__all__ = ["Limit", "check_length", "check_values", "is_concrete"]

_FIX = {
  "input_ids": "The ids come from another tokenizer or vocabulary: encode text with this checkpoint's tokenizer "
  "(`models.Tokenizer.from_pretrained(path)`).",
  "decoder_input_ids": "Build them from labels with `jlora.models.t5.shift_right(labels, model.config)`, which "
  "replaces -100 by the pad id, and encode text with this checkpoint's tokenizer.",
  "token_type_ids": "Segment ids count from 0 (0 for the first sentence, 1 for the second).",
  "positions": "Positions count from 0 and must stay inside the learned table: shorten the input "
  "(`Tokenizer.encode(..., max_length=...)`) or, with `generate`, lower `max_new_tokens`.",
}


class Limit(NamedTuple):
  """Valid values of an integer input are `0 .. size - 1`; `field` is the config field that sets `size`."""

  size: int
  field: str


def is_concrete(value: Any) -> bool:
  """Whether `value` holds known values: not None and not a tracer (inside jit, grad, eval_shape)."""
  return value is not None and not isinstance(value, jax.core.Tracer)


def check_values(owner: str, arg: str, value: Any, limit: Limit) -> None:
  """Raises when a concrete integer array holds an entry outside `[0, limit.size)`; tracers pass unchecked.

  Args:
    owner: the model's class name, for the message.
    arg: the argument `value` came from.
    value: an integer array of any shape, or None.
    limit: the valid range.

  Raises:
    ValueError: naming `arg`, the first offending value and its index, the limit and the fix.
  """
  if not is_concrete(value):
    return
  arr = np.asarray(value)
  bad = (arr < 0) | (arr >= limit.size)
  if not bad.any():
    return
  where = tuple(int(i) for i in np.argwhere(bad)[0])
  raise ValueError(
    f"`{arg}` holds {int(arr[where])} at index {list(where)}, but {owner} takes `{arg}` in 0..{limit.size - 1} "
    f"(`{limit.field}={limit.size}` in its config); an index outside its table gives NaN or garbage, not an "
    f"error. {_FIX.get(arg, '')}".rstrip()
  )


def check_length(owner: str, arg: str, length: Any, limit: Limit) -> None:
  """Raises when `length` positions (0 .. length-1) do not fit a learned position table of `limit.size`.

  Args:
    owner: the model's class name, for the message.
    arg: the argument whose length is checked.
    length: an int, or a scalar array (checked only when concrete).
    limit: the position table.

  Raises:
    ValueError: naming `arg`, the length, the table size and the fix.
  """
  if not is_concrete(length) or int(length) <= limit.size:
    return
  raise ValueError(
    f"`{arg}` needs positions 0..{int(length) - 1}, but {owner} has learned positions 0..{limit.size - 1} only "
    f"(`{limit.field}={limit.size}` in its config). Truncate the input to at most {limit.size} tokens "
    f"(`Tokenizer.encode(..., max_length={limit.size})`)."
  )
