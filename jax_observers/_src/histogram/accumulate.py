r"""One pass of histogram accumulation, per tensor or per channel, on either range policy's grid.

The state is torch's ``(histogram, min_val, max_val)``: the running min and max of the finite
values seen, and a histogram on a grid that is a function of them; the grid and how it moves are
the range policy's (:mod:`grids`: torch's re-binned evenly spaced bins, or the power-of-two grid).
A batch's bins are counted into int32 by the backend's method (:mod:`counting`), then merged into
the state by the policy.

``mode`` picks what is histogrammed: ``'signed'`` (:math:`x` on :math:`[m, M]`), ``'symmetric'``
(:math:`x` on :math:`[-a, a]`, :math:`a = \max(-m, M)`) or ``'absolute'`` (:math:`|x|` on
:math:`[0, a]`). NaN and :math:`\pm\infty` never enter the statistics; a batch (or a channel) with no
finite value changes nothing. Under ``axis_name`` an update syncs twice, the least possible (the
grid the counts are taken on depends on the global range): one ``pmin`` of ``[min, -max]`` for
the range (:func:`stats.batch_min_max`), then one ``psum`` of all the batch's counts, so every
device holds the global histogram.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

from jax_observers._src import base, stats
from jax_observers._src.histogram import counting, grids
from jax_observers._src.histogram.grids import Grid
from jax_observers._src.readable import ReadableRepr


class HistogramState(ReadableRepr, struct.PyTreeNode, repr=False):
  """Running histogram; the field names are torch's ``HistogramObserver`` buffer names."""

  histogram: jax.Array  # shape (bins,) or (C, bins); float32 ('torch' policy) or int32 ('pow2').
  min_val: jax.Array  # shape () or (C,), float32; min of the finite values, +inf before any.
  max_val: jax.Array  # like min_val; max of the finite values, -inf before any.


def fresh_state(shape: tuple[int, ...], bins: int, grid: Grid) -> HistogramState:
  return HistogramState(
    histogram=jnp.zeros((*shape, bins), grid.count_dtype),
    min_val=jnp.full(shape, jnp.inf, jnp.float32),
    max_val=jnp.full(shape, -jnp.inf, jnp.float32),
  )


def check_state(observer, state, method: str, channels: tuple[int, ...], grid: Grid) -> None:
  """At trace time: ``state`` is a :class:`HistogramState` of ``observer``'s bins, channels and grid.

  The counts' dtype is the grid's identity (float32: torch's evenly spaced bins, int32: the pow2
  grid), so a state of the other policy is a ValueError naming both policies, not a silent mix.
  """
  name = type(observer).__name__
  hist = getattr(state, "histogram", None)
  if isinstance(state, HistogramState) and hist is not None:
    got = jnp.dtype(getattr(hist, "dtype", jnp.result_type(hist)))
    other = grids.of_counts(got)
    if other is not None and other is not grid:
      raise ValueError(
        f"{name}(range_policy={grid.name!r}).{method} got a range_policy={other.name!r} histogram "
        f"({got.name} counts): the two grids differ; build the state with this observer's init(x)."
      )
  base.check_state(
    observer,
    state,
    HistogramState,
    method,
    {
      "histogram": ((*channels, observer.bins), grid.count_dtype),
      "min_val": (channels, jnp.float32),
      "max_val": (channels, jnp.float32),
    },
  )


def grid_edges(state: HistogramState, *, grid: Grid, mode: str):
  """The first and last bin edges of ``state.histogram`` per channel (histc's ``±1`` widening)."""
  return grid.edges(state.min_val, state.max_val, state.histogram.shape[-1], mode)


def accumulate(
  state: HistogramState,
  x: jax.Array,
  *,
  ch_axis: int | None,
  grid: Grid,
  mode: str,
  upsample_rate: int = 16,
  axis_name=None,
) -> HistogramState:
  """``state`` after observing float ``x`` (channels along ``ch_axis``; None: one histogram)."""
  x = lax.stop_gradient(jnp.asarray(x)).astype(jnp.float32)
  bins = state.histogram.shape[-1]
  if jnp.dtype(state.histogram.dtype) != grid.count_dtype:
    raise ValueError(
      f"range_policy={grid.name!r} keeps {grid.count_dtype.name} counts; got a "
      f"{jnp.dtype(state.histogram.dtype).name} histogram (the other policy's grid)."
    )
  if ch_axis is None:
    x = x.reshape(-1)
    axes = (0,)
  else:  # [before, channels(, after)]: a trailing 1 would cost XLA a layout copy of x
    after = math.prod(x.shape[ch_axis + 1 :])
    x = x.reshape(math.prod(x.shape[:ch_axis]), x.shape[ch_axis], *((after,) if after > 1 else ()))
    axes = (0, 2)[: x.ndim - 1]
  lo, hi = stats.batch_min_max(x, axes, ignore_nonfinite=True, axis_name=axis_name)
  seen = lo <= hi
  fresh = ~(state.min_val <= state.max_val)
  new_min, new_max = jnp.minimum(state.min_val, lo), jnp.maximum(state.max_val, hi)
  params = (
    fresh,
    seen,
    *grid.params(state.min_val, state.max_val, bins, mode),
    *grid.params(new_min, new_max, bins, mode),
  )
  merge = functools.partial(grid.merge, upsample_rate=upsample_rate)
  positions = functools.partial(_positions, grid, mode, bins)
  if ch_axis is None:
    counts = counting.count(positions, x, bins, *params[4:])
    if axis_name is not None:
      counts = lax.psum(counts, axis_name)
    hist = merge(state.histogram, counts, *params)
  else:
    hist = counting.channels_update(positions, merge, state.histogram, x, params, axis_name)
  return HistogramState(
    histogram=hist,
    min_val=jnp.where(seen, new_min, state.min_val),
    max_val=jnp.where(seen, new_max, state.max_val),
  )


def _positions(grid: Grid, mode: str, bins: int, values, a, b):
  """Bins of raw ``values`` on the grid ``(a, b)``; ``bins``: dropped."""
  keep = jnp.isfinite(values)
  values = jnp.abs(values) if mode == "absolute" else values
  return grid.positions(values, keep, a, b, bins)
