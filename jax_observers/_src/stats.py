r"""Batch statistics: the min and max of one batch, masked and synchronised across devices.

.. math::
   m = \min_{i \in K} x_i, \quad M = \max_{i \in K} x_i, \qquad
   K = \{i : x_i \text{ is not NaN}\} \text{ (or finite, with ignore\_nonfinite)}

An empty ``K`` gives ``m = +inf, M = -inf``, the identity of the running min/max. Under an
``axis_name`` the batch statistic is reduced across devices before it enters any state, so every
device ends with the statistic of the global batch: in one collective, as flax's BatchNorm stacks
its mean and mean of squares, ``pmin`` of the stacked :math:`(m, -M)` (negation is exact). The
absolute maximum FP8 scaling needs is :math:`\max(|m|, |M|)`, read off the same statistic.

Schedule (min and max are exact in any order, so only speed depends on it): XLA:CPU reads the data
twice for two separate reductions, and a variadic (min, max) reduction is fast only over a short
minor axis (over a major one it is ~20x slower). So when the last axis is reduced it is split into
chunks of at most 128, those are reduced by one variadic pass, and the 128x smaller remainder by
plain ``min``/``max``: one read of the data. XLA:CPU also runs one reduction on one thread but
independent ones on separate threads, so on the CPU backend a large input's last axis is cut into
as many slices as the machine has cores (at most 8), each reduced on its own and the results
combined elementwise. GPU and TPU reductions are parallel already and take one slice. The choice is
made at trace time from ``jax.default_backend()`` and ``os.cpu_count()``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

SMALL = 1 << 16  # inputs up to this many elements take the masked reduction directly
_CHUNK = 128
_SLICE_MIN = 1 << 20  # elements per slice below which threads cost more than they save
_MAX_SLICES = 8


def _variadic(low_input, high_input, axes):
  inf = np.array(np.inf, low_input.dtype)
  return lax.reduce(
    (low_input, high_input),
    (inf, -inf),
    lambda a, b: (jnp.minimum(a[0], b[0]), jnp.maximum(a[1], b[1])),
    axes,
  )


def _slices(x: jax.Array, axes) -> int:
  """How many independent slices of the last axis to reduce (the schedule above); 1: no split."""
  if x.ndim == 0 or x.ndim - 1 not in axes or jax.default_backend() != "cpu":
    return 1
  k = min(os.cpu_count() or 1, _MAX_SLICES, x.size // _SLICE_MIN)
  while k > 1 and x.shape[-1] % (k * _CHUNK):
    k -= 1
  return max(k, 1)


def min_max(x: jax.Array, axes) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(min x, max x, any NaN)`` over ``axes`` (a tuple), in the schedule described above.

  The NaN flag is computed in the same pass: XLA:CPU's vectorized min/max reductions drop NaN
  (openxla/xla#21461) rather than propagate it, so a NaN cannot be told from their result.
  """
  k = _slices(x, axes)
  if k > 1:
    results = [_one_pass(part, axes) for part in jnp.split(x, k, axis=-1)]
    return (
      functools.reduce(jnp.minimum, [r[0] for r in results]),
      functools.reduce(jnp.maximum, [r[1] for r in results]),
      functools.reduce(jnp.logical_or, [r[2] for r in results]),
    )
  return _one_pass(x, axes)


