"""``FixedQParamsObserver``: quantization parameters fixed at construction (sigmoid, tanh, ...)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jax_observers._src import serialization
from jax_observers._src.base import (
  Observer,
  QParams,
  QScheme,
  UniformGrid,
  canonical_dtype,
  check_state,
  per_tensor_affine,
  python_scalars,
)
from jax_observers._src.readable import ReadableRepr


class FixedQParamsState(ReadableRepr, struct.PyTreeNode, repr=False):
  """torch keeps the fixed parameters as buffers; so do we (they travel in state dicts)."""

  scale: jax.Array  # shape (), float32.
  zero_point: jax.Array  # shape (), int32.


@dataclasses.dataclass(frozen=True, kw_only=True)
class FixedQParamsObserver(UniformGrid, Observer):
  """Passes tensors through and always reports ``(scale, zero_point)``.

  Examples:
    >>> import jax.numpy as jnp, jax_observers as jo
    >>> obs = jo.FixedQParamsObserver(scale=1.0 / 256.0, zero_point=0)
    >>> state = obs.update(obs.init(jnp.zeros(3)), jnp.array([5.0, -5.0, 0.1]))
    >>> float(obs.calculate_qparams(state).scale), int(obs.calculate_qparams(state).zero_point)
    (0.00390625, 0)
  """

  scale: float
  zero_point: int
  dtype: Any = jnp.uint8
  qscheme: QScheme = per_tensor_affine
  quant_min: int = 0
  quant_max: int = 255
  is_dynamic: bool = False

  def __post_init__(self):
    python_scalars(self)
    object.__setattr__(self, "dtype", canonical_dtype(self.dtype))
    if not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale):
      raise ValueError(f"scale={self.scale!r} must be a finite number.")
    if isinstance(self.zero_point, bool) or not isinstance(self.zero_point, int):
      raise ValueError(f"zero_point={self.zero_point!r} must be an int.")
    if not isinstance(self.qscheme, QScheme):
      raise ValueError(f"qscheme={self.qscheme!r} is not a jo.QScheme.")
    if self.is_dynamic:
      raise NotImplementedError("FixedQParamsObserver does not support is_dynamic=True.")

  @property
  def quant_range(self) -> tuple[int, int]:
    return self.quant_min, self.quant_max

  def init(self, x=None) -> FixedQParamsState:
    return FixedQParamsState(
      scale=jnp.asarray(self.scale, jnp.float32), zero_point=jnp.asarray(self.zero_point, jnp.int32)
    )

  def update(self, state: FixedQParamsState, x=None, *, axis_name=None) -> FixedQParamsState:
    self._check(state, "update")
    return state

  def _check(self, state, method: str) -> None:
    fields = {"scale": ((), jnp.float32), "zero_point": ((), jnp.int32)}
    check_state(self, state, FixedQParamsState, method, fields)

  def calculate_qparams(self, state: FixedQParamsState) -> QParams:
    self._check(state, "calculate_qparams")
    return QParams(scale=state.scale, zero_point=state.zero_point)


def _fixed_to_dict(observer, state) -> dict[str, np.ndarray]:
  return {
    "scale": np.array(state.scale, np.float32).reshape(1),
    "zero_point": np.array(state.zero_point, np.int32).reshape(1),
  }


def _fixed_from_dict(observer, d, *, strict, example):
  scale, zero_point = serialization.take(d, ("scale", "zero_point"), observer, strict)
  scale = serialization.checked(observer, "scale", scale, shapes=[(1,), ()], finite=True)
  zero_point = serialization.checked(
    observer, "zero_point", zero_point, kind="int", shapes=[(1,), ()]
  )
  return FixedQParamsState(scale=scale.reshape(()), zero_point=zero_point.reshape(()))


serialization.register(FixedQParamsObserver, _fixed_to_dict, _fixed_from_dict)
