r"""FP8 scales from amax: ``Float8Observer`` (running per-block amax) and its formulas.

For a block :math:`g` with running amax :math:`a_g = \max_t \max_{i \in B_g} |x_{t,i}|` and the fp8
format's largest value :math:`F` (448 for e4m3fn, 57344 for e5m2):

.. math::
   s_g = \frac{\mathrm{clip}(a_g, \epsilon, u)}{F}, \qquad
   q = \mathrm{fp8}(\mathrm{clip}(x / s_g, -F, F)), \qquad \hat x = q \cdot s_g

which is torchao's ``_choose_scale_float8`` / ``_quantize_affine_float8`` with ``hp_value_lb`` =
:math:`\epsilon` (default ``1e-12``, torchao float8 training's floor) and ``hp_value_ub`` = :math:`u`.
torchao's default has no floor: an all-zero block gives ``s = 0`` and NaN after quantization.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jax_observers._src import numerics, serialization, stats
from jax_observers._src.affine import granularity as gran
from jax_observers._src.base import (
  Observer,
  QParams,
  Quantizer,
  canonical_dtype,
  check_state,
  python_scalars,
)
from jax_observers._src.config import float_input
from jax_observers._src.readable import ReadableRepr

FP8_DTYPES = tuple(
  np.dtype(d)
  for d in (jnp.float8_e4m3fn, jnp.float8_e5m2, jnp.float8_e4m3fnuz, jnp.float8_e5m2fnuz)
)
FP8_EPS = 1e-12  # torchao float8 training's amax floor
_PER_TENSOR = gran.PerTensor()  # frozen, so one shared default is safe


def float8_max(dtype) -> float:
  """The largest finite value of an fp8 dtype (448.0 for float8_e4m3fn)."""
  return float(jnp.finfo(canonical_dtype(dtype, allowed=FP8_DTYPES)).max)


def float8_scale_from_amax(
  amax: jax.typing.ArrayLike, dtype, *, eps: float = FP8_EPS, hp_value_ub: float | None = None
) -> jax.Array:
  """The dequantization scale ``clip(amax, eps, hp_value_ub) / fp8_max`` (float32).

  Examples:
    >>> import jax.numpy as jnp, jax_observers as jo
    >>> jo.float8_scale_from_amax(jnp.array([448.0, 0.0]), jnp.float8_e4m3fn).tolist()
    [1.0, 2.2321429389771845e-15]
  """
  amax = jnp.maximum(jnp.asarray(amax, jnp.float32), np.float32(eps))
  if hp_value_ub is not None:
    amax = jnp.minimum(amax, np.float32(hp_value_ub))
  return numerics.exact_div(amax, np.float32(float8_max(dtype)))


def quantize_float8(x, scale, dtype) -> jax.Array:
  """``fp8(clip(x / scale, -max, max))``: a saturating cast (JAX's cast overflows to NaN)."""
  fmax = np.float32(float8_max(dtype))
  return jnp.clip(numerics.exact_div(x.astype(jnp.float32), scale), -fmax, fmax).astype(dtype)


def accumulate_amax(observer, state, x, *, axis_name, config: str):
  """``state`` with the running per-block amax of ``x`` (Float8Observer, MXObserver).

  ``observer`` provides ``layout(x)`` and ``ignore_nonfinite``; ``config`` names its blocking in the
  error raised when the state's shape does not fit ``x``.
  """
  name = type(observer).__name__
  x = float_input(x, name)
  layout = observer.layout(x)
  check_state(observer, state, AmaxState, "update", {"amax": (None, jnp.float32)})
  if jnp.shape(state.amax) != layout.state_shape:
    raise ValueError(
      f"{name}({config}) has state of shape {jnp.shape(state.amax)} but x of shape "
      f"{jnp.shape(x)} gives blocks of shape {layout.state_shape}."
    )
  if x.size == 0:
    return state
  amax, _ = stats.batch_amax(
    layout.view(x),
    layout.stat_axes,
    ignore_nonfinite=observer.ignore_nonfinite,
    axis_name=axis_name,
  )
  return AmaxState(amax=jnp.maximum(state.amax, amax))


class AmaxState(ReadableRepr, struct.PyTreeNode, repr=False):
  """Running absolute maximum per block."""

  amax: jax.Array  # shape: the block grid (token axes excluded), float32; 0 before any update.


@dataclasses.dataclass(frozen=True, kw_only=True)
class Float8Observer(Observer, Quantizer):
  r"""Running per-block amax; fp8 scales :math:`s = \mathrm{clip}(a, \epsilon, u) / F`.

  Args:
    dtype: ``jnp.float8_e4m3fn`` (default), ``float8_e5m2``, or their ``fnuz`` variants.
    granularity: any :class:`Granularity` (torchao uses PerTensor, PerRow, PerBlock((1, 128)) and
      PerBlock((128, 128))).
    eps: amax floor (torchao's ``hp_value_lb``), so an all-zero block has a finite, nonzero scale.
    hp_value_ub: optional amax ceiling (torchao's ``hp_value_ub``).
    token_axes, pad_partial_blocks, ignore_nonfinite: as :class:`AffineQuantizedMinMaxObserver`.

  Examples:
    >>> import jax.numpy as jnp, jax_observers as jo
    >>> obs = jo.Float8Observer(granularity=jo.PerRow())
    >>> w = jnp.array([[-896.0, 1.0], [0.0, 0.0]])
    >>> qp = obs.calculate_qparams(obs.update(obs.init(w), w))
    >>> [f"{s:.3g}" for s in qp.scale.tolist()], obs.quantize(w, qp).astype(jnp.float32).tolist()
    (['2', '2.23e-15'], [[-448.0, 0.5], [0.0, 0.0]])
  """

  dtype: Any = jnp.float8_e4m3fn
  granularity: gran.Granularity = _PER_TENSOR
  eps: float = FP8_EPS
  hp_value_ub: float | None = None
  token_axes: int | None = None
  pad_partial_blocks: bool = False
  ignore_nonfinite: bool = False

  def __post_init__(self):
    python_scalars(self)
    object.__setattr__(self, "dtype", canonical_dtype(self.dtype, allowed=FP8_DTYPES))
    if not isinstance(self.granularity, gran.Granularity):
      raise ValueError(f"granularity={self.granularity!r} is not a jo.Granularity.")
    if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not self.eps > 0:
      raise ValueError(f"eps={self.eps!r} must be a positive number (it keeps scales nonzero).")
    ub = self.hp_value_ub
    if ub is not None and (not isinstance(ub, (int, float)) or math.isnan(ub) or ub < self.eps):
      raise ValueError(f"hp_value_ub={ub!r} must be None or a number >= eps={self.eps}.")

  def layout(self, x) -> gran.BlockLayout:
    return gran.block_layout(
      jnp.shape(x), self.granularity, token_axes=self.token_axes, pad=self.pad_partial_blocks
    )

  def init(self, x) -> AmaxState:
    float_input(x, type(self).__name__)
    return AmaxState(amax=jnp.zeros(self.layout(x).state_shape, jnp.float32))

  def update(self, state: AmaxState, x, *, axis_name=None) -> AmaxState:
    """Observes ``x``; with ``axis_name``, the global batch (``pmax`` of the block amax)."""
    return accumulate_amax(self, state, x, axis_name=axis_name, config=str(self.granularity))

  def calculate_qparams(self, state: AmaxState) -> QParams:
    check_state(self, state, AmaxState, "calculate_qparams", {"amax": (None, jnp.float32)})
    scale = float8_scale_from_amax(
      state.amax, self.dtype, eps=self.eps, hp_value_ub=self.hp_value_ub
    )
    return QParams(scale=scale, zero_point=jnp.zeros(scale.shape, jnp.int32))

  def quantize(self, x: jax.typing.ArrayLike, qparams: QParams) -> jax.Array:
    """``x`` as ``dtype`` values (scales broadcast over blocks and token axes)."""
    x = float_input(x, type(self).__name__)
    layout = self.layout(x)
    scale = layout.broadcast(qparams.scale)
    return layout.unview(quantize_float8(layout.view(x), scale, self.dtype))

  def dequantize(self, q: jax.typing.ArrayLike, qparams: QParams) -> jax.Array:
    """Float32 values ``q * scale``."""
    layout = self.layout(q)
    return layout.unview(layout.view(q).astype(jnp.float32) * layout.broadcast(qparams.scale))


serialization.register_arrays(Float8Observer, AmaxState, ("amax",))
