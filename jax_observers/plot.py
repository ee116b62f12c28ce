"""Pictures of observer state (matplotlib, the optional ``plot`` extra).

* :func:`plot_histogram`: a histogram state, the range the observer picked and its quantization grid;
* :func:`plot_channel_ranges`: per-channel observed ranges and the representable ranges;
* :func:`plot_error_vs_range`: quantization error of a histogram as a function of the clipping range,
  with the ranges different observers picked marked on the curve;
* :func:`range_errors`: the numbers behind that curve.

Every function takes an optional ``ax`` and returns the Axes it drew on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def _pyplot():
  try:
    import matplotlib.pyplot as plt
  except ImportError as e:  # pragma: no cover - exercised without the extra
    raise ImportError(
      "jax_observers.plot needs matplotlib: pip install 'jax_observers[plot]'"
    ) from e
  return plt


def _axes(ax):
  return ax if ax is not None else _pyplot().subplots(figsize=(7, 3.5), layout="constrained")[1]


def representable_range(observer, qparams) -> tuple[np.ndarray, np.ndarray]:
  """``[(q_min - z) s, (q_max - z) s]``: the real values the quantized grid covers."""
  qmin, qmax = observer.quant_range
  scale = np.asarray(qparams.scale, np.float64)
  zero_point = np.asarray(qparams.zero_point, np.float64)
  return (qmin - zero_point) * scale, (qmax - zero_point) * scale


def histogram_edges(observer, state) -> np.ndarray:
  """The bin edges of a histogram observer's (or calibrator's) state."""
  return np.asarray(observer.edges(state), np.float64)


def plot_histogram(observer, state, *, channel: int | None = None, ax=None, max_grid_lines=64):
  """Histogram of ``state`` (log counts), the picked range, and the quantization grid inside it."""
  ax = _axes(ax)
  hist, edges = np.asarray(state.histogram, np.float64), histogram_edges(observer, state)
  qp = observer.calculate_qparams(state)
  lo, hi = representable_range(observer, qp)
  if hist.ndim == 2:
    channel = 0 if channel is None else channel
    hist, edges, lo, hi = hist[channel], edges[channel], lo[channel], hi[channel]
  ax.stairs(hist, edges, fill=True, alpha=0.6, label="histogram", color="tab:blue")
  ax.set_yscale("symlog", linthresh=1.0)
  ax.axvline(float(lo), color="tab:red", lw=1.5, label=f"range [{float(lo):.4g}, {float(hi):.4g}]")
  ax.axvline(float(hi), color="tab:red", lw=1.5)
  qmin, qmax = observer.quant_range
  levels = qmax - qmin + 1
  step = max(1, int(np.ceil(levels / max_grid_lines)))
  scale = float(np.reshape(qp.scale, -1)[channel or 0])
  for k in range(0, levels, step):
    ax.axvline(float(lo) + k * scale, color="0.5", lw=0.4, alpha=0.5)
  ax.plot([], [], color="0.5", lw=0.4, label=f"grid (every {step} of {levels} levels)")
  ax.set_xlabel("value")
  ax.set_ylabel("count")
  title = type(observer).__name__ + ("" if channel is None else f", channel {channel}")
  ax.set_title(title)
  ax.legend(loc="upper right", fontsize="small")
  return ax


def plot_channel_ranges(observer, state, *, ax=None):
  """Per channel: the observed [min, max] (bars) and the representable range (red ticks)."""
  ax = _axes(ax)
  min_val, max_val = np.asarray(state.min_val), np.asarray(state.max_val)
  lo, hi = representable_range(observer, observer.calculate_qparams(state))
  channels = np.arange(min_val.size)
  ax.bar(channels, max_val - min_val, bottom=min_val, width=0.8, alpha=0.6, label="observed")
  ax.scatter(channels, lo, marker="_", color="tab:red", s=60, label="representable")
  ax.scatter(channels, hi, marker="_", color="tab:red", s=60)
  ax.axhline(0.0, color="0.3", lw=0.5)
  ax.set_xlabel("channel")
  ax.set_ylabel("value")
  ax.set_title(f"{type(observer).__name__}: ranges of {min_val.size} channels")
  ax.legend(loc="upper right", fontsize="small")
  return ax


def range_errors(hist, edges, ranges, quant_range) -> np.ndarray:
  r"""Mean squared quantization error of histogram mass for each clipping range ``[lo, hi]``.

  Each bin's mass sits at its centre :math:`c`; the error is
  :math:`\sum_b n_b (c_b - Q(c_b))^2 / \sum_b n_b` with :math:`Q` the affine quantizer of the range
  (``quant_range`` levels, clipping outside).

  >>> import numpy as np
  >>> edges = np.linspace(-2, 2, 5)       # centres -1.5, -0.5, 0.5, 1.5
  >>> float(range_errors([0, 1, 1, 0], edges, [(-1.0, 1.0)], (0, 2))[0])
  0.25
  """
  hist = np.asarray(hist, np.float64)
  edges = np.asarray(edges, np.float64)
  centres = 0.5 * (edges[:-1] + edges[1:])
  qmin, qmax = quant_range
  out = []
  for lo, hi in ranges:
    scale = max((hi - lo) / (qmax - qmin), 1e-30)
    q = np.clip(np.round((centres - lo) / scale), 0, qmax - qmin)
    out.append(np.sum(hist * (centres - (lo + q * scale)) ** 2) / max(hist.sum(), 1.0))
  return np.asarray(out)


def plot_error_vs_range(
  hist,
  edges,
  *,
  quant_range: tuple[int, int] = (-128, 127),
  symmetric: bool = True,
  picked: Mapping[str, tuple[float, float]] | None = None,
  points: int = 200,
  ax=None,
):
  """Error of the ranges ``[-t, t]`` (or ``[min(0, lo), t]``) against ``t``, observers' ranges marked.

  Args:
    hist, edges: a histogram and its ``bins + 1`` edges (e.g. ``state.histogram`` and
      :func:`histogram_edges`).
    quant_range: the quantized integer range.
    symmetric: ranges ``[-t, t]``; else ``[l, t]`` with ``l = min(0, edges[0])`` fixed (the affine
      family for one-sided data such as post-ReLU activations).
    picked: ``{label: (lo, hi)}`` ranges to mark (each at its own error).
    points: number of thresholds on the curve.
  """
  ax = _axes(ax)
  edges = np.asarray(edges, np.float64)
  top = float(np.max(np.abs(edges))) if symmetric else float(edges[-1])
  lower = min(0.0, float(edges[0]))
  t = np.linspace(top / points, top, points)
  ranges = [(-v, v) for v in t] if symmetric else [(lower, v) for v in t]
  label = "[-t, t]" if symmetric else f"[{lower:.3g}, t]"
  ax.plot(t, range_errors(hist, edges, ranges, quant_range), label=label)
  for name, (lo, hi) in (picked or {}).items():
    err = range_errors(hist, edges, [(float(lo), float(hi))], quant_range)[0]
    x = max(-float(lo), float(hi)) if symmetric else float(hi)
    ax.scatter([x], [err], zorder=3, label=name)
  ax.set_yscale("log")
  ax.set_xlabel("clipping threshold t")
  ax.set_ylabel("mean squared error")
  ax.set_title("quantization error versus clipping range")
  ax.legend(loc="upper right", fontsize="small")
  return ax


def plot_many(observers: Sequence, states: Sequence, *, cols: int = 2):
  """A grid of :func:`plot_histogram` panels, one per (observer, state); returns the Figure."""
  plt = _pyplot()
  rows = int(np.ceil(len(observers) / cols))
  fig, axes = plt.subplots(
    rows, cols, figsize=(6 * cols, 3.2 * rows), squeeze=False, layout="constrained"
  )
  for ax, obs, state in zip(axes.flat, observers, states, strict=False):
    plot_histogram(obs, state, ax=ax)
  for ax in list(axes.flat)[len(observers) :]:
    ax.set_visible(False)
  return fig
