r"""``FusedMovingAvgObsFakeQuantize``: moving-average min/max observer and fake quantization in one step.

torch's fused kernel (``fused_moving_avg_obs_fake_quant``) observes like
``MovingAverage(PerChannel)MinMaxObserver`` but picks its qparams with fbgemm's
``ChooseQuantizationParams`` (scale divided in float64 and stored as float32, zero point in float64
from the side with the smaller :math:`|q| + |r/s|`, symmetric divisor :math:`2^{b-1}` or
:math:`2^{b-1} - 1` instead of :math:`(q_{max} - q_{min})/2`, a 6.1e-5 scale floor), while its
``calculate_qparams()`` (used by convert) is the observer's formula. Training and inference therefore
disagree in torch (E18, E19; pytorch/pytorch#194816, pytorch/ao#4824). Here one rule serves both:

* ``use_kernel_params=False`` (default): the observer's ``calculate_qparams`` for the forward pass and
  for ``calculate_qparams``. The model is trained with the qparams it is converted with, the numbers
  equal ``FakeQuantize`` with the same observer, and everything stays in float32 inside the graph.
* ``use_kernel_params=True``: torch's kernel rule, bit for bit (forward values, ``scale``/``zero_point``
  buffers), and ``calculate_qparams`` returns those buffers, as pytorch/ao#4824's flag of the same name
  does. The float64 arithmetic runs on the host through ``jax.pure_callback`` (one small call per
  step). torch 2.13's own ``calculate_qparams()`` is still
  ``fq.activation_post_process.calculate_qparams(state.activation_post_process)``.

Unlike torch, ``scale``/``zero_point`` are refreshed whenever the observer or fake quantization is on,
so they are never stale after an observe-only phase (E20, pytorch/pytorch#194815), and per-channel
quantization works on any ``ch_axis`` (torch: 0 only).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_observers._src.base import QParams
from jax_observers._src.config import float_input
from jax_observers._src.fake_quant.fake_quantize import FakeQuantize, _same_types, branch
from jax_observers._src.fake_quant.state import FakeQuantizeState
from jax_observers._src.observers.minmax import MovingAverageMinMaxObserver
from jax_observers._src.observers.per_channel import MovingAveragePerChannelMinMaxObserver

_F32, _F64 = np.float32, np.float64
SMALL_SCALE_THRESHOLD = _F32(6.1e-5)  # fbgemm's cut-off, CPU only (the CUDA kernel has none)


def _cmax(a, b):
  """C++ ``std::max(a, b)``: ``a < b ? b : a`` (NaN handling included)."""
  return np.where(a < b, b, a)


def _cmin(a, b):
  """C++ ``std::min(a, b)``: ``b < a ? b : a``."""
  return np.where(b < a, b, a)


def choose_quantization_params_numpy(min_val, max_val, quant_min, quant_max, preserve_sparsity):
  """fbgemm's ``ChooseQuantizationParams`` elementwise, in NumPy float32/float64 exactly as the C++.

  Returns ``(scale float32, zero_point int32)`` arrays shaped like ``min_val``.
  """
  with np.errstate(all="ignore"):
    lo = np.array(min_val, _F32)
    hi = np.array(max_val, _F32)
    if preserve_sparsity:
      straddle = (lo < 0) & (hi > 0)
      sym_min = -((quant_max - quant_min) // 2 + 1)
      sym_max = (quant_max - quant_min) // 2
      max_scale = _cmax(np.abs(lo / _F32(sym_min)), np.abs(hi / _F32(sym_max))).astype(_F64)
      lo = np.where(straddle, (max_scale * sym_min).astype(_F32), lo)
      hi = np.where(straddle, (max_scale * sym_max).astype(_F32), hi)
    lo = _cmin(lo, _F32(0))
    hi = _cmax(hi, _F32(0))
    span = quant_max - quant_min
    # `float scale = (double(max) - min) / (qmax - qmin)`: computed in double, stored as float.
    scale = ((hi.astype(_F64) - lo.astype(_F64)) / _F64(span)).astype(_F32)
    scale = np.where((scale == 0) | np.isinf(_F32(1) / scale), _F32(0.1), scale)
    small = scale < SMALL_SCALE_THRESHOLD
    amplifier = SMALL_SCALE_THRESHOLD / scale
    floor_hi = SMALL_SCALE_THRESHOLD * _F32(span)
    new_lo = np.where(
      lo == 0, lo, np.where(hi == 0, -SMALL_SCALE_THRESHOLD * _F32(span), lo * amplifier)
    )
    new_hi = np.where(lo == 0, floor_hi, np.where(hi == 0, hi, hi * amplifier))
    lo, hi = np.where(small, new_lo, lo), np.where(small, new_hi, hi)
    scale = np.where(small, SMALL_SCALE_THRESHOLD, scale)
    wide = scale.astype(_F64)
    from_min = _F64(quant_min) - lo.astype(_F64) / wide
    from_max = _F64(quant_max) - hi.astype(_F64) / wide
    # fbgemm adds the magnitudes (the quant_utils.h mirror in torch subtracts them).
    error_min = _F64(abs(quant_min)) + np.abs(lo.astype(_F64) / wide)
    error_max = _F64(abs(quant_max)) + np.abs(hi.astype(_F64) / wide)
    initial = np.where(error_min < error_max, from_min, from_max)
    if preserve_sparsity:
      initial = np.where((lo < 0) & (hi > 0), _F64(quant_min + quant_max) / 2, initial)
    nudged = np.rint(initial)
    nudged = np.where(np.isnan(nudged), np.iinfo(np.int32).min, nudged)  # x86 cast of NaN
    zero_point = np.where(
      initial < quant_min, quant_min, np.where(initial > quant_max, quant_max, nudged)
    )
    return scale, zero_point.astype(np.int32)


def choose_quantization_params(
  min_val, max_val, quant_min, quant_max, preserve_sparsity
) -> QParams:
  """:func:`choose_quantization_params_numpy` from inside ``jit``/``vmap`` (a host callback).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jax_observers._src.fake_quant.fused import choose_quantization_params
    >>> qp = choose_quantization_params(jnp.array(-1.0), jnp.array(2.0), -128, 127, True)
    >>> round(float(qp.scale), 6), int(qp.zero_point)  # torch E18: 2/127, not 2/127.5
    (0.015748, 0)
  """
  min_val = jnp.asarray(min_val, jnp.float32)
  max_val = jnp.asarray(max_val, jnp.float32)
  shape = jnp.broadcast_shapes(min_val.shape, max_val.shape)
  fn = functools.partial(
    choose_quantization_params_numpy,
    quant_min=int(quant_min),
    quant_max=int(quant_max),
    preserve_sparsity=bool(preserve_sparsity),
  )
  out = (jax.ShapeDtypeStruct(shape, jnp.float32), jax.ShapeDtypeStruct(shape, jnp.int32))
  scale, zero_point = jax.pure_callback(fn, out, min_val, max_val, vmap_method="broadcast_all")
  return QParams(scale=scale, zero_point=zero_point)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FusedMovingAvgObsFakeQuantize(FakeQuantize):
  r"""torch's ``FusedMovingAvgObsFakeQuantize`` (see the module docstring for ``use_kernel_params``).

  Args:
    observer: ``MovingAverageMinMaxObserver`` or ``MovingAveragePerChannelMinMaxObserver`` (class,
      partial or instance).
    quant_min, quant_max: the range, passed to the observer (torch's defaults 0, 255).
    use_kernel_params: use torch's fused-kernel qparams (``ChooseQuantizationParams``) instead of the
      observer's ``calculate_qparams``, for training and for ``calculate_qparams``.

  Examples:
    >>> import jax.numpy as jnp, jax_observers as jo
    >>> wt = jo.MovingAverageMinMaxObserver.with_args(dtype=jnp.int8, qscheme=jo.per_tensor_symmetric)
    >>> x = jnp.array([-1.0, 2.0])
    >>> for kernel in (False, True):
    ...   fq = jo.FusedMovingAvgObsFakeQuantize(
    ...       observer=wt, quant_min=-128, quant_max=127, use_kernel_params=kernel)
    ...   print(round(float(fq.apply(fq.init(x), x)[1].scale), 6))
    0.015686
    0.015748
  """

  quant_min: int | None = 0
  quant_max: int | None = 255
  use_kernel_params: bool = False

  torch_flag_dtype = np.int64

  def __post_init__(self):
    super().__post_init__()
    obs = self.activation_post_process
    if not isinstance(obs, (MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver)):
      raise TypeError(
        "FusedMovingAvgObsFakeQuantize works with MovingAverageMinMaxObserver or "
        f"MovingAveragePerChannelMinMaxObserver; got {type(obs).__name__}."
      )

  @property
  def is_symmetric_quant(self) -> bool:
    return self.activation_post_process.qscheme.is_symmetric

  def kernel_qparams(self, obs_state) -> QParams:
    """torch's fused-kernel qparams from the running min/max."""
    quant_min, quant_max = self.quant_range
    return choose_quantization_params(
      obs_state.min_val, obs_state.max_val, quant_min, quant_max, self.is_symmetric_quant
    )

  def _refresh(self, state: FakeQuantizeState) -> FakeQuantizeState:
    obs_state = state.activation_post_process
    if self.use_kernel_params:
      scale, zero_point = self.kernel_qparams(obs_state)
    else:
      scale, zero_point = self.activation_post_process.calculate_qparams(obs_state)
    return state.replace(
      scale=jnp.asarray(scale, jnp.float32).reshape(state.scale.shape),
      zero_point=jnp.asarray(zero_point).astype(state.zero_point.dtype).reshape(state.scale.shape),
    )

  def apply(self, state: FakeQuantizeState, x, *, axis_name=None):
    """``(y, new_state)``: moving-average observe, refresh qparams, fake-quantize."""
    x = float_input(x, self)
    self.check_state(state, "apply")
    obs = self.activation_post_process

    def observe(s):
      new = obs.update(s.activation_post_process, lax.stop_gradient(x), axis_name=axis_name)
      return s.replace(activation_post_process=_same_types(new, s.activation_post_process))

    state = branch(state.observer_enabled, observe, lambda s: s, state)
    active = state.observer_enabled | state.fake_quant_enabled
    state = branch(active, self._refresh, lambda s: s, state)
    return self.output(state, x), state

  def calculate_qparams(self, state: FakeQuantizeState) -> QParams:
    """The qparams the forward pass uses: the kernel buffers, or the observer's formula."""
    self.check_state(state, "calculate_qparams")
    if self.use_kernel_params:
      return QParams(scale=state.scale, zero_point=state.zero_point)
    return self.activation_post_process.calculate_qparams(state.activation_post_process)
