r"""torch's L2 range search (``_non_linear_param_search``), run on the host in NumPy.

The search walks a clipping range :math:`[s, e]` (in source bins) inwards: at step :math:`k` the
cut-offs :math:`\alpha_k = \alpha_{k-1} + 10^{-5}` and :math:`\beta_k = \beta_{k-1} - 10^{-5}` are
Python float64 sums, the thresholds :math:`f_{32}(\alpha_k T)` meet the float32 cumulative
histogram, and the walk stops at the first range whose quantization error

.. math::
   E(s, e) = \sum_i \frac{h_i}{w}\int_{\mathrm{bin}\ i} (x - c(x))^2\,dx
   \quad(\text{three-term form, float32, as torch})

exceeds the best so far. float64 is not available in JAX's default configuration, so the search
runs here, on the host, behind ``jax.pure_callback``; it is a NumPy mirror of torch's float32 and
float64 operations. Two things make it fast without changing a single step: the inner ``while``
loops become ``searchsorted`` on the cumulative sum, and runs of steps that move neither end are
skipped with a binary search over the precomputed :math:`\beta_k` sequence.
"""

from __future__ import annotations

import bisect
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

_F32 = np.float32
_STEP = 1e-5


@functools.cache
def _cutoffs() -> tuple[np.ndarray, np.ndarray]:
  """alpha_k and beta_k for every k the search can reach, accumulated exactly as torch's loop."""
  n = int(1 / _STEP) + 3
  alpha = np.add.accumulate(np.concatenate([[0.0], np.full(n, _STEP)]))
  beta = np.add.accumulate(np.concatenate([[1.0], np.full(n, -_STEP)]))
  return alpha, beta


def _f32_sum(values: np.ndarray) -> float:
  """torch's float32 ``sum().item()``, taken as the correctly rounded float32 of the exact sum."""
  return float(_F32(math.fsum(values.astype(np.float64))))


def quantization_error(
  hist: np.ndarray, bin_width: float, start: int, end: int, dst_nbins: int
) -> float:
  """torch's ``_compute_quantization_error(start, end)``: every rounding of its float32 ops."""
  bins = hist.size
  dst_width = bin_width * (end - start + 1) / dst_nbins
  if dst_width == 0.0:
    return 0.0
  width, dst, half = _F32(bin_width), _F32(dst_width), _F32(dst_width / 2)
  src_begin = (np.arange(bins) - start).astype(_F32) * width
  src_end = src_begin + width
  dst_begin = np.clip(np.floor_divide(src_begin, dst), _F32(0), _F32(dst_nbins - 1))
  dst_begin_center = (dst_begin + _F32(0.5)) * dst
  dst_end = np.clip(np.floor_divide(src_end, dst), _F32(0), _F32(dst_nbins - 1))
  density = hist / width
  three = _F32(3)

  def cube(v):
    return v * v * v

  norm = np.zeros(bins, _F32)
  delta_begin = src_begin - dst_begin_center
  norm += density * ((cube(np.ones(bins, _F32) * half) - cube(delta_begin)) / three)
  full = (cube(half) - cube(-half)) / three
  norm += (dst_end - dst_begin - _F32(1)) * (density * full)
  delta_end = src_end - (dst_end * dst + half)
  norm += density * ((cube(delta_end) - cube(-half)) / three)
  return _f32_sum(norm)


def _skip_idle_steps(csum, total, ka, kb, end):
  """The first ``kb' >= kb`` at which torch's loop ends or its right cut moves (alpha fixed)."""
  alpha, beta = _cutoffs()
  # beta is decreasing: the loop runs while beta[kb'] > alpha[ka].
  last_running = bisect.bisect_left(beta, -alpha[ka], key=lambda b: -b) - 1
  # r moves once f32(beta[kb' + 1] * total) < csum[end].
  target = csum[end]
  moves = bisect.bisect_left(
    range(kb, last_running + 1), True, key=lambda k: _F32(beta[k + 1] * total) < target
  )
  return kb + moves


def l2_search(
  hist: np.ndarray, min_val: float, max_val: float, dst_nbins: int
) -> tuple[np.float32, np.float32]:
  """torch's ``_non_linear_param_search`` -> float32 ``(new_min, new_max)``."""
  hist = np.asarray(hist, _F32)
  min_val, max_val = _F32(min_val), _F32(max_val)
  bins = hist.size
  alpha, beta = _cutoffs()
  total = _f32_sum(hist)
  csum = np.cumsum(hist.astype(np.float64)).astype(_F32)
  double_width = (float(max_val) - float(min_val)) / bins
  ka = kb = 0
  start, end, norm_min = 0, bins - 1, math.inf
  while alpha[ka] < beta[kb]:
    left = int(np.searchsorted(csum, _F32(alpha[ka + 1] * total), side="left"))
    right = int(np.searchsorted(csum, _F32(beta[kb + 1] * total), side="right")) - 1
    left, right = min(max(left, start), end), min(max(right, start), end)
    if left - start > end - right:
      next_start, next_end = left, end
      ka += 1
    else:
      next_start, next_end = start, right
      kb += 1
    if (next_start, next_end) == (start, end):
      if end == start:  # nothing can move: torch spins until alpha >= beta.
        break
      kb = _skip_idle_steps(csum, total, ka, kb, end)
      continue
    norm = quantization_error(hist, double_width, next_start, next_end, dst_nbins)
    if norm > norm_min:
      break
    norm_min, start, end = norm, next_start, next_end
  width = (max_val - min_val) / _F32(bins)
  return min_val + width * _F32(start), min_val + width * _F32(end + 1)


def _host_search(hist, min_val, max_val, *, dst_nbins):
  hist, min_val, max_val = np.asarray(hist), np.asarray(min_val), np.asarray(max_val)
  lo = np.empty(min_val.shape, _F32)
  hi = np.empty(min_val.shape, _F32)
  for idx in np.ndindex(min_val.shape):
    if np.isfinite(min_val[idx]) and np.isfinite(max_val[idx]):
      lo[idx], hi[idx] = l2_search(hist[idx], min_val[idx], max_val[idx], dst_nbins)
    else:  # never observed: calculate_qparams turns (inf, -inf) into torch's default.
      lo[idx], hi[idx] = min_val[idx], max_val[idx]
  return lo, hi


def search(hist: jax.Array, min_val: jax.Array, max_val: jax.Array, dst_nbins: int):
  """:func:`l2_search` on device arrays, usable under ``jit`` and ``vmap`` (a host callback)."""
  shape = jax.ShapeDtypeStruct(jnp.shape(min_val), jnp.float32)
  return jax.pure_callback(
    functools.partial(_host_search, dst_nbins=dst_nbins),
    (shape, shape),
    hist,
    min_val,
    max_val,
    vmap_method="broadcast_all",
  )
