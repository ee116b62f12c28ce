"""The device L2 search against the host search (bit for bit) and torch 2.13 (live)."""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_observers as jo
from jax_observers._src.histogram import search_device, search_host
from jax_observers._src.observers import qparams

B = 112  # histograms per vmapped call: one shape per (bins, dst_nbins), so one compile each.
KINDS = (
  "normal",
  "laplace",
  "uniform",
  "cauchy",
  "outliers",
  "spikes",
  "inner_spikes",
  "constant",
  "sparse",
  "fractional",
  "big_counts",
  "large",
  "tiny",
  "offset",
  "empty",
  "never_observed",
)
# Ranges whose error terms overflow (NaN errors: torch accepts every step, so the walk runs to its
# end) or underflow to zero: each one walks all ~2 * bins moves, so they get their own small stack.
DEGENERATE = ("overflow", "underflow")


@functools.cache
def _device():
  return jax.jit(jax.vmap(search_device.search, (0, 0, 0, None)), static_argnums=3)


def _from_data(rng, x, bins):
  x = np.asarray(x, np.float32)
  x = x[np.isfinite(x)]
  lo, hi = np.float32(x.min()), np.float32(x.max())
  if lo == hi:
    return np.bincount([0], minlength=bins).astype(np.float32) * x.size, lo, hi
  hist = np.histogram(x.astype(np.float64), bins, (float(lo), float(hi)))[0]
  return hist.astype(np.float32), lo, hi


def _histogram(rng, kind, bins):
  """One ``(hist, min_val, max_val)`` of the given kind."""
  n = int(rng.integers(50, 20000))
  scale = float(10 ** rng.uniform(-3, 3))
  if kind == "normal":
    return _from_data(rng, rng.standard_normal(n) * scale + rng.uniform(-1, 1) * scale, bins)
  if kind == "laplace":
    return _from_data(rng, rng.laplace(rng.uniform(-3, 3), scale, n), bins)
  if kind == "uniform":
    return _from_data(rng, rng.uniform(-scale, scale * rng.uniform(0.1, 2), n), bins)
  if kind == "cauchy":
    return _from_data(rng, rng.standard_cauchy(n) * scale, bins)
  if kind == "outliers":
    x = rng.standard_normal(n)
    x[rng.integers(0, n, rng.integers(1, 4))] = rng.choice([-1, 1]) * 10 ** rng.uniform(1, 4)
    return _from_data(rng, x, bins)
  if kind == "spikes":
    return _from_data(rng, rng.choice([0.0, rng.choice([1.0, scale])], n), bins)
  hist = np.zeros(bins, np.float32)
  lo = np.float32(rng.uniform(-2, 0) * scale)
  hi = np.float32(lo + rng.uniform(0.01, 3) * scale)
  if kind == "inner_spikes":
    hist[rng.integers(0, bins, 2)] = rng.integers(1, 10**6, 2)
  elif kind == "constant":
    hist[rng.integers(0, bins)] = n
    hi = lo
  elif kind == "sparse":
    hist[rng.integers(0, bins, rng.integers(1, 12))] = rng.integers(1, 1000, 1)
  elif kind == "fractional":  # re-binned counts: multiples of 1/16
    hist = (rng.poisson(rng.uniform(0.1, 50), bins) / 16.0).astype(np.float32)
  elif kind == "big_counts":
    hist = np.round(np.exp(-(np.linspace(-3, 3, bins) ** 2)) * 10 ** rng.uniform(4, 7))
  elif kind in ("large", "overflow"):  # cubes of the widths stay finite / overflow
    top = float(10 ** (rng.uniform(5, 12) if kind == "large" else rng.uniform(14, 38.5)))
    lo, hi = np.float32(-top * rng.uniform(0, 1)), np.float32(min(top, 3.4e38))
    hist = rng.poisson(rng.uniform(1, 100), bins).astype(np.float32)
  elif kind == "tiny":  # small ranges, anywhere, whose error terms stay normal floats
    center = rng.choice([-1, 1]) * 10 ** rng.uniform(-30, 2)
    lo = np.float32(center)
    hi = np.float32(center + 10 ** rng.uniform(-8, -3) * max(1.0, abs(center)))
    hist = rng.poisson(rng.uniform(1, 100), bins).astype(np.float32)
  elif kind == "underflow":  # error terms below float32's normal range
    lo = np.float32(rng.uniform(-1, 1) * 10 ** rng.uniform(-36, -12))
    hi = np.float32(lo + abs(lo) * rng.uniform(0.01, 3))
    hist = rng.poisson(rng.uniform(1, 100), bins).astype(np.float32)
  elif kind == "offset":  # a range of a few float32 ulps around a large offset
    return _from_data(rng, 1000 + rng.standard_normal(n) * 1e-4, bins)
  elif kind == "never_observed":
    lo, hi = np.float32(np.inf), np.float32(-np.inf)
  return hist.astype(np.float32), lo, hi


