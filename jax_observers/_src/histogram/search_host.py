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
float64 operations. It takes the same steps as torch, only faster:

* the inner ``while`` loops become binary searches on the cumulative sum, and runs of steps that
  move neither end are skipped with a binary search over the precomputed :math:`\beta_k`;
* the ranges the walk visits do not depend on the errors (only where it stops does), so
  :func:`_walk` lists them ahead and :func:`quantization_errors` evaluates them in batches of
  growing size, one ``[ranges, bins]`` NumPy pass each, until the error first increases.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

_F32 = np.float32
_STEP = 1e-5
_FIRST_BATCH = 12  # ranges per error evaluation; most data stops within 2 to 12.
_MAX_BATCH = 256


@functools.cache
def _cutoffs() -> tuple[list[float], list[float]]:
  """alpha_k and beta_k for every k the search can reach, accumulated exactly as torch's loop."""
  n = int(1 / _STEP) + 3
  alpha = np.add.accumulate(np.concatenate([[0.0], np.full(n, _STEP)]))
  beta = np.add.accumulate(np.concatenate([[1.0], np.full(n, -_STEP)]))
  return alpha.tolist(), beta.tolist()


def f32_sum(values: np.ndarray) -> float:
  """torch's float32 ``sum().item()``, taken as float32 of the (float64-rounded) exact sum."""
  return float(_F32(math.fsum(np.asarray(values, np.float64).tolist())))


def _cube(v):
  return v * v * v


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
  norm = np.zeros(bins, _F32)
  delta_begin = src_begin - dst_begin_center
  norm += density * ((_cube(np.ones(bins, _F32) * half) - _cube(delta_begin)) / three)
  full = (_cube(half) - _cube(-half)) / three
  norm += (dst_end - dst_begin - _F32(1)) * (density * full)
  delta_end = src_end - (dst_end * dst + half)
  norm += density * ((_cube(delta_end) - _cube(-half)) / three)
  return f32_sum(norm)


