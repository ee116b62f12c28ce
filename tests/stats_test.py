"""Batch statistics (``_src/stats.py``): a NumPy reference, and one collective per statistic."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from registry import CASES, batches, sharded

from jax_observers._src import stats
from jax_observers._src.histogram.accumulate import HistogramState

COLLECTIVES = ("pmin", "pmax", "psum", "all_gather", "all_to_all", "ppermute", "psum_scatter")


def _collectives(jaxpr) -> list[str]:
  """The collective primitives of ``jaxpr`` and of every jaxpr nested in its equations."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in COLLECTIVES:
      found.append(eqn.primitive.name)
    for value in eqn.params.values():
      for inner in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(inner, "jaxpr", inner)
        if hasattr(inner, "eqns"):
          found += _collectives(inner)
  return found


@pytest.mark.parametrize("obs, shape", CASES)
def test_one_collective_per_update(obs, shape):
  """Like flax's BatchNorm, statistics are stacked into one collective: ``pmin`` of ``[m, -M]``.
  A histogram needs two, one after the other: the global range, then the counts on its grid."""
  xs = batches(shape)
  state = obs.init(xs[0])
  step = sharded(lambda state, x: obs.update(state, x, axis_name="data"))
  found = _collectives(jax.make_jaxpr(step)(state, xs[0]).jaxpr)
  assert len(found) <= (2 if isinstance(state, HistogramState) else 1), found


def _numpy_min_max(x, axes, ignore_nonfinite):
  skip = ~np.isfinite(x) if ignore_nonfinite else np.isnan(x)
  lo = np.where(skip, np.inf, x).min(axis=axes)
  hi = np.where(skip, -np.inf, x).max(axis=axes)
  return lo.astype(np.float32), hi.astype(np.float32)


@pytest.mark.parametrize("shape, axes", [((300,), None), ((64, 1030), (0,)), ((8, 70000), (1,))])
@pytest.mark.parametrize("ignore_nonfinite", [False, True])
def test_batch_min_max_and_amax_match_numpy(shape, axes, ignore_nonfinite):
  rng = np.random.default_rng(sum(shape))
  x = (rng.standard_normal(shape) * 3).astype(np.float32)
  flat = x.reshape(-1)
  flat[rng.integers(0, flat.size, 5)] = np.nan
  flat[rng.integers(0, flat.size, 3)] = np.inf
  flat[rng.integers(0, flat.size, 3)] = -np.inf
  if len(shape) == 2:
    x[0] = np.nan  # a row (a channel, for axes=(1,)) that holds no value to keep
  np_axes = tuple(range(x.ndim)) if axes is None else axes
  lo_ref, hi_ref = _numpy_min_max(x, np_axes, ignore_nonfinite)
  lo, hi = jax.jit(stats.batch_min_max, static_argnums=1, static_argnames="ignore_nonfinite")(
    x, axes, ignore_nonfinite=ignore_nonfinite
  )
  np.testing.assert_array_equal(np.asarray(lo), lo_ref)
  np.testing.assert_array_equal(np.asarray(hi), hi_ref)
  amax, seen = stats.batch_amax(jnp.asarray(x), axes, ignore_nonfinite=ignore_nonfinite)
  seen_ref = lo_ref <= hi_ref
  np.testing.assert_array_equal(np.asarray(seen), seen_ref)
  amax_ref = np.where(seen_ref, np.maximum(np.abs(lo_ref), np.abs(hi_ref)), 0)
  np.testing.assert_array_equal(np.asarray(amax), amax_ref)


def test_synced_min_max_is_the_global_one_for_every_sign_of_zero_and_infinity():
  x = np.array([[0.0, -0.0], [-np.inf, 1.0], [np.inf, -2.0], [5.0, -0.0]] * 2, np.float32)
  step = sharded(
    lambda _, v: stats.batch_min_max(v, (0,), ignore_nonfinite=False, axis_name="data")
  )
  lo, hi = step(jnp.zeros(()), x)
  np.testing.assert_array_equal(np.asarray(lo), x.min(0))
  np.testing.assert_array_equal(np.asarray(hi), x.max(0))


@pytest.mark.parametrize(
  "shape, axes",
  [((1 << 21,), None), ((2048, 512), (1,)), ((2048, 512), (0,)), ((64, 8, 4096), (0, 2))],
)
def test_a_few_nans_in_a_large_batch_are_skipped(shape, axes):
  """XLA:CPU's vectorized min/max drop NaN instead of propagating it (openxla/xla#21461), so the
  NaN flag that picks the masked pass must not be read off their result."""
  rng = np.random.default_rng(len(shape))
  for _ in range(3):
    x = rng.standard_normal(shape).astype(np.float32)
    x.reshape(-1)[rng.integers(0, x.size, 5)] = np.nan
    np_axes = tuple(range(x.ndim)) if axes is None else axes
    lo, hi = jax.jit(lambda v: stats.batch_min_max(v, axes, ignore_nonfinite=False))(x)
    np.testing.assert_array_equal(np.asarray(lo), np.nanmin(x, axis=np_axes))
    np.testing.assert_array_equal(np.asarray(hi), np.nanmax(x, axis=np_axes))
