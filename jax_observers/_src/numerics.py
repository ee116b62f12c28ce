r"""Float32 arithmetic that rounds exactly where torch rounds.

XLA rewrites ``x / c`` into ``x * (1 / c)`` when ``c`` is a broadcast scalar or a constant, and XLA:CPU
contracts ``a + b * c`` into one fused multiply-add. Both change the last bit of results that torch
computes with separate IEEE float32 roundings. The helpers here keep each operation a separate,
correctly rounded float32 operation, inside and outside ``jax.jit``.

On top of those, error-free transformations (Knuth's TwoSum, Dekker's TwoProduct) give the exact
float32 building blocks torch's kernels need: a fused multiply-add and integer differences.

torch's AVX2/AVX512 CPU kernels are compiled with FMA contraction, so some of its expressions are one
fused multiply-add, :math:`\mathrm{rn}(a b + c)`, rounded once. JAX has no FMA primitive and XLA
fuses only when it likes, so :func:`fma` computes the correctly rounded result from error-free
transformations in plain float32:

.. math::
   a b + c = s_h + t_h + t_l \text{ exactly}, \qquad
   \mathrm{fma}(a, b, c) = \mathrm{rn}(s_h + t_h) \text{, moved one step when } t_l
   \text{ breaks a tie.}

Every product that feeds a sum goes through :func:`rounded`, so XLA:CPU cannot contract it into an
FMA of its own, which would break the error-free transformations.

References:
  Dekker, "A floating-point technique for extending the available precision" (1971).
  Knuth, TAOCP vol. 2, 4.2.2 (TwoSum).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

INT32_MIN = np.int32(np.iinfo(np.int32).min)
_TWO_POW_31 = np.float32(2.0**31)


@jax.custom_batching.custom_vmap
def _barrier_div(numerator: jax.Array, divisor: jax.Array) -> jax.Array:
  return numerator / lax.optimization_barrier(divisor)


@_barrier_div.def_vmap
def _barrier_div_vmap(axis_size, in_batched, numerator, divisor):
  # vmap would broadcast an unbatched divisor *after* the barrier, where XLA can rewrite the
  # division again; batch both operands first so the barrier holds the full divisor.
  if not in_batched[0]:
    numerator = jnp.broadcast_to(numerator, (axis_size, *numerator.shape))
  if not in_batched[1]:
    divisor = jnp.broadcast_to(divisor, (axis_size, *divisor.shape))
  return _barrier_div(numerator, divisor), True


@jax.custom_jvp
def exact_div(numerator: jax.Array, divisor) -> jax.Array:
  """``numerator / divisor`` as one IEEE division, never a reciprocal multiply.

  The divisor is broadcast to the numerator's shape behind an optimization barrier so that XLA's
  algebraic simplifier cannot turn the division into a multiplication by ``1 / divisor``; under
  ``vmap`` both operands are batched before the barrier, for the same reason.
  """
  numerator = jnp.asarray(numerator)
  shape = jnp.broadcast_shapes(numerator.shape, jnp.shape(divisor))
  divisor = jnp.broadcast_to(jnp.asarray(divisor, numerator.dtype), shape)
  return _barrier_div(jnp.broadcast_to(numerator, shape), divisor)


@exact_div.defjvp
def _exact_div_jvp(primals, tangents):
  numerator, divisor = primals
  d_numerator, d_divisor = tangents
  quotient = exact_div(numerator, divisor)
  return quotient, (d_numerator - quotient * d_divisor) / divisor


def rounded(value: jax.Array) -> jax.Array:
  """Returns ``value`` rounded on its own, so a following add cannot fuse with it into an FMA.

  ``where(isnan(v), nan, v)`` is the identity on every float (NaN stays NaN), but it puts a select
  between the multiply and its consumer, which stops LLVM from contracting them.
  """
  return jnp.where(jnp.isnan(value), jnp.asarray(jnp.nan, value.dtype), value)


def x86_to_int32(values: jax.Array) -> jax.Array:
  """float32 -> int32 the way torch's CPU cast does it (``cvttss2si``).

  NaN and values outside the int32 range become ``INT32_MIN`` (JAX would saturate them instead).
  Values must already be integral (rounded) for the result to equal a truncating cast.
  """
  out_of_range = jnp.isnan(values) | (values >= _TWO_POW_31) | (values < -_TWO_POW_31)
  safe = jnp.where(out_of_range, jnp.zeros_like(values), values)
  return jnp.where(out_of_range, INT32_MIN, safe.astype(jnp.int32))


_SPLITTER = np.float32(4097.0)  # 2**12 + 1: Veltkamp's splitter for 24-bit significands.


def two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(s, e)`` with ``s = rn(a + b)`` and ``a + b = s + e`` exactly (Knuth)."""
  s = a + b
  bb = s - a
  return s, (a - (s - bb)) + (b - bb)