def _host(hist, lo, hi, dst_nbins):
  if not (np.isfinite(lo) and np.isfinite(hi)):
    return lo, hi
  with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
    return search_host.l2_search(hist, lo, hi, dst_nbins)


def _bits(values):
  return np.asarray(values, np.float32).view(np.int32)


def _compare(bins, dst_nbins, kinds, seed):
  rng = np.random.default_rng(seed)
  hists, los, his = zip(*(_histogram(rng, kind, bins) for kind in kinds), strict=True)
  got = _device()(np.stack(hists), np.array(los), np.array(his), dst_nbins)
  want = np.array([_host(*args, dst_nbins) for args in zip(hists, los, his, strict=True)])
  return np.stack([_bits(g) for g in got], -1), _bits(want), np.array(los), np.array(his)


@pytest.mark.parametrize(
  "bins,dst_nbins", [(64, 16), (100, 256), (1000, 16), (2048, 256), (2048, 16)]
)
def test_matches_host_search_bit_for_bit(bins, dst_nbins):
  """A fresh random sweep: every kind of histogram, several times each, in one vmapped call."""
  kinds = [KINDS[i % len(KINDS)] for i in range(B)]
  got, want, _, _ = _compare(bins, dst_nbins, kinds, seed=bins * 31 + dst_nbins)
  for i, kind in enumerate(kinds):
    assert got[i].tolist() == want[i].tolist(), (kind, i)


@pytest.mark.parametrize("bins,dst_nbins", [(64, 16), (2048, 256)])
def test_degenerate_ranges(bins, dst_nbins):
  """Overflowing error terms (NaN): bit for bit. Underflowing ones (ranges below ~1e-9, whose
  cubes are float32 subnormals, which XLA:CPU flushes to zero and NumPy and torch keep): a range
  inside ``[min_val, max_val]``, not necessarily the host's (documented in the module)."""
  kinds = [DEGENERATE[i % 2] for i in range(8)]
  got, want, los, his = _compare(bins, dst_nbins, kinds, seed=bins + dst_nbins)
  for i, kind in enumerate(kinds):
    if kind == "overflow":
      assert got[i].tolist() == want[i].tolist(), (kind, i)
    else:
      new_min, new_max = got[i].view(np.float32)
      assert los[i] <= new_min <= new_max <= his[i], (kind, i)


