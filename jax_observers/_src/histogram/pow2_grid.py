r"""The power-of-two range policy: histograms that do not depend on how the data was batched.

The grid is a function of the running range only. With :math:`B = 2^b` bins and the smallest
:math:`R = 2^e` (:math:`-126 \le e \le 127`) that covers the range, bins have width
:math:`2^g` and bin :math:`j` covers :math:`[(j - o)\,2^g, (j - o + 1)\,2^g)`:

* unsigned grid :math:`[0, R)` (no negative value seen, or ``|x|``): :math:`g = e - b`, :math:`o = 0`;
* signed grid :math:`[-R, R)`: :math:`g = e + 1 - b`, :math:`o = B/2`.

A value's bin is :math:`\lfloor v\,2^{-g} \rfloor + o`, exact because :math:`2^{-g}` is a power of
two. When the range grows, :math:`g` grows and every bin maps to
:math:`\lfloor (j - o)/2^{g' - g} \rfloor + o'`: pairs of bins merge, exactly. Binning at
:math:`g` then merging equals binning at :math:`g' > g` directly, so the final histogram is the one
of all the data binned on the final grid, whatever the batches were. Counts are int32 and saturate
at :math:`2^{31} - 1`. Values with :math:`|v| \ge 2^{127}` land in the end bins (exactness is lost
only for them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

E_MIN, E_MAX = -126, 127
INT32_MAX = np.int32(np.iinfo(np.int32).max)


def check_bins(bins: int) -> int:
  """log2(bins), or a ValueError: the policy needs a power of two >= 4."""
  if not isinstance(bins, int) or bins < 4 or bins & (bins - 1):
    raise ValueError(f"bins={bins!r}: range_policy='pow2' needs a power of two >= 4.")
  return bins.bit_length() - 1


def _exponent(a: jax.Array, *, strict: bool) -> jax.Array:
  """Smallest e with ``a < 2**e`` (strict) or ``a <= 2**e``, clipped to [E_MIN, E_MAX]."""
  mantissa, p = jnp.frexp(a)
  e = p if strict else p - (mantissa == 0.5).astype(p.dtype)
  return jnp.clip(jnp.where(a > 0, e, E_MIN), E_MIN, E_MAX).astype(jnp.int32)


def grid(min_val, max_val, bins: int, mode: str) -> tuple[jax.Array, jax.Array]:
  """``(g, o)``: the bin-width exponent and the index of the bin starting at 0, per channel.

  ``mode`` is ``'signed'`` (unsigned grid until a negative value is seen), ``'symmetric'`` (always
  signed) or ``'absolute'`` (a grid for ``|x|``). A never-observed range gives ``(E_MIN - b, 0)``.
  """
  b = check_bins(bins)
  seen = min_val <= max_val
  lo = jnp.where(seen, min_val, 0.0)
  hi = jnp.where(seen, max_val, 0.0)
  if mode == "absolute":
    signed = jnp.zeros(lo.shape, bool)
    e = _exponent(jnp.maximum(-lo, hi), strict=True)
  else:
    signed = (lo < 0) | (mode == "symmetric")
    e = jnp.maximum(_exponent(jnp.maximum(hi, 0.0), strict=True), _exponent(-lo, strict=False))
  g = jnp.where(signed, e + 1 - b, e - b)
  return g.astype(jnp.int32), jnp.where(signed, bins // 2, 0).astype(jnp.int32)


def _pow2(k: jax.Array) -> jax.Array:
  """float32 ``2**k`` for integer ``k`` in [-126, 127], built from its bits."""
  return lax.bitcast_convert_type((k + 127) << 23, jnp.float32)


def edges(g, o, bins: int) -> tuple[jax.Array, jax.Array]:
  """The grid's ``(first edge, last edge)`` as float32 (``inf`` past float32's range)."""
  half = g // 2
  width = _pow2(half) * _pow2(g - half)
  return -o.astype(jnp.float32) * width, (bins - o).astype(jnp.float32) * width


def positions(v: jax.Array, keep: jax.Array, g, o, bins: int) -> jax.Array:
  """Bin of each float32 ``v`` on the grid ``(g, o)`` (broadcast against ``v``); ``bins`` if dropped."""
  k = -g
  k1 = k // 2
  q = (v * _pow2(k1)) * _pow2(k - k1)
  p = jnp.floor(q)
  p = jnp.where((q == 0) & (v < 0), -1.0, p)  # a negative value that underflowed to -0
  idx = jnp.clip(p, -(2**30), 2**30).astype(jnp.int32) + o
  return jnp.where(keep, jnp.clip(idx, 0, bins - 1), bins)


def saturating_add(a: jax.Array, b: jax.Array) -> jax.Array:
  """``a + b`` for non-negative int32, stopping at ``2**31 - 1``."""
  return jnp.where(a > INT32_MAX - b, INT32_MAX, a + b)


def regrid(hist: jax.Array, g_old, o_old, g_new, o_new) -> jax.Array:
  """``hist`` ([C, B] int32, grid ``(g_old, o_old)`` per channel) on the grid ``(g_new, o_new)``.

  One doubling merges bin pairs and places them at ``j - o/2 + o'``; channels that need fewer
  doublings than the widest one stop early. More than ``b + 1`` doublings change nothing more.
  """
  bins = hist.shape[-1]
  b = bins.bit_length() - 1
  steps = jnp.clip(g_new - g_old, 0, b + 1)
  half, quarter = bins // 2, bins // 4

  def body(carry):
    t, h, o = carry
    pairs = h.reshape((*h.shape[:-1], half, 2))
    merged = saturating_add(pairs[..., 0], pairs[..., 1])
    z_half = jnp.zeros(merged.shape, merged.dtype)
    z_quarter = z_half[..., :quarter]
    at_0 = jnp.concatenate([merged, z_half], axis=-1)
    at_quarter = jnp.concatenate([z_quarter, merged, z_quarter], axis=-1)
    at_half = jnp.concatenate([z_half, merged], axis=-1)
    place = (o_new - o // 2)[..., None]
    moved = jnp.where(place == 0, at_0, jnp.where(place == quarter, at_quarter, at_half))
    active = (t < steps)[..., None]
    return t + 1, jnp.where(active, moved, h), jnp.where(t < steps, o_new, o)

  _, hist, _ = lax.while_loop(
    lambda c: c[0] < jnp.max(steps, initial=0), body, (jnp.int32(0), hist, o_old)
  )
  return hist
