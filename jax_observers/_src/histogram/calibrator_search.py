r"""Clipping-range searches on one histogram ``h`` (``[B]``) with bin edges ``e`` (``[B + 1]``).

Every function is static-shape jnp code for one histogram; callers ``vmap`` it over channels.

* :func:`percentile_range`: ModelOpt's ``_compute_amax_percentile`` / ONNX Runtime's
  ``HistogramCollector.compute_percentile``. With :math:`C_j = \sum_{i \le j} h_i`,
  :math:`N = C_{B-1}` and :math:`q = p / 100`, :math:`j^\ast = \min\{j : C_j \ge q N\}` and the clip is the bin's lower
  edge :math:`e_{j^\ast}`. The comparison is exact (see :func:`percentile_index`).
* :func:`mse_range`: candidates :math:`t_k = k/K` of the observed range; the error of torch's
  quantizer is integrated in closed form over each bin, values uniform in the bin (torch's L2 model):
  :math:`\sum_j \frac{h_j}{e_{j+1}-e_j} s^3 \int_{u_j}^{u_{j+1}} (u - \mathrm{clip}(\mathrm{rne}\,u))^2 du`.
* :func:`entropy_trt_amax`: TensorRT / ModelOpt ``_compute_amax_entropy`` (``|x|`` histogram):
  :math:`\arg\min_i \mathrm{KL}(P_i \| Q_i)` over :math:`i \in [\mathrm{start}, B]`, last minimum.
* :func:`entropy_symmetric_range`: MXNet / ONNX Runtime ``get_entropy_threshold`` (histogram
  symmetric around 0, both sides grown together), first minimum.

Level sums use exclusive prefix sums of the counts: exact for int32 counts (``'pow2'`` policy);
float32 for float32 counts. Divergences are float32 (the references use float64); near-ties can
resolve to a neighbouring candidate.
"""

from __future__ import annotations

import fractions

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_observers._src import numerics
from jax_observers._src.observers import qparams


def _prefix(hist: jax.Array) -> jax.Array:
  """Exclusive prefix sums ``[B + 1]`` (int32 exact for int32 counts), as float32."""
  zero = jnp.zeros((1,), hist.dtype)
  return jnp.concatenate([zero, jnp.cumsum(hist)]).astype(jnp.float32)


def _kl(p: jax.Array, q: jax.Array) -> jax.Array:
  """scipy's ``entropy(p, q)``: both normalised; ``inf`` where ``p > 0 = q``."""
  p = numerics.exact_div(p, jnp.sum(p))
  q = numerics.exact_div(q, jnp.sum(q))
  ratio = jnp.where(p > 0, p, 1.0) / jnp.where(q > 0, q, 1.0)
  terms = jnp.where(p > 0, jnp.where(q > 0, p * jnp.log(ratio), jnp.inf), 0.0)
  return jnp.sum(terms)


_LIMB_BITS, _LIMBS = 12, 5  # five 12-bit limbs: exact integers below 2**60
_MASK = (1 << _LIMB_BITS) - 1


def _carry(columns) -> list[jax.Array]:
  """Column sums (int32, each < 2**30) to normalised 12-bit limbs, least significant first."""
  out, carry = [], 0
  for column in columns:
    value = column + carry
    out.append(value & _MASK)
    carry = value >> _LIMB_BITS
  return out


def _times(limbs, constant: int) -> list[jax.Array]:
  """The limbs of ``limbs * constant`` (a Python int < 2**60): products < 2**24, <= 5 a column."""
  c = [(constant >> (_LIMB_BITS * k)) & _MASK for k in range(_LIMBS)]
  columns = [
    sum(limbs[i] * c[k - i] for i in range(_LIMBS) if 0 <= k - i < _LIMBS)
    for k in range(2 * _LIMBS)
  ]
  return _carry(columns)


def _at_least(x, y) -> jax.Array:
  """``x >= y`` for numbers given as equally many normalised limbs (compared from the top)."""
  order = jnp.zeros(jnp.shape(x[0]), jnp.int32)
  for xk, yk in zip(reversed(x), reversed(y), strict=True):
    order = jnp.where(order == 0, jnp.sign(xk - yk), order)
  return order >= 0