def _torch_case(rng):
  """Batches of one random stream, and a torch observer config (dtype, qscheme, reduce_range)."""
  kind = rng.choice(["normal", "laplace", "cauchy", "outliers", "uniform", "relu", "constant"])
  batches = []
  for _ in range(rng.integers(1, 4)):
    n, scale = 1024, float(10 ** rng.uniform(-2, 2))
    if kind == "normal":
      x = rng.standard_normal(n) * scale
    elif kind == "laplace":
      x = rng.laplace(rng.uniform(-1, 1), scale, n)
    elif kind == "cauchy":
      x = rng.standard_cauchy(n) * scale
    elif kind == "outliers":
      x = rng.standard_normal(n)
      x[:2] = 10 ** rng.uniform(1, 3)
    elif kind == "uniform":
      x = rng.uniform(-scale, scale, n)
    elif kind == "relu":
      x = np.maximum(rng.standard_normal(n) * scale, 0)
    else:
      x = np.full(n, rng.uniform(-2, 2))
    batches.append(x.astype(np.float32))
  dtype = [np.uint8, np.int8][rng.integers(2)]
  qscheme = [jo.per_tensor_affine, jo.per_tensor_symmetric][rng.integers(2)]
  # quint8 symmetric with reduce_range: jo's documented zero-point deviation, tested elsewhere.
  reduce_range = bool(rng.random() < 0.3) and not (dtype == np.uint8 and qscheme.is_symmetric)
  return batches, dtype, qscheme, reduce_range


def test_qparams_match_torch_live():
  """jo's and torch's HistogramObserver see the same batches; the device search's qparams are
  torch's ``calculate_qparams`` bit for bit (and its searched range too)."""
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(2026)
  obs = jo.HistogramObserver(bins=2048)
  update = jax.jit(obs.update)
  cases, states, expected = [], [], []
  for _ in range(B):
    batches, dtype, qscheme, reduce_range = _torch_case(rng)
    tq = {np.uint8: torch.quint8, np.int8: torch.qint8}[dtype]
    tqs = {jo.per_tensor_affine: torch.per_tensor_affine}.get(qscheme, torch.per_tensor_symmetric)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      t = torch.ao.quantization.HistogramObserver(
        bins=2048, dtype=tq, qscheme=tqs, reduce_range=reduce_range
      )
      state = obs.init(batches[0])
      for x in batches:
        t(torch.from_numpy(x))
        state = update(state, x)
      new_min, new_max = t._non_linear_param_search()
      scale, zero_point = t._calculate_qparams(new_min, new_max)
    np.testing.assert_array_equal(np.asarray(state.histogram), t.histogram.numpy())
    cases.append(
      jo.HistogramObserver(bins=2048, dtype=dtype, qscheme=qscheme, reduce_range=reduce_range)
    )
    states.append(state)
    expected.append((new_min.item(), new_max.item(), scale.item(), zero_point.item()))
  got_min, got_max = _device()(
    np.stack([s.histogram for s in states]),
    np.array([s.min_val for s in states]),
    np.array([s.max_val for s in states]),
    256,
  )
  for i, (case, (t_min, t_max, t_scale, t_zp)) in enumerate(zip(cases, expected, strict=True)):
    assert (float(got_min[i]), float(got_max[i])) == (t_min, t_max), i
    scale, zero_point = qparams.calculate_qparams(got_min[i], got_max[i], case)
    assert (float(scale), int(zero_point)) == (np.float32(t_scale), t_zp), i


def test_jit_and_vmap_over_a_stack_with_never_observed_entries():
  """Leading dims (jnp.vectorize) and nested vmap give the host's result, element by element."""
  rng = np.random.default_rng(7)
  kinds = ["normal", "spikes", "never_observed", "laplace", "constant", "sparse"]
  hists, los, his = (
    np.stack(v) for v in zip(*(_histogram(rng, k, 64) for k in kinds), strict=True)
  )
  hists, los, his = hists.reshape(2, 3, 64), los.reshape(2, 3), his.reshape(2, 3)
  search = functools.partial(search_device.search, dst_nbins=16)
  stacked = jax.jit(search)(hists, los, his)
  nested = jax.jit(jax.vmap(jax.vmap(search)))(hists, los, his)
  for idx in np.ndindex(2, 3):
    want = _bits(_host(hists[idx], los[idx], his[idx], 16)).tolist()
    assert [_bits(v[idx]).item() for v in stacked] == want, idx
    assert [_bits(v[idx]).item() for v in nested] == want, idx
  assert np.isinf(stacked[0][0, 2]) and np.isinf(stacked[1][0, 2])  # never observed: as is


