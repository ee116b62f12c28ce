"""Histogram calibrators vs NumPy references of the published algorithms, and calibrators.md §9."""

import fractions
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_observers as jo

torch = pytest.importorskip("torch")


def _entropy(p, q):
  """scipy.stats.entropy(p, q) in float64."""
  p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
  p, q = p / p.sum(), q / q.sum()
  with np.errstate(divide="ignore", invalid="ignore"):
    terms = np.where(p > 0, np.where(q > 0, p * np.log(p / q), np.inf), 0.0)
  return terms.sum()


def ref_percentile(hist, edges, lo, hi, p, symmetric):
  """ModelOpt `_compute_amax_percentile` / ORT `compute_percentile` (clamped, ORT); float64, so
  only for data without exact ties (ORT itself: tests/ort_parity_test.py)."""
  cdf = np.cumsum(hist / hist.sum())
  if symmetric:
    amax = edges[np.searchsorted(cdf, p / 100)]
    t = (-amax, amax)
  else:
    cut = (100.0 - p) / 200.0
    t = (edges[np.searchsorted(cdf, cut)], edges[np.searchsorted(cdf, 1.0 - cut)])
  return max(t[0], lo), min(t[1], hi)


def ref_entropy_trt(hist, edges, nq=128, start_bin=128, stride=1):
  """ModelOpt `_compute_amax_entropy` (its loops, float64)."""
  bins = hist.astype(np.float64).copy()
  bins[0] = bins[1]
  divergences = []
  for i in range(start_bin, len(bins) + 1, stride):
    space = np.linspace(0, i, num=nq + 1)
    digitized = np.digitize(range(i), space) - 1
    digitized[bins[:i] == 0] = -1
    density = np.zeros(nq)
    counter = np.zeros(nq)
    for idx, d in enumerate(digitized):
      if d != -1:
        density[d] += bins[idx]
        counter[d] += 1
    density = np.where(counter > 0, density / np.maximum(counter, 1), 0)
    q = np.where(digitized != -1, density[np.maximum(digitized, 0)], 0.0)
    p = bins[:i].copy()
    p[-1] += bins[i:].sum()
    divergences.append(_entropy(p, q))
  divergences = np.array(divergences)
  last = len(divergences) - 1 - np.argmin(divergences[::-1])
  return edges[last * stride + start_bin], divergences


def _smooth(p, eps=0.0001):
  is_zeros = (p == 0).astype(np.float32)
  is_nonzeros = (p != 0).astype(np.float32)
  n_zeros = is_zeros.sum()
  n_nonzeros = p.size - n_zeros
  if not n_nonzeros:
    return None
  eps1 = eps * float(n_zeros) / float(n_nonzeros)
  hist = p.astype(np.float32)
  hist += eps * is_zeros + (-eps1) * is_nonzeros
  return hist