def _reached_exact(counts, q: fractions.Fraction) -> jax.Array:
  """``C_j >= q N`` for int32 counts >= 0, as ``C_j den >= num N`` in 60-bit integers."""
  c = counts.astype(jnp.int32)
  pieces = (c & _MASK, (c >> _LIMB_BITS) & _MASK, c >> (2 * _LIMB_BITS))
  zero = jnp.zeros_like(c)
  cum = _carry([jnp.cumsum(v) for v in pieces] + [zero] * (_LIMBS - len(pieces)))
  total = [jnp.broadcast_to(v[-1], v.shape) for v in cum]
  return _at_least(_times(cum, q.denominator), _times(total, q.numerator))


def _reached_float(counts, q: fractions.Fraction) -> jax.Array:
  """``C_j >= q N`` for fractional float32 counts, in float-float (about 2**-44 relative)."""

  def step(acc, v):
    s, e = numerics.two_sum(acc[0], v)
    acc = numerics.two_sum(s, acc[1] + e)
    return acc, acc

  zero = jnp.zeros((), jnp.float32)
  _, (hi, lo) = lax.scan(step, (zero, zero), counts.astype(jnp.float32))
  qh = np.float32(q)
  ql = np.float32(q - fractions.Fraction(float(qh)))
  th, tl = numerics.two_prod(qh, hi[-1])
  tl = tl + numerics.rounded(qh * lo[-1]) + numerics.rounded(ql * hi[-1])
  s, e = numerics.two_sum(hi, -th)
  return s + (e + (lo - tl)) >= 0


def percentile_index(hist, q: fractions.Fraction) -> jax.Array:
  """The first bin whose cumulative count reaches ``q`` of the total: ``min{j : C_j >= q N}``.

  Exact for integer counts (the ``'pow2'`` policy's int32 histogram, or float32 counts that are
  all whole numbers): ``C_j q_d >= q_n N`` in 60-bit integer arithmetic on 12-bit limbs. So at a tie
  (:math:`qN` an integer and some :math:`C_j = qN`) the clip is the bin of the order statistic of
  rank :math:`qN`. ORT's and ModelOpt's ``searchsorted(cumsum(h / N), q)`` compare a float64 running
  sum, which can land one ulp below :math:`q` at a tie and then pick the next non-empty bin.
  Fractional counts (``'torch'`` re-binning) are compared in float-float.
  """
  if jnp.issubdtype(hist.dtype, jnp.integer):
    reached = _reached_exact(hist, q)
  else:
    whole = jnp.all((hist == jnp.round(hist)) & (hist < 2.0**31))
    counts = jnp.where(whole, hist, 0).astype(jnp.int32)
    reached = jnp.where(whole, _reached_exact(counts, q), _reached_float(hist, q))
  return jnp.argmax(reached)


def as_fraction(percentile) -> fractions.Fraction:
  """The percentile as the decimal it was written as (its shortest repr), an exact fraction."""
  p = fractions.Fraction(repr(float(percentile)))
  if p.denominator >= 2**55:  # more digits than 60-bit products allow
    p = p.limit_denominator(2**55 - 1)
  return p


def percentile_range(hist, edges, min_val, max_val, *, percentile: float, symmetric: bool):
  """``(lo, hi)``: ModelOpt/ORT percentile clip, clamped to the observed range (ORT).

  ``symmetric``: ``hist`` is of ``|x|``, the clip is ``(-e[j], e[j])`` with ``q = p / 100``
  (ModelOpt's ``amax``, ORT ``symmetric=True``). Otherwise ``hist`` is of ``x`` and
  ``(100 - p) / 200`` of the mass is cut on each side (ORT ``symmetric=False``); all three fractions
  are exact (:func:`as_fraction`, :func:`percentile_index`).
  """
  p = as_fraction(percentile)
  if symmetric:
    amax = edges[percentile_index(hist, p / 100)]
    lo, hi = -amax, amax
  else:
    cut = (100 - p) / 200
    lo = edges[percentile_index(hist, cut)]
    hi = edges[percentile_index(hist, 1 - cut)]
  return jnp.maximum(lo, min_val), jnp.minimum(hi, max_val)


