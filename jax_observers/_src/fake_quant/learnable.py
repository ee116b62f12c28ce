r"""``LearnableFakeQuantize``: LSQ/LSQ+ fake quantization, torch's ``_LearnableFakeQuantize`` as pure functions.

``scale`` and ``zero_point`` live in the state and are **trainable**: differentiate the loss with
respect to ``state.scale``/``state.zero_point`` to get torch's LSQ gradients (:mod:`learnable_ops`).
``y, state = fq.apply(state, x)`` is torch's ``forward``:

1. ``static_enabled``: the observer sees ``x`` and ``scale``/``zero_point`` take its qparams;
   otherwise ``scale`` is clamped to at least ``eps``. torch does both in place on ``.data``; here the
   returned state holds the new values and the gradient still reaches the incoming ones.
2. ``fake_quant_enabled``: a symmetric qscheme zeroes ``zero_point``; then
   :math:`y = \mathrm{LSQ}(x; s, z)` with gradient factor :math:`g = 1/\sqrt{N q_{max}}` when
   ``use_grad_scaling`` (:math:`N` = elements of ``x``, over all devices under ``axis_name``), else 1.

``learning_enabled`` gates the gradients: while it is off, ``scale``/``zero_point`` get zero gradients
(torch sets ``requires_grad=False``; only a freshly built torch module has ``learning_enabled=0`` with
``requires_grad=True``). ``enable_param_learning``, ``enable_static_estimate`` and
``enable_static_observation`` are methods of the state, as torch's are of the module.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_observers._src import base, serialization
from jax_observers._src.base import FLOAT32_EPS, Observer, QParams, QScheme
from jax_observers._src.config import float_input, normalized_axis
from jax_observers._src.fake_quant import layouts, learnable_ops
from jax_observers._src.fake_quant.fake_quantize import (
  FakeQuantizeBase,
  _same_types,
  branch,
  build_observer,
)
from jax_observers._src.fake_quant.state import LearnableFakeQuantizeState
from jax_observers._src.observers.minmax import MovingAverageMinMaxObserver


@jax.custom_vjp
def _with_gradient_of(param, value, enabled):
  """``value``, with ``param``'s gradient the incoming one when ``enabled`` (else zero)."""
  del param, enabled
  return value


def _with_gradient_of_fwd(param, value, enabled):
  return value, enabled


def _with_gradient_of_bwd(enabled, g):
  return jnp.where(enabled, g, jnp.zeros_like(g)), None, None


