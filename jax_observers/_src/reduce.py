r"""Batch statistics: the min and max of one batch, masked and synchronised across devices.

.. math::
   m = \min_{i \in K} x_i, \quad M = \max_{i \in K} x_i, \qquad
   K = \{i : x_i \text{ is not NaN}\} \text{ (or finite, with ignore\_nonfinite)}

An empty ``K`` gives ``m = +inf, M = -inf``, the identity of the running min/max. Under an
``axis_name`` the batch statistic is ``pmin``/``pmax``-reduced before it enters any state, so every
device ends with the statistic of the global batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

SMALL = 1 << 16  # inputs up to this many elements take the masked reduction directly


def batch_min_max(
  x: jax.Array,
  axes: Sequence[int] | None,
  *,
  ignore_nonfinite: bool,
  axis_name=None,
) -> tuple[jax.Array, jax.Array]:
  """float32 ``(min, max)`` of ``x`` over ``axes`` (None: all), skipping NaN (and +-inf).

  Large inputs run the plain reductions first and the masked pass only when they saw a value to
  skip, so clean data costs two reductions and nothing more; small inputs (activations of a training
  step) take the masked reduction directly, which avoids a ``lax.cond`` on the step's critical path.
  """
  x = lax.stop_gradient(x)
  axes = None if axes is None else tuple(axes)
  skip = (lambda v: ~jnp.isfinite(v)) if ignore_nonfinite else jnp.isnan

  def masked(_=None):
    keep = ~skip(x)
    inf = jnp.asarray(jnp.inf, x.dtype)
    return (
      jnp.min(jnp.where(keep, x, inf), axis=axes),
      jnp.max(jnp.where(keep, x, -inf), axis=axes),
    )

  if x.size <= SMALL:  # one fused pass; a branch would cost more than it saves
    lo, hi = masked()
  else:
    lo, hi = jnp.min(x, axis=axes), jnp.max(x, axis=axes)
    lo, hi = lax.cond(jnp.any(skip(lo) | skip(hi)), masked, lambda _: (lo, hi), None)
  lo, hi = lo.astype(jnp.float32), hi.astype(jnp.float32)
  if axis_name is not None:
    lo, hi = lax.pmin(lo, axis_name), lax.pmax(hi, axis_name)
  return lo, hi
