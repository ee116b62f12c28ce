"""Histogram calibrators against live ONNX Runtime 1.32 ``HistogramCollector`` and ModelOpt's rule.

Two kinds of comparison:

* **same histogram**: ORT's ``compute_percentile`` / ``get_entropy_threshold`` run on jo's own
  histogram and edges, so only the search differs. Percentile: bit-equal, except at exact ties
  (``qN`` an integer), where ORT's float64 running CDF may fall an ulp short; there jo must equal
  the exact rational answer, and ORT's miss is counted. Entropy: ORT's pick equals jo's or is a
  near-minimum of jo's float32 divergences (ORT's are float64, then cast to float32).
* **equal grids**: ORT's own collector on data whose grid is jo's (``range_policy='torch'``): the
  symmetric percentile histograms ``|x|`` on ``[min|x|, max|x|]``, equal to jo's ``[0, max|x|]``
  when the data hold a 0; the affine percentile and entropy histogram ``[-max|x|, max|x|]``, jo's
  ``[min, max]`` when ``min = -max`` (entropy: always). Later batches keep batch 1's grid when batch
  1 holds the extremes. Tolerance: ``np.histogram`` bins in float64, jo (as ``torch.histc``) in
  float32, so an element within a float32 rounding of an edge can land one bin over; the clip can
  then move by at most one bin width, and is bit-equal whenever the two histograms are equal
  (counted and asserted).

ModelOpt is not installed: its ``_compute_amax_percentile`` rule is restated below in NumPy
(``searchsorted(cumsum(h / N), p / 100)`` in float64).
"""

import collections
import contextlib
import fractions
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_observers as jo
from jax_observers._src.histogram import calibrator_search as search

pytest.importorskip("onnx")
calibrate = pytest.importorskip("onnxruntime.quantization.calibrate")
torch = pytest.importorskip("torch")

REPORT = {}


def ort(method, symmetric, hist_state=None, batches=(), *, bins=2048, nq=128, percentile=99.99):
  """ORT's HistogramCollector: fed a histogram (``hist_state``) or ``batches``; its thresholds."""
  c = calibrate.HistogramCollector(method, symmetric, bins, nq, percentile, "same")
  with contextlib.redirect_stdout(io.StringIO()):
    if hist_state is not None:
      c.histogram_dict = {"t": hist_state}
    for b in batches:
      c.collect({"t": b})
    lo, hi = c.compute_collection_result()["t"][:2]
  return float(lo), float(hi), c.histogram_dict["t"]


def modelopt_percentile_amax(hist, edges, percentile):
  """ModelOpt ``HistogramCalibrator._compute_amax_percentile``: float64 CDF, searchsorted."""
  hist = np.asarray(hist, np.float64)
  cdf = np.cumsum(hist / hist.sum())
  return float(edges[np.searchsorted(cdf, percentile / 100)])


def exact_index(hist, q: fractions.Fraction) -> int:
  """min{j : C_j >= q N} in rational arithmetic (float32 counts are exact fractions)."""
  counts = np.asarray(hist).reshape(-1)
  if np.all(counts == np.round(counts)):  # whole counts: Python integers, C_j den >= num N
    cum = np.cumsum(counts.astype(np.int64)).astype(object)
    return int(np.argmax(cum * q.denominator >= q.numerator * cum[-1]))
  fracs = [fractions.Fraction(float(c)) for c in counts]
  target, running = q * sum(fracs), fractions.Fraction(0)
  for j, c in enumerate(fracs):
    running += c
    if running >= target:
      return j
  raise AssertionError("q > 1")


def _observe(obs, batches):
  update = jax.jit(obs.update)
  state = obs.init(batches[0])
  for b in batches:
    state = update(state, b)
  return state


def _data(rng, kind, n):
  if kind == "laplace":
    x = rng.laplace(0, 1, n)
  elif kind == "relu":
    x = np.maximum(rng.standard_normal(n), 0) * 3
  elif kind == "outliers":
    x = np.concatenate([rng.standard_normal(n - 20) * 0.5 + 0.3, rng.uniform(-30, 30, 20)])
  else:
    x = rng.standard_cauchy(n)
  return rng.permutation(x).astype(np.float32)


