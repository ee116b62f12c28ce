r"""Exact float32 building blocks for fake quantization: error-free sums and products, and an FMA.

torch's AVX2/AVX512 CPU kernels are compiled with FMA contraction, so some of its fake-quant
expressions are one fused multiply-add, :math:`\mathrm{rn}(a b + c)`, rounded once. JAX has no FMA
primitive and XLA fuses only when it likes, so :func:`fma` computes the correctly rounded result
from error-free transformations (Knuth's TwoSum, Dekker's TwoProduct) in plain float32:

.. math::
   a b + c = s_h + t_h + t_l \text{ exactly}, \qquad
   \mathrm{fma}(a, b, c) = \mathrm{rn}(s_h + t_h) \text{, moved one step when } t_l
   \text{ breaks a tie.}

Every product that feeds a sum goes through :func:`numerics.rounded`, so XLA:CPU cannot contract
it into an FMA of its own, which would break the error-free transformations.

References:
  Dekker, "A floating-point technique for extending the available precision" (1971).
  Knuth, TAOCP vol. 2, 4.2.2 (TwoSum).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_observers._src import numerics

_SAFE = np.float32(2.0**100)  # Dekker's split cannot overflow below this magnitude.


two_sum = numerics.two_sum
two_prod = numerics.two_prod


def round_three(high: jax.Array, mid: jax.Array, low: jax.Array) -> jax.Array:
  """``rn(high + mid + low)`` for an expansion whose ``low`` lies below ``mid``'s last bit."""
  r, e = two_sum(high, mid)
  toward = jnp.nextafter(r, r + e)
  half = (toward - r) * np.float32(0.5)
  breaks_tie = (e != 0) & (e == half) & (low != 0) & (jnp.signbit(low) == jnp.signbit(e))
  return jnp.where(breaks_tie, toward, r)


def fma(a: jax.Array, b: jax.Array, c: jax.Array) -> jax.Array:
  r"""float32 :math:`\mathrm{rn}(a b + c)` with one rounding, as a hardware FMA computes it.

  Non-finite inputs and magnitudes beyond 2**100 fall back to ``rn(rn(a b) + c)``, which has the same
  infinities, NaNs and sign there.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jax_observers._src.fake_quant_numerics import fma
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
