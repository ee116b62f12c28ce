r"""torch's histogram arithmetic in float32: ``histc`` binning, ``linspace`` and ``_upscale_histogram``.

``histc(x, bins, L, R)`` puts every finite :math:`x \in [L, R]` in bin

.. math::
   p(x) = \min\Big(\Big\lfloor \frac{f_{32}((x - L) \cdot n)}{R - L} \Big\rfloor, n - 1\Big),

each operation one float32 rounding, as torch's CPU kernel does. ``linspace`` reproduces torch's
x86 build, whose points are single-rounding fused multiply-adds
:math:`v_i = \mathrm{fma}(s, i, a)` for :math:`i < n/2` and :math:`\mathrm{fma}(-s, n-1-i, b)`
above; XLA has no FMA operation, so :func:`numerics.fma` emulates one exactly in float32.
``upscale`` is torch's zero-order-hold re-binning.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_observers._src import numerics


def linspace(start: jax.Array, end: jax.Array, num: int) -> jax.Array:
  """torch's CPU float32 ``torch.linspace(start, end, num)``, bit for bit."""
  start = jnp.asarray(start, jnp.float32)
  end = jnp.asarray(end, jnp.float32)
  if num == 1:
    return start[None]
  step = numerics.exact_div(end - start, np.float32(num - 1))
  i = np.arange(num)
  lower = i < num // 2
  factor = jnp.asarray(np.where(lower, i, num - 1 - i).astype(np.float32))
  sign_step = jnp.where(jnp.asarray(lower), step, -step)
  origin = jnp.where(jnp.asarray(lower), start, end)
  return numerics.fma(sign_step, factor, origin)


def histc_edges(lo: jax.Array, hi: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The ``(L, R)`` histc bins between: ``(lo - 1, hi + 1)`` when ``lo == hi``."""
  same = lo == hi
  return jnp.where(same, lo - 1, lo), jnp.where(same, hi + 1, hi)


def histc_positions(x: jax.Array, keep: jax.Array, bins: int, lo, hi) -> jax.Array:
  """Bin index of each element of float32 ``x`` in ``histc(x, bins, lo, hi)``; ``bins`` if skipped.

  ``lo``/``hi`` broadcast against ``x`` (per-channel ranges); ``keep`` masks elements out.
  """
  left, right = histc_edges(lo, hi)
  scaled = (x - left) * np.float32(bins)
  pos = numerics.exact_div(scaled, jnp.broadcast_to(right - left, x.shape))
  inside = keep & (x >= left) & (x <= right)
  pos = jnp.minimum(jnp.where(inside, pos, 0).astype(jnp.int32), bins - 1)
  return jnp.where(inside, pos, bins)


def upscale(
  hist: jax.Array, orig_min, orig_max, new_min, new_max, *, upsample_rate: int = 16
) -> jax.Array:
  """torch's ``_upscale_histogram``: re-bin ``hist`` from ``[orig_min, orig_max]`` into new edges.

  Every source bin is cut into ``upsample_rate`` equal sub-bins; each sub-bin's mass goes to the new
  bin that holds its midpoint (``bucketize(..., right=True) - 1``, clipped), summed in index order
  as ``torch.bincount`` does.
  """
  bins = hist.shape[-1]
  fine = bins * upsample_rate
  # An exact division: XLA would multiply by the rounded 1/3 (47.000004 where torch has 47.0).
  weights = numerics.exact_div(jnp.repeat(hist, upsample_rate), np.float32(upsample_rate))
  sub_width = numerics.exact_div(orig_max - orig_min, np.float32(fine))
  mids = linspace(orig_min, orig_max, fine + 1)[:-1] + np.float32(0.5) * sub_width
  bounds = linspace(new_min, new_max, bins + 1)
  idx = jnp.searchsorted(bounds, mids, side="right") - 1
  idx = jnp.clip(idx, 0, bins - 1)
  # The barrier keeps XLA from folding a later ``+ update`` into the scatter as its initial
  # value (``scatter(update, ...)``): that adds the weights to the counts one at a time instead
  # of summing them first, and the float32 roundings then differ from torch's.
  return lax.optimization_barrier(jnp.zeros(bins, jnp.float32).at[idx].add(weights))


def rebinned(hist, old_lo, old_hi, new_lo, new_hi, *, upsample_rate: int = 16) -> jax.Array:
  """The old histogram carried onto the new range: what torch adds the batch's counts to.

  Same range: ``hist``. Old range a single point (a constant first batch): all old mass moves to
  the bin histc gives that point. Otherwise ``upscale(hist)``.
  """
  bins = hist.shape[-1]

  def from_point():
    pos = histc_positions(old_lo[None], jnp.ones((1,), bool), bins, new_lo, new_hi)
    return (jnp.arange(bins) == pos).astype(jnp.float32) * jnp.sum(hist)

  def resample():
    return upscale(hist, old_lo, old_hi, new_lo, new_hi, upsample_rate=upsample_rate)

  same = (new_lo == old_lo) & (new_hi == old_hi)
  branch = jnp.where(same, 0, jnp.where(old_lo == old_hi, 1, 2))
  return lax.switch(branch, (lambda: hist, from_point, resample))
