"""jo.plot: figures rendered headless to PNG, and their contents checked."""

import io

import jax.numpy as jnp
import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import jax_observers as jo  # noqa: E402
from jax_observers import plot  # noqa: E402


@pytest.fixture(autouse=True)
def _close():
  yield
  plt.close("all")


def data():
  x = np.random.default_rng(0).laplace(size=20000).astype(np.float32)
  x[:5] = 25.0
  return x


def png(ax) -> bytes:
  buf = io.BytesIO()
  ax.figure.savefig(buf, format="png", dpi=60)
  assert buf.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"
  return buf.getvalue()


def vlines(ax, color):
  return [ln.get_xdata()[0] for ln in ax.lines if ln.get_color() == color and len(ln.get_xdata())]


@pytest.mark.parametrize(
  "obs",
  [jo.HistogramObserver(bins=256), jo.HistogramPercentileObserver(bins=256, percentile=99.9)],
  ids=["histogram", "percentile"],
)
def test_plot_histogram_shows_the_picked_range_and_grid(obs):
  x = data()
  state = obs.update(obs.init(x), x)
  ax = plot.plot_histogram(obs, state, max_grid_lines=32)
  png(ax)
  scale, zero_point = obs.calculate_qparams(state)
  qmin, qmax = obs.quant_range
  lo, hi = (qmin - float(zero_point)) * float(scale), (qmax - float(zero_point)) * float(scale)
  np.testing.assert_allclose(sorted(vlines(ax, "tab:red")), [lo, hi], rtol=1e-6)
  grid = vlines(ax, "0.5")
  assert len(grid) == 32  # 256 levels, every 8th
  np.testing.assert_allclose(np.diff(grid), 8 * float(scale), rtol=1e-5)
  assert ax.get_title() == type(obs).__name__
  assert ax.get_xlabel() == "value" and ax.get_yscale() == "symlog"
  (stairs,) = [p for p in ax.patches]
  np.testing.assert_array_equal(stairs.get_data().values, np.asarray(state.histogram))
  assert any("range [" in t.get_text() for t in ax.get_legend().get_texts())


def test_plot_channel_ranges_draws_one_bar_per_channel():
  w = np.random.default_rng(1).standard_normal((32, 6)).astype(np.float32) * np.arange(1, 7)
  obs = jo.PerChannelMinMaxObserver(ch_axis=1, dtype=jnp.int8, qscheme=jo.per_channel_symmetric)
  state = obs.update(obs.init(w), w)
  ax = plot.plot_channel_ranges(obs, state)
  png(ax)
  bars = ax.patches
  assert len(bars) == 6
  np.testing.assert_allclose([b.get_height() for b in bars], w.max(0) - w.min(0), rtol=1e-6)
  np.testing.assert_allclose([b.get_y() for b in bars], w.min(0), rtol=1e-6)
  lo_points = ax.collections[0].get_offsets()[:, 1]
  scale = np.asarray(obs.calculate_qparams(state).scale)
  np.testing.assert_allclose(lo_points, -128 * scale, rtol=1e-6)


def test_range_errors_matches_a_direct_computation():
  rng = np.random.default_rng(2)
  edges = np.linspace(-4, 4, 65)
  hist = rng.integers(0, 50, 64).astype(np.float64)
  centres = 0.5 * (edges[1:] + edges[:-1])
  values = np.repeat(centres, hist.astype(int))
  for lo, hi in [(-1.0, 1.0), (-4.0, 4.0), (-0.5, 3.0)]:
    s = (hi - lo) / 15
    deq = lo + np.clip(np.round((values - lo) / s), 0, 15) * s
    want = np.mean((values - deq) ** 2)
    np.testing.assert_allclose(plot.range_errors(hist, edges, [(lo, hi)], (0, 15))[0], want)


def test_plot_error_vs_range_marks_each_picked_range_on_the_curve():
  x = data()
  obs = jo.HistogramMSEObserver(bins=512, dtype=jnp.int8, qscheme=jo.per_tensor_symmetric)
  state = obs.update(obs.init(x), x)
  edges = plot.histogram_edges(obs, state)
  picked = {
    "mse": tuple(map(float, obs.clip_range(state))),
    "max": (float(x.min()), float(x.max())),
  }
  ax = plot.plot_error_vs_range(state.histogram, edges, picked=picked, points=50)
  png(ax)
  (curve,) = ax.lines
  t, err = curve.get_data()
  np.testing.assert_allclose(
    err, plot.range_errors(state.histogram, edges, [(-v, v) for v in t], (-128, 127))
  )
  assert len(ax.collections) == 2 and ax.get_yscale() == "log"
  labels = [t.get_text() for t in ax.get_legend().get_texts()]
  assert labels[1:] == ["mse", "max"]
  mse_err = ax.collections[0].get_offsets()[0, 1]
  assert mse_err <= err.min() * 1.05  # the MSE calibrator sits at the bottom of the curve


def test_plot_many_makes_one_panel_per_observer():
  x = data()
  observers = [jo.HistogramObserver(bins=128), jo.HistogramMSEObserver(bins=128)]
  states = [o.update(o.init(x), x) for o in observers]
  fig = plot.plot_many(observers, states)
  visible = [a for a in fig.axes if a.get_visible()]
  assert [a.get_title() for a in visible] == ["HistogramObserver", "HistogramMSEObserver"]


def test_affine_family_curve_passes_through_one_sided_picks():
  x = np.abs(data())
  obs = jo.HistogramPercentileObserver(bins=256, percentile=99.0)
  state = obs.update(obs.init(x), x)
  edges = plot.histogram_edges(obs, state)
  lo, hi = plot.representable_range(obs, obs.calculate_qparams(state))
  ax = plot.plot_error_vs_range(
    state.histogram, edges, quant_range=(0, 255), symmetric=False, picked={"p99": (lo, hi)}
  )
  (curve,) = ax.lines
  t, err = curve.get_data()
  lower = min(0.0, float(edges[0]))
  np.testing.assert_allclose(
    err, plot.range_errors(state.histogram, edges, [(lower, v) for v in t], (0, 255))
  )
  assert float(lo) == lower == 0.0  # one-sided data: the pick lies on this family's curve
  px, py = ax.collections[0].get_offsets()[0]
  assert px == pytest.approx(float(hi))
  assert py == pytest.approx(plot.range_errors(state.histogram, edges, [(lo, hi)], (0, 255))[0])
