r"""torchao's ``AffineQuantizedMinMaxObserver`` and its moving-average variant, on a static state.

For every block :math:`g` of the granularity's grid (:mod:`granularity`):

.. math::
   m_{t,g} = \min(m_{t-1,g}, \min_{i \in B_g} x_{t,i}), \qquad
   M_{t,g} = \max(M_{t-1,g}, \max_{i \in B_g} x_{t,i})

(the moving average: :math:`m_{t,g} = m_{t-1,g} + c\,(\min_{B_g} x_t - m_{t-1,g})`), and
``calculate_qparams`` is :func:`choose_qparams_affine_with_min_max` on :math:`(m, M)`.

**The state never depends on the token count.** The first ``token_axes`` axes of the input index
tokens; the block statistic is reduced over them too, so ``min_val``/``max_val`` have the grid shape
of the other axes only. ``PerToken`` defaults to every leading axis (its state is one range, the
min of the per-token minima and the max of the per-token maxima: the bound the per-token scales of
any batch stay within; per-token qparams of a batch come from :func:`choose_qparams_affine`). Every
other granularity defaults to ``token_axes=0``, torchao's state, right for weights. With
``token_axes=0`` and a fixed input shape the state and qparams are torchao's, bit for bit.

The torchao 0.18 counterparts: :class:`AffineQuantizedMinMaxObserver` is
``torchao.quantization.observer.AffineQuantizedMinMaxObserver`` (default ``eps``:
``finfo(float32).smallest_normal``). That class warns that ``preserve_zero=False`` and non-INT
domains are deprecated and computes ``choose_qparams_affine_with_min_max`` regardless (zero kept,
integer zero point); jo computes what the split functions give for those arguments
(``_choose_qparams_affine_dont_preserve_zero``, ``_choose_qparams_affine_tinygemm``, see
:mod:`qparams`). :class:`AffineQuantizedMovingAverageMinMaxObserver` is torchao 0.18's
``AffineQuantizedMovingAverageMinMaxObserver``, which exists only in the pt2e copy
(``torchao.quantization.pt2e._affine_quantization``), whose default ``eps`` is
``finfo(float32).eps``: jo keeps that default for it. Both compute the state in float32; torchao's
state has the input's dtype (the same values for bfloat16 inputs, whose min and max are exact in
float32, but torchao's qparams are then computed in bfloat16).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jax_observers._src import serialization, stats
from jax_observers._src.affine import granularity as gran
from jax_observers._src.affine import qparams as aq
from jax_observers._src.affine import quantize as affine_quant
from jax_observers._src.base import (
  FLOAT32_EPS,
  Observer,
  QParams,
  Quantizer,
  canonical_dtype,
  check_state,
  python_scalars,
)
from jax_observers._src.config import float_input
from jax_observers._src.observers import minmax
from jax_observers._src.observers.minmax import MinMaxState


@dataclasses.dataclass(frozen=True, kw_only=True)
class AffineQuantizedMinMaxObserver(Observer, Quantizer):
  r"""Running per-block min and max; torchao's qparams for any granularity and integer dtype.

  Args:
    mapping_type: ``jo.MappingType.SYMMETRIC``, ``SYMMETRIC_NO_CLIPPING_ERR`` or ``ASYMMETRIC``.
    target_dtype: ``jnp.int8``, ``jnp.uint8``, ``jnp.int4``, ``jnp.uint4``, ``jnp.int2`` ...
    granularity: ``jo.PerTensor()``, ``PerAxis(axis)``, ``PerGroup(group_size)``, ``PerRow()``,
      ``PerToken()`` or ``PerBlock(block_size)``.
    quant_min, quant_max: a custom range inside the dtype's.
    eps: smallest scale (None: ``default_eps``; torchao 0.18's ``finfo(float32).smallest_normal``).
    preserve_zero: widen each block's range to include 0.
    zero_point_domain: ``jo.ZeroPointDomain.INT``, ``FLOAT`` or ``NONE``.
    token_axes: leading input axes that index tokens, reduced into the state (None: all leading
      axes for ``PerToken``, none otherwise).
    pad_partial_blocks: a block size that does not divide its axis gives a partial last block
      (ModelOpt / ONNX Runtime) instead of a ValueError (torchao).
    ignore_nonfinite: skip +-inf as well as NaN (NaN is always skipped).

  Examples:
    >>> import jax, jax.numpy as jnp, jax_observers as jo
    >>> obs = jo.AffineQuantizedMinMaxObserver(
    ...   mapping_type=jo.MappingType.ASYMMETRIC, target_dtype=jnp.uint4,
    ...   granularity=jo.PerGroup(4), token_axes=1)
    >>> x = jnp.arange(24.0).reshape(3, 8) - 8.0   # 3 tokens, 2 groups of 4 features
    >>> state = jax.jit(obs.update)(obs.init(x), x)
    >>> state.min_val.tolist(), state.max_val.tolist()
    ([-8.0, -4.0], [11.0, 15.0])
    >>> obs.calculate_qparams(state).zero_point.tolist()
    [6, 3]
  """

  mapping_type: aq.MappingType
  target_dtype: Any
  granularity: gran.Granularity
  quant_min: int | None = None
  quant_max: int | None = None
  eps: float | None = None
  preserve_zero: bool = True
  zero_point_domain: aq.ZeroPointDomain = aq.ZeroPointDomain.INT
  token_axes: int | None = None
  pad_partial_blocks: bool = False
  ignore_nonfinite: bool = False

  default_eps: ClassVar[float] = aq.SMALLEST_NORMAL  # torchao 0.18's observer

  def __post_init__(self):
    python_scalars(self)
    aq.check_mapping(self.mapping_type, self.zero_point_domain, self.preserve_zero)
    self.quant_range  # noqa: B018 -- validates target_dtype, quant_min, quant_max eagerly.
    aq.check_eps(self.eps)
    object.__setattr__(self, "target_dtype", canonical_dtype(self.target_dtype))
    if not isinstance(self.granularity, gran.Granularity):
      raise ValueError(f"granularity={self.granularity!r} is not a jo.Granularity.")
    t = self.token_axes
    if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 0):
      raise ValueError(f"token_axes={t!r} must be None or an int >= 0.")
    for name in ("pad_partial_blocks", "ignore_nonfinite"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"{name}={getattr(self, name)!r} must be a bool.")

  @property
  def quant_range(self) -> tuple[int, int]:
    """(quant_min, quant_max) after the dtype defaults."""
    return aq.affine_quant_range(self.target_dtype, self.quant_min, self.quant_max)

  def layout(self, x) -> gran.BlockLayout:
    """The block layout over inputs shaped like ``x``."""
    return gran.block_layout(
      jnp.shape(x), self.granularity, token_axes=self.token_axes, pad=self.pad_partial_blocks
    )

  def state_shape(self, x) -> tuple[int, ...]:
    """The shape of ``min_val``/``max_val`` for inputs like ``x`` (token axes excluded)."""
    return self.layout(x).state_shape

  def init(self, x) -> MinMaxState:
    float_input(x, type(self).__name__)
    return minmax.fresh_state(self.state_shape(x))

  def update(self, state: MinMaxState, x, *, axis_name=None) -> MinMaxState:
    """Observes ``x``; with ``axis_name``, the global batch (``pmin``/``pmax`` of the statistic)."""
    x = float_input(x, type(self).__name__)
    layout = self.layout(x)
    self.check_state(state, "update")
    if jnp.shape(state.min_val) != layout.state_shape:
      raise ValueError(
        f"{type(self).__name__}({self.granularity}) has state of shape "
        f"{jnp.shape(state.min_val)} but x of shape {jnp.shape(x)} gives blocks of shape "
        f"{layout.state_shape}; build a new state with init(x)."
      )
    if x.size == 0:
      return state
    lo, hi = stats.batch_min_max(
      layout.view(x), layout.stat_axes, ignore_nonfinite=self.ignore_nonfinite, axis_name=axis_name
    )
    return self.accumulate(state, lo, hi)

  def accumulate(self, state: MinMaxState, lo, hi) -> MinMaxState:
    return MinMaxState(
      min_val=jnp.minimum(state.min_val, lo), max_val=jnp.maximum(state.max_val, hi)
    )

  def check_state(self, state: MinMaxState, method: str) -> None:
    """At trace time: ``state`` is a float32 ``MinMaxState`` (its block shape is checked by the
    caller that knows the input)."""
    spec = (None, jnp.float32)
    check_state(self, state, MinMaxState, method, {"min_val": spec, "max_val": spec})

  def calculate_qparams(self, state: MinMaxState) -> QParams:
    """torchao's ``choose_qparams_affine_with_min_max`` per block; unobserved blocks ``(1, 0)``."""
    self.check_state(state, "calculate_qparams")
    qp = aq.qparams_from_min_max(
      state.min_val,
      state.max_val,
      mapping_type=self.mapping_type,
      quant_range=self.quant_range,
      eps=aq.check_eps(self.eps, self.default_eps),
      preserve_zero=self.preserve_zero,
      zero_point_domain=self.zero_point_domain,
    )
    return aq.unobserved_to_default(qp, state.min_val, state.max_val)

  def quantize(self, x: jax.typing.ArrayLike, qparams: QParams) -> jax.Array:
    """``x`` as ``target_dtype`` integers (torchao's ``quantize_affine``; qparams broadcast over
    the token axes)."""
    x = float_input(x, type(self).__name__)
    return affine_quant.quantize_blocks(
      x,
      self.layout(x),
      qparams.scale,
      qparams.zero_point,
      quant_range=self.quant_range,
      zero_point_domain=self.zero_point_domain,
      dtype=self.target_dtype,
    )

  def dequantize(self, q: jax.typing.ArrayLike, qparams: QParams) -> jax.Array:
    """Float32 values of ``q`` (torchao's ``dequantize_affine``)."""
    return affine_quant.dequantize_blocks(
      q,
      self.layout(q),
      qparams.scale,
      qparams.zero_point,
      quant_range=self.quant_range,
      zero_point_domain=self.zero_point_domain,
      dtype=jnp.float32,
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class AffineQuantizedMovingAverageMinMaxObserver(AffineQuantizedMinMaxObserver):
  r"""Per-block moving average of the batch min and max: :math:`m + c\,(\min_{B_g} x - m)`.

  torchao 0.18's ``torchao.quantization.pt2e._affine_quantization``
  ``AffineQuantizedMovingAverageMinMaxObserver``; ``eps=None`` is its ``finfo(float32).eps``.

  Args:
    averaging_constant: ``c`` in [0, 1].
    is_dynamic: torchao's flag for dynamic quantization; needs ``averaging_constant=1``.
    **kwargs: as :class:`AffineQuantizedMinMaxObserver`.

  Examples:
    >>> import jax.numpy as jnp, jax_observers as jo
    >>> obs = jo.AffineQuantizedMovingAverageMinMaxObserver(
    ...   mapping_type=jo.MappingType.SYMMETRIC, target_dtype=jnp.int8,
    ...   granularity=jo.PerAxis(-1), averaging_constant=0.5)
    >>> state = obs.init(jnp.zeros((4, 2)))
    >>> for scale in (1.0, 3.0):
    ...   state = obs.update(state, scale * jnp.array([[-1.0, 0.0], [0.0, 2.0]]))
    >>> state.min_val.tolist(), state.max_val.tolist()
    ([-2.0, 0.0], [0.0, 4.0])
  """

  averaging_constant: float = 0.01
  is_dynamic: bool = False

  default_eps: ClassVar[float] = FLOAT32_EPS  # torchao 0.18's only copy is pt2e's: finfo.eps

  def __post_init__(self):
    super().__post_init__()
    c = minmax.check_averaging_constant(self.averaging_constant)
    if self.is_dynamic and c != 1:
      raise NotImplementedError(
        f"is_dynamic=True needs averaging_constant=1, got averaging_constant={c}."
      )

  def accumulate(self, state: MinMaxState, lo, hi) -> MinMaxState:
    return minmax.moving_average(state, lo, hi, self.averaging_constant)


serialization.register_arrays(AffineQuantizedMinMaxObserver, MinMaxState, ("min_val", "max_val"))
