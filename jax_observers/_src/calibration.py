"""The calibration loop shared by ``jo.linen.calibrate`` and ``jo.nnx.calibrate``."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from jax_observers._src import progress as progress_lib
from jax_observers._src import stacked


def run(
  step: Callable[[tuple], None],
  batches: Iterable,
  *,
  states: Callable[[], object],
  progress: bool | str,
  name: str,
  disable_hint: str,
) -> None:
  """Calls ``step(args)`` for every batch (a tuple is the positional arguments, else one).

  Args:
    step: runs one jitted calibration step and keeps its result.
    batches: the inputs.
    states: the observer states now (called before and after the loop).
    progress: draw a progress bar on stderr (a string: with that label).
    name: the model's name, for the default label.
    disable_hint: the call that disables observers, named in the error.

  Raises:
    ValueError: no batches, or no observer state changed.
  """
  before = states()
  label = progress if isinstance(progress, str) else f"calibrating {name}"
  seen = 0
  for batch in progress_lib.bar(batches, label) if progress else batches:
    step(batch if isinstance(batch, tuple) else (batch,))
    seen += 1
  if not seen:
    raise ValueError("calibrate got no batches.")
  if stacked.trees_equal(before, states()):
    raise ValueError(
      f"calibrate ran {seen} batches but no observer state changed: are the observers disabled "
      f"({disable_hint}) or in quantize mode, or every batch empty or NaN?"
    )
