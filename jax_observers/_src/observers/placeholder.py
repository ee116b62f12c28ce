"""Observers that only carry a dtype: ``PlaceholderObserver``, ``NoopObserver``, ``ReuseInputObserver``.

They observe nothing and keep an empty state; ``calculate_qparams`` raises, as in torch. Convert
passes read their config (``dtype``, ``is_dynamic``, ``quant_min`` ...), not their state.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import struct

from jax_observers._src import serialization
from jax_observers._src.base import FLOAT32_EPS, Observer, QScheme, canonical_dtype, check_state
from jax_observers._src.readable import ReadableRepr


class EmptyState(ReadableRepr, struct.PyTreeNode, repr=False):
  """The state of an observer that keeps no statistics (a pytree with no leaves)."""


class _Stateless(Observer):
  def init(self, x=None) -> EmptyState:
    return EmptyState()

  def update(self, state: EmptyState, x=None, *, axis_name=None) -> EmptyState:
    check_state(self, state, EmptyState, "update", {})
    return state


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlaceholderObserver(_Stateless):
  """Records the requested dtype (and, for dynamic quantization, the range) for convert.

  ``compute_dtype`` is accepted for torch compatibility; as in torch it has no effect.

  Examples:
    >>> import jax.numpy as jnp, jax_observers as jo
    >>> jo.PlaceholderObserver(dtype=jnp.float16).dtype
    dtype('float16')
  """

  dtype: Any = jnp.float32
  custom_op_name: str = ""
  compute_dtype: Any = None
  quant_min: int | None = None
  quant_max: int | None = None
  qscheme: QScheme | None = None
  eps: float | None = None
  is_dynamic: bool = False

  def __post_init__(self):
    object.__setattr__(self, "dtype", canonical_dtype(self.dtype))
    if self.qscheme is None:
      object.__setattr__(self, "qscheme", QScheme.PER_TENSOR_AFFINE)
    if not isinstance(self.qscheme, QScheme):
      raise ValueError(f"qscheme={self.qscheme!r} is not a jo.QScheme.")
    if self.eps is None:
      object.__setattr__(self, "eps", FLOAT32_EPS)

  @property
  def quant_range(self) -> tuple[int | None, int | None]:
    """(quant_min, quant_max) as given; a placeholder computes nothing from them."""
    return self.quant_min, self.quant_max


@dataclasses.dataclass(frozen=True, kw_only=True)
class NoopObserver(_Stateless):
  """Passes tensors through; marks an op to be cast to ``dtype`` (float16 by default)."""

  dtype: Any = jnp.float16
  custom_op_name: str = ""

  def __post_init__(self):
    object.__setattr__(self, "dtype", canonical_dtype(self.dtype))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReuseInputObserver(_Stateless):
  """Marks an op whose output reuses its input's observer (reshape, view, ...)."""

  dtype: Any = dataclasses.field(default=jnp.uint8, init=False)

  def __post_init__(self):
    object.__setattr__(self, "dtype", canonical_dtype(self.dtype))


def _empty_to_dict(observer, state) -> dict[str, np.ndarray]:
  return {}


def _empty_from_dict(observer, d, *, strict, example):
  serialization.take(d, (), observer, strict)
  return EmptyState()


serialization.register(_Stateless, _empty_to_dict, _empty_from_dict)
