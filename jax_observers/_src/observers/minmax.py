r"""Per-tensor running min/max observers: ``MinMaxObserver`` and ``MovingAverageMinMaxObserver``.

.. math::
   m_t = \min(m_{t-1}, \min x_t), \qquad M_t = \max(M_{t-1}, \max x_t)

and, for the moving average with :math:`c` = ``averaging_constant`` (three float32 roundings, as torch):

.. math::
   m_t = m_{t-1} + c\,(\min x_t - m_{t-1}), \qquad m_0 = \min x_0 .
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jax_observers._src import numerics, serialization
from jax_observers._src.base import (
  QParams,
  UniformObserver,
  check_state,
  per_tensor_affine,
  per_tensor_symmetric,
)
from jax_observers._src.config import float_input
from jax_observers._src.observers import qparams
from jax_observers._src.readable import ReadableRepr
from jax_observers._src.stats import batch_min_max


class MinMaxState(ReadableRepr, struct.PyTreeNode, repr=False):
  """Running range; the field names are torch's buffer names."""

  min_val: jax.Array  # shape () or (C,), float32; +inf before any update.
  max_val: jax.Array  # like min_val; -inf before any update.


def fresh_state(shape) -> MinMaxState:
  return MinMaxState(
    min_val=jnp.full(shape, jnp.inf, jnp.float32), max_val=jnp.full(shape, -jnp.inf, jnp.float32)
  )


def check_averaging_constant(c):
  """``c`` (a Python or NumPy number) as a Python number in [0, 1], else a ValueError naming it."""
  if isinstance(c, (np.integer, np.floating)):
    c = c.item()
  if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 <= c <= 1:
    raise ValueError(f"averaging_constant={c!r} must be a number in [0, 1].")
  return c


def moving_average(state: MinMaxState, lo, hi, averaging_constant: float) -> MinMaxState:
  r"""``m + c * (x - m)`` per element, torch's rounding; a batch with no values changes nothing.

  The step never leaves a valid range (the rule for degenerate states, README "Non-finite inputs"):

  * a running value that is not finite (fresh, or after an inf batch) is replaced by the batch
    value, as torch's fused kernel does (torch's Python observer would turn it into NaN forever);
  * a step that would be NaN (``c = 0`` and an infinite batch value: ``0 * inf``) keeps the running
    value, the limit of the exact arithmetic (torch: NaN);
  * a step that would invert the range (``min_val > max_val``, from float32 cancellation, e.g.
    ``c = 1`` after a batch at -1e30, or from a restart) takes the batch's own range ``[lo, hi]``
    (torch keeps the inverted range, and its ``calculate_qparams`` then asserts).

  Everywhere else the result is torch's, bit for bit.
  """
  c = np.float32(averaging_constant)

  def step(running, current):
    averaged = running + numerics.rounded(c * (current - running))
    averaged = jnp.where(jnp.isnan(averaged), running, averaged)
    return jnp.where(jnp.isfinite(running), averaged, current)

  seen = lo <= hi
  new_min, new_max = step(state.min_val, lo), step(state.max_val, hi)
  inverted = new_min > new_max
  new_min, new_max = jnp.where(inverted, lo, new_min), jnp.where(inverted, hi, new_max)
  return MinMaxState(
    min_val=jnp.where(seen, new_min, state.min_val),
    max_val=jnp.where(seen, new_max, state.max_val),
  )