def _floor_div(a: np.ndarray, b: np.ndarray, top: np.float32) -> np.ndarray:
  """``clip(np.floor_divide(a, b), 0, top)`` for ``[K, n]`` float32 ``a``, ``[K, 1]`` ``b > 0``.

  ``floor(f32(a / b))`` is one too large exactly where the division rounded ``a / b`` up onto an
  integer (``top < 2**24``); only those entries are checked, exactly, in float64: ``q * b > a``.
  """
  d = a / b
  q = np.floor(d)
  suspect = np.flatnonzero(d == q)
  if suspect.size:
    q_s = q.ravel()[suspect]
    too_big = q_s.astype(np.float64) * b[suspect // a.shape[1], 0] > a.ravel()[suspect]
    q.ravel()[suspect[too_big]] -= 1
  return np.clip(q, _F32(0), top, out=q)


def quantization_errors(
  hist: np.ndarray, bin_width: float, ranges: list[tuple[int, int]], dst_nbins: int
) -> np.ndarray:
  """:func:`quantization_error` of every ``(start, end)`` in ``ranges``, in one batched pass.

  Empty bins add exact zeros, so only non-empty ones are visited; grids on which that or the
  fast floor division could differ (zero or huge widths) take the one-range reference path.
  """
  bins = hist.size
  starts, ends = np.array(ranges, np.int64).reshape(-1, 2).T
  dst_width = bin_width * (ends - starts + 1) / dst_nbins
  width = _F32(bin_width)
  dst = dst_width.astype(_F32)[:, None]
  if not (0 < width and float(width) * bins < 1e12 and np.all(dst >= np.finfo(_F32).tiny)):
    return np.array([quantization_error(hist, bin_width, s, e, dst_nbins) for s, e in ranges])
  nonzero = np.flatnonzero(hist)
  density = hist[nonzero] / width
  half = (dst_width / 2).astype(_F32)[:, None]
  src_begin = nonzero.astype(_F32) - starts.astype(_F32)[:, None]  # exact: integers < 2**24
  src_begin *= width
  src_end = src_begin + width
  dst_begin = _floor_div(src_begin, dst, _F32(dst_nbins - 1))
  dst_end = _floor_div(src_end, dst, _F32(dst_nbins - 1))
  # torch's three terms, each rounding kept; in place where it saves a temporary.
  three, cube_half = _F32(3), _cube(half)
  t = src_begin - (dst_begin + _F32(0.5)) * dst
  norm = cube_half - _cube(t)
  norm /= three
  norm *= density
  t = dst_end - dst_begin
  t -= _F32(1)
  t *= density * ((cube_half - _cube(-half)) / three)
  norm += t
  t = src_end - (dst_end * dst + half)
  t = _cube(t)
  t -= _cube(-half)
  t /= three
  t *= density
  norm += t
  return f32_sums(norm)


def f32_sums(rows: np.ndarray) -> np.ndarray:
  """:func:`f32_sum` of each row: a float64 sum with an error bound, ``math.fsum`` if in doubt."""
  wide = rows.astype(np.float64)
  total = wide.sum(axis=-1)
  bound = np.abs(wide, out=wide).sum(axis=-1) * (2.0 * rows.shape[-1] * 2.0**-53)
  with np.errstate(over="ignore", invalid="ignore"):
    got = total.astype(_F32)
    doubt = (total - bound).astype(_F32) != (total + bound).astype(_F32)
  for row in np.flatnonzero(doubt).tolist():
    got[row] = f32_sum(rows[row])
  return got.astype(np.float64)


def _skip_idle_steps(csum, total, ka, kb, end):
  """The first ``kb' >= kb`` at which torch's loop ends or its right cut moves (alpha fixed)."""
  alpha, beta = _cutoffs()
  # beta is decreasing: the loop runs while beta[kb'] > alpha[ka].
  last_running = bisect.bisect_left(beta, -alpha[ka], key=lambda b: -b) - 1
  # r moves once f32(beta[kb' + 1] * total) < csum[end].
  target = csum[end]
  moves = bisect.bisect_left(
    range(kb, last_running + 1), True, key=lambda k: float(_F32(beta[k + 1] * total)) < target
  )
  return kb + moves


def _walk(csum: list[float], total: float) -> Iterator[tuple[int, int]]:
  """The ranges torch's loop evaluates, in order, as if each one's error were the new minimum."""
  alpha, beta = _cutoffs()
  ka = kb = 0
  start, end = 0, len(csum) - 1
  while alpha[ka] < beta[kb]:
    left = bisect.bisect_left(csum, float(_F32(alpha[ka + 1] * total)))
    right = bisect.bisect_right(csum, float(_F32(beta[kb + 1] * total))) - 1
    left, right = min(max(left, start), end), min(max(right, start), end)
    if left - start > end - right:
      next_start, next_end = left, end
      ka += 1
    else:
      next_start, next_end = start, right
      kb += 1
    if (next_start, next_end) == (start, end):
      if end == start:  # nothing can move: torch spins until alpha >= beta.
        return
      kb = _skip_idle_steps(csum, total, ka, kb, end)
      continue
    yield next_start, next_end
    start, end = next_start, next_end


def l2_search(
  hist: np.ndarray, min_val: float, max_val: float, dst_nbins: int
) -> tuple[np.float32, np.float32]:
  """torch's ``_non_linear_param_search`` -> float32 ``(new_min, new_max)``."""
  hist = np.asarray(hist, _F32)
  min_val, max_val = _F32(min_val), _F32(max_val)
  bins = hist.size
  csum = np.cumsum(hist, dtype=np.float64).astype(_F32).tolist()
  walk = _walk(csum, float(f32_sums(hist[None])[0]))
  double_width = (float(max_val) - float(min_val)) / bins
  start, end, norm_min = 0, bins - 1, math.inf
  batch = _FIRST_BATCH
  while ranges := list(itertools.islice(walk, batch)):
    norms = quantization_errors(hist, double_width, ranges, dst_nbins)
    for (next_start, next_end), norm in zip(ranges, norms.tolist(), strict=True):
      if norm > norm_min:
        return _edges(min_val, max_val, bins, start, end)
      norm_min, start, end = norm, next_start, next_end
    batch = min(2 * batch, _MAX_BATCH)
  return _edges(min_val, max_val, bins, start, end)


def _edges(min_val, max_val, bins, start, end):
  """torch's ``min_val + bin_width * bin`` in float32. A range wider than float32's max has an
  infinite width: bin 0 then stays at ``min_val`` (torch's ``inf * 0`` would be NaN)."""
  with np.errstate(over="ignore", invalid="ignore"):
    width = (max_val - min_val) / _F32(bins)
    lo = min_val if start == 0 else min_val + width * _F32(start)
    return lo, min_val + width * _F32(end + 1)


def _host_search(packed: np.ndarray, *, dst_nbins: int) -> np.ndarray:
  """``[..., bins + 2]`` (histogram, min_val, max_val) -> ``[..., 2]`` (new_min, new_max)."""
  packed = np.asarray(packed, _F32)
  out = packed[..., -2:].copy()
  for idx in np.ndindex(packed.shape[:-1]):
    min_val, max_val = packed[idx][-2:]
    if np.isfinite(min_val) and np.isfinite(max_val):  # else never observed: left as is.
      # torch's float32 steps overflow (a range near float32's max) or divide by a zero width
      # (a range of a few subnormals) silently; so do these.
      with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        out[idx] = l2_search(packed[idx][:-2], min_val, max_val, dst_nbins)
  return out


def search(hist: jax.Array, min_val: jax.Array, max_val: jax.Array, dst_nbins: int):
  """:func:`l2_search` on device arrays, usable under ``jit`` and ``vmap`` (a host callback).

  The operands travel as one array and the results come back as one: each array costs the
  callback a ``device_put`` (about 25 us) on the host.
  """
  bounds = jnp.stack([min_val, max_val], axis=-1).astype(jnp.float32)
  packed = jnp.concatenate([jnp.asarray(hist, jnp.float32), bounds], axis=-1)
  out = jax.pure_callback(
    functools.partial(_host_search, dst_nbins=dst_nbins),
    jax.ShapeDtypeStruct((*jnp.shape(min_val), 2), jnp.float32),
    packed,
    vmap_method="broadcast_all",
  )
  return out[..., 0], out[..., 1]
