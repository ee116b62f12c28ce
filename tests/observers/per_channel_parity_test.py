"""Per-channel observers against torch 2.13, live, bit for bit, on any ch_axis."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from torch_oracle import INPUT_KINDS, assert_same, random_batch, random_config, torch_run

import jax_observers as jo

CLASSES = [jo.PerChannelMinMaxObserver, jo.MovingAveragePerChannelMinMaxObserver]


def run(obs, batches, jit=True):
  update = jax.jit(obs.update) if jit else obs.update
  state = obs.init(batches[0])
  for b in batches:
    state = update(state, b)
  return state, (jax.jit(obs.calculate_qparams) if jit else obs.calculate_qparams)(state)


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_random_configs_axes_and_inputs_match_torch(cls, jit):
  rng = np.random.default_rng(11 + 2 * CLASSES.index(cls) + jit)
  for trial in range(40 if jit else 12):
    shape = tuple(int(n) for n in rng.integers(1, 7, rng.integers(2, 5)))  # torch fails on 1-D
    ch_axis = int(rng.integers(-len(shape), len(shape)))
    obs = random_config(rng, cls, ch_axis=ch_axis)
    kinds = rng.choice(INPUT_KINDS, rng.integers(1, 5))
    batches = [random_batch(rng, k, shape) for k in kinds]
    # per-channel data with very different ranges per channel
    batches = [
      b
      * np.float32(10.0)
      ** rng.integers(-3, 4, shape[ch_axis])
      .reshape([-1 if i == ch_axis % len(shape) else 1 for i in range(len(shape))])
      .astype(np.float32)
      for b in batches
    ]
    state, (scale, zero_point) = run(obs, batches, jit)
    t, t_scale, t_zp = torch_run(obs, batches)
    what = f"trial {trial}: {obs} shape {shape} on {list(kinds)}"
    assert_same(state.min_val, t.min_val.numpy(), what)
    assert_same(state.max_val, t.max_val.numpy(), what)
    assert_same(scale, t_scale, what)
    assert_same(zero_point, t_zp, what)
    assert zero_point.dtype == (
      jnp.float32 if obs.qscheme == jo.per_channel_affine_float_qparams else jnp.int32
    )


def test_float_qparams_edge_case_matches_torch():
  """E4: float zero point, unclamped; scale 1.0 where the range is <= eps."""
  obs = jo.PerChannelMinMaxObserver(qscheme=jo.per_channel_affine_float_qparams)
  x = np.array([[-1.0, 2.0], [4.0, 4.0], [-4.0, -2.0]], np.float32)
  _, (scale, zero_point) = run(obs, [x])
  _, t_scale, t_zp = torch_run(obs, [x])
  assert_same(scale, t_scale)
  assert_same(zero_point, t_zp)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_a_changed_channel_count_is_an_error_not_a_broadcast(cls):
  """Deviation (E12): torch silently resizes a [1]-channel state to 3 channels."""
  obs = cls(ch_axis=0)
  state = obs.init(jnp.ones((1, 4)))
  state = obs.update(state, jnp.ones((1, 4)))
  with pytest.raises(ValueError, match="has state for"):
    jax.jit(obs.update)(state, jnp.ones((3, 4)))


@pytest.mark.parametrize("ch_axis", [2, -3])
def test_ch_axis_out_of_range_fails_at_trace_time(ch_axis):
  obs = jo.PerChannelMinMaxObserver(ch_axis=ch_axis)
  with pytest.raises(ValueError, match="ch_axis"):
    obs.init(jnp.ones((2, 3)))
  with pytest.raises(ValueError, match="ch_axis"):
    jax.jit(obs.update)(jo.MinMaxState(jnp.zeros(2), jnp.zeros(2)), jnp.ones((2, 3)))


def test_nan_in_one_channel_leaves_the_others_exact():
  rng = np.random.default_rng(5)
  x = random_batch(rng, "normal", (3, 8))
  dirty = x.copy()
  dirty[1, 3] = np.nan
  dirty[2, :] = np.nan
  obs = jo.PerChannelMinMaxObserver(dtype=jnp.int8, qscheme=jo.per_channel_symmetric)
  state, (scale, zero_point) = run(obs, [dirty])
  assert_same(state.min_val[:2], [x[0].min(), np.nanmin(dirty[1])])
  assert state.min_val[2] == np.inf and state.max_val[2] == -np.inf  # channel 2 saw nothing
  assert float(scale[2]) == 1.0 and int(zero_point[2]) == 0  # torch's default for no data
  _, t_scale, _t_zp = torch_run(obs, [x[:2]])
  assert_same(scale[:2], t_scale)


@pytest.mark.parametrize(
  "kwargs, error",
  [
    ({"qscheme": jo.per_tensor_affine}, NotImplementedError),
    ({"is_dynamic": True}, NotImplementedError),
    ({"ch_axis": 1.0}, ValueError),
    ({"averaging_constant": -0.1}, ValueError),
  ],
)
def test_bad_configs_are_refused(kwargs, error):
  with pytest.raises(error, match=next(iter(kwargs))):
    jo.MovingAveragePerChannelMinMaxObserver(**kwargs)


def test_empty_input_leaves_state_unchanged():
  obs = jo.PerChannelMinMaxObserver(ch_axis=1)
  state = run(obs, [np.ones((2, 3), np.float32)])[0]
  chex.assert_trees_all_equal(jax.jit(obs.update)(state, jnp.zeros((0, 3))), state)
