r"""Float-float arithmetic: float64 steps emulated exactly with float32 expansions (x64 off).

A value is an *expansion*: a list of float32 terms whose exact (unrounded) sum it is, smallest
first. The error-free transforms (:func:`numerics.two_sum`, :func:`numerics.two_prod`) and the
float64 roundings of :mod:`histogram.search_device` (:func:`round_to_f64`, :func:`f32_of_f64`) are
the building blocks; this module adds what a whole float64 formula needs around them:

* exponent handling that XLA cannot spoil: :func:`pow2`, :func:`exponent` and :func:`ldexp` work on
  the bits, so operands can be normalised to :math:`[1, 2)` before a product or a quotient and the
  result put back (overflowing to :math:`\pm\infty` exactly as IEEE does);
* bit-level tests and scalings for subnormal float32 values, which XLA:CPU flushes to zero on input
  and output (:func:`upscale` is exact on them, :func:`is_negative` sees their sign);
* :func:`renormalize` (VecSum passes until the top term is the faithfully rounded sum), :func:`sign`,
  :func:`round2_to_f64` (a cheap :func:`round_to_f64` for a two-term sum), :func:`div_f32` and
  :func:`div_expansion` (long division), :func:`rint` and :func:`rint_small` (nearest integer, ties
  to even) and :func:`less` (exact comparison of two float64 values);
* :func:`fusion_barrier`: XLA:CPU compiles a long chain of error-free transforms into kernels whose
  work grows exponentially with the chain's depth, so expansions are passed from kernel to kernel.

Everything is elementwise on float32/int32 arrays, usable under ``jit``, ``vmap`` and ``jax.export``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_observers._src.histogram.search_device import _distill, f32_of_f64
from jax_observers._src.numerics import exact_div, two_prod

_F32 = np.float32
_EXP_MASK = 0x7F800000
_MANT_MASK = 0x007FFFFF
_ABS_MASK = 0x7FFFFFFF


def _bits(x: jax.Array) -> jax.Array:
  return lax.bitcast_convert_type(jnp.asarray(x, jnp.float32), jnp.int32)


def abs_bits(x: jax.Array) -> jax.Array:
  """The bits of ``|x|`` as int32: ordered like ``|x|`` (NaN above ``inf``), subnormals included."""
  return _bits(x) & _ABS_MASK


def pow2(k) -> jax.Array:
  """``2**k`` as float32 for int32 ``k`` in ``[-126, 127]``, built from its bits."""
  k = jnp.asarray(k, jnp.int32)
  return lax.bitcast_convert_type((k + 127) << 23, jnp.float32)


def exponent(x: jax.Array) -> jax.Array:
  r"""``floor(log2 |x|)`` (int32) of a normal float32 ``x``; 0 for zeros and subnormals."""
  biased = (_bits(x) & _EXP_MASK) >> 23
  return jnp.where(biased == 0, 0, biased - 127)


def ldexp(x: jax.Array, k) -> jax.Array:
  """``x * 2**k`` for int32 ``k`` in ``[-252, 254]``, as two exact power-of-two products.

  Exact whenever the result is a normal float32; an overflowing result is ``±inf`` (the IEEE
  rounding of a value already rounded to 24 bits), an underflowing one is flushed.
  """
  k = jnp.asarray(k, jnp.int32)
  k1 = k >> 1  # floor(k / 2): both halves have k's sign, so the first product is never smaller
  return x * pow2(k1) * pow2(k - k1)


def is_subnormal(x: jax.Array) -> jax.Array:
  b = _bits(x)
  return ((b & _EXP_MASK) == 0) & ((b & _MANT_MASK) != 0)


def is_negative(x: jax.Array) -> jax.Array:
  """``x < 0`` on the bits: true for negative subnormals (XLA:CPU compares them as zero)."""
  b = _bits(x)
  return (b < 0) & ((b & _ABS_MASK) != 0) & ((b & _ABS_MASK) <= _EXP_MASK)


def is_positive(x: jax.Array) -> jax.Array:
  """``x > 0`` on the bits, subnormals included."""
  b = _bits(x)
  return (b > 0) & (b <= _EXP_MASK)


def flush_subnormal(x: jax.Array) -> jax.Array:
  """``x`` with subnormals replaced by a zero of their sign, on the bits (XLA:CPU's DAZ, made
  explicit so that no arithmetic depends on how a device treats them)."""
  b = _bits(x)
  return lax.bitcast_convert_type(jnp.where(is_subnormal(x), b & ~_ABS_MASK, b), jnp.float32)


def upscale(x: jax.Array, k: int) -> jax.Array:
  """``x * 2**k`` exactly for finite ``x``, subnormal ones included (read from the mantissa bits),
  for a static ``k`` in ``[24, 126]`` and a result below ``2**128``."""
  if not 24 <= k <= 126:
    raise ValueError(f"upscale: k={k!r}; expected 24 <= k <= 126.")
  b = _bits(x)
  mantissa = (b & _MANT_MASK).astype(jnp.float32) * pow2(k - 149)  # exact: below 2**23 * 2**(k-149)
  sub = jnp.where(b < 0, -mantissa, mantissa)
  return jnp.where(is_subnormal(x), sub, ldexp(x, k))


def renormalize(terms, passes: int | None = None) -> list[jax.Array]:
  r"""VecSum passes (error-free), each its own kernel (:func:`fusion_barrier`).

  After :math:`K` passes over :math:`n` terms the last one is within
  :math:`2^{-24} |x| + (2n\,2^{-24})^K \sum |t_i|` of the sum :math:`x` (Ogita, Rump and Oishi,
  2005): faithful (within one ulp) when the condition number :math:`\sum |t_i| / |x|` times
  :math:`(2n\,2^{-24})^K` is below :math:`2^{-25}`. The default, :math:`n + 1` passes, is for sums
  whose cancellation is not bounded (exact sign tests, exact zeros: ``tests/float_float_test.py``).
  """
  ts = list(terms)
  for _ in range(len(ts) + 1 if passes is None else passes):
    ts = fusion_barrier(*_distill(ts, passes=1))
  return ts


def fusion_barrier(*arrays: jax.Array) -> list[jax.Array]:
  """``arrays`` unchanged (bit for bit), but computed by kernels of their own.

  XLA:CPU fuses long elementwise chains into one kernel and outlines the subexpressions that have
  several users into functions that it calls once per use, not once: in an error-free expansion
  (every term feeds two others) the work grows exponentially with depth, and a few thousand
  operations ran 1000 times slower than their count. ``lax.optimization_barrier`` is removed before
  fusion there; a reduction is not fused into its users, so each group is passed through a
  ``max`` over a stacked ``[bits, INT32_MIN]`` axis (on the bits: float ``max`` flushes subnormals).
  """
  shape = jnp.broadcast_shapes(*(a.shape for a in arrays))
  bits = [
    jnp.broadcast_to(
      a.astype(jnp.int32) if a.dtype == jnp.bool_ else lax.bitcast_convert_type(a, jnp.int32), shape
    )
    for a in arrays
  ]
  stacked = jnp.stack(bits)
  kept = jnp.max(jnp.stack([stacked, jnp.full_like(stacked, np.iinfo(np.int32).min)]), axis=0)
  return [
    (k != 0) if a.dtype == jnp.bool_ else lax.bitcast_convert_type(k, a.dtype)
    for a, k in zip(arrays, kept, strict=True)
  ]


def sign(terms, passes: int | None = None) -> jax.Array:
  """The sign (-1, 0 or 1, float32) of the exact sum of ``terms`` (:func:`renormalize` ``passes``;
  two terms need none: a correctly rounded sum is 0 only when exact, else of the sum's sign)."""
  if len(terms) == 2:
    return jnp.sign(terms[0] + terms[1])
  return jnp.sign(renormalize(terms, passes)[-1])


def round2_to_f64(hi: jax.Array, lo: jax.Array) -> list[jax.Array]:
  """``float64(hi + lo)`` for a non-overlapping pair (``|lo| <= ulp(hi) / 2``, as :func:`two_sum`
  leaves it), ``|hi|`` in ``[2**-60, 2**120]`` or 0, as an exact pair ``[lo', hi]``.

  float64's spacing around ``hi`` is ``g = ulp(hi) 2**-29`` (half that below a power of two when
  ``lo`` points down) and ``hi / g`` is even, so the rounding takes ``lo`` to the nearest multiple
  of ``g``, ties to even: ``jnp.round(lo / g) * g``, at most 24 bits.
  """
  e = exponent(hi)
  down = ((_bits(hi) & _MANT_MASK) == 0) & (lo * jnp.sign(hi) < 0)
  shift = jnp.where(down, 53, 52) - e  # g = 2**-shift
  return [ldexp(jnp.round(ldexp(lo, shift)), -shift), hi]


def div_f32(numerator: jax.Array, divisor: jax.Array, steps: int) -> list[jax.Array]:
  r"""``numerator / divisor`` for two float32 as ``steps`` terms (smallest first), each the
  correctly rounded quotient of the remainder so far: a sorted, non-overlapping expansion good
  to :math:`2^{-24\,\mathrm{steps}}` relative.

  The remainder :math:`r - q d` of a correctly rounded quotient is a float32 (Bohlender, Walter,
  Kornerup and Matula, 1991), so each step is exact with :func:`two_prod` and no expansion is
  kept. Operands near 1 (normalise with :func:`ldexp`): the remainders shrink by :math:`2^{-24}` a
  step and must stay normal.
  """
  divisor = jnp.broadcast_to(divisor, jnp.shape(numerator))
  rest, quotient = numerator, []
  for _ in range(steps):
    q = exact_div(rest, divisor)
    p, e = two_prod(q, divisor)
    rest = (rest - p) - e  # rest - p is exact (Sterbenz), and so is the remainder
    quotient.append(q)
  return fusion_barrier(*quotient[::-1])


def div_expansion(numerator, divisor, steps: int) -> list[jax.Array]:
  r"""``numerator / divisor`` as ``steps`` float32 terms (smallest first) by long division.

  Args:
    numerator: terms whose exact sum is the dividend, of magnitude in about :math:`[2^{-60}, 2^{60}]`
      (normalise with :func:`ldexp`; the remainders shrink by :math:`2^{-22}` a step and must not
      underflow).
    divisor: ``(d_hi, d_lo)``, an exact two-term divisor with ``|d_lo| <= ulp(d_hi) / 2``, ``d_hi``
      in the same range (``d_lo`` may be 0).
    steps: quotient terms; the relative error of their sum is below :math:`2^{-22\,\mathrm{steps}}`.

  Each step divides the top of the remainder by ``d_hi`` and subtracts ``q d`` exactly
  (:func:`two_prod`); the remainder is kept to its top five terms, which hold it to
  :math:`2^{-110}`.
  """
  d_hi, d_lo = divisor
  rest = renormalize(list(numerator))
  quotient = []
  for _ in range(steps):
    q = exact_div(rest[-1], d_hi)
    p_hi, e_hi = two_prod(q, d_hi)
    p_lo, e_lo = two_prod(q, d_lo)
    # rest[-1] - p_hi is exact (Sterbenz: q d_hi is within a factor 2 of rest[-1]).
    rest = renormalize([*rest[:-1], -e_lo, -p_lo, -e_hi, rest[-1] - p_hi])[-5:]
    *rest, q = fusion_barrier(*rest, q)
    quotient.append(q)
  return quotient[::-1]


def _parity(n: jax.Array) -> jax.Array:
  """1.0 for odd float32 integers, 0.0 for even ones (exact)."""
  return n - _F32(2) * jnp.floor(n * _F32(0.5))


def rint(terms) -> tuple[jax.Array, jax.Array]:
  """The integer nearest the exact sum of ``terms`` (ties to even, ``|sum| < 2**45``) as two
  float32 integers ``(n_hi, n_lo)``, ``|n_lo| <= 2**23``: ``np.rint`` of a float64, for example."""
  ts = renormalize(terms)
  n_hi = jnp.round(ts[-1])  # half to even; ts[-1] - n_hi below is exact
  ts = renormalize([*ts[:-1], ts[-1] - n_hi])
  n_lo = jnp.round(ts[-1])
  ts = [*ts[:-1], ts[-1] - n_lo]  # the rest, now in (-1, 1)
  up, down = fusion_barrier(sign([*ts, _F32(-0.5)]), sign([*ts, _F32(0.5)]))
  odd = _parity(n_hi) != _parity(n_lo)
  adj = jnp.where((up > 0) | ((up == 0) & odd), _F32(1), _F32(0))
  adj = jnp.where((down < 0) | ((down == 0) & odd), _F32(-1), adj)
  return n_hi, n_lo + adj


def rint_small(terms) -> jax.Array:
  """:func:`rint` for ``|sum| < 2**23`` when the last term is faithful (within one ulp of the sum,
  as :func:`round_to_f64` and :func:`renormalize` leave it): one float32 integer.

  With ``n = round(top)``, ``d = top - n`` and the rest ``e`` (``|e| <= ulp(top) <= 1/2``), the
  sum is ``n + d + e`` with ``|d + e| <= 1``: two exact sign tests against ``±1/2`` decide
  (``d ∓ 1/2`` is exact whenever it can matter).
  """
  *rest, top = terms
  n = jnp.round(top)
  d = top - n
  up, down = fusion_barrier(
    sign([*rest, d - _F32(0.5)], passes=len(rest) + 2),
    sign([*rest, d + _F32(0.5)], passes=len(rest) + 2),
  )
  odd = _parity(n) == 1
  n = jnp.where((up > 0) | ((up == 0) & odd), n + _F32(1), n)
  return jnp.where((down < 0) | ((down == 0) & odd), n - _F32(1), n)


def canonical(terms) -> tuple[jax.Array, jax.Array, jax.Array]:
  """A float64 value (the exact sum of ``terms``, representable in float64, with a faithful last
  term as :func:`round_to_f64` leaves it) as the unique ``(hi, mid, lo)`` with ``hi = f32(x)``,
  ``mid = f32(x - hi)``, ``lo = x - hi - mid``."""
  (hi,) = fusion_barrier(f32_of_f64(terms))
  (mid,) = fusion_barrier(f32_of_f64([*terms, -hi]))
  lo = renormalize([*terms, -hi, -mid])[-1]  # exact: at most 6 bits are left
  return hi, mid, lo


def less(a, b) -> jax.Array:
  """``a < b`` for two float64 values given as exact float32 terms (finite)."""
  hi, mid, lo = canonical([jnp.stack([x, y]) for x, y in zip(a, b, strict=True)])
  (ah, bh), (am, bm), (al, bl) = hi, mid, lo
  return (ah < bh) | ((ah == bh) & ((am < bm) | ((am == bm) & (al < bl))))


def split_int(value: int) -> tuple[np.float32, np.float32]:
  """A Python integer below ``2**48`` in magnitude as two float32 ``(hi, lo)``, ``hi + lo == value``."""
  if abs(value) >= 2**48:
    raise ValueError(f"split_int: {value!r} is not below 2**48 in magnitude.")
  hi = _F32(value)
  lo = _F32(value - int(hi))
  assert int(hi) + int(lo) == value
  return hi, lo
