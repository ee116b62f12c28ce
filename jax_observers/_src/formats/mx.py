r"""OCP Microscaling (MX): one E8M0 power-of-two scale per block of 32, torchao's ``to_mx`` rules.

For a block with amax :math:`a`, an element format with largest value :math:`F` and largest power of
two :math:`2^{e_{max}}` (e4m3: 448, 8; e5m2: 57344, 15; e2m3: 7.5, 2; e3m2: 28, 4; e2m1: 6, 2), the
block scale is :math:`2^k` with

* FLOOR (the OCP spec): :math:`k = \lfloor \log_2 a \rfloor - e_{max}`;
* CEIL: :math:`k = \lceil \log_2 a \rceil - e_{max}`;
* EVEN: :math:`k = \lfloor \log_2 \mathrm{rnd}(a) \rfloor - e_{max}`, :math:`a`'s mantissa first
  rounded (half up) to the element format's mantissa bits;
* RCEIL (cuBLAS, Blackwell ``cvt.rp.ue8m0``): :math:`k = \lceil \log_2 (a \cdot \mathrm{fl}(1/F))
  \rceil - 127`-biased directly, rounding up as the E8M0 conversion does.

:math:`k` is clipped to [-127, 127] and stored biased (:math:`k + 127`, a byte); a non-finite
:math:`a` gives the NaN byte 255. Elements are :math:`\mathrm{fmt}(\mathrm{clip}(x \cdot 2^{-k},
-F, F))`. All of it is computed on the float32 bits, as torchao does. XLA has no float6 arrays:
for the fp6 formats the scales are available, the element cast raises NotImplementedError.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_observers._src import compiled, serialization
from jax_observers._src.affine import granularity as gran
from jax_observers._src.base import (
  Observer,
  QParams,
  Quantizer,
  canonical_dtype,
  check_state,
  python_scalars,
)
from jax_observers._src.config import float_input, normalized_axis
from jax_observers._src.formats import fp8


class ScaleCalculationMode(enum.Enum):
  """torchao's MX ``ScaleCalculationMode``."""

  FLOOR = "floor"
  CEIL = "ceil"
  EVEN = "even"
  RCEIL = "rceil"


# element dtype -> (largest power of two e_max, mantissa bits, largest value F)
MX_ELEMENT_FORMATS = {
  np.dtype(jnp.float8_e4m3fn): (8, 3, 448.0),
  np.dtype(jnp.float8_e5m2): (15, 2, 57344.0),
  np.dtype(jnp.float6_e2m3fn): (2, 3, 7.5),
  np.dtype(jnp.float6_e3m2fn): (4, 2, 28.0),
  np.dtype(jnp.float4_e2m1fn): (2, 1, 6.0),
}
E8M0_BIAS = 127
E8M0_NAN = 255
_U32 = jnp.uint32


def _bits(x) -> jax.Array:
  return lax.bitcast_convert_type(jnp.asarray(x, jnp.float32), _U32)


def _float(bits) -> jax.Array:
  return lax.bitcast_convert_type(bits.astype(_U32), jnp.float32)


def mx_exponent_from_amax(amax: jax.typing.ArrayLike, elem_dtype, mode) -> jax.Array:
  """The biased E8M0 byte (uint8) of the scale of blocks with absolute maximum ``amax``.

  Examples:
    >>> import jax.numpy as jnp, jax_observers as jo
    >>> amax = jnp.array([448.0, 500.0, 0.0, jnp.nan])
    >>> jo.mx_exponent_from_amax(amax, jnp.float8_e4m3fn, jo.ScaleCalculationMode.FLOOR).tolist()
    [127, 127, 0, 255]
    >>> jo.mx_exponent_from_amax(amax, jnp.float8_e4m3fn, jo.ScaleCalculationMode.RCEIL).tolist()
    [127, 128, 0, 255]
  """
  emax, mbits, fmax = MX_ELEMENT_FORMATS[canonical_dtype(elem_dtype, allowed=MX_ELEMENT_FORMATS)]
  mode = ScaleCalculationMode(mode)
  amax = jnp.asarray(amax, jnp.float32)
  if mode == ScaleCalculationMode.RCEIL:
    descale = amax * np.float32(1.0 / fmax)
    bits = _bits(descale)
    biased = (bits >> 23) & 0xFF
    mantissa = bits & 0x7FFFFF
    up = jnp.where(biased == 0, mantissa > 0x400000, mantissa != 0)
    exponent = (biased + up.astype(_U32)).astype(jnp.int32)
    return jnp.where(jnp.isfinite(descale), exponent, E8M0_NAN).astype(jnp.uint8)
  bits = _bits(amax)
  if mode == ScaleCalculationMode.EVEN:
    rounded = (bits + np.uint32(1 << (23 - mbits - 1))) & np.uint32(0xFF800000)
    amax = jnp.where(jnp.isnan(amax), amax, _float(rounded))
    bits = _bits(amax)
  pow2 = ((bits >> 23) & 0xFF).astype(jnp.int32) - 127
  if mode == ScaleCalculationMode.CEIL:
    pow2 = pow2 + ((bits & 0x7FFFFF) > 0).astype(jnp.int32)
  unbiased = jnp.clip(pow2 - emax, -E8M0_BIAS, E8M0_BIAS + 1)
  return jnp.where(jnp.isfinite(amax), unbiased + E8M0_BIAS, E8M0_NAN).astype(jnp.uint8)


