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
    name = type(observer).__name__
    arrays = state_dict.take(d, fields, observer, strict)
    values = {k: np.asarray(v, np.float32) for k, v in zip(fields, arrays, strict=True)}
    if example is not None:
      expected = observer.init(example)
      for k, v in values.items():
        if v.shape != np.shape(getattr(expected, k)):
          raise ValueError(
            f"{name} state_dict {k} has shape {v.shape}; inputs like the example need "
            f"{np.shape(getattr(expected, k))}."
          )
    return state_cls(**values)

  state_dict.register(observer_cls, to_dict, from_dict)
