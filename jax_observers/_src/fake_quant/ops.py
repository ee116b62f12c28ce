r"""torch's fake-quantization ops with their straight-through gradient, and real quantize/dequantize.

With :math:`s` = ``scale``, :math:`z` = ``zero_point`` and every step one float32 rounding, as torch's
CPU kernels compute it:

.. math::
   q_f = z + \mathrm{rne}(x \cdot \mathrm{rn}(1/s)), \qquad
   y = (\mathrm{clip}(q_f, q_{min}, q_{max}) - z)\, s, \qquad
   \frac{\partial y}{\partial x} = [\, q_{min} \le q_f \le q_{max} \,].

* ``x`` is multiplied by the float32 reciprocal ``1/s``, never divided by ``s``; the result differs
  from ``rne(x / s)`` on some inputs (torch E13).
* The gradient mask is on the **unclamped** rounded value ``q_f``, so the window is
  :math:`[(q_{min} - z - \tfrac12) s, (q_{max} - z + \tfrac12) s]`, ties to even (E14).
* NaN maps to :math:`q_{min}` with gradient 0, :math:`\pm\infty` to :math:`q_{max}, q_{min}` (E15).
* A per-channel **float** zero point (``per_channel_affine_float_qparams``) rounds after adding it:
  :math:`q = \mathrm{rne}(\mathrm{fma}(x, 1/s, z))`, one fused multiply-add as in torch's
  AVX2/AVX512 kernels, and :math:`y` is rounded once from :math:`(q - z) s`.
* float16/bfloat16 inputs are computed in float32 and the result is rounded to the input dtype;
  float64 inputs (with ``jax_enable_x64``) round :math:`x \cdot (1/s)` in float64, as torch does.
* No gradient reaches ``scale`` or ``zero_point`` (zero cotangents; torch raises if they require
  grad). Use :mod:`learnable_ops` to learn them.

Deviations from torch 2.13 on x86 (everything else is bit for bit, NaN and ties included):

* Per channel, +inf and :math:`|x/s| \ge 2^{63}` saturate to :math:`q_{max}` like the per-tensor op
  (and torch on CUDA/ARM); torch's x86 ``int64`` cast sends them to :math:`q_{min}`. The gradient
  mask is 0 either way.
* Per channel with a range wider than :math:`2^{24}` codes (int32), :math:`(q - z) s` is rounded
  twice here (float32 difference, then product); torch rounds the exact product once (in double).
* Negative ``axis`` values are accepted (torch requires ``0 <= axis``); an int ``zero_point`` array
  is range-checked only when its values are known at trace time.

:mod:`codes` exposes the integer codes themselves (``quantize``/``dequantize``).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_observers._src import compiled, numerics
from jax_observers._src.config import float_input, normalized_axis

_INT32 = np.iinfo(np.int32)
# Largest |quant_min|, |quant_max| for float32 codes: every code, and code - (z & 255), is exact.
_FLOAT_CODES = 2**24 - 256


def check_quant_range(quant_min, quant_max) -> tuple[int, int]:
  """``(quant_min, quant_max)`` as Python ints inside int32, with ``quant_min <= quant_max``."""
  for name, v in (("quant_min", quant_min), ("quant_max", quant_max)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
      raise TypeError(f"{name}={v!r} must be a Python int (a static value, not an array).")
    if not _INT32.min <= v <= _INT32.max:
      raise ValueError(f"{name}={v} is outside the int32 range.")
  if quant_min > quant_max:
    raise ValueError(f"quant_min={quant_min} must be less than or equal to quant_max={quant_max}.")
  return int(quant_min), int(quant_max)


def _compute_dtype(x) -> np.dtype:
  return np.dtype(np.float64) if x.dtype == np.float64 else np.dtype(np.float32)


def _bounds(quant_min: int, quant_max: int, dtype) -> tuple[Any, Any]:
  """Thresholds ``lo, hi`` with ``f >= quant_min`` iff ``f >= lo`` and ``f <= quant_max`` iff ``f <= hi``."""
  if dtype == np.float64:
    return np.float64(quant_min), np.float64(quant_max)
  return numerics.float32_at_least(quant_min), numerics.float32_at_most(quant_max)


def _clip_codes(q_f, quant_min: int, quant_max: int) -> jax.Array:
  """int32 ``clip(q_f)`` with exact integer bounds; NaN goes to ``quant_min`` (torch's ``fmax``)."""
  lo, hi = _bounds(quant_min, quant_max, q_f.dtype)
  above_min = q_f >= lo  # False for NaN
  above_max = q_f > hi
  inside = above_min & ~above_max
  codes = jnp.where(inside, q_f, jnp.zeros_like(q_f)).astype(jnp.int32)
  return jnp.where(above_min, jnp.where(above_max, np.int32(quant_max), codes), np.int32(quant_min))


def _float_codes(q_f, quant_min: int, quant_max: int, signed_zero: bool) -> jax.Array:
  """``float32(_clip_codes(q_f))`` without the int32 round trip, for ranges inside ``_FLOAT_CODES``.

  Float selects on the rounded ``q_f`` (an integer or NaN/inf). ``signed_zero``: ``q_f`` may be -0.0
  (a float zero point), made +0.0 as ``float(0)``; an int one is added at run time, which gives +0.0.
  """
  lo, hi = np.float32(quant_min), np.float32(quant_max)
  inside = jnp.where(q_f == 0, np.float32(0), q_f) if signed_zero else q_f
  return jnp.where(q_f >= lo, jnp.where(q_f > hi, hi, inside), lo)


def _in_range(q_f, quant_min: int, quant_max: int, *, exact: bool) -> jax.Array:
  """The STE mask. Per tensor, torch compares ``float(quant_min) <= q_f`` (bounds rounded to float)."""
  if exact:
    lo, hi = _bounds(quant_min, quant_max, q_f.dtype)
  else:
    lo, hi = np.asarray(quant_min, q_f.dtype), np.asarray(quant_max, q_f.dtype)
  return (q_f >= lo) & (q_f <= hi)


def _channel_shape(x, axis: int) -> tuple[int, ...]:
  return tuple(x.shape[axis] if i == axis else 1 for i in range(x.ndim))


def _inverse(scale) -> jax.Array:
  """float32 ``1 / scale``, one IEEE division (as torch's ``1.0f / scale``)."""
  return numerics.exact_div(np.float32(1.0), scale)


def _at_run_time(zero_point, dtype) -> jax.Array:
  """``zero_point`` as ``dtype`` behind a barrier, so ``rne(...) + z`` is a real add: +0.0 for a code
  of 0 even when ``z`` is a constant 0 (XLA folds ``r + 0`` to ``r``, which keeps ``rne``'s -0.0)."""
  return lax.optimization_barrier(zero_point.astype(dtype))


def per_tensor_codes(x, scale, zero_point, quant_min, quant_max):
  """``(codes, q_f)``: int32 clipped codes and the unclamped ``z + rne(x * (1/s))``."""
  dtype = _compute_dtype(x)
  q_f = jnp.round(x.astype(dtype) * _inverse(scale).astype(dtype)) + _at_run_time(zero_point, dtype)
  return _clip_codes(q_f, quant_min, quant_max), q_f


def per_channel_codes(x, scale, zero_point, quant_min, quant_max):
  """Per-channel ``(codes, q_f)``; ``scale``/``zero_point`` already shaped to broadcast against ``x``.

  An integer zero point is added after rounding; a float one before rounding, in one FMA (float32).
  +inf and values past int64 go to ``quant_max`` (torch's x86 int64 cast sends them to quant_min).
  """
  dtype = _compute_dtype(x)
  inv = _inverse(scale)
  if jnp.issubdtype(zero_point.dtype, jnp.floating) and dtype == np.float64:
    # lrintf(double) rounds the double sum to float first.
    v = numerics.rounded(x * inv.astype(dtype)) + zero_point.astype(dtype)
    q_f = jnp.round(v.astype(jnp.float32))
  elif jnp.issubdtype(zero_point.dtype, jnp.floating):
    q_f = jnp.round(numerics.fma(x.astype(jnp.float32), inv, zero_point.astype(jnp.float32)))
  else:
    q_f = jnp.round(x.astype(dtype) * inv.astype(dtype)) + _at_run_time(zero_point, dtype)
  return _clip_codes(q_f, quant_min, quant_max), q_f


def _float_code_minus(codes, zero_point) -> jax.Array:
  """``float32(codes - zero_point)`` for :func:`_float_codes` and an int32 zero point, rounded once.

  With ``z = h + l``, ``l = z & 255``: ``codes - l`` is exact and ``h`` (a multiple of 256) is a
  float32, so only the last subtraction rounds, as torch's int64 difference converted to float.
  """
  low = zero_point & np.int32(255)
  high = (zero_point - low).astype(jnp.float32)
  # The barrier keeps XLA from folding a constant zero point's two parts into one rounded float.
  return (codes - low.astype(jnp.float32)) - lax.optimization_barrier(high)


def dequantize_codes(codes, scale, zero_point, dtype=np.float32) -> jax.Array:
  """``(codes - zero_point) * scale`` rounded once to ``dtype``, kept apart from any later add.

  ``codes`` are int32, or float32 from :func:`_float_codes` (the same numbers without int32
  conversions, which cost XLA:CPU more than the rest of the fake quantization). float64 is for
  torch's per-channel kernel on float64 inputs, which computes in double.
  """
  if dtype == np.float64:
    y = (codes.astype(dtype) - zero_point.astype(dtype)) * scale.astype(dtype)
  elif jnp.issubdtype(zero_point.dtype, jnp.floating):
    # torch computes (q - z) * s in double: the difference is exact, the product rounds once.
    high, low = numerics.two_sum(codes.astype(jnp.float32), -zero_point.astype(jnp.float32))
    y = numerics.fma(high, scale, numerics.rounded(low * scale))
  elif jnp.issubdtype(codes.dtype, jnp.floating):
    y = _float_code_minus(codes, zero_point.astype(jnp.int32)) * scale
  else:
    y = numerics.int_sub_to_float32(codes, zero_point) * scale
  return numerics.rounded(y)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _fake_quant(x, scale, zero_point, spec):
  return _fake_quant_fwd(x, scale, zero_point, spec)[0]


def _fake_quant_fwd(x, scale, zero_point, spec):
  axis, quant_min, quant_max = spec
  if axis is None:
    codes, q_f = per_tensor_codes(x, scale, zero_point, quant_min, quant_max)
    mask = _in_range(q_f, quant_min, quant_max, exact=x.dtype == np.float64)
  else:
    codes, q_f = per_channel_codes(x, scale, zero_point, quant_min, quant_max)
    mask = _in_range(q_f, quant_min, quant_max, exact=True)
  precision = np.float64 if axis is not None and x.dtype == np.float64 else np.float32
  if precision == q_f.dtype == np.float32 and max(-quant_min, quant_max) <= _FLOAT_CODES:
    signed_zero = jnp.issubdtype(zero_point.dtype, jnp.floating)
    codes = _float_codes(q_f, quant_min, quant_max, signed_zero)  # the int32 codes go unused
  y = dequantize_codes(codes, scale, zero_point, precision).astype(x.dtype)
  return y, mask


def times_mask(g, mask) -> jax.Array:
  """torch's ``dY * mask``: ``g`` where the mask is set, else ``g * 0.0`` (-0.0, or NaN for NaN/inf).

  A multiply by the mask as a float, which XLA would turn into a select (+0.0) if it could see the
  factor is a converted predicate; the barrier hides that. Linear in ``g``, so it is its own
  transpose: forward mode (``jax.jvp``) and reverse mode (``jax.grad``) get the same numbers.
  """
  return g * lax.optimization_barrier(mask.astype(g.dtype))


@_fake_quant.defjvp
def _fake_quant_jvp(spec, primals, tangents):
  """The straight-through estimator, ``dy = dx * mask``, as a JVP: JAX transposes it for ``grad``.

  ``scale`` and ``zero_point`` get no derivative (zero cotangents; torch raises if they require
  grad): use :mod:`learnable_ops` to learn them.
  """
  x, scale, zero_point = primals
  y, mask = _fake_quant_fwd(x, scale, zero_point, spec)
  return y, times_mask(tangents[0].astype(y.dtype), mask)


@functools.partial(jax.custom_jvp, nondiff_argnums=(4,))
def _fake_quant_where(x, scale, zero_point, enabled, spec):
  return jnp.where(enabled, _fake_quant_fwd(x, scale, zero_point, spec)[0], x)


@_fake_quant_where.defjvp
def _fake_quant_where_jvp(spec, primals, tangents):
  """``dy = dx * mask`` where ``enabled``, else ``dx * 1``: one product, the bits of a cond."""
  x, scale, zero_point, enabled = primals
  y, mask = _fake_quant_fwd(x, scale, zero_point, spec)
  return jnp.where(enabled, y, x), times_mask(tangents[0].astype(y.dtype), mask | ~enabled)


def fake_quantize_where(enabled, x, scale, zero_point, axis, quant_min, quant_max) -> jax.Array:
  """``fake_quantize_per_{tensor,channel}_affine(x, ...)`` where the flag ``enabled`` is set, else x.

  The same numbers and gradients as a ``lax.cond`` on ``enabled``, but both sides are computed and
  selected, so XLA fuses the fake quantization with its neighbours and its straight-through mask
  with the backward pass (a ``lax.cond`` is a fusion barrier in both passes). ``axis=None``: per
  tensor.
  """
  per_tensor = axis is None
  fn = f"fake_quantize_per_{'tensor' if per_tensor else 'channel'}_affine"
  x = float_input(x, fn)
  quant_min, quant_max = check_quant_range(quant_min, quant_max)
  if per_tensor:
    scale, zero_point = per_tensor_qparams(scale, zero_point, quant_min, quant_max, fn)
  else:
    axis, scale, zero_point = per_channel_qparams(
      x, scale, zero_point, axis, quant_min, quant_max, fn
    )
  enabled = jnp.asarray(enabled, jnp.bool_)
  return _fake_quant_where(x, scale, zero_point, enabled, (axis, quant_min, quant_max))


def per_tensor_qparams(scale, zero_point, quant_min, quant_max, fn: str):
  """torch's two per-tensor overloads: a Python int zero point is range-checked, an array is not.

  An array zero point is converted like ``zero_point.item().toInt()``: a float one is truncated.
  """
  if isinstance(zero_point, (bool, float, np.floating)):
    raise TypeError(f"{fn}: zero_point={zero_point!r} must be an int or an array.")
  if isinstance(zero_point, (int, np.integer)):
    if not quant_min <= zero_point <= quant_max:
      raise ValueError(
        f"{fn}: zero_point={zero_point} must be between quant_min={quant_min} and "
        f"quant_max={quant_max}."
      )
  zero_point = jnp.asarray(zero_point)
  scale = jnp.asarray(scale)
  for name, v in (("scale", scale), ("zero_point", zero_point)):
    if v.size != 1:
      raise ValueError(f"{fn}: {name} must hold one value per tensor; got shape {v.shape}.")
  if jnp.issubdtype(zero_point.dtype, jnp.floating):
    zero_point = jnp.trunc(zero_point)
  return scale.reshape(()).astype(jnp.float32), zero_point.reshape(()).astype(jnp.int32)


def per_channel_qparams(x, scale, zero_point, axis, quant_min, quant_max, fn: str):
  """``(axis, scale, zero_point)`` checked against ``x`` and shaped to broadcast along ``axis``."""
  axis = normalized_axis(axis, x.shape, name="axis", where=f"{fn}: ")
  channels = x.shape[axis]
  # torch range-checks int zero points; only values known at trace time can be checked.
  known = None if isinstance(zero_point, jax.core.Tracer) else np.asarray(zero_point)
  scale, zero_point = jnp.asarray(scale), jnp.asarray(zero_point)
  for name, v in (("scale", scale), ("zero_point", zero_point)):
    if v.shape != (channels,):
      raise ValueError(
        f"{fn}: {name} must have shape ({channels},), one value per channel of x along "
        f"axis={axis} (x has shape {x.shape}); got shape {v.shape}."
      )
  if not jnp.issubdtype(scale.dtype, jnp.floating):
    raise TypeError(f"{fn}: scale must be a float array; got dtype {scale.dtype}.")
  if jnp.issubdtype(zero_point.dtype, jnp.integer):
    if (
      known is not None and known.size and not quant_min <= known.min() <= known.max() <= quant_max
    ):
      raise ValueError(
        f"{fn}: zero_point values {known.tolist()} must lie in [{quant_min}, {quant_max}]."
      )
    zero_point = zero_point.astype(jnp.int32)
  elif not jnp.issubdtype(zero_point.dtype, jnp.floating):
    raise TypeError(f"{fn}: zero_point must be an int or float array; got {zero_point.dtype}.")
  shape = _channel_shape(x, axis)
  return axis, scale.astype(jnp.float32).reshape(shape), zero_point.reshape(shape)


@compiled.eager_compiled_function("x", "scale", "zero_point")
def fake_quantize_per_tensor_affine(x, scale, zero_point, quant_min, quant_max) -> jax.Array:
  r"""torch's ``fake_quantize_per_tensor_affine``: quantize and dequantize, straight-through gradient.

  .. math::
     y = (\mathrm{clip}(z + \mathrm{rne}(x \cdot \tfrac{1}{s}), q_{min}, q_{max}) - z)\, s,
     \qquad \partial y / \partial x = [q_{min} \le z + \mathrm{rne}(x/s) \le q_{max}]

  Args:
    x: a floating-point array; ``y`` has its dtype.
    scale: a Python float or a one-element float array (rounded to float32).
    zero_point: a Python int, checked against the range (torch's scalar overload), or a one-element
      array, not checked and truncated if float (torch's tensor overload).
    quant_min, quant_max: the static integer range.

  Returns:
    The fake-quantized array. Gradients flow to ``x`` only (``scale``/``zero_point`` get zero; torch
    raises if they require grad).

  Raises:
    ValueError: ``quant_min > quant_max``, or an int ``zero_point`` outside the range.

  Examples:
    >>> import jax, jax.numpy as jnp, jax_observers as jo
    >>> x = jnp.array([-1.251, -1.25, 4.25, 4.251])
    >>> jo.fake_quantize_per_tensor_affine(x, 0.5, 2, 0, 10).tolist()
    [-1.0, -1.0, 4.0, 4.0]
    >>> jax.grad(lambda x: jo.fake_quantize_per_tensor_affine(x, 0.5, 2, 0, 10).sum())(x).tolist()
    [0.0, 1.0, 1.0, 0.0]
  """
  fn = "fake_quantize_per_tensor_affine"
  x = float_input(x, fn)
  quant_min, quant_max = check_quant_range(quant_min, quant_max)
  scale, zero_point = per_tensor_qparams(scale, zero_point, quant_min, quant_max, fn)
  return _fake_quant(x, scale, zero_point, (None, quant_min, quant_max))


@compiled.eager_compiled_function("x", "scale", "zero_point")
def fake_quantize_per_channel_affine(x, scale, zero_point, axis, quant_min, quant_max) -> jax.Array:
  r"""torch's ``fake_quantize_per_channel_affine``: one ``scale``/``zero_point`` per slice along ``axis``.

  For channel :math:`c`, an int zero point gives
  :math:`y = (\mathrm{clip}(z_c + \mathrm{rne}(x \cdot \tfrac{1}{s_c})) - z_c)\, s_c`; a float zero point
  (``per_channel_affine_float_qparams``) gives :math:`y = (\mathrm{clip}(\mathrm{rne}(\mathrm{fma}(x,
  \tfrac{1}{s_c}, z_c))) - z_c)\, s_c`. The gradient is the straight-through mask on the unclamped
  code.

  Args:
    x: a floating-point array.
    scale: float array of shape ``(x.shape[axis],)``.
    zero_point: int or float array of that shape; concrete int values are range-checked.
    axis: the channel axis; negative values count from the end (torch rejects them).
    quant_min, quant_max: the static integer range.

  Returns:
    The fake-quantized array, with ``x``'s dtype.

  Raises:
    ValueError: a bad range, ``axis`` out of range, or ``scale``/``zero_point`` of the wrong shape.

  Examples:
    >>> import jax.numpy as jnp, jax_observers as jo
    >>> x = jnp.array([[0.26, -1.0], [0.26, -1.0]])
    >>> s, z = jnp.array([0.1, 0.5]), jnp.array([0, 1], jnp.int32)
    >>> jo.fake_quantize_per_channel_affine(x, s, z, 0, -128, 127).tolist()
    [[0.30000001192092896, -1.0], [0.5, -1.0]]
  """
  fn = "fake_quantize_per_channel_affine"
  x = float_input(x, fn)
  quant_min, quant_max = check_quant_range(quant_min, quant_max)
  axis, scale, zero_point = per_channel_qparams(
    x, scale, zero_point, axis, quant_min, quant_max, fn
  )
  return _fake_quant(x, scale, zero_point, (axis, quant_min, quant_max))
