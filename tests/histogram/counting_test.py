"""histogram counting: every counting method gives the same integers, and one pmin and one psum sync."""

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_observers as jo
from jax_observers._src.histogram import accumulate as ha
from jax_observers._src.histogram import counting, grids

METHODS = ("scatter_cpu", "scatter", "onehot")
BINS = 64


@pytest.fixture
def small_blocks(monkeypatch):
  """Chunks and channel groups small enough that tests reach the loops and their remainders."""
  monkeypatch.setattr(counting, "_CHUNK", 1000)
  monkeypatch.setattr(counting, "_GROUP_BYTES", 4 * BINS * 8)  # 8 channels per group


def _data(rng, shape, kind):
  x = rng.standard_normal(shape).astype(np.float32)
  if kind == "spiky":  # runs of one bin (ReLU zeros), NaN and infinities
    x = np.maximum(x, 0)
    x.reshape(-1)[::97] = np.nan
    x.reshape(-1)[5::101] = np.inf
    x.reshape(-1)[7::103] = -np.inf
  return x


def _reference_counts(x, state, ch_axis, policy, mode):
  """np.bincount of the bins ha._positions gives every value (the binning under test is fixed)."""
  new = ha.accumulate(state, x, ch_axis=ch_axis, grid=grids.policy(policy), mode=mode)
  grid = grids.policy(policy).params(new.min_val, new.max_val, BINS, mode)
  if ch_axis is None:
    pos = np.asarray(
      ha._positions(grids.policy(policy), mode, BINS, jnp.asarray(x), *grid)
    ).reshape(-1)
    return np.bincount(pos, minlength=BINS + 1)[:BINS]
  moved = np.moveaxis(x, ch_axis, 0).reshape(x.shape[ch_axis], -1)
  rows = ha._positions(
    grids.policy(policy), mode, BINS, jnp.asarray(moved), *(g[:, None] for g in grid)
  )
  return np.stack([np.bincount(r, minlength=BINS + 1)[:BINS] for r in np.asarray(rows)])


@pytest.mark.parametrize("policy", ["torch", "pow2"])
@pytest.mark.parametrize("mode, kind", [("signed", "normal"), ("absolute", "spiky")])
@pytest.mark.parametrize(
  "shape, ch_axis",
  [
    ((3 * 1000 + 17,), None),  # the CPU loop over chunks and a remainder chunk
    ((70000,), None),  # past stats.SMALL: plain reductions, masked ones under a cond
    ((37, 50), 0),  # channel-major: contiguous groups, a remainder group (37 = 4 * 8 + 5)
    ((50, 37), 1),  # interleaved channels: the transpose to channel-major rows
    ((3, 37, 4), 1),
    ((2, 3, 19), 2),
  ],
)
def test_every_method_counts_alike(small_blocks, monkeypatch, policy, mode, kind, shape, ch_axis):
  rng = np.random.default_rng(len(shape) + (ch_axis or 0))
  first, second = _data(rng, shape, kind), 3 * _data(rng, shape, kind)  # the range grows
  channels = () if ch_axis is None else (shape[ch_axis],)
  fresh = ha.fresh_state(channels, BINS, grids.policy(policy))
  kw = dict(ch_axis=ch_axis, grid=grids.policy(policy), mode=mode)
  results = {}
  for method in METHODS:
    monkeypatch.setattr(counting, "_method", lambda method=method: method)
    step = jax.jit(lambda s, x: ha.accumulate(s, x, **kw))
    state = step(fresh, first)
    if method == "scatter_cpu":
      counts = np.asarray(state.histogram).astype(np.int64)
      np.testing.assert_array_equal(counts, _reference_counts(first, fresh, ch_axis, policy, mode))
    results[method] = step(state, second)
  for method in METHODS[1:]:
    for field in ("histogram", "min_val", "max_val"):
      np.testing.assert_array_equal(
        np.asarray(getattr(results[method], field)),
        np.asarray(getattr(results["scatter_cpu"], field)),
        err_msg=f"{method} {field}",
      )


def _collectives(obs, x):
  step = jax.vmap(lambda s, v: obs.update(s, v, axis_name="d"), (None, 0), axis_name="d")
  text = str(jax.make_jaxpr(step)(obs.init(x[0]), x))
  return collections.Counter(re.findall(r"\b(pmin|pmax|psum|all_gather|all_to_all)\b", text))


@pytest.mark.parametrize(
  "obs, shape",
  [
    (jo.HistogramObserver(), (4, 1 << 17)),
    (jo.HistogramObserver(range_policy="pow2"), (4, 1 << 17)),
    (jo.HistogramPercentileObserver(ch_axis=1, qscheme=jo.per_channel_affine), (4, 512, 300)),
    (
      jo.HistogramPercentileObserver(ch_axis=0, qscheme=jo.per_channel_affine, range_policy="pow2"),
      (4, 300, 512),
    ),
  ],
)
def test_one_pmin_and_one_psum_per_update(obs, shape):
  """The range's two ends share one pmin ([min, -max]); all counts share one psum, after the loop."""
  counts = _collectives(obs, jnp.ones(shape, jnp.float32))
  assert counts == {"pmin": 1, "psum": 1}, counts


def test_vmap_of_a_large_update_equals_a_loop():
  """Past stats.SMALL the masked min/max sits in a cond; vmap (batched predicate) must work."""
  obs = jo.HistogramObserver(bins=BINS)
  xs = _data(np.random.default_rng(3), (2, 70000), "spiky")
  batched = jax.vmap(obs.update, (None, 0))(obs.init(xs[0]), xs)
  for i, x in enumerate(xs):
    one = obs.update(obs.init(x), x)
    np.testing.assert_array_equal(np.asarray(batched.histogram[i]), np.asarray(one.histogram))