def _one_pass(x: jax.Array, axes) -> tuple[jax.Array, jax.Array, jax.Array]:
  last = x.ndim - 1
  n = x.shape[-1] if x.ndim else 1
  chunk = n if n <= _CHUNK else max(d for d in range(1, _CHUNK + 1) if n % d == 0)
  if x.ndim == 0 or last not in axes or chunk < 8:  # plain reductions (no useful split)
    # The flag: a NaN makes the sum NaN (adds propagate it; inf - inf is a harmless false alarm),
    # and a full sum is vectorized where an `any` along a major axis is not (2x cheaper here).
    return jnp.min(x, axis=axes), jnp.max(x, axis=axes), jnp.isnan(jnp.sum(x))
  split = (*x.shape[:-1], n // chunk, chunk)
  inf = np.array(np.inf, x.dtype)
  parts = x.reshape(split)
  lo, hi, nan = lax.reduce(
    (parts, parts, jnp.isnan(parts)),
    (inf, -inf, np.False_),
    lambda a, b: (jnp.minimum(a[0], b[0]), jnp.maximum(a[1], b[1]), a[2] | b[2]),
    (last + 1,),
  )
  rest = (*(a for a in axes if a != last), last)  # the chunk-count axis is reduced too
  return jnp.min(lo, axis=rest), jnp.max(hi, axis=rest), jnp.any(nan, axis=rest)


def batch_min_max(
  x: jax.Array,
  axes: Sequence[int] | None,
  *,
  ignore_nonfinite: bool,
  axis_name=None,
) -> tuple[jax.Array, jax.Array]:
  """float32 ``(min, max)`` of ``x`` over ``axes`` (None: all), skipping NaN (and +-inf).

  Large inputs run the plain reductions (and a NaN flag, in the same pass) first and the masked
  pass only when they saw a value to skip, so clean data costs one read and nothing more; small
  inputs (activations of a training step) take the masked reduction directly, which avoids a
  ``lax.cond`` on the step's critical path.
  """
  x = lax.stop_gradient(jnp.asarray(x))
  ndim = max(x.ndim, 1)
  axes = tuple(range(x.ndim)) if axes is None else tuple(a % ndim for a in axes)
  skip = (lambda v: ~jnp.isfinite(v)) if ignore_nonfinite else jnp.isnan

  inf = np.array(np.inf, x.dtype)  # a literal: a jax constant would be batched under vmap of cond

  def masked(_=None):
    # Two plain reductions over fused `where`s: for small inputs faster than one variadic pass.
    keep = ~skip(x)
    return jnp.min(jnp.where(keep, x, inf), axis=axes), jnp.max(jnp.where(keep, x, -inf), axis=axes)

  def masked_variadic(_):
    # One variadic pass that XLA fuses with the mask: no temporaries. Two plain reductions would
    # mask into two copies of x, allocated on every call even when this branch is not taken (and
    # past glibc's 32 MiB mmap threshold, page-faulted afresh each time).
    keep = ~skip(x)
    return _variadic(jnp.where(keep, x, inf), jnp.where(keep, x, -inf), axes)

  if x.size <= SMALL:  # one fused pass; a branch would cost more than it saves
    lo, hi = masked()
  else:
    lo, hi, nan = min_max(x, axes)
    dirty = jnp.any(nan)
    if ignore_nonfinite:  # infinities reach lo/hi (min/max keep them); only NaN needs the flag
      dirty = dirty | jnp.any(jnp.isinf(lo) | jnp.isinf(hi))
    lo, hi = lax.cond(dirty, masked_variadic, lambda _: (lo, hi), None)
  return sync_min_max(lo.astype(jnp.float32), hi.astype(jnp.float32), axis_name)


def sync_min_max(lo: jax.Array, hi: jax.Array, axis_name=None) -> tuple[jax.Array, jax.Array]:
  """``(pmin lo, pmax hi)`` over ``axis_name`` in one collective (``pmin`` of ``[lo, -hi]``)."""
  if axis_name is None:
    return lo, hi
  both = lax.pmin(jnp.stack([lo, -hi]), axis_name)
  return both[0], -both[1]


def batch_amax(
  x: jax.Array, axes: Sequence[int] | None, *, ignore_nonfinite: bool, axis_name=None
) -> tuple[jax.Array, jax.Array]:
  """float32 ``(max |x|, seen)`` over ``axes`` from :func:`batch_min_max`'s ``(m, M)``.

  ``seen`` is False where every element was skipped (the amax there is 0).
  """
  lo, hi = batch_min_max(x, axes, ignore_nonfinite=ignore_nonfinite, axis_name=axis_name)
  seen = lo <= hi
  return jnp.where(seen, jnp.maximum(jnp.abs(lo), jnp.abs(hi)), jnp.float32(0)), seen
