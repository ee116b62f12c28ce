r"""Delayed scaling (Transformer Engine, flax ``fp8_ops``): fp8 scales from an amax history.

Each update puts the batch amax :math:`a_t = \max |x_t|` into a ring buffer of the last
``history_len`` amaxes and recomputes the scale from it (:math:`F` the fp8 maximum, :math:`\mu` the
``margin``):

.. math::
   A_t = \begin{cases} \max_{k < L} h_{t,k} & \text{'max'} \\ a_t & \text{'most\_recent'}
   \end{cases}, \qquad
   s_t = \begin{cases} 1 \big/ \big((F / A_t) / 2^{\mu}\big) & A_t > 0 \text{ and finite} \\
   s_{t-1} & \text{otherwise} \end{cases}

:math:`s` is the dequantization scale (TE's ``scale_inv``, flax's stored ``scale``), rounded exactly
as they round it. The scale *used* on batch :math:`t` is :math:`s_{t-1}`, from the amaxes before
it: quantize with ``calculate_qparams(state)``, then ``state = update(state, x)``.

The history layout is flax's: slot 0 holds the newest amax, ``roll(h, -1).at[0].set(a_t)``. The
state is a plain pytree (the ``'observers'`` collection in Flax), updated by ``update``, not smuggled
through gradients as TE's and flax's ``_overwrite_with_gradient`` collection is.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jax_observers._src import numerics, serialization, stats
from jax_observers._src.base import (
  Observer,
  QParams,
  Quantizer,
  canonical_dtype,
  check_state,
  python_scalars,
)
from jax_observers._src.config import float_input
from jax_observers._src.formats import fp8
from jax_observers._src.readable import ReadableRepr

AMAX_COMPUTE_ALGOS = ("max", "most_recent")


class DelayedScalingState(ReadableRepr, struct.PyTreeNode, repr=False):
  """Amax history and the scale computed from it."""

  amax_history: jax.Array  # shape (history_len,), float32; [0] newest, zeros before any update.
  scale: jax.Array  # shape (), float32; dequantization scale (TE's scale_inv), 1 before updates.


def delayed_scale(amax, previous_scale, fp8_max: float, margin: int) -> jax.Array:
  """TE's update: ``1 / ((fp8_max / amax) / 2**margin)``, the previous scale where amax is not
  positive and finite."""
  sf = numerics.exact_div(np.float32(fp8_max), amax)
  sf = numerics.exact_div(sf, np.float32(2.0**margin))
  scale = numerics.exact_div(jnp.ones_like(sf), sf)
  return jnp.where((amax > 0) & jnp.isfinite(amax), scale, previous_scale)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Float8DelayedScalingObserver(Observer, Quantizer):
  r"""Per-tensor fp8 scale from the last ``history_len`` batch amaxes (TE's ``DelayedScaling``).

  Args:
    dtype: the fp8 format (``jnp.float8_e4m3fn``; ``float8_e5m2`` for gradients).
    history_len: ring-buffer length (TE and flax default to 1024).
    amax_compute_algo: ``'max'`` over the history, or ``'most_recent'``.
    margin: the scale leaves :math:`2^{margin}` of headroom: amax maps to ``fp8_max / 2**margin``.
    ignore_nonfinite: skip +-inf as well as NaN (NaN is always skipped; an inf amax keeps the
      previous scale, as in TE, while it stays in the history).

  Examples:
    >>> import jax, jax.numpy as jnp, jax_observers as jo
    >>> obs = jo.Float8DelayedScalingObserver(history_len=2)
    >>> state = obs.init(jnp.zeros(3))
    >>> for amax in (896.0, 224.0, 112.0):
    ...   state = jax.jit(obs.update)(state, jnp.array([0.0, -amax, 1.0]))
    ...   print(state.amax_history.tolist(), float(obs.calculate_qparams(state).scale))
    [896.0, 0.0] 2.0
    [224.0, 896.0] 2.0
    [112.0, 224.0] 0.5
  """

  dtype: Any = jnp.float8_e4m3fn
  history_len: int = 1024
  amax_compute_algo: str = "max"
  margin: int = 0
  ignore_nonfinite: bool = False

  def __post_init__(self):
    python_scalars(self)
    object.__setattr__(self, "dtype", canonical_dtype(self.dtype, allowed=fp8.FP8_DTYPES))
    n = self.history_len
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
      raise ValueError(f"history_len={n!r} must be a positive int.")
    if self.amax_compute_algo not in AMAX_COMPUTE_ALGOS:
      raise ValueError(
        f"amax_compute_algo={self.amax_compute_algo!r} must be one of {AMAX_COMPUTE_ALGOS}."
      )
    if isinstance(self.margin, bool) or not isinstance(self.margin, int):
      raise ValueError(f"margin={self.margin!r} must be an int (the scale is 2**margin apart).")

  def check_state(self, state, method: str) -> None:
    """At trace time: a :class:`DelayedScalingState` of ``history_len`` (ValueError otherwise)."""
    fields = {
      "amax_history": ((self.history_len,), jnp.float32),
      "scale": ((), jnp.float32),
    }
    check_state(self, state, DelayedScalingState, method, fields)

  def init(self, x=None) -> DelayedScalingState:
    if x is not None:
      float_input(x, type(self).__name__)
    return DelayedScalingState(
      amax_history=jnp.zeros((self.history_len,), jnp.float32), scale=jnp.ones((), jnp.float32)
    )

  def update(self, state: DelayedScalingState, x, *, axis_name=None) -> DelayedScalingState:
    """Records ``max |x|`` (``pmax`` over ``axis_name``) and recomputes the scale.

    A batch with no values (empty, or all skipped) leaves the state as it was.
    """
    x = float_input(x, type(self).__name__)
    self.check_state(state, "update")
    if jnp.shape(state.amax_history) != (self.history_len,):
      raise ValueError(
        f"{type(self).__name__}(history_len={self.history_len}) got a history of shape "
        f"{jnp.shape(state.amax_history)}."
      )
    if x.size == 0:
      return state
    amax, seen = stats.batch_amax(
      x, None, ignore_nonfinite=self.ignore_nonfinite, axis_name=axis_name
    )
    history = jnp.roll(state.amax_history, -1).at[0].set(amax)
    current = jnp.max(history) if self.amax_compute_algo == "max" else history[0]
    scale = delayed_scale(current, state.scale, fp8.float8_max(self.dtype), self.margin)
    return DelayedScalingState(
      amax_history=jnp.where(seen, history, state.amax_history),
      scale=jnp.where(seen, scale, state.scale),
    )

  def calculate_qparams(self, state: DelayedScalingState) -> QParams:
    """The scale for the next batch, zero point 0."""
    self.check_state(state, "calculate_qparams")
    return QParams(scale=state.scale, zero_point=jnp.zeros((), jnp.int32))

  def quantize(self, x: jax.typing.ArrayLike, qparams: QParams) -> jax.Array:
    """``fp8(clip(x / scale, -max, max))`` (flax's ``quantize``)."""
    x = float_input(x, type(self).__name__)
    return fp8.quantize_float8(x, qparams.scale, self.dtype)

  def dequantize(self, q: jax.typing.ArrayLike, qparams: QParams) -> jax.Array:
    """Float32 values ``q * scale``."""
    return jnp.asarray(q).astype(jnp.float32) * qparams.scale


serialization.register_arrays(
  Float8DelayedScalingObserver, DelayedScalingState, ("amax_history", "scale")
)