_with_gradient_of.defvjp(_with_gradient_of_fwd, _with_gradient_of_bwd)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LearnableFakeQuantize(FakeQuantizeBase):
  r"""LSQ/LSQ+ fake quantization with learnable ``scale`` and ``zero_point`` (torch's private
  ``_LearnableFakeQuantize``; see the module docstring for the forward steps).

  Args:
    observer: an Observer class, partial or instance, used while ``static_enabled``.
    quant_min, quant_max: the range (``quant_min < quant_max``, including 0), passed to the observer.
    scale, zero_point: the initial parameter values.
    channel_len: torch's channel count for per-channel qschemes; -1 takes it from ``init``'s input.
    use_grad_scaling: multiply the scale/zero-point gradients by :math:`1/\sqrt{N q_{max}}`.
    consistent_zero_point: per tensor, compute the gradients with the forward's rounded zero point
      instead of torch's ``trunc(z + 0.5)`` (torch E17; default False matches torch).

  Examples:
    >>> import jax, jax.numpy as jnp, jax_observers as jo
    >>> fq = jo.LearnableFakeQuantize(observer=jo.MovingAverageMinMaxObserver, quant_min=0,
    ...                               quant_max=15, scale=0.2, zero_point=2.5)
    >>> x = jnp.array([3.0, 0.0])
    >>> state = fq.init(x).enable_param_learning()
    >>> def loss(scale, zero_point):
    ...   y, _ = fq.apply(state.replace(scale=scale, zero_point=zero_point), x)
    ...   return y.sum()
    >>> ds, dz = jax.grad(loss, argnums=(0, 1))(state.scale, state.zero_point)
    >>> float(ds), round(float(dz), 4)  # torch E17
    (12.0, -0.2)
  """

  observer: Any = dataclasses.field(default=MovingAverageMinMaxObserver, compare=False)
  quant_min: int = 0
  quant_max: int = 255
  scale: float = 1.0
  zero_point: float = 0.0
  channel_len: int = -1
  use_grad_scaling: bool = False
  consistent_zero_point: bool = False
  activation_post_process: Observer = dataclasses.field(init=False)

  eps = FLOAT32_EPS  # torch's eps buffer (finfo(float32).eps)
  trainable_fields = ("scale", "zero_point")
  state_kind = LearnableFakeQuantizeState

  def zero_point_dtype(self):
    return jnp.float32  # LSQ's zero point is a float parameter

  def __post_init__(self):
    base.python_scalars(self)
    obs = build_observer(self.observer, self.quant_min, self.quant_max, strict_order=True)
    if not self.quant_min <= 0 <= self.quant_max:
      raise ValueError(
        f"[quant_min, quant_max] = [{self.quant_min}, {self.quant_max}] must include 0 "
        "(torch's learnable backward requires it)."
      )
    qscheme = getattr(obs, "qscheme", None)
    if qscheme == QScheme.PER_CHANNEL_AFFINE_FLOAT_QPARAMS:
      raise NotImplementedError(
        "LearnableFakeQuantize does not support per_channel_affine_float_qparams (torch sends it "
        "to the per-tensor op, which reads only scale[0])."
      )
    if not isinstance(qscheme, QScheme):
      raise TypeError(f"LearnableFakeQuantize needs an observer with a qscheme; got {obs!r}.")
    if qscheme.is_per_channel:
      if self.channel_len != -1 and (not isinstance(self.channel_len, int) or self.channel_len < 1):
        raise ValueError(f"channel_len={self.channel_len!r} must be a positive int or -1.")
    elif self.channel_len != -1:
      raise ValueError(
        f"channel_len={self.channel_len} is for per-channel qschemes; qscheme is {qscheme.value}."
      )
    if self.use_grad_scaling and self.quant_max <= 0:
      raise ValueError(f"use_grad_scaling needs quant_max > 0; got quant_max={self.quant_max}.")
    for name in ("scale", "zero_point"):
      if not isinstance(getattr(self, name), (int, float)):
        raise TypeError(f"{name}={getattr(self, name)!r} must be a Python number.")
    object.__setattr__(self, "activation_post_process", obs)

  @property
  def qscheme(self) -> QScheme:
    return self.activation_post_process.qscheme

  @property
  def ch_axis(self) -> int:
    return self.activation_post_process.ch_axis if self.qscheme.is_per_channel else -1

  def init(self, x) -> LearnableFakeQuantizeState:
    x = float_input(x, self)
    shape = ()
    if self.qscheme.is_per_channel:
      channels = x.shape[normalized_axis(self.ch_axis, x.shape)]
      if self.channel_len not in (-1, channels):
        raise ValueError(
          f"channel_len={self.channel_len} but x of shape {x.shape} has {channels} channels along "
          f"ch_axis={self.ch_axis}."
        )
      shape = (channels,)
    return LearnableFakeQuantizeState(
      scale=jnp.full(shape, self.scale, jnp.float32),
      zero_point=jnp.full(shape, self.zero_point, jnp.float32),
      fake_quant_enabled=jnp.ones((), jnp.bool_),
      static_enabled=jnp.ones((), jnp.bool_),
      learning_enabled=jnp.zeros((), jnp.bool_),
      activation_post_process=self.activation_post_process.init(x),
    )

  def grad_factor(self, x, axis_name=None) -> float:
    """LSQ's :math:`1/\\sqrt{N q_{max}}` (torch's Python float), or 1."""
    if not self.use_grad_scaling:
      return 1.0
    numel = x.size * (1 if axis_name is None else lax.axis_size(axis_name))
    return 1.0 / (numel * self.quant_max) ** 0.5

  def _clamp(self, state):
    eps = np.float32(self.eps)
    return state.activation_post_process, jnp.maximum(state.scale, eps), state.zero_point

  def _observe(self, state, x, axis_name):
    obs = self.activation_post_process
    obs_state = obs.update(state.activation_post_process, lax.stop_gradient(x), axis_name=axis_name)
    scale, zero_point = obs.calculate_qparams(obs_state)
    shape = state.scale.shape
    return (
      _same_types(obs_state, state.activation_post_process),
      jnp.asarray(scale, jnp.float32).reshape(shape),
      jnp.asarray(zero_point).astype(jnp.float32).reshape(shape),
    )

  def _fake_quant(self, x, scale, zero_point, axis_name):
    g = self.grad_factor(x, axis_name)
    if self.qscheme.is_per_channel:
      return learnable_ops.fake_quantize_learnable_per_channel_affine(
        x, scale, zero_point, self.ch_axis, self.quant_min, self.quant_max, g
      )
    return learnable_ops.fake_quantize_learnable_per_tensor_affine(
      x, scale, zero_point, self.quant_min, self.quant_max, g,
      consistent_zero_point=self.consistent_zero_point,
    )  # fmt: skip

  def apply(self, state: LearnableFakeQuantizeState, x, *, axis_name=None):
    """``(y, new_state)``; gradients flow to ``x`` and (while learning) to ``scale``/``zero_point``."""
    x = float_input(x, self)
    self.check_state(state, "apply")
    observe = lambda s: self._observe(s, x, axis_name)
    obs_state, scale, zero_point = branch(state.static_enabled, observe, self._clamp, state)
    learning = state.learning_enabled
    scale = _with_gradient_of(state.scale, lax.stop_gradient(scale), learning)
    zero_point = _with_gradient_of(state.zero_point, lax.stop_gradient(zero_point), learning)
    if self.qscheme.is_symmetric:  # torch: zero_point.data.zero_() before fake quantizing
      zeros = _with_gradient_of(zero_point, jnp.zeros_like(zero_point), True)
      zero_point = jnp.where(state.fake_quant_enabled, zeros, zero_point)
    y = branch(
      state.fake_quant_enabled,
      lambda a: self._fake_quant(*a, axis_name),
      lambda a: a[0],
      (x, scale, zero_point),
    )
    new_state = state.replace(
      scale=lax.stop_gradient(scale),
      zero_point=lax.stop_gradient(zero_point),
      activation_post_process=obs_state,
    )
    return y, new_state

  def calculate_qparams(self, state: LearnableFakeQuantizeState) -> QParams:
    """``(max(scale, eps), clip(rne(zero_point)))`` with an int32 zero point, as torch."""
    self.check_state(state, "calculate_qparams")
    scale = jnp.maximum(state.scale, np.float32(self.eps))
    zero_point = jnp.clip(jnp.round(state.zero_point), self.quant_min, self.quant_max)
    return QParams(scale=scale, zero_point=zero_point.astype(jnp.int32))


serialization.register(
  LearnableFakeQuantize,
  layouts.learnable_to_dict,
  layouts.learnable_from_dict,
)
