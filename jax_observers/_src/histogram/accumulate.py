r"""One pass of histogram accumulation, per tensor or per channel, under either range policy.

The state is torch's ``(histogram, min_val, max_val)``: the running min and max of the finite
values seen, and a histogram on a grid that is a function of them.

* ``range_policy='torch'``: the grid is the range itself, :math:`[m, M]` (torch's
  ``HistogramObserver``), float32 counts; when the range grows the old histogram is re-binned with
  torch's ``_upscale_histogram`` (approximate, order dependent, bit-exact with torch).
* ``range_policy='pow2'``: the power-of-two grid of :mod:`pow2_grid`, int32 counts, exact bin
  merging: the state depends only on the multiset of values observed.

Per channel, the channels are processed in groups (a ``lax.scan``): each group's counts go into a
small table that stays in cache and are merged into its rows of the histogram in place, so an
update builds no ``[channels, bins]`` array besides its result.

``mode`` picks what is histogrammed: ``'signed'`` (:math:`x` on :math:`[m, M]`), ``'symmetric'``
(:math:`x` on :math:`[-a, a]`, :math:`a = \max(-m, M)`) or ``'absolute'`` (:math:`|x|` on
:math:`[0, a]`). NaN and :math:`\pm\infty` never enter the statistics; a batch (or a channel) with no
finite value changes nothing. Under ``axis_name`` the range is ``pmin``/``pmax``-reduced and the
batch counts ``psum``-med before they meet the state, so every device holds the global histogram.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

from jax_observers._src import base
from jax_observers._src.histogram import arithmetic, pow2_grid
from jax_observers._src.readable import ReadableRepr
from jax_observers._src.stats import SMALL, batch_min_max

RANGE_POLICIES = ("torch", "pow2")
_GROUP_BYTES = 1 << 20  # int32 count table per group of channels: about half an L2.
_REBIN_BATCH = 8  # channels re-binned at once (each makes [bins * upsample_rate] temporaries).
MODES = ("signed", "symmetric", "absolute")


class HistogramState(ReadableRepr, struct.PyTreeNode, repr=False):
  """Running histogram; the field names are torch's ``HistogramObserver`` buffer names."""

  histogram: jax.Array  # shape (bins,) or (C, bins); float32 ('torch' policy) or int32 ('pow2').
  min_val: jax.Array  # shape () or (C,), float32; min of the finite values, +inf before any.
  max_val: jax.Array  # like min_val; max of the finite values, -inf before any.


def fresh_state(shape: tuple[int, ...], bins: int, range_policy: str) -> HistogramState:
  return HistogramState(
    histogram=jnp.zeros((*shape, bins), count_dtype(range_policy)),
    min_val=jnp.full(shape, jnp.inf, jnp.float32),
    max_val=jnp.full(shape, -jnp.inf, jnp.float32),
  )


def count_dtype(range_policy: str) -> jnp.dtype:
  """The histogram dtype of a policy: what a state carries to say which grid its counts are on."""
  return jnp.dtype(jnp.int32 if range_policy == "pow2" else jnp.float32)


