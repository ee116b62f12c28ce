r"""torch's L2 range search (``_non_linear_param_search``) on the device, float32/int32 only.

The same walk as :mod:`search_host` (which runs it on the host in NumPy/float64), in one
``lax.while_loop``: no host callback, so it runs where the histogram lives and ``jax.export`` can
serialize it. torch's float64 steps are emulated with error-free transforms
(:func:`numerics.two_sum`, :func:`numerics.two_prod`):

* the cut-offs :math:`\alpha_k, \beta_k` (Python floats accumulated :math:`10^{-5}` at a time) are
  tables of exact triple-float32 expansions built at trace time, and the loop test
  :math:`\alpha_{k_a} < \beta_{k_b}` is a table of integers :math:`k_b < L(k_a)`;
* a threshold :math:`f_{32}(\mathrm{rn}_{64}(\alpha T))` is the exact six-term product expansion
  rounded by :func:`f32_of_f64`, which rounds to float32 *through* float64: it finds the float32
  midpoints and the float64 ties around them, so double rounding is reproduced;
* sums (the histogram's total, its cumulative sum, each range's error) are split into levels on
  nested power-of-two grids whose float32 sums are exact (Rump, Ogita and Oishi's extraction), and
  the exact sum is rounded by :func:`f32_of_f64`, as the host's float64 sum rounded to float32;
* the bin width :math:`\mathrm{rn}_{64}(\mathrm{rn}_{64}(M - m)/\mathrm{bins})` is an exact float64
  in three float32 terms (:func:`round_to_f64` of the exact difference, then of a long-division
  quotient), and the destination width :math:`w (e - s + 1)/2^b` its exact product, rounded by
  :func:`f32_of_f64`.

Runs of steps that move neither end are skipped with a 64-way search over :math:`\beta_k` (the
host's binary search), so "two spikes" takes a handful of iterations instead of :math:`10^5`.

Where it is not bit for bit with torch and the host (documented limits):

* subnormal float32 values: XLA:CPU flushes them to zero, torch and NumPy keep them. Ranges whose
  error terms fall below :math:`2^{-126}` (spans below about :math:`10^{-9}`; all bin widths of
  spans below about :math:`2.4 \cdot 10^{-35}`) give a range inside ``[min_val, max_val]`` that
  can differ from torch's.
* histograms whose cumulative sums are not exact in float64 (torch's accumulator then rounds;
  never for counts, nor for re-binned counts), or that span more than :math:`2^{67}` between
  bins: the exact sum is used.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_observers._src import numerics
from jax_observers._src.histogram import search_host
from jax_observers._src.numerics import exact_div, rounded, two_sum

_F32 = np.float32
_LEVELS = 6  # extraction levels, each 23 - ceil(log2(n + 2)) bits (11 for 2048 bins): the sums
# are exact down to 2**-67 of the largest term, past any float64 rounding decision that matters.
_PASSES = 3  # VecSum passes: enough for the short, nearly sorted expansions here.
_FAN, _ROUNDS = 64, 3  # the idle-run search: 64 candidates a round, 64**3 > len(beta).
_BIG = _F32(2.0**60)  # two_prod operands above this are scaled down first (split overflows).


@functools.cache
def _tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """alpha_k, beta_k as exact ``[K, 3]`` float32 expansions (large first), and ``L(k_a)``: the
  number of ``k_b`` with ``beta[k_b] > alpha[k_a]`` (torch's loop runs while ``k_b < L(k_a)``)."""
  alpha, beta = (np.asarray(v, np.float64) for v in search_host._cutoffs())

  def triple(v):
    parts, rest = [], v
    for _ in range(3):
      parts.append(rest.astype(_F32))
      rest = rest - parts[-1].astype(np.float64)
    assert not rest.any(), "a float64 needs at most three float32 parts"
    return np.stack(parts, axis=-1)

  limit = beta.size - np.searchsorted(beta[::-1], alpha, side="right")
  return triple(alpha), triple(beta), limit.astype(np.int32)


def _two_prod(a, b):
  """:func:`numerics.two_prod` for any finite ``a`` (``|b| < 2**60``): big ``a`` is scaled first."""
  scale = jnp.where(jnp.abs(a) > _BIG, _F32(2.0**-40), _F32(1))
  p, e = numerics.two_prod(a * scale, b)
  return p / scale, e / scale  # exact: a power of two


def _distill(terms, passes=None):
  """VecSum passes (error-free): the last term becomes the rounded sum, the others its errors."""
  ts = list(terms)
  for _ in range(_PASSES if passes is None else passes):
    for i in range(len(ts) - 1):
      s, e = two_sum(ts[i], ts[i + 1])
      ts[i], ts[i + 1] = e, s
  return ts


def _sign(terms):
  """The sign of an exact sum of float32 terms."""
  return jnp.sign(_distill(terms)[-1])


def f32_of_f64(terms):
  """``float32(float64(x))`` for ``x`` the exact sum of float32 ``terms`` (smallest first).

  ``r`` is the distilled sum and ``d = x - r`` the exact rest. With ``u`` float32's spacing on
  ``d``'s side of ``r`` and ``g = u 2**-29`` float64's spacing at the midpoint ``r + u/2``: ``x``
  rounds to float64 onto that midpoint iff ``||d| - u/2| <= g/2`` (the midpoint is even in
  float64), and the midpoint then rounds to the even one of ``r`` and its neighbour.
  """
  ts = _distill(terms)
  r, rest = ts[-1], ts[:-1]
  if not rest:
    return r
  side = _sign(rest)
  u = _ulp_at(r, side)
  h, g2 = u * _F32(0.5), u * _F32(2.0**-30)
  dist = [t * side for t in rest]  # |d|, exactly
  above = _sign([*dist, -g2, -h]) > 0  # |d| > u/2 + g/2: past the midpoint's float64 cell
  reach = _sign([*dist, g2, -h]) >= 0  # |d| >= u/2 - g/2: at least onto the midpoint
  step = jnp.nextafter(r, side * jnp.asarray(jnp.inf, r.dtype))
  odd = (lax.bitcast_convert_type(r, jnp.int32) & 1) == 1
  out = jnp.where(above | (reach & odd), step, r)
  return jnp.where((side == 0) | ~jnp.isfinite(r), r, out)


def _levels(x):
  """``x[..., n] = sum(levels) + rest``, each level on a grid where its float32 sums are exact."""
  n = x.shape[-1]
  m = int(np.ceil(np.log2(n + 2)))
  _, e = jnp.frexp(jnp.max(jnp.abs(x), axis=-1, keepdims=True))  # 2**e > max |x|
  biased = jnp.clip(e + m + 127, 1, 254).astype(jnp.int32)
  sigma = lax.bitcast_convert_type(biased << 23, jnp.float32)
  levels = []
  for _ in range(_LEVELS):
    q = (sigma + x) - sigma
    x = x - q
    levels.append(q)
    sigma = sigma * _F32(2.0 ** (m - 23))
  ok = jnp.all(jnp.isfinite(x), axis=-1) & (jnp.squeeze(e, -1) + m < 127)
  return levels, x, ok


def exact_sum(x):
  """``float32(float64 sum)`` of the last axis, as the host's ``f32_sums`` (non-finite as NumPy)."""
  levels, rest, ok = _levels(x)
  terms = jnp.sum(jnp.stack([rest, *reversed(levels)]), axis=-1)  # one pass for every level
  return jnp.where(ok, f32_of_f64(list(terms)), jnp.sum(x, -1))


def exact_cumsum(x):
  """torch's CPU ``cumsum`` (a float64 accumulator, cast per element), for exact float64 sums."""
  levels, rest, _ = _levels(x)
  sums = jnp.cumsum(jnp.stack([rest, *reversed(levels)]), axis=-1)  # one scan for every level
  return f32_of_f64(list(sums))


def _ulp_at(r, side):
  """float32's spacing next to ``r`` on the side ``side`` (finer below a power of two)."""
  mag = jnp.abs(r)
  u = jnp.nextafter(mag, jnp.asarray(jnp.inf, r.dtype)) - mag
  pow2 = (lax.bitcast_convert_type(mag, jnp.int32) & 0x7FFFFF) == 0
  return jnp.where(pow2 & (side * jnp.sign(r) < 0), u * _F32(0.5), u)


def round_to_f64(terms):
  """``float64(x)`` (round to nearest even) as an exact expansion ``[t3, t2, t1]``, for ``x`` the
  exact sum of float32 ``terms``, ``|x|`` in ``[2**-60, 2**120]`` (else ``x``'s own sum is kept).

  With ``r`` the distilled sum, ``G = u 2**-29`` is float64's spacing around ``r`` and ``r / G``
  is even, so ``float64(x) = r + k G`` with ``k`` the integer nearest ``(x - r) / G``, ties even.
  ``k`` (up to ``2**29``) is found in two float32 parts, the tie by an exact sign test.
  """
  ts = _distill(terms)
  r, rest = ts[-1], ts[:-1]
  side = _sign(rest)
  u = _ulp_at(r, side)
  ok = (u >= _F32(2.0**-80)) & (u <= _F32(2.0**100)) & jnp.isfinite(r)
  u = jnp.where(ok, u, _F32(1))
  scale = _F32(2.0**29) * (_F32(1) / u)  # exact: powers of two
  y = _distill([t * scale for t in rest])
  k1 = jnp.round(y[-1])  # half to even
  y = _distill([*y[:-1], y[-1] - k1])  # exact: y[-1] and k1 are close
  k2 = jnp.round(y[-1])
  y = [*y[:-1], y[-1] - k2]
  up, down = _sign([*y, _F32(-0.5)]), _sign([*y, _F32(0.5)])
  odd = (k1 - _F32(2) * jnp.floor(k1 * _F32(0.5))) != (k2 - _F32(2) * jnp.floor(k2 * _F32(0.5)))
  adj = jnp.where((up > 0) | ((up == 0) & odd), _F32(1), _F32(0))
  adj = jnp.where((down < 0) | ((down == 0) & odd), _F32(-1), adj)
  g = u * _F32(2.0**-29)
  out = [(k2 + adj) * g, k1 * g, r]
  kept = ([jnp.zeros_like(r)] * 3 + ts)[-3:]
  return [jnp.where(ok, o, t) for o, t in zip(out, kept, strict=True)]


def _quotient(min_val, max_val, bins):
  """torch's Python-float ``(max - min) / bins`` as an exact float64 in three float32 terms
  (smallest first), for inputs scaled by ``c``: returns ``(terms, 1 / c)``."""
  shift = jnp.maximum(jnp.abs(min_val), jnp.abs(max_val)) > _F32(2.0**126)
  c = jnp.where(shift, _F32(0.5), _F32(1))
  hi, lo = two_sum(max_val * c, -(min_val * c))  # exact
  d = round_to_f64([lo, hi])  # float64(max) - float64(min), rounded
  b = _F32(bins)
  q = []
  for _ in range(3):  # long division: d - b (q1 + q2 + ...) stays exact
    q.append(exact_div(d[-1], b))
    p, pe = _two_prod(q[-1], b)
    d = _distill([*d[:-1], -pe, d[-1] - p])  # d[-1] - p exact (Sterbenz)
  # the quotient is never a float64 midpoint unless exact, and never within 2**-65 of one: the
  # three terms (error 2**-72) round as the quotient does.
  return round_to_f64(q[::-1]), jnp.where(shift, _F32(2), _F32(1))


def _floor_divide(a, b):
  """NumPy's float32 ``floor_divide(a, b)`` for ``b > 0`` (torch's ``rounding_mode='floor'``).

  NumPy's fmod-based result is the exact ``floor(a / b)`` here (quotients below 2**22, NaN for
  infinite ``a``). ``floor(f32(a / b))`` is one too large exactly where the division rounded up
  onto an integer; that is checked exactly, ``q b > a`` with :func:`_two_prod` (``q b - a`` is
  exact by Sterbenz). No ``fmod``: XLA:CPU calls libm for it, element by element.
  """
  d = exact_div(a, b)
  q = jnp.floor(d)
  p, e = _two_prod(q, jnp.broadcast_to(b, q.shape))
  q = jnp.where((d == q) & ((p - a) + e > 0), q - _F32(1), q)
  return jnp.where(jnp.isinf(a), _F32(np.nan), q)


def _cube(v):
  return rounded(rounded(v * v) * v)


def _error(hist, density, width, bw, inv, start, end, dst_nbins):
  """torch's ``_compute_quantization_error(start, end)`` with each float32 rounding kept."""
  bins = hist.shape[-1]
  n = (end - start + 1).astype(jnp.float32)
  terms = []
  for q in bw:
    p, e = _two_prod(q, n)
    terms += [e * inv, p * inv]
  dst = f32_of_f64([t * _F32(1.0 / dst_nbins) for t in terms])
  half = dst * _F32(0.5)  # f32(x / 2) == f32(x) / 2 (x normal)
  top, three = _F32(dst_nbins - 1), _F32(3)
  src_begin = rounded((jnp.arange(bins) - start).astype(jnp.float32) * width)
  src_end = src_begin + width
  dst_begin = jnp.clip(_floor_divide(src_begin, dst), _F32(0), top)
  dst_end = jnp.clip(_floor_divide(src_end, dst), _F32(0), top)
  delta_begin = src_begin - rounded((dst_begin + _F32(0.5)) * dst)
  norm = rounded(density * exact_div(_cube(jnp.ones_like(hist) * half) - _cube(delta_begin), three))
  full = exact_div(_cube(half) - _cube(-half), three)
  norm = norm + rounded((dst_end - dst_begin - _F32(1)) * rounded(density * full))
  delta_end = src_end - (rounded(dst_end * dst) + half)
  norm = norm + rounded(density * exact_div(_cube(delta_end) - _cube(-half), three))
  return jnp.where(bw[-1] == 0, _F32(0), exact_sum(norm))


def _threshold(row, total):
  """``float32(cutoff * total)``, the product taken in float64 (``row[i]``: the cut-off's terms)."""
  terms = []
  for i in (2, 1, 0):
    p, e = _two_prod(jnp.broadcast_to(total, row[i].shape), row[i])
    terms += [e, p]
  return f32_of_f64(terms)


def _search_one(hist, min_val, max_val, dst_nbins):
  alpha_np, beta_np, limit_np = _tables()
  alpha, beta, limit = jnp.asarray(alpha_np), jnp.asarray(beta_np), jnp.asarray(limit_np)
  bins = hist.shape[-1]
  small_counts = jnp.all(hist == jnp.round(hist)) & (jnp.sum(jnp.abs(hist)) < _F32(2.0**24))
  csum = lax.cond(small_counts, jnp.cumsum, exact_cumsum, hist)  # integers below 2**24: exact
  total = csum[-1]  # the host's f32_sums(hist): both are float32 of the exact total
  bw, inv = _quotient(min_val, max_val, bins)
  width = f32_of_f64([q * inv for q in bw])
  density = exact_div(hist, width)
  error = functools.partial(_error, hist, density, width, bw, inv, dst_nbins=dst_nbins)

  def skip(ka, kb, end):
    """The first ``kb' >= kb`` where the loop ends or ``f32(beta[kb' + 1] T) < csum[end]``: a
    64-way search (three rounds cover the ~1e5 steps), the host's binary search vectorized."""
    lo, hi = kb, jnp.maximum(limit[ka], kb)  # the answer is in [lo, hi]; hi if nothing hits
    for _ in range(_ROUNDS):
      step = jnp.maximum((hi - lo + _FAN - 1) // _FAN, 1)
      cand = lo + step * jnp.arange(_FAN, dtype=jnp.int32)
      rows = beta[jnp.minimum(cand + 1, beta.shape[0] - 1)]
      hit = (cand < hi) & (_threshold(rows.T, total) < csum[end])
      first = jnp.argmax(hit)
      found = jnp.any(hit)
      lo, hi = (
        jnp.where(found & (first > 0), cand[jnp.maximum(first - 1, 0)] + 1, lo),
        jnp.where(found, cand[first], hi),
      )
      last = cand[jnp.clip((hi - 1 - cand[0]) // step, 0, _FAN - 1)]  # the last candidate < hi
      lo = jnp.where(found, lo, jnp.minimum(last + 1, hi))
    return hi

  def cond(c):
    ka, kb, *_, done = c
    return ~done & (kb < limit[ka])

  def body(c):
    ka, kb, start, end, norm_min, _ = c
    thr_a, thr_b = _threshold(jnp.stack([alpha[ka + 1], beta[kb + 1]], -1), total)
    left = jnp.searchsorted(csum, thr_a, side="left")
    right = jnp.searchsorted(csum, thr_b, side="right") - 1
    left, right = jnp.clip(left, start, end), jnp.clip(right, start, end)
    move_a = left - start > end - right
    new_start, new_end = jnp.where(move_a, left, start), jnp.where(move_a, end, right)
    ka, kb = ka + move_a, kb + ~move_a
    moved = (new_start != start) | (new_end != end)
    stuck = ~moved & (end == start)  # nothing can move: torch spins until alpha >= beta.
    kb = lax.cond(moved | stuck, lambda: kb, lambda: skip(ka, kb, end))
    norm = lax.cond(moved, lambda: error(new_start, new_end), lambda: norm_min)
    stop = moved & (norm > norm_min)  # NaN is accepted, as torch's `norm > norm_min`
    take = moved & ~stop
    start, end = jnp.where(take, new_start, start), jnp.where(take, new_end, end)
    norm_min = jnp.where(take, norm, norm_min)
    return ka, kb, start, end, norm_min, stop | stuck

  i32 = functools.partial(jnp.asarray, dtype=jnp.int32)
  init = (i32(0), i32(0), i32(0), i32(bins - 1), jnp.asarray(jnp.inf, jnp.float32), False)
  _, _, start, end, _, _ = lax.while_loop(cond, body, init)
  return _edges(min_val, max_val, bins, start, end)


def _edges(min_val, max_val, bins, start, end):
  """``min_val + bin_width * bin`` in float32, two roundings; bin 0 stays ``min_val``."""
  width = exact_div(max_val - min_val, _F32(bins))
  lo = min_val + rounded(width * start.astype(jnp.float32))
  return jnp.where(start == 0, min_val, lo), min_val + rounded(
    width * (end + 1).astype(jnp.float32)
  )


def search(hist: jax.Array, min_val: jax.Array, max_val: jax.Array, dst_nbins: int):
  """:func:`search_host.search` on the device: ``(new_min, new_max)`` float32.

  Args:
    hist: ``[..., bins]`` histogram counts.
    min_val, max_val: ``[...]`` the histogram's range; a non-finite one (never observed) is
      returned as is.
    dst_nbins: the destination bins, ``2**bits``.

  Usable under ``jit``, ``vmap`` and ``jax.export``; float32/int32 only (x64 off).
  """
  if dst_nbins < 1 or dst_nbins & (dst_nbins - 1) or dst_nbins > 2**24:
    raise ValueError(f"search: dst_nbins={dst_nbins!r}; expected a power of two up to 2**24.")
  hist = jnp.asarray(hist, jnp.float32)
  if not 1 <= hist.shape[-1] <= 2**20:
    raise ValueError(f"search: hist has {hist.shape[-1]} bins; expected 1 to 2**20.")
  min_val = jnp.asarray(min_val, jnp.float32)
  max_val = jnp.asarray(max_val, jnp.float32)

  def one(h, lo, hi):
    observed = jnp.isfinite(lo) & jnp.isfinite(hi)
    # A never-observed state searches an empty [0, 1] histogram instead (a few steps).
    h = jnp.where(observed, h, _F32(0))
    new_lo, new_hi = _search_one(
      h, jnp.where(observed, lo, _F32(0)), jnp.where(observed, hi, _F32(1)), dst_nbins
    )
    return jnp.where(observed, new_lo, lo), jnp.where(observed, new_hi, hi)

  return jnp.vectorize(one, signature="(n),(),()->(),()")(hist, min_val, max_val)