@pytest.mark.parametrize("policy", ["torch", "pow2"])
def test_percentile_search_equals_ort_on_jo_histograms(policy):
  rng = np.random.default_rng(0 if policy == "torch" else 1)
  counts = collections.Counter()
  for trial in range(16):
    symmetric = bool(trial % 2)
    p = float(rng.choice([90.0, 99.0, 99.9, 99.99, 99.999]))
    obs = jo.HistogramPercentileObserver(
      percentile=p,
      bins=int(rng.choice([256, 2048])),
      range_policy=policy,
      qscheme=jo.per_tensor_symmetric if symmetric else jo.per_tensor_affine,
    )
    kind = str(rng.choice(["laplace", "relu", "outliers", "cauchy"]))
    batches = [_data(rng, kind, int(rng.integers(3000, 30000))) for _ in range(rng.integers(1, 4))]
    state = _observe(obs, batches)
    hist, edges = np.asarray(state.histogram), np.asarray(obs.edges(state))
    mn, mx = np.float32(state.min_val), np.float32(state.max_val)
    lo, hi, _ = ort("percentile", symmetric, (hist.astype(np.float64), edges, mn, mx), percentile=p)
    ours = tuple(float(v) for v in obs.clip_range(state))
    # the exact answer, from rationals
    pf = fractions.Fraction(repr(p))
    fracs = [pf / 100] if symmetric else [(100 - pf) / 200, 1 - (100 - pf) / 200]
    idx = [exact_index(hist, f) for f in fracs]
    exact = (-edges[idx[0]], edges[idx[0]]) if symmetric else (edges[idx[0]], edges[idx[1]])
    exact = (max(float(exact[0]), float(mn)), min(float(exact[1]), float(mx)))
    assert ours == exact, (trial, p, ours, exact)
    counts["cases"] += 1
    counts["bit-equal with ORT" if ours == (lo, hi) else "ORT off at an exact tie"] += 1
  REPORT[f"percentile search {policy}"] = dict(counts)
  print(dict(counts))
  assert counts["bit-equal with ORT"] >= counts["cases"] - 2  # random data: ties are rare


def _tie_histogram(rng, q: fractions.Fraction, bins=64):
  """Integer counts with N a multiple of q's denominator and C_j = qN exactly at some j, followed
  by empty bins (so a miss by ORT's float64 CDF lands visibly further)."""
  m = int(rng.integers(1, 40))
  n = q.denominator * m
  k = q.numerator * m  # the tie: C_j = k exactly
  j = int(rng.integers(0, min(bins - 6, k)))
  gap = int(rng.integers(1, 5))
  hist = np.zeros(bins, np.int64)
  hist[: j + 1] = rng.multinomial(k - (j + 1), np.ones(j + 1) / (j + 1)) + 1
  rest = n - k
  if rest:
    tail = bins - (j + 1 + gap)
    hist[j + 1 + gap :] = rng.multinomial(rest, np.ones(tail) / tail)
  return hist


def test_exact_percentile_ties_against_ort_and_modelopt():
  """Sweep of exact ties: jo equals the rational answer; ORT's and ModelOpt's float64 CDFs are
  compared with it and their agreement is reported."""
  rng = np.random.default_rng(3)
  edges = np.arange(65, dtype=np.float32)
  counts = collections.Counter()
  for trial in range(160):
    p = float(rng.choice([50.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99, 99.999, 99.9999]))
    symmetric = trial % 4 != 0
    pf = fractions.Fraction(repr(p))
    q = pf / 100 if symmetric else 1 - (100 - pf) / 200
    hist = _tie_histogram(rng, q)
    for dtype in (np.int32, np.float32):  # the pow2 and torch policies' count dtypes
      h = jnp.asarray(hist.astype(dtype))
      lo, hi = search.percentile_range(
        h, jnp.asarray(edges), edges[0], edges[-1], percentile=p, symmetric=symmetric
      )
      got = float(hi)
      want = float(edges[exact_index(np.asarray(h), q)])  # float32 counts may be rounded
      assert got == want, (trial, p, dtype, got, want)
      if not symmetric:
        assert float(lo) == float(edges[exact_index(np.asarray(h), (100 - pf) / 200)])
    counts["ties"] += 1
    want = float(edges[exact_index(hist, q)])
    state = (hist, edges, edges[0], edges[-1])
    ort_hi = ort("percentile", symmetric, state, percentile=p)[1]
    counts["ORT = exact"] += ort_hi == want
    if symmetric:
      counts["ModelOpt-style float64 = exact"] += modelopt_percentile_amax(hist, edges, p) == want
      counts["symmetric ties"] += 1
  REPORT["exact ties"] = dict(counts)
  print(dict(counts))
  assert counts["ORT = exact"] < counts["ties"]  # the sweep does reach float64's misses