def check_state(observer, state, method: str, channels: tuple[int, ...], range_policy: str) -> None:
  """At trace time: ``state`` is a :class:`HistogramState` of ``observer``'s bins, channels and policy.

  The counts' dtype is the grid's identity (float32: torch's evenly spaced bins, int32: the pow2
  grid), so a state of the other policy is a ValueError naming both policies, not a silent mix.
  """
  name = type(observer).__name__
  hist = getattr(state, "histogram", None)
  if isinstance(state, HistogramState) and hist is not None:
    got = jnp.dtype(getattr(hist, "dtype", jnp.result_type(hist)))
    if got != count_dtype(range_policy) and got in (jnp.int32, jnp.float32):
      other = "pow2" if got == jnp.int32 else "torch"
      raise ValueError(
        f"{name}(range_policy={range_policy!r}).{method} got a range_policy={other!r} histogram "
        f"({got.name} counts): the two grids differ; build the state with this observer's init(x)."
      )
  bins = observer.bins
  base.check_state(
    observer,
    state,
    HistogramState,
    method,
    {
      "histogram": ((*channels, bins), count_dtype(range_policy)),
      "min_val": (channels, jnp.float32),
      "max_val": (channels, jnp.float32),
    },
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
    g, o = pow2_grid.grid(state.min_val, state.max_val, bins, mode)
    return pow2_grid.edges(g, o, bins)
  return arithmetic.histc_edges(*mode_range(state.min_val, state.max_val, mode))


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
  if jnp.dtype(state.histogram.dtype) != count_dtype(range_policy):
    raise ValueError(
      f"range_policy={range_policy!r} keeps {count_dtype(range_policy).name} counts; got a "
      f"{jnp.dtype(state.histogram.dtype).name} histogram (the other policy's grid)."
    )
  if ch_axis is None:
    lo, hi = batch_min_max(x, None, ignore_nonfinite=True, axis_name=axis_name)
  else:
    lo, hi = _finite_min_max(x, tuple(i for i in range(x.ndim) if i != ch_axis), axis_name)
  seen = lo <= hi
  fresh = ~(state.min_val <= state.max_val)
  new_min, new_max = jnp.minimum(state.min_val, lo), jnp.maximum(state.max_val, hi)
  if range_policy == "pow2":
    grid = lambda a, b: pow2_grid.grid(a, b, bins, mode)
    merge = _pow2_merge
  else:
    grid = lambda a, b: mode_range(a, b, mode)
    merge = functools.partial(_torch_merge, upsample_rate=upsample_rate)

  def block(hist, values, ones, fresh, seen, *grids):
    """The merged histogram (``[bins]``, or ``[channels, bins]`` for ``values`` [channels, m])."""
    positions = _positions(range_policy, mode, bins, *(g[..., None] for g in grids[2:]))
    if hist.ndim == 1:
      counts = arithmetic.count(positions, values, bins)
    else:
      counts = arithmetic.count_rows(positions, values, bins, ones)
    if axis_name is not None:
      counts = lax.psum(counts, axis_name)
    return merge(hist, counts, fresh, seen, *grids)

  params = (fresh, seen, *grid(state.min_val, state.max_val), *grid(new_min, new_max))
  if ch_axis is None:
    hist = block(state.histogram, x, None, *params)
  else:  # channel-major rows: each group of channels reads one contiguous block
    rows = jnp.moveaxis(x, ch_axis, 0).reshape(state.histogram.shape[0], -1)
    hist = _along_channel_groups(block, state.histogram, rows, params)
  return HistogramState(
    histogram=hist,
    min_val=jnp.where(seen, new_min, state.min_val),
    max_val=jnp.where(seen, new_max, state.max_val),
  )


def _finite_min_max(x, axes, axis_name):
  """``(min, max)`` of the finite values of ``x`` over ``axes``: ``reduce.batch_min_max``'s answer.

  The same plain reductions come first; the masked pass, run only when they met NaN or ``±inf``,
  is one variadic reduction that XLA fuses with the mask. Over axes that exclude the last one,
  ``batch_min_max`` masks into two copies of ``x`` there, and that branch's temporaries count on
  every call: at 4M values they lift a per-channel update's temporaries past glibc's 32 MiB
  ``mmap`` threshold, and every call then page-faults them afresh (2.5x the update's time).
  """
  inf = jnp.float32(jnp.inf)

  def masked(_):
    keep = jnp.isfinite(x)
    extremes = (jnp.where(keep, x, inf), jnp.where(keep, x, -inf))
    return lax.reduce(extremes, (inf, -inf), _min_max, axes)

  if x.size <= SMALL:  # one fused pass; a branch would cost more than it saves
    lo, hi = masked(None)
  else:
    lo, hi = jnp.min(x, axis=axes), jnp.max(x, axis=axes)
    clean = jnp.all(jnp.isfinite(lo) & jnp.isfinite(hi))
    lo, hi = lax.cond(clean, lambda _: (lo, hi), masked, None)
  if axis_name is not None:
    lo, hi = lax.pmin(lo, axis_name), lax.pmax(hi, axis_name)
  return lo, hi


def _min_max(a, b):
  return jnp.minimum(a[0], b[0]), jnp.maximum(a[1], b[1])


def _positions(range_policy: str, mode: str, bins: int, a, b):
  """Elementwise bins of raw values on the grid ``(a, b)``: ``(g, o)`` (pow2) or ``(lo, hi)``."""

  def positions(v):
    keep = jnp.isfinite(v)
    values = jnp.abs(v) if mode == "absolute" else v
    if range_policy == "pow2":
      return pow2_grid.positions(values, keep, a, b, bins)
    return arithmetic.histc_positions(values, keep, bins, a, b)

  return positions


def _along_channel_groups(block, hist, rows, params):
  """``block(hist[g], rows[g], *params[g])`` for groups ``g`` of channels, written in place.

  A group's count table (``_GROUP_BYTES``) stays in cache, and no ``[channels, bins]`` array
  other than the result is ever built: one that size would be a second pass over the histogram
  and, past 32 MiB, a fresh ``mmap`` (page faults) on every call.
  """
  channels, bins = hist.shape
  size = max(1, min(channels, _GROUP_BYTES // (4 * bins)))
  groups = channels // size
  split = lambda a: a[: groups * size].reshape(groups, size, *a.shape[1:])

  ones = jnp.ones(rows[:size].size, jnp.int32)  # the scatter's updates, built once

  def body(out, xs):
    start, values, group_params = xs
    old = lax.dynamic_slice_in_dim(out, start, size)
    new = block(old, values, ones, *group_params)
    return lax.dynamic_update_slice_in_dim(out, new, start, 0), None

  starts = jnp.arange(groups, dtype=jnp.int32) * size
  hist, _ = lax.scan(body, hist, (starts, split(rows), tuple(map(split, params))))
  done = groups * size
  if done < channels:
    tail = rows[done:]
    rest = block(hist[done:], tail, jnp.ones(tail.size, jnp.int32), *(p[done:] for p in params))
    hist = hist.at[done:].set(rest)
  return hist


def _pow2_merge(hist, counts, fresh, seen, g_old, o_old, g, o):
  """Exact bin merging onto the new grid, then a saturating add of the counts."""
  g_new = jnp.where(fresh, g_old, g)
  old = _if_moved(
    fresh, (g_old, o_old), (g_new, o), lambda: pow2_grid.regrid(hist, g_old, o_old, g_new, o), hist
  )
  new = pow2_grid.saturating_add(jnp.where(fresh[..., None], 0, old), counts)
  return jnp.where(seen[..., None], new, hist)


def _torch_merge(hist, counts, fresh, seen, old_lo, old_hi, new_lo, new_hi, *, upsample_rate):
  """torch's ``forward``: the old histogram carried onto the new range, plus the counts."""
  carry = lambda a: arithmetic.rebinned(*a, upsample_rate=upsample_rate)
  operands = (hist, old_lo, old_hi, new_lo, new_hi)
  if hist.ndim == 1:
    base = carry(operands)
  else:  # a few channels at a time: each makes [bins * upsample_rate] temporaries.
    rebin = lambda: lax.map(carry, operands, batch_size=_REBIN_BATCH)
    base = _if_moved(fresh, (old_lo, old_hi), (new_lo, new_hi), rebin, hist)
  new = jnp.where(fresh[..., None], 0.0, base) + counts.astype(jnp.float32)
  return jnp.where(seen[..., None], new, hist)


def _if_moved(fresh, old_grid, new_grid, rebin, hist):
  """``rebin()`` if some channel seen before changes grid, else ``hist`` (the common case)."""
  moved = jnp.any(~fresh & ((old_grid[0] != new_grid[0]) | (old_grid[1] != new_grid[1])))
  return lax.cond(moved, rebin, lambda: hist)
