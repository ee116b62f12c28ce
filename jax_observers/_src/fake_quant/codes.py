"""``quantize`` / ``dequantize``: the integer codes behind fake quantization, as real arrays.

``quantize`` returns exactly the clipped codes :func:`fake_quantize_per_tensor_affine` and
:func:`fake_quantize_per_channel_affine` compute, and ``dequantize`` maps them back the same way, so
``dequantize(quantize(x, ...), ...)`` equals the fake-quantized ``x`` bit for bit. For finite inputs
the codes equal ``torch.quantize_per_tensor``/``quantize_per_channel(...).int_repr()`` and the values
``.dequantize()``; for NaN the codes follow the fake-quant kernel (``quant_min``) where
``torch.quantize_per_tensor`` gives ``quant_max`` for 8-bit types and ``quantize_per_channel`` 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_observers._src import compiled
from jax_observers._src.config import float_input
from jax_observers._src.fake_quant import ops

_INT32 = np.iinfo(np.int32)


def _integer_range(dtype, quant_min, quant_max) -> tuple[np.dtype, int, int]:
  try:
    info = jnp.iinfo(dtype)
  except ValueError:
    raise ValueError(f"dtype={dtype!r} is not an integer dtype.") from None
  quant_min = int(info.min) if quant_min is None else quant_min
  quant_max = int(info.max) if quant_max is None else quant_max
  quant_min, quant_max = ops.check_quant_range(quant_min, quant_max)
  if quant_min < info.min or quant_max > info.max:
    raise ValueError(
      f"[quant_min, quant_max] = [{quant_min}, {quant_max}] does not fit dtype {info.dtype}."
    )
  return np.dtype(info.dtype), quant_min, quant_max


@compiled.eager_compiled_function("x", "scale", "zero_point")
def quantize(
  x, scale, zero_point, *, dtype, axis=None, quant_min=None, quant_max=None
) -> jax.Array:
  r"""The integer codes :math:`\mathrm{clip}(z + \mathrm{rne}(x \cdot \tfrac{1}{s}), q_{min}, q_{max})`.

  The same codes :func:`fake_quantize_per_tensor_affine` and :func:`fake_quantize_per_channel_affine`
  produce, so ``dequantize(quantize(x, ...), ...)`` is the fake-quantized ``x``. For finite inputs they
  equal ``torch.quantize_per_tensor``/``quantize_per_channel(...).int_repr()``.

  Args:
    x: a floating-point array.
    scale: per tensor, a float or one-element array; per channel, shape ``(x.shape[axis],)``.
    zero_point: an int (range-checked) or array; per channel an int or float array.
    dtype: the integer dtype of the codes (``jnp.int8``, ``jnp.uint8``, ``jnp.int32``, ...).
    axis: ``None`` for per-tensor, else the channel axis.
    quant_min, quant_max: the code range; defaults to the whole range of ``dtype``.

  Returns:
    An array of ``dtype`` with ``x``'s shape.

  Examples:
    >>> import jax.numpy as jnp, jax_observers as jo
    >>> q = jo.quantize(jnp.array([-1.0, 0.26, 9.0]), 0.1, 3, dtype=jnp.uint8)
    >>> q.tolist(), q.dtype
    ([0, 6, 93], dtype('uint8'))
    >>> jo.dequantize(q, 0.1, 3).tolist()
    [-0.30000001192092896, 0.30000001192092896, 9.0]
  """
  fn = "quantize"
  x = float_input(x, fn)
  dtype, quant_min, quant_max = _integer_range(dtype, quant_min, quant_max)
  if axis is None:
    scale, zero_point = ops.per_tensor_qparams(scale, zero_point, quant_min, quant_max, fn)
    codes, _ = ops.per_tensor_codes(x, scale, zero_point, quant_min, quant_max)
  else:
    axis, scale, zero_point = ops.per_channel_qparams(
      x, scale, zero_point, axis, quant_min, quant_max, fn
    )
    codes, _ = ops.per_channel_codes(x, scale, zero_point, quant_min, quant_max)
  return codes.astype(dtype)


@compiled.eager_compiled_function("q", "scale", "zero_point")
def dequantize(q, scale, zero_point, *, axis=None, dtype=jnp.float32) -> jax.Array:
  r"""Codes back to real values, :math:`(q - z)\, s` rounded once (the fake-quant output).

  Args:
    q: an integer array of codes.
    scale, zero_point: as for :func:`quantize` (a zero point is not range-checked here).
    axis: ``None`` for per-tensor, else the channel axis.
    dtype: the floating dtype of the result (computed in float32, then rounded to ``dtype``).

  Returns:
    An array of ``dtype`` with ``q``'s shape.
  """
  fn = "dequantize"
  q = jnp.asarray(q)
  if not jnp.issubdtype(q.dtype, jnp.integer):
    raise TypeError(f"{fn} takes integer codes; got dtype {q.dtype}.")
  if axis is None:
    if isinstance(zero_point, (int, np.integer)):
      zero_point = jnp.asarray(zero_point, jnp.int32)
    scale, zero_point = ops.per_tensor_qparams(scale, zero_point, _INT32.min, _INT32.max, fn)
  else:
    _, scale, zero_point = ops.per_channel_qparams(
      q, scale, zero_point, axis, _INT32.min, _INT32.max, fn
    )
  return ops.dequantize_codes(q.astype(jnp.int32), scale, zero_point).astype(dtype)