@dataclasses.dataclass(frozen=True, kw_only=True)
class MinMaxObserver(UniformObserver):
  r"""Running min and max of everything observed: :math:`m_t = \min(m_{t-1}, \min x_t)`.

  Args:
    dtype: quantized dtype (``jnp.uint8`` for torch.quint8, ``jnp.int8`` for qint8, ...).
    qscheme: ``jo.per_tensor_affine`` or ``jo.per_tensor_symmetric``.
    reduce_range: halve the default quantized range (torch's x86 overflow guard).
    quant_min, quant_max: a custom quantized range (both or neither, as torch).
    eps: smallest scale.
    ignore_nonfinite: skip +-inf as well as NaN (NaN is always skipped).

  Examples:
    >>> import jax, jax.numpy as jnp, jax_observers as jo
    >>> obs = jo.MinMaxObserver()
    >>> x = jnp.array([-1.0, 2.0])
    >>> state = jax.jit(obs.update)(obs.init(x), x)
    >>> scale, zero_point = obs.calculate_qparams(state)
    >>> print(f"{float(scale):.8f}", int(zero_point))
    0.01176471 85
  """

  allowed_qschemes: ClassVar = (per_tensor_affine, per_tensor_symmetric)

  def state_shape(self, x) -> tuple[int, ...]:
    """The shape of ``min_val``/``max_val`` for inputs like ``x``."""
    return ()

  def reduce_axes(self, x) -> tuple[int, ...] | None:
    return None

  def init(self, x) -> MinMaxState:
    float_input(x, self)
    return fresh_state(self.state_shape(x))

  def update(self, state: MinMaxState, x, *, axis_name=None) -> MinMaxState:
    """Observes ``x``; with ``axis_name``, the global batch across that mapped axis."""
    x = float_input(x, self)
    state = self.check_state(state, x)
    if x.size == 0:
      return state
    lo, hi = batch_min_max(
      x, self.reduce_axes(x), ignore_nonfinite=self.ignore_nonfinite, axis_name=axis_name
    )
    return self.accumulate(state, lo, hi)

  def check_state(self, state: MinMaxState, x, method: str = "update") -> MinMaxState:
    """``state`` if it is a float32 :class:`MinMaxState` of this observer's shape (trace time)."""
    shape = () if x is None else self.state_shape(x)
    spec = (shape, jnp.float32)
    check_state(self, state, MinMaxState, method, {"min_val": spec, "max_val": spec})
    return state

  def accumulate(self, state: MinMaxState, lo, hi) -> MinMaxState:
    return MinMaxState(
      min_val=jnp.minimum(state.min_val, lo), max_val=jnp.maximum(state.max_val, hi)
    )

  def calculate_qparams(self, state: MinMaxState) -> QParams:
    """torch's ``calculate_qparams``; a degenerate range gives ``(1.0, 0)`` (see ``degenerate``)."""
    self.check_state(state, None, "calculate_qparams")
    return qparams.calculate_qparams(state.min_val, state.max_val, self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MovingAverage:
  r"""What makes a min/max observer a moving average: :math:`m_t = m + c(\min x_t - m)`.

  Mixed into a running min/max observer (per tensor or per channel), it replaces the running
  min/max ``accumulate`` by the exponential moving average of the batch ranges, so "is a moving
  average" and "is per channel" are two independent facts about a class.

  Args:
    averaging_constant: ``c`` in [0, 1]; 1 keeps only the last batch, 0 only the first.
  """

  averaging_constant: float = 0.01

  def __post_init__(self):
    super().__post_init__()
    c = check_averaging_constant(self.averaging_constant)
    if self.is_dynamic and c != 1:
      raise NotImplementedError(
        f"is_dynamic=True needs averaging_constant=1, got averaging_constant={c}."
      )

  def accumulate(self, state: MinMaxState, lo, hi) -> MinMaxState:
    return moving_average(state, lo, hi, self.averaging_constant)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MovingAverageMinMaxObserver(MovingAverage, MinMaxObserver):
  r"""Exponential moving average of the batch min and max, :math:`m_t = m + c(\min x_t - m)`.

  Args:
    averaging_constant: ``c`` in [0, 1]; 1 keeps only the last batch, 0 only the first.
    **kwargs: as :class:`MinMaxObserver`.

  Examples:
    >>> import jax.numpy as jnp, jax_observers as jo
    >>> obs = jo.MovingAverageMinMaxObserver(averaging_constant=0.5)
    >>> state = obs.init(jnp.zeros(2))
    >>> for batch in ([-1.0, 2.0], [0.0, 4.0]):
    ...   state = obs.update(state, jnp.array(batch))
    >>> float(state.min_val), float(state.max_val)
    (-0.5, 3.0)
  """


def range_to_dict(observer, state) -> dict[str, np.ndarray]:
  min_val = np.array(state.min_val, np.float32)
  max_val = np.array(state.max_val, np.float32)
  fresh = min_val.ndim == 1 and np.all(min_val == np.inf) and np.all(max_val == -np.inf)
  if fresh:  # torch's per-channel observers start from empty [0] buffers.
    min_val, max_val = np.zeros(0, np.float32), np.zeros(0, np.float32)
  return {"eps": np.array([observer.eps], np.float32), "min_val": min_val, "max_val": max_val}


def range_from_dict(observer, d, *, strict, example, per_channel: bool = False):
  """A :class:`MinMaxState` from torch's ``eps``/``min_val``/``max_val`` (``[]`` or ``[C]``)."""
  eps, min_val, max_val = serialization.take(d, ("eps", "min_val", "max_val"), observer, strict)
  serialization.check_eps(eps, observer, strict)
  if per_channel and min_val.ndim != 1:
    serialization.refuse(observer, "min_val", min_val, "expected shape [C] (or torch's empty [0])")
  shapes = [min_val.shape] if per_channel else [(), (1,)]
  min_val, max_val = serialization.running_range(
    observer, min_val, max_val, strict=strict, shapes=shapes
  )
  shape = min_val.shape if per_channel else ()
  return MinMaxState(min_val=min_val.reshape(shape), max_val=max_val.reshape(shape))


serialization.register(MinMaxObserver, range_to_dict, range_from_dict)