def test_issue_tie_example_exact_bin_where_ort_and_modelopt_move_on():
  """x = linspace(0, 1, 99990) and 5..14, p = 99.99: qN = 99990 is reached in the bin holding 1.0
  (exactly: the order statistic of rank 99990 is 1.0). ORT and ModelOpt's float64 CDF falls an ulp
  short there and returns the bin of 5.0."""
  x = np.concatenate([np.linspace(0, 1, 99990), np.arange(5, 15)]).astype(np.float32)
  obs = jo.HistogramPercentileObserver(
    percentile=99.99, bins=2048, qscheme=jo.per_tensor_symmetric, range_policy="torch"
  )
  state = _observe(obs, [x])
  _, hi, (ort_hist, ort_edges, *_) = ort("percentile", True, batches=[x], percentile=99.99)
  edges = np.asarray(obs.edges(state))
  assert np.array_equal(np.asarray(state.histogram), ort_hist)  # equal grids: [0, 14]
  assert np.array_equal(edges, ort_edges)
  assert float(obs.clip_range(state)[1]) == float(
    edges[exact_index(ort_hist, fractions.Fraction(9999, 10000))]
  )
  assert 0.99 < float(obs.clip_range(state)[1]) <= 1.0
  assert hi == modelopt_percentile_amax(ort_hist, ort_edges, 99.99) and 4.99 < hi <= 5.0


def _equal_grid_batches(rng, symmetric_range, n_batches):
  """Batches whose first holds the extremes (and a 0), so later ones keep its grid in both."""
  kinds = rng.choice(["laplace", "outliers", "relu"], n_batches)
  batches = [_data(rng, str(k), int(rng.integers(4000, 20000))) for k in kinds]
  a = np.float32(max(np.abs(b).max() for b in batches) * 1.01)
  first = np.concatenate([batches[0], np.float32([0.0, a] + ([-a] if symmetric_range else []))])
  return [first, *batches[1:]]


@pytest.mark.parametrize("symmetric", [True, False])
def test_percentile_end_to_end_equals_ort_on_equal_grids(symmetric):
  rng = np.random.default_rng(10 + symmetric)
  counts = collections.Counter()
  for _ in range(6):
    p = float(rng.choice([99.0, 99.9, 99.99, 99.999]))
    batches = _equal_grid_batches(rng, not symmetric, int(rng.integers(1, 4)))
    obs = jo.HistogramPercentileObserver(
      percentile=p, range_policy="torch",
      qscheme=jo.per_tensor_symmetric if symmetric else jo.per_tensor_affine,
    )  # fmt: skip
    state = _observe(obs, batches)
    lo, hi, (ort_hist, ort_edges, *_) = ort("percentile", symmetric, batches=batches, percentile=p)
    edges = np.asarray(obs.edges(state))
    # the same grid: torch.linspace and ORT's float64 edges cast to float32 differ by <= 4 ulp
    ulp = float(np.spacing(np.float32(np.abs(edges).max())))
    np.testing.assert_allclose(edges, ort_edges, rtol=0, atol=4 * ulp)
    ours = tuple(float(v) for v in obs.clip_range(state))
    width = float(edges[1] - edges[0])
    counts["cases"] += 1
    bin_of = lambda e, v: int(np.argmin(np.abs(np.asarray(e, np.float64) - v)))
    same_bins = [
      bin_of(edges, a) == bin_of(ort_edges, b) for a, b in zip(ours, (lo, hi), strict=True)
    ]
    if np.array_equal(np.asarray(state.histogram), ort_hist):
      counts["same histogram"] += 1
      assert all(same_bins)  # then the clip is the same bin's edge (bit-equal if the edge is)
    assert abs(ours[0] - lo) <= width + 4 * ulp and abs(ours[1] - hi) <= width + 4 * ulp
    counts["same bin as ORT"] += all(same_bins)
    counts["clip bit-equal"] += ours == (lo, hi)
  REPORT[f"percentile end to end symmetric={symmetric}"] = dict(counts)
  print(dict(counts))
  assert counts["same bin as ORT"] >= counts["cases"] - 1