def e8m0_to_float32(exponent: jax.typing.ArrayLike) -> jax.Array:
  """``2**(e - 127)`` as float32 (byte 0 is the subnormal ``2**-127``, 255 is NaN)."""
  e = jnp.asarray(exponent).astype(_U32)
  bits = jnp.where(e == 0, np.uint32(0x00400000), e << 23)
  return _float(jnp.where(e == E8M0_NAN, np.uint32(0x7FC00000), bits))


def _e8m0_reciprocal(exponent) -> jax.Array:
  """``2**(127 - e)``: the byte ``254 - e`` read as E8M0 (torchao's reciprocal), exactly."""
  e = jnp.asarray(exponent).astype(jnp.int32)
  return e8m0_to_float32(((2 * E8M0_BIAS - e) & 0xFF).astype(jnp.uint8))


def _scale_to_exponent(scale) -> jax.Array:
  """The E8M0 byte of a power-of-two float32 scale (inverse of :func:`e8m0_to_float32`)."""
  bits = _bits(scale)
  e = (bits >> 23) & 0xFF
  e = jnp.where(bits == 0x00400000, np.uint32(0), e)
  return jnp.where(jnp.isnan(scale), np.uint32(E8M0_NAN), e).astype(jnp.uint8)


_NO_XLA_ARRAYS = (np.dtype(jnp.float6_e2m3fn), np.dtype(jnp.float6_e3m2fn))


def _cast_elements(scaled, elem_dtype) -> jax.Array:
  if np.dtype(elem_dtype) in _NO_XLA_ARRAYS:
    raise NotImplementedError(
      f"elem_dtype={np.dtype(elem_dtype).name}: XLA has no float6 arrays, so MX elements cannot be "
      "cast to it; its E8M0 scales (mx_exponent_from_amax, MXObserver.calculate_qparams) are exact."
    )
  fmax = np.float32(MX_ELEMENT_FORMATS[np.dtype(elem_dtype)][2])
  return jnp.clip(scaled, -fmax, fmax).astype(elem_dtype)


