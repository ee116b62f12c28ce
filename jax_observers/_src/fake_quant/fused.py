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
  does. Its float64 arithmetic is emulated exactly in float32 on the device
  (:mod:`fused_qparams`: no host callback, so the step runs under ``jit``/``vmap``/``pmap``
  where the data is and ``jax.export`` serializes it). torch 2.13's own ``calculate_qparams()`` is
  still ``fq.activation_post_process.calculate_qparams(state.activation_post_process)``.

Unlike torch, ``scale``/``zero_point`` are refreshed whenever the observer or fake quantization is on,
so they are never stale after an observe-only phase (E20, pytorch/pytorch#194815), and per-channel
quantization works on any ``ch_axis`` (torch: 0 only).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_observers._src.base import QParams
from jax_observers._src.config import float_input
from jax_observers._src.fake_quant.fake_quantize import FakeQuantize, _same_types, branch
from jax_observers._src.fake_quant.fused_qparams import choose_quantization_params
from jax_observers._src.fake_quant.state import FakeQuantizeState
from jax_observers._src.observers.minmax import MovingAverage


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
    if not isinstance(obs, MovingAverage):  # per tensor or per channel
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
