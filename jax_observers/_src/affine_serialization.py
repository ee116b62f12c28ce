"""``state_dict`` support for observers whose state is a few named float32 arrays.

torchao's affine observers keep ``min_val``/``max_val`` as plain attributes, outside
``state_dict()``; ours are exported under those names (and ``amax``, ``amax_history``, ``scale``),
shaped like the state, so a calibration can be saved and loaded as NumPy arrays.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jax_observers._src import state_dict


def register_arrays(observer_cls: type, state_cls: type, fields: Sequence[str]) -> None:
  """Registers ``observer_cls``: its state is ``state_cls(**{field: float32 array})``."""
  fields = tuple(fields)

  def to_dict(observer, state) -> dict[str, np.ndarray]:
    return {name: np.array(getattr(state, name), np.float32) for name in fields}

  def from_dict(observer, d, *, strict: bool, example):
    arrays = state_dict.take(d, fields, observer, strict)
    values = {k: state_dict.checked(observer, k, v) for k, v in zip(fields, arrays, strict=True)}
    for k, v in values.items():
      if np.isnan(v).any():  # NaN never enters these states; a NaN value is a corrupt one.
        state_dict.refuse(observer, k, v, "NaN, which no update of this observer produces")
    if "min_val" in values and "max_val" in values:
      values["min_val"], values["max_val"] = state_dict.running_range(
        observer, values["min_val"], values["max_val"], strict=strict, shapes=None
      )
    if example is not None:
      expected = observer.init(example)
      for k, v in values.items():
        if v.shape != np.shape(getattr(expected, k)):
          state_dict.refuse(
            observer, k, v, f"inputs like the example need shape {np.shape(getattr(expected, k))}"
          )
    return state_cls(**values)

  state_dict.register(observer_cls, to_dict, from_dict)
