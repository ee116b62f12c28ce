r"""Per-channel running min/max: ``PerChannelMinMaxObserver`` and its moving-average variant.

For channel :math:`c` along ``ch_axis``: :math:`m_{t,c} = \min(m_{t-1,c}, \min_{i} x_{t,i,c})`, the
min over every other axis (and the moving average of :mod:`minmax` per channel). The channel count
is fixed by ``init``; an input with another count is an error, not a silent broadcast.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax.numpy as jnp

from jax_observers._src import serialization
from jax_observers._src.base import (
  QParams,
  check_state,
  per_channel_affine,
  per_channel_affine_float_qparams,
  per_channel_symmetric,
)
from jax_observers._src.config import normalized_axis
from jax_observers._src.observers import minmax, qparams


@dataclasses.dataclass(frozen=True, kw_only=True)
class PerChannelMinMaxObserver(minmax.MinMaxObserver):
  r"""Running min and max of each channel along ``ch_axis`` (negative values count from the end).

  Examples:
    >>> import jax.numpy as jnp, jax_observers as jo
    >>> obs = jo.PerChannelMinMaxObserver(ch_axis=0, dtype=jnp.int8, qscheme=jo.per_channel_symmetric)
    >>> w = jnp.array([[-1.0, 0.5], [0.25, 2.0]])
    >>> scale, zero_point = obs.calculate_qparams(obs.update(obs.init(w), w))
    >>> [f"{s:.6f}" for s in scale.tolist()], zero_point.tolist()
    (['0.007843', '0.015686'], [0, 0])
  """

  ch_axis: int = 0
  qscheme: object = per_channel_affine

  allowed_qschemes: ClassVar = (
    per_channel_affine,
    per_channel_symmetric,
    per_channel_affine_float_qparams,
  )

  def __post_init__(self):
    super().__post_init__()
    if not isinstance(self.ch_axis, int):
      raise ValueError(f"ch_axis={self.ch_axis!r} must be an int.")
    if self.is_dynamic:
      raise NotImplementedError(f"{type(self).__name__} does not support is_dynamic=True.")

  def channel_axis(self, x) -> int:
    """``ch_axis`` normalised for ``x``, or a ValueError naming both."""
    return normalized_axis(self.ch_axis, jnp.shape(x))

  def state_shape(self, x) -> tuple[int, ...]:
    return (jnp.shape(x)[self.channel_axis(x)],)

  def reduce_axes(self, x) -> tuple[int, ...]:
    axis = self.channel_axis(x)
    return tuple(i for i in range(len(jnp.shape(x))) if i != axis)

  def check_state(self, state: minmax.MinMaxState, x, method: str = "update") -> minmax.MinMaxState:
    """``state`` checked at trace time: a float32 :class:`MinMaxState` with ``x``'s channel count
    (any count when ``x`` is None), or torch's never-observed ``[0]`` buffers (made fresh)."""
    spec = ([(None,)], jnp.float32)
    check_state(self, state, minmax.MinMaxState, method, {"min_val": spec, "max_val": spec})
    shape = jnp.shape(state.min_val)
    if jnp.shape(state.max_val) != shape:
      raise ValueError(
        f"{type(self).__name__}.{method} got min_val of shape {shape} and max_val of shape "
        f"{jnp.shape(state.max_val)}; build the state with init(x)."
      )
    if x is None:
      return state
    expected = self.state_shape(x)
    if shape == (0,):  # torch's never-observed buffers, e.g. from a loaded torch state_dict.
      return minmax.fresh_state(expected)
    if shape != expected:
      raise ValueError(
        f"{type(self).__name__}(ch_axis={self.ch_axis}) has state for {shape} channels but x "
        f"of shape {jnp.shape(x)} has {expected[0]}; build a new state with init(x)."
      )
    return state

  def calculate_qparams(self, state: minmax.MinMaxState) -> QParams:
    """torch's per-channel qparams; a degenerate channel gives ``(1.0, 0)`` (see ``degenerate``)."""
    self.check_state(state, None, "calculate_qparams")
    if jnp.shape(state.min_val) == (0,):
      fresh = minmax.fresh_state((1,))  # torch's [0] buffers: one default entry, (1.0, 0)
      return qparams.calculate_qparams(fresh.min_val, fresh.max_val, self)
    return qparams.calculate_qparams(state.min_val, state.max_val, self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MovingAveragePerChannelMinMaxObserver(minmax.MovingAverage, PerChannelMinMaxObserver):
  r"""Per-channel exponential moving average of the min and max, :math:`m + c(\min x - m)`.

  Examples:
    >>> import jax.numpy as jnp, jax_observers as jo
    >>> obs = jo.MovingAveragePerChannelMinMaxObserver(averaging_constant=0.5, ch_axis=1)
    >>> state = obs.init(jnp.zeros((3, 2)))
    >>> for scale in (1.0, 3.0):
    ...   state = obs.update(state, scale * jnp.array([[-1.0, 0.0], [0.0, 2.0]]))
    >>> state.min_val.tolist(), state.max_val.tolist()
    ([-2.0, 0.0], [0.0, 4.0])
  """


serialization.register(
  PerChannelMinMaxObserver,
  minmax.range_to_dict,
  functools.partial(minmax.range_from_dict, per_channel=True),
)