def split(a: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``a = hi + lo`` with 12-bit halves (Veltkamp), for |a| < 2**115 (``4097 a`` finite)."""
  c = rounded(_SPLITTER * a)
  hi = c - (c - a)
  return hi, a - hi


def two_prod(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(p, e)`` with ``p = rn(a b)`` and ``a b = p + e`` exactly (Dekker), products kept apart
  from the adds (no FMA), for |a|, |b| < 2**115."""
  p = rounded(a * b)
  a_hi, a_lo = split(a)
  b_hi, b_lo = split(b)
  e = rounded(a_hi * b_hi) - p
  e = e + rounded(a_hi * b_lo)
  e = e + rounded(a_lo * b_hi)
  return p, e + rounded(a_lo * b_lo)


_SAFE = np.float32(2.0**115)  # Veltkamp's split (4097 a) cannot overflow below this magnitude.


def round_three(high: jax.Array, mid: jax.Array, low: jax.Array) -> jax.Array:
  """``rn(high + mid + low)`` for an expansion whose ``low`` lies below ``mid``'s last bit."""
  r, e = two_sum(high, mid)
  toward = jnp.nextafter(r, r + e)
  half = (toward - r) * np.float32(0.5)
  breaks_tie = (e != 0) & (e == half) & (low != 0) & (jnp.signbit(low) == jnp.signbit(e))
  return jnp.where(breaks_tie, toward, r)


def fma(a: jax.Array, b: jax.Array, c: jax.Array) -> jax.Array:
  r"""float32 :math:`\mathrm{rn}(a b + c)` with one rounding, as a hardware FMA computes it.

  Non-finite inputs and magnitudes beyond 2**115 fall back to ``rn(rn(a b) + c)``, which has the same
  infinities, NaNs and sign there.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jax_observers._src.numerics import fma
    >>> a = jnp.float32(1 + 2**-12)
    >>> float(fma(a, a, jnp.float32(-1))) == 2**-11 + 2**-24  # the plain product loses 2**-24
    True
  """
  a, b, c = (jnp.asarray(v, jnp.float32) for v in (a, b, c))
  a, b, c = jnp.broadcast_arrays(a, b, c)
  ph, pl = two_prod(a, b)
  sh, sl = two_sum(ph, c)
  th, tl = two_sum(sl, pl)
  exact = round_three(sh, th, tl)
  plain = ph + c
  safe = (jnp.abs(a) < _SAFE) & (jnp.abs(b) < _SAFE) & jnp.isfinite(c) & jnp.isfinite(exact)
  return jnp.where(safe, exact, plain)


def int_sub_to_float32(a: jax.Array, b: jax.Array) -> jax.Array:
  """``float32(a - b)`` for int32 ``a`` and ``b``, rounded once from the exact (33-bit) difference.

  torch subtracts in int64 and converts; int32 arithmetic would wrap. The magnitude of the exact
  difference is below 2**32, so it is exact as a uint32, and uint32 -> float32 rounds once.
  """
  a = jnp.asarray(a, jnp.int32)
  b = jnp.asarray(b, jnp.int32)
  nonneg = a >= b
  wrapped = jnp.where(nonneg, a - b, b - a)  # two's complement: equals |a - b| modulo 2**32.
  magnitude = lax.bitcast_convert_type(wrapped, jnp.uint32).astype(jnp.float32)
  return jnp.where(nonneg, magnitude, -magnitude)


def float32_at_least(n: int) -> np.float32:
  """The smallest float32 >= the integer ``n``: ``f >= n`` iff ``f >= float32_at_least(n)``."""
  f = np.float32(n)
  return np.nextafter(f, np.float32(np.inf)) if int(f) < n else f


def float32_at_most(n: int) -> np.float32:
  """The largest float32 <= the integer ``n``: ``f <= n`` iff ``f <= float32_at_most(n)``."""
  f = np.float32(n)
  return np.nextafter(f, np.float32(-np.inf)) if int(f) > n else f