def test_ort_drops_later_values_below_batch_ones_min_abs():
  """Pinned ORT bug, not copied: its |x| grid starts at batch 1's min|x|, and later values below
  it are not counted; jo's grid starts at 0 and counts every value."""
  b1 = np.float32([0.5, -1.0, 2.0, 4.0])
  b2 = np.float32([0.01, -0.02, 0.03, 1.0])
  *_, (ort_hist, ort_edges, *_) = ort("percentile", True, batches=[b1, b2], bins=16)
  assert ort_edges[0] == 0.5 and ort_hist.sum() == 5  # three of b2's values are gone
  obs = jo.HistogramPercentileObserver(
    bins=16, qscheme=jo.per_tensor_symmetric, range_policy="torch"
  )
  state = _observe(obs, [b1, b2])
  assert float(np.asarray(state.histogram).sum()) == 8 and float(obs.edges(state)[0]) == 0.0


def test_entropy_onnxruntime_variant_against_ort():
  """ORT's get_entropy_threshold on jo's histogram, and ORT end to end on its own grid."""
  rng = np.random.default_rng(20)
  counts = collections.Counter()
  for trial in range(6):
    obs = jo.HistogramEntropyObserver(
      variant="onnxruntime", bins=256, num_quantized_bins=32, range_policy="torch"
    )
    batches = _equal_grid_batches(rng, True, 1 + trial % 2)
    state = _observe(obs, batches)
    hist, edges = np.asarray(state.histogram), np.asarray(obs.edges(state))
    mn, mx = np.float32(state.min_val), np.float32(state.max_val)
    ours = tuple(float(v) for v in obs.clip_range(state))
    given = (hist.astype(np.int64), edges, mn, mx)
    for source, (lo, hi, ort_state) in (
      ("jo's histogram", ort("entropy", True, given, bins=256, nq=32)),
      ("ORT's collector", ort("entropy", True, batches=batches, bins=256, nq=32)),
    ):
      counts[f"{source}: cases"] += 1
      if (lo, hi) == ours:
        counts[f"{source}: bit-equal"] += 1
        continue
      # a float32 near-tie: ORT's pick must be a near-minimum of jo's divergences
      _, kl = search.entropy_symmetric_divergences(
        jnp.asarray(ort_state[0], jnp.float32), num_quantized_bins=32, variant="onnxruntime"
      )
      kl = np.asarray(kl)
      i = int(np.searchsorted(np.asarray(ort_state[1]), hi)) - 128 - 1 - 16
      assert 0 <= i < kl.size and kl[i] <= kl.min() * (1 + 1e-5) + 1e-7, (source, trial)
      counts[f"{source}: a near-minimum of jo's float32 KL"] += 1
  REPORT["entropy onnxruntime"] = dict(counts)
  print(dict(counts))
  assert counts["jo's histogram: bit-equal"] >= 5


def test_modelopt_grid_is_jos_absolute_grid():
  """ModelOpt collects torch.histc(|x|, bins, 0, max|x|) with linspace(0, max|x|, bins + 1) edges:
  jo's symmetric percentile histogram on the 'torch' policy is the same, bin for bin, and the amax
  is ModelOpt's rule on it (no tie in this data)."""
  rng = np.random.default_rng(30)
  x = _data(rng, "laplace", 20011)
  obs = jo.HistogramPercentileObserver(
    percentile=99.9, bins=2048, qscheme=jo.per_tensor_symmetric, range_policy="torch"
  )
  state = _observe(obs, [x])
  amax = float(np.abs(x).max())
  t_hist = torch.histc(torch.from_numpy(np.abs(x)), bins=2048, min=0, max=amax).numpy()
  t_edges = torch.linspace(0, amax, 2049).numpy()
  assert np.array_equal(np.asarray(state.histogram), t_hist)
  assert np.array_equal(np.asarray(obs.edges(state)), t_edges)
  assert float(obs.clip_range(state)[1]) == modelopt_percentile_amax(t_hist, t_edges, 99.9)