@compiled.eager_compiled_function("x")
def to_mx(
  x: jax.typing.ArrayLike,
  elem_dtype=jnp.float8_e4m3fn,
  block_size: int = 32,
  scaling_mode: ScaleCalculationMode = ScaleCalculationMode.FLOOR,
) -> tuple[jax.Array, jax.Array]:
  """torchao's ``to_mx``: E8M0 block exponents and the scaled elements of ``x``.

  Blocks run along the last axis, which ``block_size`` must divide. As in torchao, NaN in a block
  makes its scale NaN (byte 255).

  Returns:
    ``(exponents, elements)``: uint8 of shape ``(..., K // block_size)`` and ``elem_dtype`` of
    ``x``'s shape.

  Examples:
    >>> import jax.numpy as jnp, jax_observers as jo
    >>> e, q = jo.to_mx(jnp.array([[600.0, -3.0, 1.0, 0.0]]), block_size=4)
    >>> e.tolist(), q.astype(jnp.float32).tolist()   # 600 / 2 = 300 rounds to e4m3's 288
    ([[128]], [[288.0, -1.5, 0.5, 0.0]])
  """
  x = float_input(x, "to_mx")
  shape = jnp.shape(x)
  if not shape or shape[-1] % block_size:
    raise ValueError(f"to_mx: the last axis of shape {shape} must be a multiple of {block_size}.")
  blocks = jnp.reshape(x, (*shape[:-1], shape[-1] // block_size, block_size)).astype(jnp.float32)
  exponent = mx_exponent_from_amax(jnp.max(jnp.abs(blocks), axis=-1), elem_dtype, scaling_mode)
  scaled = blocks * _e8m0_reciprocal(exponent)[..., None]
  return exponent, jnp.reshape(_cast_elements(scaled, elem_dtype), shape)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MXObserver(Observer, Quantizer):
  r"""Running amax per block of ``block_size`` along ``axis``; MX scales :math:`2^k`.

  Args:
    elem_dtype: ``jnp.float8_e4m3fn`` (MXFP8, default), ``float8_e5m2``, ``float6_e2m3fn``,
      ``float6_e3m2fn`` or ``float4_e2m1fn`` (MXFP4).
    block_size: elements per shared scale (32 in the OCP spec).
    axis: the blocked axis, the matmul's contraction axis: -1 (torchao, torch's ``(out, in)``
      weights and activations) or 0 for a Flax kernel ``(in, out)``.
    scaling_mode: a :class:`ScaleCalculationMode` (FLOOR, the spec's, by default).
    token_axes, pad_partial_blocks, ignore_nonfinite: as :class:`AffineQuantizedMinMaxObserver`.

  Examples:
    >>> import jax.numpy as jnp, jax_observers as jo
    >>> obs = jo.MXObserver(block_size=4, token_axes=1)
    >>> x = jnp.array([[600.0, -3.0, 1.0, 0.0, 1.0, 2.0, 3.0, 4.0],
    ...                [1.0, 2.0, 3.0, 4.0, 0.5, 0.5, 0.5, 0.5]])   # 2 tokens, 2 blocks of 4
    >>> state = obs.update(obs.init(x), x)
    >>> obs.exponents(state).tolist(), obs.calculate_qparams(state).scale.tolist()
    ([128, 121], [2.0, 0.015625])
  """

  elem_dtype: Any = jnp.float8_e4m3fn
  block_size: int = 32
  axis: int = -1
  scaling_mode: ScaleCalculationMode = ScaleCalculationMode.FLOOR
  token_axes: int | None = None
  pad_partial_blocks: bool = False
  ignore_nonfinite: bool = False

  def __post_init__(self):
    python_scalars(self)
    dtype = canonical_dtype(self.elem_dtype, allowed=MX_ELEMENT_FORMATS, arg="elem_dtype")
    object.__setattr__(self, "elem_dtype", dtype)
    gran.PerGroup(self.block_size)  # validates block_size
    if not isinstance(self.scaling_mode, ScaleCalculationMode):
      raise ValueError(f"scaling_mode={self.scaling_mode!r} is not a jo.ScaleCalculationMode.")
    if isinstance(self.axis, bool) or not isinstance(self.axis, int):
      raise ValueError(f"axis={self.axis!r} must be an int.")

  def layout(self, x) -> gran.BlockLayout:
    shape = jnp.shape(x)
    axis = normalized_axis(self.axis, shape, name="axis")
    block = tuple(self.block_size if i == axis else 1 for i in range(len(shape)))
    return gran.block_layout(
      shape, gran.PerBlock(block), token_axes=self.token_axes, pad=self.pad_partial_blocks
    )

  def init(self, x) -> fp8.AmaxState:
    float_input(x, type(self).__name__)
    return fp8.AmaxState(amax=jnp.zeros(self.layout(x).state_shape, jnp.float32))

  def update(self, state: fp8.AmaxState, x, *, axis_name=None) -> fp8.AmaxState:
    """Observes ``x``; with ``axis_name``, the global batch (``pmax`` of the block amax)."""
    return fp8.accumulate_amax(
      self, state, x, axis_name=axis_name, config=f"block_size={self.block_size}"
    )

  def exponents(self, state: fp8.AmaxState) -> jax.Array:
    """The biased E8M0 bytes (uint8), one per block."""
    return mx_exponent_from_amax(state.amax, self.elem_dtype, self.scaling_mode)

  def calculate_qparams(self, state: fp8.AmaxState) -> QParams:
    """Scales :math:`2^k` as float32, zero point 0."""
    check_state(self, state, fp8.AmaxState, "calculate_qparams", {"amax": (None, jnp.float32)})
    scale = e8m0_to_float32(self.exponents(state))
    return QParams(scale=scale, zero_point=jnp.zeros(scale.shape, jnp.int32))

  def quantize(self, x: jax.typing.ArrayLike, qparams: QParams) -> jax.Array:
    """Elements ``fmt(clip(x * 2**-k, -F, F))``, the reciprocal exact as torchao's."""
    x = float_input(x, type(self).__name__)
    layout = self.layout(x)
    inverse = layout.broadcast(_e8m0_reciprocal(_scale_to_exponent(qparams.scale)))
    scaled = layout.view(x).astype(jnp.float32) * inverse
    return layout.unview(_cast_elements(scaled, self.elem_dtype))

  def dequantize(self, q: jax.typing.ArrayLike, qparams: QParams) -> jax.Array:
    """Float32 values ``q * 2**k``."""
    layout = self.layout(q)
    return layout.unview(layout.view(q).astype(jnp.float32) * layout.broadcast(qparams.scale))


serialization.register_arrays(MXObserver, fp8.AmaxState, ("amax",))