def _bin_error(ua, ub, qmin, qmax):
  r""":math:`\int_{u_a}^{u_b} (u - \mathrm{clip}(\mathrm{rne}(u)))^2 du` in code units (torch's 3 terms)."""
  cb = jnp.clip(jnp.round(ua), qmin, qmax)
  ce = jnp.clip(jnp.round(ub), qmin, qmax)
  one_cell = ((ub - cb) ** 3 - (ua - cb) ** 3) / 3
  first = (0.125 - (ua - cb) ** 3) / 3
  middle = (ce - cb - 1) / 12
  last = ((ub - ce) ** 3 + 0.125) / 3
  return jnp.where(cb == ce, one_cell, first + middle + last)


def mse_errors(hist, edges, lo, hi, observer, steps: int) -> jax.Array:
  """Modelled squared error ``[steps]`` of the candidates ``(t lo, t hi)``, ``t = k/steps``."""
  qmin, qmax = observer.quant_range
  counts = hist.astype(jnp.float32)
  width = edges[1:] - edges[:-1]
  density = jnp.where(counts > 0, counts / jnp.where(width > 0, width, 1.0), 0.0)

  def error(k):
    t = k.astype(jnp.float32) / np.float32(steps)
    scale, zero_point = qparams.calculate_qparams(lo * t, hi * t, observer)
    zp = zero_point.astype(jnp.float32)
    ua = numerics.exact_div(edges[:-1], scale) + zp
    ub = numerics.exact_div(edges[1:], scale) + zp
    return jnp.sum(density * scale**3 * _bin_error(ua, ub, qmin, qmax))

  return lax.map(error, jnp.arange(1, steps + 1))


def mse_range(hist, edges, min_val, max_val, *, observer, steps: int):
  """The candidate of :func:`mse_errors` with the least error (the smallest ``t`` on ties)."""
  lo, hi = jnp.minimum(min_val, 0.0), jnp.maximum(max_val, 0.0)
  if observer.qscheme.is_symmetric:
    hi = jnp.maximum(-lo, hi)
    lo = -hi
  errors = mse_errors(hist, edges, lo, hi, observer, steps)
  t = (jnp.argmin(errors) + 1).astype(jnp.float32) / np.float32(steps)
  return lo * t, hi * t