def test_two_spikes_is_fast_and_matches_torch():
  """torch's ~1e5 idle iterations are skipped: a handful of loop steps, the same end."""
  torch = pytest.importorskip("torch")
  hist = np.zeros(2048, np.float32)
  hist[0], hist[-1] = 5000.0, 3000.0
  t = torch.ao.quantization.HistogramObserver()
  t.histogram.copy_(torch.from_numpy(hist))
  t.min_val.fill_(0.0)
  t.max_val.fill_(1.0)
  expected = [v.item() for v in t._non_linear_param_search()]
  got = jax.jit(search_device.search, static_argnums=3)(hist, 0.0, 1.0, 256)
  assert [float(v) for v in got] == expected
  assert [_bits(v).item() for v in got] == _bits(_host(hist, 0.0, 1.0, 256)).tolist()


def test_export_serializes_without_host_callbacks():
  rng = np.random.default_rng(3)
  hist, lo, hi = _histogram(rng, "laplace", 256)
  fn = jax.jit(functools.partial(search_device.search, dst_nbins=256))
  exported = jax.export.export(fn)(hist, lo, hi)
  text = exported.mlir_module()
  assert "stablehlo.custom_call" not in text  # host callbacks are custom calls
  assert "xf64>" not in text and "tensor<f64>" not in text
  restored = jax.export.deserialize(exported.serialize())
  got = restored.call(hist, lo, hi)
  assert [_bits(v).item() for v in got] == _bits(_host(hist, lo, hi, 256)).tolist()


def test_rejects_bad_dst_nbins():
  with pytest.raises(ValueError, match="dst_nbins=100"):
    search_device.search(jnp.zeros(8), 0.0, 1.0, 100)


def test_f32_of_f64_double_rounding():
  """float32(float64(x)) differs from float32(x) when x rounds onto a float32 midpoint."""
  one = np.float32(1)
  ulp = np.float32(2.0**-23)
  cases = [
    [np.float32(2.0**-60), ulp / 2, one],  # just above the midpoint, within float64's half ulp
    [np.float32(2.0**-50), ulp / 2, one],  # clearly above: rounds up
    [np.float32(-(2.0**-60)), ulp / 2, one + ulp],  # ties to even after double rounding
    [np.float32(2.0**-60), -ulp / 4, one],  # below a power of two
  ]
  f = jax.jit(search_device.f32_of_f64)
  for terms in cases:
    exact = sum(float(t) for t in terms)  # each case is exact in float64 or rounds as intended
    want = np.float32(np.float64(sum(np.float64(t) for t in terms)))
    got = f([jnp.float32(t) for t in terms])
    assert _bits(got).item() == _bits(want).item(), (terms, exact)


