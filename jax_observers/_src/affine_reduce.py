r"""Per-block min and max, NaN skipped, synchronised by ``pmin``/``pmax``; one read of the data.

.. math::
   m_g = \min_{i \in B_g \cap K} x_i, \qquad M_g = \max_{i \in B_g \cap K} x_i, \qquad
   K = \{i : x_i \text{ not NaN}\} \text{ (or finite, with ignore\_nonfinite)}

The semantics of ``reduce.batch_min_max`` (an empty :math:`B_g \cap K` gives :math:`+\infty,
-\infty`; the masked pass runs only when the plain one saw a value to skip); only the schedule
differs, because min and max are exact in any order. XLA:CPU reads the data twice for two separate
reductions, and a variadic (min, max) reduction is fast only over a short minor axis (over a major
one it is 20x slower). So when the last axis is reduced it is split into chunks of at most 128,
those are reduced by one variadic pass, and the 128x smaller remainder by plain ``min``/``max``.
On a 4096 x 4096 float32 array that is 2-7x faster than two reductions (per group, per tensor,
per row, with token axes).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

_CHUNK = 128


def _variadic(low_input, high_input, axes):
  inf = jnp.asarray(jnp.inf, low_input.dtype)
  return lax.reduce(
    (low_input, high_input),
    (inf, -inf),
    lambda a, b: (jnp.minimum(a[0], b[0]), jnp.maximum(a[1], b[1])),
    axes,
  )


def _min_max(low_input: jax.Array, high_input: jax.Array, axes) -> tuple[jax.Array, jax.Array]:
  """``(min low_input, max high_input)`` over ``axes``: see the module docstring for the schedule."""
  last = low_input.ndim - 1
  if last not in axes:
    return jnp.min(low_input, axis=axes), jnp.max(high_input, axis=axes)
  n = low_input.shape[-1]
  chunk = n if n <= _CHUNK else max(d for d in range(1, _CHUNK + 1) if n % d == 0)
  if chunk < 8:  # no useful split (e.g. a large prime): two plain reductions
    return jnp.min(low_input, axis=axes), jnp.max(high_input, axis=axes)
  split = (*low_input.shape[:-1], n // chunk, chunk)
  lo, hi = _variadic(low_input.reshape(split), high_input.reshape(split), (last + 1,))
  rest = (*(a for a in axes if a != last), last)  # the chunk-count axis is reduced too
  return jnp.min(lo, axis=rest), jnp.max(hi, axis=rest)


def block_min_max(
  x: jax.Array, axes: Sequence[int], *, ignore_nonfinite: bool, axis_name=None
) -> tuple[jax.Array, jax.Array]:
  """float32 ``(min, max)`` of ``x`` over ``axes``, skipping NaN (and +-inf)."""
  x = lax.stop_gradient(jnp.asarray(x))
  axes = tuple(a % max(x.ndim, 1) for a in axes)
  lo, hi = _min_max(x, x, axes)
  skip = (lambda v: ~jnp.isfinite(v)) if ignore_nonfinite else jnp.isnan

  def masked(_):
    keep = ~skip(x)
    inf = jnp.asarray(jnp.inf, x.dtype)
    return _min_max(jnp.where(keep, x, inf), jnp.where(keep, x, -inf), axes)

  lo, hi = lax.cond(jnp.any(skip(lo) | skip(hi)), masked, lambda _: (lo, hi), None)
  lo, hi = lo.astype(jnp.float32), hi.astype(jnp.float32)
  if axis_name is not None:
    lo, hi = lax.pmin(lo, axis_name), lax.pmax(hi, axis_name)
  return lo, hi
