r"""Power-of-two scales: ``pow2_scale`` on any ``QParams``, and ``Pow2ScaleObserver`` around any observer.

For a scale :math:`s = m \cdot 2^e` with :math:`m \in [1, 2)`:

* ``'floor'``: :math:`2^{\lfloor \log_2 s \rfloor} = 2^e` (torchao float8 ``round_scales_to_power_of_2``);
* ``'ceil'``: :math:`2^{\lceil \log_2 s \rceil}` (INC ``POW2``, AQT ``po2_scale``);
* ``'round'``: :math:`2^{\mathrm{round}(\log_2 s)}`, up when :math:`m > \sqrt 2` (never a tie).

The exponent and mantissa are read from the float32 bits, so the result is exact for every float32,
subnormals included; 0, inf and NaN are returned unchanged (``'ceil'`` just below
:math:`2^{128}` overflows to inf). The zero point is kept: a symmetric scheme stays exact; for an
affine one the representable range :math:`[(q_{min} - z)s', (q_{max} - z)s']` scales about 0 by
:math:`s'/s`, so ``'ceil'`` never clips what the observed range covered and ``'floor'`` may.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_observers._src import serialization
from jax_observers._src.base import Observer, QParams, Quantizer

POW2_MODES = ("floor", "ceil", "round")
# m = 1 + f / 2**23 > sqrt(2)  <=>  (2**23 + f)**2 > 2**47  <=>  f >= isqrt(2**47) + 1 - 2**23
_ROUND_UP_FRACTION = math.isqrt(2**47) + 1 - 2**23


def pow2_round(x: jax.typing.ArrayLike, mode: str) -> jax.Array:
  """``x`` (float32) rounded to a power of two by ``mode``, keeping its sign.

  Examples:
    >>> import jax.numpy as jnp, jax_observers as jo
    >>> s = jnp.array([0.75, 1.0, 1.5, 3e-39])
    >>> [jo.pow2_round(s, m).tolist() for m in ("floor", "ceil", "round")]  # doctest: +NORMALIZE_WHITESPACE
    [[0.5, 1.0, 1.0, 2.938735877055719e-39], [1.0, 1.0, 2.0, 5.877471754111438e-39],
     [1.0, 1.0, 2.0, 2.938735877055719e-39]]
  """
  if mode not in POW2_MODES:
    raise ValueError(f"mode={mode!r} must be one of {POW2_MODES}.")
  x = jnp.asarray(x, jnp.float32)
  bits = lax.bitcast_convert_type(x, jnp.uint32)
  sign = bits & np.uint32(0x80000000)
  biased = ((bits >> 23) & 0xFF).astype(jnp.int32)
  mantissa = (bits & 0x7FFFFF).astype(jnp.int32)
  top = 31 - lax.clz(jnp.maximum(mantissa, 1))  # highest set bit of a subnormal's mantissa
  subnormal = biased == 0
  exponent = jnp.where(subnormal, top - 149, biased - 127)
  fraction = jnp.where(subnormal, (mantissa << jnp.clip(23 - top, 0, 23)) & 0x7FFFFF, mantissa)
  if mode == "ceil":
    exponent = exponent + (fraction != 0)
  elif mode == "round":
    exponent = exponent + (fraction >= _ROUND_UP_FRACTION)
  normal_bits = (jnp.clip(exponent, -126, 128) + 127).astype(jnp.uint32) << 23
  # No test for +-0 here: LLVM folds `(bits & 0x7fffffff) == 0` into `x == 0.0`, which XLA:CPU's
  # denormals-are-zero mode makes true for subnormals. A zero (mantissa 0) gives 0 arithmetically.
  subnormal_bits = jnp.uint32(1) << jnp.clip(exponent + 149, 0, 31).astype(jnp.uint32)
  subnormal_bits = subnormal_bits * jnp.minimum(mantissa, 1).astype(jnp.uint32)
  out = jnp.where(exponent >= -126, normal_bits, subnormal_bits) | sign
  return jnp.where(biased == 0xFF, x, lax.bitcast_convert_type(out, jnp.float32))


def pow2_scale(qparams: QParams, mode: str = "ceil") -> QParams:
  """``qparams`` with the scale rounded to a power of two by ``mode`` and the zero point kept.

  Examples:
    >>> import jax.numpy as jnp, jax_observers as jo
    >>> qp = jo.QParams(scale=jnp.array([0.3, 0.2]), zero_point=jnp.array([0, 3]))
    >>> jo.pow2_scale(qp, "ceil").scale.tolist(), jo.pow2_scale(qp, "floor").zero_point.tolist()
    ([0.5, 0.25], [0, 3])
  """
  return QParams(scale=pow2_round(qparams.scale, mode), zero_point=qparams.zero_point)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Pow2ScaleObserver(Observer, Quantizer):
  r"""Any observer, its scales rounded to powers of two: ``pow2_scale(observer.calculate_qparams)``.

  ``init`` and ``update`` (and the state) are the wrapped observer's.

  Args:
    observer: the wrapped observer config (any ``jo`` observer with qparams).
    mode: ``'floor'``, ``'ceil'`` (default: never clips the observed range) or ``'round'``.

  Examples:
    >>> import jax.numpy as jnp, jax_observers as jo
    >>> obs = jo.Pow2ScaleObserver(
    ...   observer=jo.MinMaxObserver(dtype=jnp.int8, qscheme=jo.per_tensor_symmetric))
    >>> x = jnp.array([-3.0, 1.0])
    >>> float(obs.calculate_qparams(obs.update(obs.init(x), x)).scale)   # 3 / 127.5 -> 2**-5
    0.03125
  """

  observer: Observer
  mode: str = "ceil"

  def __post_init__(self):
    if not isinstance(self.observer, Observer):
      raise ValueError(f"observer={self.observer!r} is not a jo observer config.")
    if not isinstance(self.observer, Quantizer):
      raise ValueError(
        f"observer={type(self.observer).__name__}(...) has no quantization grid (it is no "
        "jo.Quantizer); wrap a uniform, affine, FP8 or MX observer."
      )
    if self.mode not in POW2_MODES:
      raise ValueError(f"mode={self.mode!r} must be one of {POW2_MODES}.")

  def init(self, x):
    return self.observer.init(x)

  def update(self, state, x, *, axis_name=None):
    return self.observer.update(state, x, axis_name=axis_name)

  def calculate_qparams(self, state) -> QParams:
    return pow2_scale(self.observer.calculate_qparams(state), self.mode)

  def quantize(self, x, qparams: QParams):
    """The wrapped observer's ``quantize`` (pass this observer's power-of-two qparams)."""
    return self.observer.quantize(x, qparams)

  def dequantize(self, q, qparams: QParams):
    """The wrapped observer's ``dequantize``."""
    return self.observer.dequantize(q, qparams)


def _to_dict(observer: Pow2ScaleObserver, state) -> dict[str, np.ndarray]:
  return serialization.state_dict(observer.observer, state)


def _from_dict(observer: Pow2ScaleObserver, d, *, strict, example):
  return serialization.load_state_dict(observer.observer, d, strict=strict, example=example)


serialization.register(Pow2ScaleObserver, _to_dict, _from_dict)