def _near_ties(rng, n):
  """Expansions ``r + side u/2 + e + t`` around float32 midpoints and float64 ties next to them."""
  r = (rng.choice([-1, 1], n) * 2.0 ** rng.uniform(-20, 20, n)).astype(np.float32)
  r[: n // 8] = np.float32(2.0) ** rng.integers(-20, 20, n // 8)  # powers of two: finer grid below
  u = np.spacing(np.abs(r))
  side = rng.choice([-1, 1], n).astype(np.float32)
  half = np.where(rng.random(n) < 0.8, side * u / 2, side * u * rng.random(n)).astype(np.float32)
  g2 = u * np.float32(2.0**-30)
  e = g2 * rng.choice([-1, 1, -2, 2, 0, 1 + 2**-10, -(1 + 2**-10), 1 - 2**-10], n)
  t = e * rng.choice([0, 2.0**-20, -(2.0**-20)], n)
  return [t.astype(np.float32), e.astype(np.float32), half, r]


def _round_f32(x):
  """float32 nearest to the rational ``x`` (ties to even), in one rounding."""
  from fractions import Fraction

  c = np.float32(float(x))
  near = [np.nextafter(c, np.float32(-np.inf)), c, np.nextafter(c, np.float32(np.inf))]
  return min(near, key=lambda v: (abs(Fraction(float(v)) - x), int(_bits(v)) & 1))


def test_f32_of_f64_is_float32_of_the_float64_rounding():
  """Against exact rationals: float64's round-to-nearest-even, then float32's, near every tie."""
  from fractions import Fraction

  rng = np.random.default_rng(11)
  terms = _near_ties(rng, 4000)
  got = _bits(jax.jit(search_device.f32_of_f64)(terms))
  exact = [sum(map(Fraction, map(float, col)), Fraction(0)) for col in zip(*terms, strict=True)]
  want = _bits(np.array([float(x) for x in exact], np.float64).astype(np.float32))
  assert (got == want).all(), np.flatnonzero(got != want)[:5]
  assert (got != _bits([_round_f32(x) for x in exact])).sum() > 100  # double rounding was hit


def test_exact_sums_match_the_host():
  """Rows with mixed signs and wide exponents (f32_sums), and histogram cumulative sums."""
  rng = np.random.default_rng(12)
  rows = rng.standard_normal((64, 512)) * 2.0 ** rng.integers(-30, 30, (64, 512))
  rows[::3] = np.abs(rows[::3])
  rows = rows.astype(np.float32)
  got = jax.jit(search_device.exact_sum)(rows)
  assert (_bits(got) == _bits(search_host.f32_sums(rows))).all()
  hists = [
    rng.poisson(50, (8, 512)),
    rng.poisson(3, (8, 512)) / 16.0,
    np.round(rng.exponential(1e6, (8, 512))),
  ]
  hists = np.concatenate(hists).astype(np.float32)
  want = np.cumsum(hists, -1, dtype=np.float64).astype(np.float32)
  assert (_bits(jax.jit(search_device.exact_cumsum)(hists)) == _bits(want)).all()


@pytest.mark.parametrize("bins", [100, 1000])
def test_widths_round_as_python_floats(bins):
  """f32(bw) and f32(bw * n / dst_nbins) for bw = (max - min) / bins in Python floats, on ranges
  built to meet float32 midpoints: an odd span times n a multiple of bins' odd factor. Without
  float64's rounding of the quotient emulated, 37 of 24000 such cases were one ulp off."""
  rng = np.random.default_rng(bins)
  size = 4000
  span = (rng.integers(2**22, 2**24, size) | 1) * 2.0 ** rng.integers(-30, 30, size)
  lo = np.where(rng.random(size) < 0.5, 0, -rng.random(size) * 10 ** rng.uniform(-12, 3, size))
  lo = lo.astype(np.float32)
  hi = (lo + span).astype(np.float32)
  odd = bins // (bins & -bins)
  n = rng.integers(1, bins // odd + 1, size) * odd
  n = np.where(rng.random(size) < 0.5, n, rng.integers(1, bins + 1, size)).astype(np.float32)
  dst_nbins = rng.choice([16, 256], size)

  def widths(lo, hi, n, dst_inv):
    bw, inv = search_device._quotient(lo, hi, bins)
    terms = []
    for q in bw:
      p, e = search_device._two_prod(q, n)
      terms += [e * inv * dst_inv, p * inv * dst_inv]
    return search_device.f32_of_f64([q * inv for q in bw]), (search_device.f32_of_f64(terms))

  got = jax.jit(jax.vmap(widths))(lo, hi, n, (1.0 / dst_nbins).astype(np.float32))
  bw = [(float(b) - float(a)) / bins for a, b in zip(lo, hi, strict=True)]
  want_bw = np.array(bw, np.float32)
  want_dst = np.array([w * float(k) / float(d) for w, k, d in zip(bw, n, dst_nbins, strict=True)])
  assert (_bits(got[0]) == _bits(want_bw)).all()
  assert (_bits(got[1]) == _bits(want_dst.astype(np.float32))).all()
