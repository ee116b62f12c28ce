r"""fbgemm's ``ChooseQuantizationParams`` (torch's fused fake-quant kernel) on the device, bit for bit.

:func:`choose_quantization_params_numpy` is the reference: the C++ in NumPy float32/float64, bit for
bit with torch 2.13 (``tests/fake_quant/fused_parity_test.py``). :func:`choose_quantization_params` computes
the same numbers with float32/int32 operations only (x64 off, no host callback, so it runs under
``jit``/``vmap`` and ``jax.export`` serializes it). Each float64 step is emulated exactly with
:mod:`float_float` expansions:

* :math:`f_{32}(\mathrm{rn}_{64}(m\,q))` (the symmetric range) is the exact product of ``m`` and the
  integer ``q`` (two float32 parts) rounded by :func:`f32_of_f64`, which reproduces the double rounding;
* the scale :math:`f_{32}(\mathrm{rn}_{64}(\mathrm{rn}_{64}(M - m)/(q_{max} - q_{min})))`: the
  difference is rounded by :func:`float_float.round2_to_f64`, divided by long division
  (:func:`float_float.div_f32`), rounded by :func:`f32_of_f64`;
* the zero point: :math:`t = \mathrm{rn}_{64}(r/s)` by long division, then
  :math:`\mathrm{rn}_{64}(q - t)` and :math:`\mathrm{rn}_{64}(|q| + |t|)` by :func:`round_to_f64`, an
  exact comparison (:func:`float_float.less`) and an exact ``rint`` (:func:`float_float.rint_small`).

The quotients never need their exact remainder: a float64 midpoint is never a quotient of these
operands (a float32 or float64 numerator, a float32 or 32-bit integer divisor: the midpoint's odd
significand has 54 bits, so its product with the divisor does not fit the numerator), and none lies
closer than :math:`2^{-77}` relative (:math:`2^{-85}` for divisors up to :math:`2^{32}`), while the
long divisions are good to :math:`2^{-95}`.

Operands are normalised to :math:`[1, 2)` on their exponent bits before each product and quotient,
so huge ranges round, and overflow to ``inf``, exactly as in float64. XLA:CPU flushes subnormal
float32 values (on input and output), which the reference keeps. Signs and zero tests are read from
the bits; a range whose magnitudes are all below :math:`2^{-60}` is computed scaled by
:math:`2^{100}`, where the reference's subnormal results are rounded to their grid explicitly (a
quotient's tie by the sign of its exact remainder); an amplified subnormal bound is read from its
mantissa bits. Any other subnormal operand meets a number :math:`2^{66}` times larger, where it
cannot change a float64 rounding, and is flushed; so is a subnormal result of the amplification
(below :math:`2^{-111}` after division by the scale, it cannot move the zero point).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax_observers._src import float_float as ff
from jax_observers._src.base import QParams
from jax_observers._src.histogram.search_device import f32_of_f64, round_to_f64
from jax_observers._src.numerics import exact_div, rounded, two_prod, two_sum

_F32, _F64 = np.float32, np.float64
SMALL_SCALE_THRESHOLD = _F32(6.1e-5)  # fbgemm's cut-off, CPU only (the CUDA kernel has none)
_INT32_MIN = np.int32(np.iinfo(np.int32).min)
_TINY_BITS = int(np.array(2.0**-60, _F32).view(np.int32))
_K = 100  # ranges below 2**-60 are computed scaled by 2**_K ...
_SUB = _F32(2.0 ** (_K - 126))  # ... where the reference's subnormals lie below 2**-126 * 2**_K
_GRID = _K - 149  # on a grid of 2**-149 * 2**_K
_STEPS = 5  # long-division terms: 2**-110


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


def _rounded_f32(terms, e, tiny=None):
  """``f32(f64(x))`` for ``x = sum(terms) * 2**e`` (a faithful expansion near 1); where ``tiny``,
  values below ``_SUB`` go to the scaled subnormal grid ``2**_GRID`` instead (through float64 too)."""
  if tiny is None:
    (out,) = ff.fusion_barrier(ff.ldexp(f32_of_f64(terms), e))  # overflows to inf as float32 does
    return out
  f64 = ff.fusion_barrier(*round_to_f64(terms))
  (out,) = ff.fusion_barrier(ff.ldexp(f32_of_f64(f64), e))  # f32 of the exact float64
  grid = ff.rint_small([ff.ldexp(t, jnp.where(tiny, e - _GRID, 0)) for t in f64])  # < 2**23 if used
  return jnp.where(tiny & (jnp.abs(out) < _SUB), grid * ff.pow2(_GRID), out)


def _div_f32(num, den, tiny):
  """The reference's float32 ``num / den``; where ``tiny`` (scaled operands), results below ``_SUB``
  go to the subnormal grid, a tie decided by the sign of the exact remainder."""
  q = exact_div(num, den)
  y = q * ff.pow2(-_GRID)  # exact
  low = jnp.floor(y)
  p, e = two_prod(q, jnp.broadcast_to(den, q.shape))
  side = ff.sign([-e, num - p]) * jnp.sign(den)  # num - p exact (Sterbenz): the true num/den vs q
  half = y - low == _F32(0.5)  # q is a grid midpoint: the side of num/den decides (ties even)
  k = jnp.where(half & (side > 0), low + _F32(1), jnp.where(half & (side < 0), low, jnp.round(y)))
  return jnp.where(tiny & (jnp.abs(q) < _SUB), k * ff.pow2(_GRID), q)


def _rows(values, ndim):
  """Python numbers as a float32 column ``[k, 1, ...]`` against ``[k, ...]`` stacked operands."""
  return np.asarray(values, _F32).reshape((len(values),) + (1,) * ndim)


def _mul_f32(m, factors):
  """The reference's ``f32(double(m) * q)`` for finite ``m >= 0`` (``[k, ...]``) and integers ``q``
  (one per row, each as two float32 parts from :func:`float_float.split_int`). A scaled subnormal
  ``m`` is a multiple of the grid, and so is its product below ``_SUB``: exact, no regrid."""
  e = ff.exponent(m)
  mn = ff.ldexp(m, -e)
  hi = jnp.broadcast_to(_rows([f[0] for f in factors], m.ndim - 1), mn.shape)
  p_hi, e_hi = two_prod(mn, hi)
  if all(f[1] == 0 for f in factors):
    return _rounded_f32([e_hi, p_hi], e)  # already a non-overlapping pair
  p_lo, e_lo = two_prod(mn, jnp.broadcast_to(_rows([f[1] for f in factors], m.ndim - 1), mn.shape))
  return _rounded_f32(ff.renormalize([e_lo, p_lo, e_hi, p_hi], passes=2), e)  # no cancellation


def _scale(lo, hi, span, tiny):
  """``f32((double(hi) - lo) / span)`` for ``lo <= 0 <= hi``, finite; scaled like them."""
  e = ff.exponent(jnp.maximum(-lo, hi))
  s, err = two_sum(ff.ldexp(hi, -e), -ff.ldexp(lo, -e))  # in [1, 4): a flushed rest is negligible
  d2, d1 = ff.fusion_barrier(*ff.round2_to_f64(s, err))  # float64(hi - lo), smallest first
  if span <= 2**24:  # an exact float32 divisor: each term by itself, to 2**-96 of the quotient
    q1, q2 = ff.div_f32(d1, _F32(span), 4), ff.div_f32(d2, _F32(span), 3)
    terms = [q1[0], q2[0], q1[1], q2[1], q1[2], q2[2], q1[3]]  # about sorted
    return _rounded_f32(ff.renormalize(terms, passes=2), e, tiny)  # no cancellation
  q = ff.div_expansion([d2, d1], ff.split_int(span), _STEPS)
  return _rounded_f32(q, e, tiny)


def _quotient_f64(x, s):
  """``rn64(x / s)`` as three exact float32 terms, for finite ``x`` and normal ``s > 0``."""
  ex, es = ff.exponent(x), ff.exponent(s)
  q = ff.div_f32(ff.ldexp(x, -ex), ff.ldexp(s, -es), 4)  # 2**-96: no midpoint is that close
  shift = jnp.maximum(ex - es, -252)
  return ff.fusion_barrier(*(ff.ldexp(t, shift) for t in round_to_f64(q)))


def _f64_sum(*parts):
  """``rn64`` of an exact sum (integers and float64 values): two passes here and round_to_f64's
  three cover its worst cancellation, a condition number of 2**54."""
  terms = [t for part in parts for t in part]
  return ff.fusion_barrier(*round_to_f64(ff.renormalize(terms, passes=2)))


def _zero_point(lo, hi, scale, quant_min, quant_max):
  """The zero point from the final range and scale (before the preserve-sparsity midpoint)."""
  r = jnp.stack([ff.flush_subnormal(lo), ff.flush_subnormal(hi)])  # r / s below 2**-111: no effect
  scale = jnp.broadcast_to(scale, r.shape)
  t = exact_div(r, scale)  # only its NaN / inf class is used
  finite_scale = jnp.isfinite(scale)
  r = jnp.where(finite_scale & jnp.isfinite(t), r, _F32(0))  # a finite r / inf is 0
  tl, th = zip(*_quotient_f64(r, jnp.where(finite_scale, scale, _F32(1))), strict=True)  # tl <= 0
  # from_min = qmin - tl, from_max = qmax - th, error_min = |qmin| - tl, error_max = |qmax| + th:
  q = [quant_min, quant_max, abs(quant_min), abs(quant_max)]
  parts = [ff.split_int(v) for v in q]
  terms = [jnp.stack([-a, -b, -a, b]) for a, b in zip(tl, th, strict=True)]
  ints = [jnp.broadcast_to(_rows([p[i] for p in parts], lo.ndim), terms[0].shape) for i in (1, 0)]
  if all(p[1] == 0 for p in parts):
    ints = ints[1:]
  from_min, from_max, error_min, error_max = zip(*_f64_sum(ints, terms), strict=True)
  nan_lo, nan_hi = jnp.isnan(t[0]), jnp.isnan(t[1])
  # NaN compares false; an infinite error_min (t_lo = -inf) never wins; an infinite error_max does.
  less = ~nan_lo & ~nan_hi & ~jnp.isinf(t[0]) & (jnp.isinf(t[1]) | ff.less(error_min, error_max))
  initial = ff.fusion_barrier(
    *(jnp.where(less, a, b) for a, b in zip(from_min, from_max, strict=True))
  )
  qmin, qmax = ff.split_int(quant_min), ff.split_int(quant_max)
  if max(abs(quant_min), abs(quant_max)) <= 2**20:
    # Beyond 2**21 the clip decides: rint_small's range is enough.
    big = jnp.abs(initial[-1]) > _F32(2.0**21)
    initial = [jnp.where(big, _F32(0), t) for t in initial[:-1]] + [
      jnp.where(big, jnp.sign(initial[-1]) * _F32(2.0**21), initial[-1])
    ]
    nearest = jnp.clip(ff.rint_small(initial), _F32(quant_min), _F32(quant_max))
    zero_point = nearest.astype(jnp.int32)
  else:
    n_hi, n_lo = ff.fusion_barrier(*ff.rint(initial))
    above = ff.sign([n_lo, n_hi, -qmax[1], -qmax[0]]) >= 0
    below = ff.sign([n_lo, n_hi, -qmin[1], -qmin[0]]) <= 0
    # int32 arithmetic wraps, and the sum is inside int32 whenever used: halve big n_hi (even).
    big = jnp.abs(n_hi) >= _F32(2.0**24)
    whole = jnp.where(big, (n_hi * _F32(0.5)).astype(jnp.int32) * 2, n_hi.astype(jnp.int32))
    inside = whole + n_lo.astype(jnp.int32)
    zero_point = jnp.where(above, quant_max, jnp.where(below, quant_min, inside))
  zero_point = jnp.where(~less & jnp.isinf(t[1]), quant_min, zero_point)  # from_max = -inf
  return jnp.where(~less & nan_hi, _INT32_MIN, zero_point).astype(jnp.int32)


def _sparse_range(lo, hi, quant_min, quant_max, tiny):
  """The symmetric range of a straddling ``[lo, hi]`` (``preserve_sparsity``), scaled like them."""
  span = quant_max - quant_min
  sym_min, sym_max = -(span // 2 + 1), span // 2
  if sym_max == 0:  # hi / 0 = inf: the range becomes [-inf, inf * 0]
    return jnp.full_like(lo, -np.inf), jnp.full_like(hi, np.nan)
  tiny = jnp.broadcast_to(tiny, (2, *lo.shape))
  a, b = _div_f32(jnp.stack([lo, hi]), _rows([sym_min, sym_max], lo.ndim), tiny)
  m = jnp.where(jnp.abs(a) < jnp.abs(b), jnp.abs(b), jnp.abs(a))
  finite = jnp.isfinite(m)
  safe = jnp.where(finite, m, _F32(0))
  new_lo, new_hi = _mul_f32(jnp.stack([safe, safe]), [ff.split_int(sym_min), ff.split_int(sym_max)])
  return ff.fusion_barrier(
    jnp.where(finite, new_lo, -m),  # inf * sym_min
    jnp.where(finite, new_hi, m),
  )


def _times(x, exact, tiny, amplifier):
  """``f32(x * amplifier)`` for the unscaled ``x`` (``exact``: its unflushed bits in the normal
  domain); a result below 2**-126 is flushed (it only ever meets numbers 2**100 times larger)."""
  sub = ~tiny & ff.is_subnormal(exact)
  up = jnp.where(sub, ff.upscale(exact, 64), x)
  factor = jnp.where(tiny, ff.pow2(-_K), jnp.where(sub, ff.pow2(-64), _F32(1)))
  return rounded(up * (amplifier * factor))


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _choose(lo, hi, quant_min, quant_max, preserve_sparsity):
  lo_neg, hi_pos = ff.is_negative(lo), ff.is_positive(hi)
  # |min(lo, 0)| and max(hi, 0) below 2**-60: computed scaled by 2**_K (NaN is not tiny).
  mag = jnp.maximum(jnp.where(lo_neg, ff.abs_bits(lo), 0), jnp.where(hi_pos, ff.abs_bits(hi), 0))
  tiny = (mag < _TINY_BITS) & ~jnp.isnan(lo) & ~jnp.isnan(hi)
  lo_v = jnp.where(tiny, ff.upscale(lo, _K), ff.flush_subnormal(lo))
  hi_v = jnp.where(tiny, ff.upscale(hi, _K), ff.flush_subnormal(hi))
  lo_v, hi_v, tiny = ff.fusion_barrier(lo_v, hi_v, tiny)
  lo_exact = lo  # unflushed, for the small-scale products
  if preserve_sparsity:
    straddle = lo_neg & hi_pos
    sparse_lo, sparse_hi = _sparse_range(lo_v, hi_v, quant_min, quant_max, tiny)
    lo_v, hi_v = jnp.where(straddle, sparse_lo, lo_v), jnp.where(straddle, sparse_hi, hi_v)
    lo_exact = jnp.where(straddle, sparse_lo, lo)
    hi_exact = jnp.where(straddle, sparse_hi, hi)
    lo_neg = jnp.where(straddle, ff.is_negative(sparse_lo), lo_neg)
    hi_pos = jnp.where(straddle, ff.is_positive(sparse_hi), hi_pos)
  else:
    hi_exact = hi
  lo_v = jnp.where(_F32(0) < lo_v, _F32(0), lo_v)  # std::min(lo, 0.f)
  hi_v = jnp.where(hi_v < _F32(0), _F32(0), hi_v)
  lo_zero, hi_zero = ~lo_neg & ~jnp.isnan(lo_v), ~hi_pos & ~jnp.isnan(hi_v)
  span = quant_max - quant_min
  finite = jnp.isfinite(lo_v) & jnp.isfinite(hi_v)
  if span == 0:  # d / 0: inf, or NaN for 0 / 0
    scale = jnp.where(finite & (lo_neg | hi_pos), _F32(np.inf), _F32(np.nan))
    scale = jnp.where(~finite & ~jnp.isnan(lo_v) & ~jnp.isnan(hi_v), _F32(np.inf), scale)
  else:
    safe_lo, safe_hi = jnp.where(finite, lo_v, _F32(0)), jnp.where(finite, hi_v, _F32(0))
    scale = jnp.where(
      finite, _scale(safe_lo, safe_hi, span, tiny), exact_div(hi_v - lo_v, _F32(span))
    )
  (scale,) = ff.fusion_barrier(scale)
  one = jnp.where(tiny, ff.pow2(_K), _F32(1))  # the domain's unit
  reset = tiny & (scale <= _F32(2.0 ** (_K - 128)))  # f32(1 / scale) is inf, or scale is 0
  small = ~reset & (scale < SMALL_SCALE_THRESHOLD * one)
  amplifier = exact_div(SMALL_SCALE_THRESHOLD * one, jnp.where(small, scale, one))
  floor_hi = SMALL_SCALE_THRESHOLD * _F32(span)
  new_lo = jnp.where(
    lo_zero, _F32(0), jnp.where(hi_zero, -floor_hi, _times(lo_v, lo_exact, tiny, amplifier))
  )
  new_hi = jnp.where(
    lo_zero, floor_hi, jnp.where(hi_zero, _F32(0), _times(hi_v, hi_exact, tiny, amplifier))
  )
  # Unscaled from here on: a tiny range that is not amplified is below 2**-60 (no effect).
  lo_v = jnp.where(small, new_lo, jnp.where(tiny, _F32(0), lo_v))
  hi_v = jnp.where(small, new_hi, jnp.where(tiny, _F32(0), hi_v))
  scale = jnp.where(reset, _F32(0.1), jnp.where(small, SMALL_SCALE_THRESHOLD, scale))
  lo_v, hi_v, scale = ff.fusion_barrier(lo_v, hi_v, scale)
  zero_point = _zero_point(lo_v, hi_v, scale, quant_min, quant_max)
  if preserve_sparsity:
    # Amplified: new_lo < 0 unless lo was 0, new_hi > 0 unless hi was 0 and lo was not.
    straddle = jnp.where(small, ~lo_zero & ~hi_zero, lo_neg & hi_pos)
    mid = int(np.rint(_F64(quant_min + quant_max) / 2))
    zero_point = jnp.where(straddle, jnp.int32(mid), zero_point)
  return scale, zero_point


def choose_quantization_params(
  min_val, max_val, quant_min, quant_max, preserve_sparsity
) -> QParams:
  """:func:`choose_quantization_params_numpy` on the device (float32/int32, ``jit``/``vmap``/export).

  Args:
    min_val, max_val: the running range, broadcast together (float32).
    quant_min, quant_max: Python ints inside int32, ``quant_min <= quant_max``.
    preserve_sparsity: torch's ``is_symmetric_quant``.

  Returns:
    ``QParams(scale float32, zero_point int32)`` shaped like the broadcast range, bit for bit the
    NumPy reference's (and torch's CPU kernel's).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jax_observers._src.fake_quant.fused_qparams import choose_quantization_params
    >>> qp = choose_quantization_params(jnp.array(-1.0), jnp.array(2.0), -128, 127, True)
    >>> round(float(qp.scale), 6), int(qp.zero_point)  # torch E18: 2/127, not 2/127.5
    (0.015748, 0)
  """
  quant_min, quant_max = int(quant_min), int(quant_max)
  info = np.iinfo(np.int32)
  if not info.min <= quant_min <= quant_max <= info.max:
    raise ValueError(
      f"choose_quantization_params: quant_min={quant_min}, quant_max={quant_max}; expected "
      f"integers with {info.min} <= quant_min <= quant_max <= {info.max}."
    )
  min_val, max_val = jnp.broadcast_arrays(
    jnp.asarray(min_val, jnp.float32), jnp.asarray(max_val, jnp.float32)
  )
  scale, zero_point = _choose(min_val, max_val, quant_min, quant_max, bool(preserve_sparsity))
  return QParams(scale=scale, zero_point=zero_point)
