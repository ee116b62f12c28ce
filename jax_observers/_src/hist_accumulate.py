r"""One pass of histogram accumulation, per tensor or per channel, under either range policy.

The state is torch's ``(histogram, min_val, max_val)``: the running min and max of the finite
values seen, and a histogram on a grid that is a function of them.

* ``range_policy='torch'``: the grid is the range itself, :math:`[m, M]` (torch's
  ``HistogramObserver``), float32 counts; when the range grows the old histogram is re-binned with
  torch's ``_upscale_histogram`` (approximate, order dependent, bit-exact with torch).
* ``range_policy='pow2'``: the power-of-two grid of :mod:`hist_pow2`, int32 counts, exact bin
  merging: the state depends only on the multiset of values observed.

``mode`` picks what is histogrammed: ``'signed'`` (:math:`x` on :math:`[m, M]`), ``'symmetric'``
(:math:`x` on :math:`[-a, a]`, :math:`a = \max(-m, M)`) or ``'absolute'`` (:math:`|x|` on
:math:`[0, a]`). NaN and :math:`\pm\infty` never enter the statistics; a batch (or a channel) with no
finite value changes nothing. Under ``axis_name`` the range is ``pmin``/``pmax``-reduced and the
batch counts ``psum``-med before they meet the state, so every device holds the global histogram.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

from jax_observers._src import hist_pow2
from jax_observers._src import histogram_numerics as hn
from jax_observers._src.reduce import batch_min_max

RANGE_POLICIES = ("torch", "pow2")
MODES = ("signed", "symmetric", "absolute")


class HistogramState(struct.PyTreeNode):
  """Running histogram; the field names are torch's ``HistogramObserver`` buffer names."""

  histogram: jax.Array  # shape (bins,) or (C, bins); float32 ('torch' policy) or int32 ('pow2').
  min_val: jax.Array  # shape () or (C,), float32; min of the finite values, +inf before any.
  max_val: jax.Array  # like min_val; max of the finite values, -inf before any.


def fresh_state(shape: tuple[int, ...], bins: int, range_policy: str) -> HistogramState:
  dtype = jnp.int32 if range_policy == "pow2" else jnp.float32
  return HistogramState(
    histogram=jnp.zeros((*shape, bins), dtype),
    min_val=jnp.full(shape, jnp.inf, jnp.float32),
    max_val=jnp.full(shape, -jnp.inf, jnp.float32),
  )


def mode_range(min_val, max_val, mode: str):
  """The interval the ``'torch'`` policy histograms, for the running range ``[min_val, max_val]``."""
  if mode == "signed":
    return min_val, max_val
  amax = jnp.maximum(-min_val, max_val)
  return (jnp.zeros_like(amax) if mode == "absolute" else -amax), amax


def grid_edges(state: HistogramState, *, range_policy: str, mode: str):
  """The first and last bin edges of ``state.histogram`` per channel (histc's ``±1`` widening)."""
  bins = state.histogram.shape[-1]
  if range_policy == "pow2":
    g, o = hist_pow2.grid(state.min_val, state.max_val, bins, mode)
    return hist_pow2.edges(g, o, bins)
  return hn.histc_edges(*mode_range(state.min_val, state.max_val, mode))


def accumulate(
  state: HistogramState,
  x: jax.Array,
  *,
  ch_axis: int | None,
  range_policy: str,
  mode: str,
  upsample_rate: int = 16,
  axis_name=None,
) -> HistogramState:
  """``state`` after observing float ``x`` (channels along ``ch_axis``; None: one histogram)."""
  x = lax.stop_gradient(jnp.asarray(x)).astype(jnp.float32)
  bins = state.histogram.shape[-1]
  axes = None if ch_axis is None else tuple(i for i in range(x.ndim) if i != ch_axis)
  lo, hi = batch_min_max(x, axes, ignore_nonfinite=True, axis_name=axis_name)
  seen = lo <= hi
  fresh = ~(state.min_val <= state.max_val)
  new_min, new_max = jnp.minimum(state.min_val, lo), jnp.maximum(state.max_val, hi)

  def along_channels(v):
    return v if ch_axis is None else v.reshape([-1 if i == ch_axis else 1 for i in range(x.ndim)])

  keep = jnp.isfinite(x)
  values = jnp.abs(x) if mode == "absolute" else x
  if range_policy == "pow2":
    g_old, o_old = hist_pow2.grid(state.min_val, state.max_val, bins, mode)
    g, o = hist_pow2.grid(new_min, new_max, bins, mode)
    pos = hist_pow2.positions(values, keep, along_channels(g), along_channels(o), bins)
  else:
    new_lo, new_hi = mode_range(new_min, new_max, mode)
    pos = hn.histc_positions(values, keep, bins, along_channels(new_lo), along_channels(new_hi))
  counts = _count(pos, bins, ch_axis, state.histogram.shape)
  if axis_name is not None:
    counts = lax.psum(counts, axis_name)
  if range_policy == "pow2":
    old = hist_pow2.regrid(state.histogram, g_old, o_old, jnp.where(fresh, g_old, g), o)
    hist = hist_pow2.saturating_add(jnp.where(fresh[..., None], 0, old), counts)
  else:
    hist = _torch_merge(
      state, counts.astype(jnp.float32), fresh, new_lo, new_hi, mode, upsample_rate
    )
  keep_old = ~seen[..., None]
  return HistogramState(
    histogram=jnp.where(keep_old, state.histogram, hist),
    min_val=jnp.where(seen, new_min, state.min_val),
    max_val=jnp.where(seen, new_max, state.max_val),
  )


def _count(pos, bins, ch_axis, hist_shape):
  if ch_axis is None:
    return hn.count(pos, bins)
  channels = hist_shape[0]
  ch = lax.broadcasted_iota(jnp.int32, pos.shape, ch_axis)
  flat = jnp.where(pos == bins, channels * bins, ch * bins + pos)
  return hn.count(flat, channels * bins).reshape(hist_shape)


def _torch_merge(state, update, fresh, new_lo, new_hi, mode, upsample_rate):
  old_lo, old_hi = mode_range(state.min_val, state.max_val, mode)
  merge = lambda h, a, b, u, c, d: hn.merge(h, a, b, u, c, d, upsample_rate=upsample_rate)
  if state.histogram.ndim == 1:
    merged = merge(state.histogram, old_lo, old_hi, update, new_lo, new_hi)
  else:  # re-bin only when some channel's range moved; otherwise add.
    moved = jnp.any(~fresh & ((new_lo != old_lo) | (new_hi != old_hi)))
    merged = lax.cond(
      moved,
      lambda: jax.vmap(merge)(state.histogram, old_lo, old_hi, update, new_lo, new_hi),
      lambda: state.histogram + update,
    )
  return jnp.where(fresh[..., None], update, merged)