def entropy_trt_divergences(hist, *, num_quantized_bins: int, start_bin: int, stride: int):
  """``KL_i`` for ``i = start_bin, start_bin + stride, ... <= B`` (ModelOpt's loop, float32)."""
  bins = hist.shape[-1]
  h = hist.at[0].set(hist[1]).astype(jnp.float32)
  prefix = _prefix(hist.at[0].set(hist[1]))
  nonzero = _prefix((hist.at[0].set(hist[1]) != 0).astype(jnp.int32))
  j = jnp.arange(bins)
  nq = num_quantized_bins

  def divergence(i):
    inside = j < i
    level = (nq * j) // i
    first = (level * i + nq - 1) // nq  # first j of this level: ceil(level * i / nq)
    nxt = jnp.minimum(((level + 1) * i + nq - 1) // nq, i)
    level_sum = prefix[nxt] - prefix[first]
    level_count = nonzero[nxt] - nonzero[first]
    q = jnp.where(inside & (h != 0), level_sum / jnp.maximum(level_count, 1.0), 0.0)
    tail = prefix[bins] - prefix[i]
    p = jnp.where(inside, h, 0.0) + jnp.where(j == i - 1, tail, 0.0)
    return _kl(p, q)

  candidates = jnp.arange(start_bin, bins + 1, stride)
  return candidates, lax.map(divergence, candidates)


def entropy_trt_amax(hist, edges, *, num_quantized_bins: int, start_bin: int, stride: int):
  """ModelOpt's ``calib_amax = edges[i*]`` with ``i*`` the last minimum of the divergences."""
  candidates, kl = entropy_trt_divergences(
    hist, num_quantized_bins=num_quantized_bins, start_bin=start_bin, stride=stride
  )
  last = kl.shape[0] - 1 - jnp.argmin(kl[::-1])
  return edges[candidates[last]]


def _smooth(p, inside, eps: float = 1e-4):
  """ORT/MXNet ``smooth_distribution`` on the slice; ``None`` (here: a flag) if all zero."""
  zero = inside & (p == 0)
  nonzero = inside & (p != 0)
  n_zero = jnp.sum(zero).astype(jnp.float32)
  n_nonzero = jnp.sum(nonzero).astype(jnp.float32)
  eps1 = np.float32(eps) * n_zero / jnp.maximum(n_nonzero, 1.0)
  return jnp.where(zero, np.float32(eps), jnp.where(nonzero, p - eps1, 0.0)), n_nonzero > 0


def entropy_symmetric_divergences(hist, *, num_quantized_bins: int, variant: str):
  """``KL_i`` for ``i = nq//2 .. B//2``: slice ``[B//2 - i, min(B//2 + i + 1, B))`` (ORT/MXNet)."""
  bins = hist.shape[-1]
  h = hist.astype(jnp.float32)
  prefix = _prefix(hist)
  nq = num_quantized_bins
  zero_bin = bins // 2
  j = jnp.arange(bins)

  def divergence(i):
    start, end = zero_bin - i, jnp.minimum(zero_bin + i + 1, bins)
    inside = (j >= start) & (j < end)
    m = (end - start) // nq
    p = jnp.where(inside, h, 0.0)
    p = p + jnp.where(j == start, prefix[start], 0.0)
    p = p + jnp.where(j == end - 1, prefix[bins] - prefix[end], 0.0)
    block = jnp.minimum((j - start) // m, nq - 1)
    leftover = (j - start) >= nq * m
    b0 = start + block * m
    b1 = jnp.where((block == nq - 1) & (variant == "mxnet"), end, b0 + m)
    q_sum = prefix[jnp.where(block == nq - 1, end, b0 + m)] - prefix[b0]
    pz = jnp.concatenate(
      [jnp.zeros((1,), jnp.int32), jnp.cumsum((inside & (p != 0)).astype(jnp.int32))]
    )
    norm = (pz[b1] - pz[b0]).astype(jnp.float32)
    value = q_sum / jnp.maximum(norm, 1.0)
    if variant == "onnxruntime":
      value = jnp.trunc(value)  # ORT's q is an int64 array
      q = jnp.where(inside & ~leftover & (norm > 0), value, 0.0)
    else:
      q = jnp.where(inside & (norm > 0) & (p != 0), value, 0.0)
    ps, ok_p = _smooth(p, inside)
    qs, ok_q = _smooth(q, inside)
    return jnp.where(ok_p & ok_q, _kl(ps, qs), jnp.inf)

  candidates = jnp.arange(nq // 2, zero_bin + 1)
  return candidates, lax.map(divergence, candidates)


def entropy_symmetric_range(
  hist, edges, min_val, max_val, *, num_quantized_bins: int, variant: str
):
  """ORT: ``(e[start], e[end])`` of the first minimum, clamped to the observed range; MXNet:
  ``(-e[end], e[end])``."""
  bins = hist.shape[-1]
  candidates, kl = entropy_symmetric_divergences(
    hist, num_quantized_bins=num_quantized_bins, variant=variant
  )
  i = candidates[jnp.argmin(kl)]
  hi = edges[jnp.minimum(bins // 2 + i + 1, bins)]
  if variant == "mxnet":
    return -hi, hi
  return jnp.maximum(edges[bins // 2 - i], min_val), jnp.minimum(hi, max_val)


def vmap_channels(fn, ndim: int):
  """``fn`` mapped over the leading channel axis when the state is per channel."""
  return jax.vmap(fn) if ndim == 2 else fn
