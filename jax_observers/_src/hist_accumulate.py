r"""One pass of histogram accumulation, per tensor or per channel, under either range policy.

The state is torch's ``(histogram, min_val, max_val)``: the running min and max of the finite
values seen, and a histogram on a grid that is a function of them.

* ``range_policy='torch'``: the grid is the range itself, :math:`[m, M]` (torch's
  ``HistogramObserver``), float32 counts; when the range grows the old histogram is re-binned with
  torch's ``_upscale_histogram`` (approximate, order dependent, bit-exact with torch).
* ``range_policy='pow2'``: the power-of-two grid of :mod:`hist_pow2`, int32 counts, exact bin
  merging: the state depends only on the multiset of values observed.

A batch's bins are counted into int32 by the default backend's method (:func:`_method`: chunked
scatters on CPU, one scatter on GPU, one-hot matrix products on TPU; all give the same integers),
then merged into the state. Per channel, the channels are processed in groups (a ``lax.scan``):
each group's counts go into a small table that stays in cache and are merged into its rows of the
histogram in place, so an update builds no ``[channels, bins]`` array besides its result.

``mode`` picks what is histogrammed: ``'signed'`` (:math:`x` on :math:`[m, M]`), ``'symmetric'``
(:math:`x` on :math:`[-a, a]`, :math:`a = \max(-m, M)`) or ``'absolute'`` (:math:`|x|` on
:math:`[0, a]`). NaN and :math:`\pm\infty` never enter the statistics; a batch (or a channel) with no
finite value changes nothing. Under ``axis_name`` an update syncs twice, the least possible (the
grid the counts are taken on depends on the global range): one ``pmin`` of ``[min, -max]`` for
the range, then one ``psum`` of all the batch's counts, so every device holds the global histogram.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

from jax_observers._src import base, hist_pow2
from jax_observers._src import histogram_numerics as hn
from jax_observers._src.readable import ReadableRepr
from jax_observers._src.reduce import SMALL, min_max

RANGE_POLICIES = ("torch", "pow2")
_GROUP_BYTES = 1 << 20  # int32 count table per group of channels: about half an L2.
_CHUNK = 1 << 17  # values per CPU scatter: their bins (512 KiB) stay in L2 for the scatter
_SLOTS = 4  # interleaved copies of a count table per scatter (a power of two)
_ONEHOT_BYTES = 1 << 25  # TPU: bytes of the one-hot operands per block
_REBIN_BATCH = 4  # channels re-binned at once: ~1.2 MiB of temporaries each, allocated every call
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
  if jnp.dtype(state.histogram.dtype) != count_dtype(range_policy):
    raise ValueError(
      f"range_policy={range_policy!r} keeps {count_dtype(range_policy).name} counts; got a "
      f"{jnp.dtype(state.histogram.dtype).name} histogram (the other policy's grid)."
    )
  if ch_axis is None:
    x = x.reshape(-1)
    lo, hi = _finite_min_max(x, (0,))
  else:  # [before, channels(, after)]: a trailing 1 would cost XLA a layout copy of x
    after = math.prod(x.shape[ch_axis + 1 :])
    x = x.reshape(math.prod(x.shape[:ch_axis]), x.shape[ch_axis], *((after,) if after > 1 else ()))
    lo, hi = _finite_min_max(x, (0, 2)[: x.ndim - 1])
  if axis_name is not None:  # one collective for both ends: min over [lo, -hi]
    both = lax.pmin(jnp.stack([lo, -hi]), axis_name)
    lo, hi = both[0], -both[1]
  seen = lo <= hi
  fresh = ~(state.min_val <= state.max_val)
  new_min, new_max = jnp.minimum(state.min_val, lo), jnp.maximum(state.max_val, hi)
  if range_policy == "pow2":
    grid = lambda a, b: hist_pow2.grid(a, b, bins, mode)
    merge = _pow2_merge
  else:
    grid = lambda a, b: mode_range(a, b, mode)
    merge = functools.partial(_torch_merge, upsample_rate=upsample_rate)
  params = (fresh, seen, *grid(state.min_val, state.max_val), *grid(new_min, new_max))
  positions = functools.partial(_positions, range_policy, mode, bins)
  if ch_axis is None:
    counts = _count(positions, x, bins, *params[4:])
    if axis_name is not None:
      counts = lax.psum(counts, axis_name)
    hist = merge(state.histogram, counts, *params)
  else:
    hist = _channels_update(positions, merge, state.histogram, x, params, axis_name)
  return HistogramState(
    histogram=hist,
    min_val=jnp.where(seen, new_min, state.min_val),
    max_val=jnp.where(seen, new_max, state.max_val),
  )


def _channels_update(positions, merge, hist, x3, params, axis_name):
  """The merged ``[C, bins]`` histogram for ``x3`` (``[before, C(, after)]``), group by group."""
  channels, bins = hist.shape
  size = _group_size(channels, bins, x3.size)
  rows, rest = _channel_rows(x3, size)
  ones = lax.optimization_barrier(jnp.ones(x3.size // channels * size, jnp.int32))

  def count(values, a, b):  # [size, m] values of one group
    pos = positions(values, a[:, None], b[:, None])
    return _count_onehot(pos, bins) if _method() == "onehot" else _count_rows(pos, bins, ones)

  if axis_name is None:  # count and merge each group of channels in one pass
    fn = lambda v, h, *p: merge(h, count(v, *p[4:]), *p)
    return _over_channel_groups(fn, size, rows, rest, hist, params)
  # every group's counts first, then one psum of all of them
  fn = lambda v, _, a, b: count(v, a, b)
  counts = _over_channel_groups(fn, size, rows, rest, jnp.zeros(hist.shape, jnp.int32), params[4:])
  counts = lax.psum(counts, axis_name)
  fn = lambda _, h, c, *p: merge(h, c, *p)
  return _over_channel_groups(fn, size, None, None, hist, (counts, *params))


def _finite_min_max(x, axes):
  """``(min, max)`` of the finite values of ``x`` over ``axes``: ``reduce.batch_min_max``'s answer.

  The plain reductions (:func:`reduce.min_max`, one read) come first; the masked pass, run only
  when they met NaN or ``±inf``, is one variadic reduction that XLA fuses with the mask.
  ``batch_min_max`` masks into two copies of ``x`` instead, and that untaken branch's temporaries
  are allocated on every call: at 4M values they lift an update's temporaries past glibc's 32 MiB
  ``mmap`` threshold, and every call then page-faults all of them afresh (2x the update's time).
  """
  inf = np.float32(np.inf)  # a literal: a jax constant would be batched under vmap of the cond

  def masked(_):
    keep = jnp.isfinite(x)
    extremes = (jnp.where(keep, x, inf), jnp.where(keep, x, -inf))
    return lax.reduce(extremes, (inf, -inf), _min_max, axes)

  if x.size <= SMALL:  # one fused pass; a branch would cost more than it saves
    return masked(None)
  lo, hi = min_max(x, x, axes)
  clean = jnp.all(jnp.isfinite(lo) & jnp.isfinite(hi))
  return lax.cond(clean, lambda _: (lo, hi), masked, None)


def _min_max(a, b):
  return jnp.minimum(a[0], b[0]), jnp.maximum(a[1], b[1])


def _positions(range_policy: str, mode: str, bins: int, values, a, b):
  """Bins of raw ``values`` on the grid ``(a, b)``: ``(g, o)`` (pow2) or ``(lo, hi)``; ``bins``: dropped."""
  keep = jnp.isfinite(values)
  values = jnp.abs(values) if mode == "absolute" else values
  if range_policy == "pow2":
    return hist_pow2.positions(values, keep, a, b, bins)
  return hn.histc_positions(values, keep, bins, a, b)


def _count(positions, flat: jax.Array, bins: int, a, b) -> jax.Array:
  """int32 counts ``[bins]`` of ``flat`` on the grid ``(a, b)``, by the backend's method."""
  on_grid = lambda v: positions(v, a, b)
  if _method() == "onehot":
    return _count_onehot(on_grid(flat)[None], bins)[0]
  return _count_flat(on_grid, flat, bins, _CHUNK if _method() == "scatter_cpu" else flat.size)


def _method() -> str:
  """How counts are taken on ``jax.default_backend()`` (read at trace time).

  ``'scatter_cpu'``: XLA:CPU scatters chunk by chunk (:func:`_count_flat`), channel group by
  channel group; ``'scatter'`` (GPU): one scatter-add over everything, the bins fused into it;
  ``'onehot'`` (TPU, whose scatters are serial): one-hot products on the MXU (:func:`_count_onehot`).
  Measured on XLA:CPU (4M values, 2048 bins) and beaten there: a sort of the bins then
  ``searchsorted`` (45x slower than the chunked scatters), one-hot products (70x), one scatter over
  all values (1.2x to 5x: ``bincount`` and ``segment_sum``, whose 16 MiB of bins are page-faulted
  on every call), float32 counts (1.2x to 2x); per channel, one table for all channels (3x).
  """
  backend = jax.default_backend()
  return {"cpu": "scatter_cpu", "tpu": "onehot"}.get(backend, "scatter")


def _count_flat(positions, flat: jax.Array, bins: int, chunk: int) -> jax.Array:
  """int32 counts ``[bins]`` of ``positions(flat)``, ``chunk`` values per scatter.

  Each scatter adds into ``_SLOTS`` interleaved copies of the table (value ``i`` into copy
  ``i % _SLOTS``), summed at the end: a scatter adds its updates one after the other, and runs of
  one bin (a ReLU's zeros, a constant) would otherwise wait on the previous add to the same word
  (1.4x slower). On CPU the chunks go through a loop, so that only one chunk's bins (512 KiB) and
  scatter updates are ever live (temporaries past 32 MiB are page-faulted afresh on every call,
  glibc ``mmap``s them); on 2 cores the loop is as fast as independent chunks.
  """
  n = flat.size
  size = max(1, min(chunk, n))
  ones = lax.optimization_barrier(jnp.ones(size, jnp.int32))  # built once, not in the loop

  def add(table, values):
    pos = positions(values)
    slot = (lax.iota(jnp.int32, values.size) & (_SLOTS - 1)) * bins
    index = jnp.where(pos < bins, pos + slot, _SLOTS * bins)  # out of bounds: dropped
    return table.at[index].add(ones[: values.size], mode="drop")

  table = jnp.zeros(_SLOTS * bins, jnp.int32)
  full = n // size
  if full == 1:
    table = add(table, flat[:size])
  elif full > 1:
    step = lambda i, t: add(t, lax.dynamic_slice_in_dim(flat, i * size, size))
    table = lax.fori_loop(0, full, step, table)
  if full * size < n:
    table = add(table, flat[full * size :])
  return table.reshape(_SLOTS, bins).sum(0)


def _count_rows(pos: jax.Array, bins: int, ones: jax.Array) -> jax.Array:
  """int32 counts ``[R, bins]`` of bins ``pos`` (``[R, m]``; ``bins``: dropped).

  One scatter into a zeroed ``[R, bins]`` table, which the group size keeps in cache. ``ones``
  (int32, at least ``pos.size``) are the scatter's updates, built once outside the loop.
  """
  rows = pos.shape[0]
  row = lax.broadcasted_iota(jnp.int32, pos.shape, 0)
  index = jnp.where(pos < bins, row * bins + pos, rows * bins)  # out of bounds: dropped
  table = jnp.zeros(rows * bins, jnp.int32).at[index.reshape(-1)].add(ones[: pos.size], mode="drop")
  return table.reshape(rows, bins)


def _count_onehot(pos: jax.Array, bins: int) -> jax.Array:
  """int32 counts ``[R, bins]`` of bins ``pos`` (``[R, m]``) by one-hot matrix products (TPU).

  A bin ``p`` is ``(p // 64, p % 64)``; per block of values, ``one_hot(p // 64)^T @ one_hot(p % 64)``
  (bfloat16 zeros and ones, float32 sums: exact below 2**24 values a block) counts every pair.
  """
  rows, m = pos.shape
  low = 64
  high = -(-bins // low)
  block = max(1, min(m, _ONEHOT_BYTES // (2 * rows * (high + low))))
  blocks = -(-m // block)
  pos = jnp.pad(pos, ((0, 0), (0, blocks * block - m)), constant_values=bins)
  pos = jnp.moveaxis(pos.reshape(rows, blocks, block), 1, 0)

  def step(total, p):
    keep = (p < bins)[..., None]
    hi = ((p // low)[..., None] == lax.broadcasted_iota(p.dtype, (1, 1, high), 2)) & keep
    lo = (p % low)[..., None] == lax.broadcasted_iota(p.dtype, (1, 1, low), 2)
    hi, lo = hi.astype(jnp.bfloat16), lo.astype(jnp.bfloat16)
    pairs = jnp.einsum("rmh,rml->rhl", hi, lo, preferred_element_type=jnp.float32)
    return total + pairs.astype(jnp.int32).reshape(rows, high * low)[:, :bins], None

  total, _ = lax.scan(step, jnp.zeros((rows, bins), jnp.int32), pos)
  return total


def _group_size(channels: int, bins: int, values: int) -> int:
  """Channels per group on CPU: a ``_GROUP_BYTES`` count table, at most ``_CHUNK`` ``values``.

  A divisor of ``channels`` when one is close, so that there is no remainder group. Other
  backends take all channels at once.
  """
  if _method() != "scatter_cpu":
    return channels
  target = max(1, min(channels, _GROUP_BYTES // (4 * bins), _CHUNK * channels // values))
  divisors = [d for d in range(target, (target + 1) // 2 - 1, -1) if channels % d == 0]
  return divisors[0] if divisors else target


def _channel_rows(x3: jax.Array, size: int):
  """``x3`` (``[before, channels(, after)]``) as channel-major rows: ``[groups, size, m]`` and the
  remaining ``[rest, m]`` (or None), ``m = before * after``.

  A reshape when ``before == 1``, else one transpose. XLA:CPU vectorizes the bins of a group only
  in this layout, one channel's grid broadcast along its row: sliced out of ``[before, channels]``
  (a dynamic slice of the minor axis, or a block transpose) the grid is read value by value and
  the bins are computed unvectorized, 4x slower than the transpose costs.
  """
  channels = x3.shape[1]
  rows = jnp.moveaxis(x3, 1, 0).reshape(channels, -1)
  groups = channels // size
  done = groups * size
  rest = None if done == channels else rows[done:]
  return rows[:done].reshape(groups, size, -1), rest


def _over_channel_groups(fn, size: int, blocks, rest, hist, leading=()):
  """``hist`` with the rows of each group of ``size`` channels replaced by ``fn(block, rows, ...)``.

  ``fn(block, hist[group], *(a[group] for a in leading))``, one group after the other in a
  ``lax.scan`` that updates ``hist`` in place: a group's count table stays in cache, and no
  ``[channels, bins]`` array is built besides the result (one that size is a second pass over the
  histogram, and past 32 MiB a fresh ``mmap``, page faults included, on every call). When the
  caller donates the state, the result is written into its buffer. ``blocks``, ``rest``:
  :func:`_channel_rows`, or None (``fn`` then gets None).
  """
  channels = hist.shape[0]
  groups = channels // size
  done = groups * size
  if groups == 1:
    new = fn(None if blocks is None else blocks[0], hist[:size], *(a[:size] for a in leading))
    hist = lax.dynamic_update_slice_in_dim(hist, new, 0, 0)
  elif groups > 1:
    split = lambda a: a[:done].reshape(groups, size, *a.shape[1:])

    def body(out, xs):
      start, block, group = xs
      old = lax.dynamic_slice_in_dim(out, start, size)
      return lax.dynamic_update_slice_in_dim(out, fn(block, old, *group), start, 0), None

    starts = jnp.arange(groups, dtype=jnp.int32) * size
    hist, _ = lax.scan(body, hist, (starts, blocks, tuple(map(split, leading))))
  if done < channels:
    hist = hist.at[done:].set(fn(rest, hist[done:], *(a[done:] for a in leading)))
  return hist


def _pow2_merge(hist, counts, fresh, seen, g_old, o_old, g, o):
  """Exact bin merging onto the new grid, then a saturating add of the counts."""
  g_new = jnp.where(fresh, g_old, g)
  old = _if_moved(
    fresh, (g_old, o_old), (g_new, o), lambda: hist_pow2.regrid(hist, g_old, o_old, g_new, o), hist
  )
  new = hist_pow2.saturating_add(jnp.where(fresh[..., None], 0, old), counts)
  return jnp.where(seen[..., None], new, hist)


def _torch_merge(hist, counts, fresh, seen, old_lo, old_hi, new_lo, new_hi, *, upsample_rate):
  """torch's ``forward``: the old histogram carried onto the new range, plus the counts."""
  carry = lambda a: hn.rebinned(*a, upsample_rate=upsample_rate)
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