def ref_entropy_symmetric(hist, edges, lo, hi, nq, variant):
  """ORT `get_entropy_threshold` (int64 q, clamped) or MXNet `_get_optimal_threshold`."""
  num_bins = hist.size
  zero = num_bins // 2
  kl, thresholds = [], []
  for i in range(nq // 2, zero + 1):
    start, end = zero - i, min(zero + i + 1, num_bins)
    thresholds.append((edges[start], edges[end]))
    sliced = hist[start:end].astype(np.int64)
    p = sliced.copy()
    p[0] += hist[:start].sum()
    p[-1] += hist[end:].sum()
    nonzeros = (p != 0).astype(np.int64)
    m = sliced.size // nq
    qb = np.array([sliced[k * m : (k + 1) * m].sum() for k in range(nq)], np.int64)
    qb[-1] += sliced[nq * m :].sum()
    q = np.zeros(p.size, np.int64 if variant == "onnxruntime" else np.float64)
    for k in range(nq):
      a = k * m
      b = p.size if (variant == "mxnet" and k == nq - 1) else a + m
      norm = nonzeros[a:b].sum()
      if norm != 0:
        q[a:b] = qb[k] / norm
    if variant == "mxnet":
      q[p == 0] = 0
    ps, qs = _smooth(p), _smooth(q)
    kl.append(np.inf if ps is None or qs is None else _entropy(ps, qs))
  best = thresholds[int(np.argmin(kl))]
  if variant == "mxnet":
    return -best[1], best[1]
  return max(best[0], lo), min(best[1], hi)


def _data(seed, n=20022):  # not round: no exact percentile ties
  rng = np.random.default_rng(seed)
  kind = seed % 3
  if kind == 0:
    x = rng.laplace(0, 1, n)
  elif kind == 1:
    x = np.maximum(rng.standard_normal(n), 0) * 3  # ReLU-like, many exact zeros
  else:
    x = np.concatenate([rng.standard_normal(n - 20) * 0.5 + 0.3, rng.uniform(-30, 30, 20)])
  return rng.permutation(x).astype(np.float32)


def _observe(obs, x, parts=2):
  update = jax.jit(obs.update)
  state = obs.init(x)
  for part in np.array_split(x, parts):
    state = update(state, part)
  return state


def _numpy_state(obs, state):
  return (
    np.asarray(state.histogram, np.float64),
    np.asarray(obs.edges(state), np.float64),
    float(state.min_val),
    float(state.max_val),
  )


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("policy", ["pow2", "torch"])
@pytest.mark.parametrize("qscheme", [jo.per_tensor_symmetric, jo.per_tensor_affine])
def test_percentile_matches_reference(seed, policy, qscheme):
  for p in (99.0, 99.99):
    obs = jo.HistogramPercentileObserver(
      percentile=p, bins=512, qscheme=qscheme, range_policy=policy
    )
    state = _observe(obs, _data(seed))
    lo, hi = obs.clip_range(state)
    ref = ref_percentile(*_numpy_state(obs, state), p, qscheme.is_symmetric)
    assert (float(lo), float(hi)) == pytest.approx(ref, rel=0, abs=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_entropy_tensorrt_matches_reference(seed):
  obs = jo.HistogramEntropyObserver(bins=256, start_bin=32, num_quantized_bins=32)
  state = _observe(obs, _data(seed))
  hist, edges, _, _ = _numpy_state(obs, state)
  amax, kl = ref_entropy_trt(hist, edges, nq=32, start_bin=32)
  _, hi = obs.clip_range(state)
  lo_obs, hi_obs = float(state.min_val), float(state.max_val)
  if float(hi) != min(amax, hi_obs):  # float32 near-tie: ours must be a (near-)minimum
    i = int(np.searchsorted(edges, float(hi))) - 32
    assert kl[i] <= kl.min() * (1 + 1e-4) + 1e-7
  assert lo_obs <= float(hi) <= hi_obs


@pytest.mark.parametrize("seed", [0, 2])
@pytest.mark.parametrize("variant", ["onnxruntime", "mxnet"])
def test_entropy_symmetric_matches_reference(seed, variant):
  obs = jo.HistogramEntropyObserver(variant=variant, bins=256, num_quantized_bins=32)
  state = _observe(obs, _data(seed))
  ref = ref_entropy_symmetric(*_numpy_state(obs, state), 32, variant)
  assert tuple(float(v) for v in obs.clip_range(state)) == ref


def ref_mse_errors(hist, edges, lo, hi, qmin, qmax, steps, symmetric, dtype):
  """Error integrals split at every rounding boundary, float64; qparams from torch itself."""
  qdtype = {np.dtype(np.uint8): torch.quint8, np.dtype(np.int8): torch.qint8}[np.dtype(dtype)]
  tq = torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine
  tobs = torch.ao.quantization.MinMaxObserver(dtype=qdtype, qscheme=tq)
  errors = []
  for k in range(1, steps + 1):
    t = np.float32(k) / np.float32(steps)
    scale, zp = tobs._calculate_qparams(
      torch.tensor(np.float32(lo) * t), torch.tensor(np.float32(hi) * t)
    )
    s, z = float(scale.item()), float(zp.item())
    total = 0.0
    for h, a, b in zip(hist, edges[:-1], edges[1:], strict=True):
      if h == 0:
        continue
      ua, ub = a / s + z, b / s + z
      cuts = [c + 0.5 for c in range(qmin, qmax) if ua < c + 0.5 < ub]
      points = [ua, *cuts, ub]
      err = 0.0
      for u0, u1 in itertools.pairwise(points):
        c = min(max(round((u0 + u1) / 2), qmin), qmax)
        err += ((u1 - c) ** 3 - (u0 - c) ** 3) / 3
      total += h / (b - a) * s**3 * err
    errors.append(total)
  return np.array(errors)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
  "qscheme,dtype", [(jo.per_tensor_symmetric, np.int8), (jo.per_tensor_affine, np.uint8)]
)
def test_mse_matches_reference(seed, qscheme, dtype):
  obs = jo.HistogramMSEObserver(bins=64, steps=25, qscheme=qscheme, dtype=dtype)
  state = _observe(obs, _data(seed))
  hist, edges, mn, mx = _numpy_state(obs, state)
  lo, hi = min(mn, 0.0), max(mx, 0.0)
  if qscheme.is_symmetric:
    hi = max(-lo, hi)
    lo = -hi
  qmin, qmax = obs.quant_range
  ref = ref_mse_errors(hist, edges, lo, hi, qmin, qmax, 25, qscheme.is_symmetric, dtype)
  got_lo, got_hi = obs.clip_range(state)
  k = round(float(got_hi if hi > 0 else got_lo) / (hi if hi > 0 else lo) * 25)
  assert ref[k - 1] <= ref.min() * (1 + 1e-4)


@pytest.mark.parametrize(
  "make",
  [
    lambda **kw: jo.HistogramPercentileObserver(percentile=99.9, **kw),
    lambda **kw: jo.HistogramMSEObserver(steps=10, **kw),
    lambda **kw: jo.HistogramEntropyObserver(start_bin=32, num_quantized_bins=32, **kw),
    lambda **kw: jo.HistogramEntropyObserver(variant="onnxruntime", num_quantized_bins=32, **kw),
  ],
)
def test_per_channel_equals_per_tensor_on_each_channel(make):
  """One [C, bins] pass over a (N, C) input gives each channel the per-tensor answer."""
  rng = np.random.default_rng(7)
  x = (rng.laplace(size=(2000, 3)) * np.float32([0.5, 1.0, 4.0])).astype(np.float32)
  per_channel = make(bins=256, ch_axis=1, qscheme=jo.per_channel_affine)
  state = _observe(per_channel, x)
  lo, hi = per_channel.clip_range(state)
  qp = per_channel.calculate_qparams(state)
  for c in range(3):
    single = make(bins=256)
    s = _observe(single, np.ascontiguousarray(x[:, c]))
    np.testing.assert_array_equal(np.asarray(state.histogram[c]), np.asarray(s.histogram))
    assert (float(lo[c]), float(hi[c])) == tuple(float(v) for v in single.clip_range(s))
    assert float(qp.scale[c]) == float(single.calculate_qparams(s).scale)


def test_per_channel_pow2_is_split_invariant():
  x = np.random.default_rng(8).standard_cauchy((1200, 4)).astype(np.float32)
  obs = jo.HistogramPercentileObserver(bins=128, ch_axis=1, qscheme=jo.per_channel_affine)
  a, b = _observe(obs, x, 2), _observe(obs, x, 3)
  for field in ("histogram", "min_val", "max_val"):
    np.testing.assert_array_equal(np.asarray(getattr(a, field)), np.asarray(getattr(b, field)))


def _section9_batches():
  """calibrators.md §9: 1e5 Laplace(0,1) + 20 outliers at ±(20…40), default_rng(0), two batches."""
  rng = np.random.default_rng(0)
  x = np.concatenate([rng.laplace(0, 1, 100000), np.linspace(20, 40, 10), -np.linspace(20, 30, 10)])
  return [b.astype(np.float32) for b in np.array_split(rng.permutation(x), 2)]


def test_section9_reference_values():
  batches = _section9_batches()

  def run(obs):
    state = obs.init(batches[0])
    for b in batches:
      state = obs.update(state, b)
    return state

  # torch.ao HistogramObserver quint8: [-26.72, 40] -> scale 0.261642, zp 102 (exact port).
  obs = jo.HistogramObserver()
  lo, hi = obs.search_range(run(obs))
  assert round(float(lo), 2) == -26.72 and float(hi) == 40.0
  scale, zp = obs.calculate_qparams(run(obs))
  assert round(float(scale), 6) == 0.261642 and int(zp) == 102
  # torchao AffineQuantizedMSEObserver int8 symmetric, steps=100: t = 32.40 -> scale 0.254118.
  mse = jo.HistogramMSEObserver(dtype=jnp.int8, qscheme=jo.per_tensor_symmetric)
  assert round(float(mse.calculate_qparams(run(mse)).scale), 6) == 0.254118
  # Histogram-read values: our grid differs from ModelOpt's/ORT's grown grids, so within 2 bins.
  width = 40.0 / 2048
  for p, expected in ((99.99, 26.655), (99.9, 7.323)):  # ModelOpt percentile (amax)
    pct = jo.HistogramPercentileObserver(
      percentile=p, qscheme=jo.per_tensor_symmetric, range_policy="torch"
    )
    assert abs(float(pct.clip_range(run(pct))[1]) - expected) < 2 * width
  ort = jo.HistogramPercentileObserver(percentile=99.99, range_policy="torch")  # ORT asymmetric
  lo, hi = ort.clip_range(run(ort))
  assert abs(float(lo) + 24.460) < 2 * width and abs(float(hi) - 28.887) < 2 * width
  # ModelOpt entropy 11.879 (pow2 grid: bins of 64/2048).
  ent = jo.HistogramEntropyObserver()
  assert abs(float(ent.clip_range(run(ent))[1]) - 11.879) < 4 * 64 / 2048


def test_percentile_breaks_exact_ties_in_integer_arithmetic():
  """qN an integer reached exactly: the clip is that bin (a float32 q N, or a float64 running CDF,
  can move to the next non-empty bin). Counts beyond float32's 2**24 stay exact."""
  from jax_observers._src.histogram import calibrator_search as search

  edges = jnp.arange(9, dtype=jnp.float32)
  for p, hist in (
    (99.99, [99794, 0, 196, 0, 0, 10, 0, 0]),  # C_2 = 99990 = 0.9999 * 1e5
    (90.0, [3, 6, 0, 0, 1, 0, 0, 0]),  # C_1 = 9 = 0.9 * 10
    (99.99, [2**30, 2**30 - 214749, 0, 214748, 1, 0, 0, 0]),  # N = 2**31: C_3 = qN - ... exact
  ):
    h = np.array(hist, np.int64)
    q = fractions.Fraction(repr(p)) / 100
    cum = np.cumsum(h)
    want = int(np.argmax([fractions.Fraction(int(c)) >= q * int(cum[-1]) for c in cum]))
    for dtype in (jnp.int32, jnp.float32):
      if dtype == jnp.float32 and cum[-1] > 2**24:
        continue
      _, hi = search.percentile_range(
        jnp.asarray(h, dtype), edges, 0.0, 8.0, percentile=p, symmetric=True
      )
      assert float(hi) == want, (p, hist, dtype)
