"""Float32 arithmetic that rounds exactly where torch rounds.

XLA rewrites ``x / c`` into ``x * (1 / c)`` when ``c`` is a broadcast scalar or a constant, and XLA:CPU
contracts ``a + b * c`` into one fused multiply-add. Both change the last bit of results that torch
computes with separate IEEE float32 roundings. The helpers here keep each operation a separate,
correctly rounded float32 operation, inside and outside ``jax.jit``.
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
  """``a = hi + lo`` with 12-bit halves (Veltkamp), for |a| < 2**100."""
  c = rounded(_SPLITTER * a)
  hi = c - (c - a)
  return hi, a - hi


def two_prod(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(p, e)`` with ``p = rn(a b)`` and ``a b = p + e`` exactly (Dekker), products kept apart
  from the adds (no FMA), for |a|, |b| < 2**100."""
  p = rounded(a * b)
  a_hi, a_lo = split(a)
  b_hi, b_lo = split(b)
  e = rounded(a_hi * b_hi) - p
  e = e + rounded(a_hi * b_lo)
  e = e + rounded(a_lo * b_hi)
  return p, e + rounded(a_lo * b_lo)
