r"""Counting bins into int32 tables, by the backend's fastest method (read at trace time).

Per tensor, :func:`count` takes a flat array's bins; per channel, :func:`channels_update` counts and
merges group by group of channels (a ``lax.scan``): each group's counts go into a small table that
stays in cache and are merged into its rows of the histogram in place, so an update builds no
``[channels, bins]`` array besides its result. Under ``axis_name`` all counts are ``psum``-med at
once. Every method gives the same integers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

_GROUP_BYTES = 1 << 20  # int32 count table per group of channels: about half an L2.
_CHUNK = 1 << 17  # values per CPU scatter: their bins (512 KiB) stay in L2 for the scatter
_SLOTS = 4  # interleaved copies of a count table per scatter (a power of two)
_ONEHOT_BYTES = 1 << 25  # TPU: bytes of the one-hot operands per block


def count(positions, flat: jax.Array, bins: int, a, b) -> jax.Array:
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


def channels_update(positions, merge, hist, x3, params, axis_name):
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
