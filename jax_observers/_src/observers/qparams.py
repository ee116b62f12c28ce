r"""From a (min, max) range to ``scale`` and ``zero_point``: torch's ``_calculate_qparams``.

With :math:`m^- = \min(m, 0)`, :math:`M^+ = \max(M, 0)` and every step one float32 rounding:

* affine: :math:`s = \max(\frac{M^+ - m^-}{q_{max} - q_{min}}, \epsilon)`,
  :math:`z = \mathrm{clip}(q_{min} - \mathrm{rne}(m^- / s), q_{min}, q_{max})`;
* symmetric: :math:`s = \max(\frac{\max(-m^-, M^+)}{(q_{max} - q_{min}) / 2}, \epsilon)`, ``z`` fixed
  by the dtype (128 for uint8, the range midpoint for a custom uint8 range, 32768 for uint16, else 0);
* float qparams: :math:`s = \frac{M - m}{q_{max} - q_{min}}` (1 where :math:`s \le \epsilon`),
  :math:`z = -m / s` as a float.

A range never observed (``m = +inf, M = -inf``) gives torch's default ``scale = 1, zero_point = 0``,
and so does, per entry, a degenerate one (``m > M`` or NaN, on which torch asserts).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jax_observers._src import numerics
from jax_observers._src.base import QParams, QScheme, valid_range


def symmetric_zero_point(dtype, quant_range, has_customized_qrange, reduce_range) -> int:
  """torch's fixed zero point for symmetric schemes (with the uint8 reduce_range fix)."""
  qmin, qmax = quant_range
  if dtype == np.uint8:
    if has_customized_qrange:
      return (qmin + qmax) // 2
    # torch returns 128 even for reduce_range's [0, 127]; the upper midpoint stays in range.
    return (qmin + qmax + 1) // 2
  if dtype == np.uint16:
    return 2**15
  return 0


def calculate_qparams(min_val, max_val, observer) -> QParams:
  """torch's ``_calculate_qparams`` for a UniformObserver config, bit for bit in float32."""
  qmin, qmax = observer.quant_range
  eps = np.float32(observer.eps)
  min_val = jnp.asarray(min_val, jnp.float32)
  max_val = jnp.asarray(max_val, jnp.float32)
  min_neg = jnp.minimum(min_val, 0.0)
  max_pos = jnp.maximum(max_val, 0.0)
  qscheme = observer.qscheme
  if qscheme.is_symmetric:
    max_pos = jnp.maximum(-min_neg, max_pos)
    scale = jnp.maximum(numerics.exact_div(max_pos, np.float32((qmax - qmin) / 2)), eps)
    zp = symmetric_zero_point(
      observer.dtype, (qmin, qmax), observer.has_customized_qrange, observer.reduce_range
    )
    zero_point = jnp.full(scale.shape, zp, jnp.int32)
  elif qscheme == QScheme.PER_CHANNEL_AFFINE_FLOAT_QPARAMS:
    scale = numerics.exact_div(max_val - min_val, np.float32(qmax - qmin))
    scale = jnp.where(scale > eps, scale, jnp.float32(1.0))
    zero_point = numerics.exact_div(-min_val, scale)
  else:
    scale = jnp.maximum(numerics.exact_div(max_pos - min_neg, np.float32(qmax - qmin)), eps)
    rounded = numerics.x86_to_int32(jnp.round(numerics.exact_div(min_neg, scale)))
    zero_point = jnp.clip(np.int32(qmin) - rounded, np.int32(qmin), np.int32(qmax))
  # Never observed (+inf, -inf), and degenerate ranges torch asserts on (min_val > max_val, NaN):
  # torch's default, never a collapsed scale.
  seen = valid_range(min_val, max_val)
  return QParams(
    scale=jnp.where(seen, scale, jnp.float32(1.0)),
    zero_point=jnp.where(seen, zero_point, jnp.zeros_like(zero_point)),
  )
