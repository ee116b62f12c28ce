"""Issue 14: loaded, mismatched and degenerate states give an error or a defined, documented result.

Each test names the issue's row it pins. Torch (2.13) is the oracle where it has the behaviour.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_observers as jo


def _torch():
  torch = pytest.importorskip("torch")
  from torch.ao.quantization import observer as tobs

  return torch, tobs


def _observe(obs, batches):
  state = obs.init(jnp.asarray(batches[0]))
  for b in batches:
    state = obs.update(state, jnp.asarray(b, jnp.float32))
  return state


# Row 1: a torch (evenly spaced, float) histogram is not read as a pow2 grid.
def test_pow2_observer_refuses_torchs_histogram_and_round_trips_its_own():
  torch, tobs = _torch()
  t = tobs.HistogramObserver(bins=64)
  rng = np.random.default_rng(0)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for scale in (1.0, 3.0):
      t(torch.from_numpy((rng.standard_normal(1000) * scale).astype(np.float32)))
  assert np.any(t.histogram.numpy() % 1 != 0)  # torch's re-binning leaves fractional counts
  pow2 = jo.HistogramObserver(bins=64, range_policy="pow2")
  with pytest.raises(ValueError, match=r"'histogram'.*range_policy='pow2'"):
    jo.load_state_dict(pow2, t.state_dict())
  state = _observe(pow2, [rng.standard_normal(100), 5 * rng.standard_normal(100)])
  d = jo.state_dict(pow2, state)
  assert d["histogram"].dtype == np.int32  # the dtype says which grid the counts are on
  loaded = jo.load_state_dict(pow2, d)
  np.testing.assert_array_equal(loaded.histogram, state.histogram)
  with pytest.raises(ValueError, match=r"'histogram'.*range_policy='torch'"):
    jo.load_state_dict(jo.HistogramObserver(bins=64), d)
  # Counts outside the grid bins of [min_val, max_val] are not a pow2 histogram of that range.
  moved = {**d, "histogram": np.roll(d["histogram"], 20)}
  with pytest.raises(ValueError, match="outside the power-of-two grid"):
    jo.load_state_dict(pow2, moved)


# Row 2: float32 cancellation in a moving average never leaves an inverted range behind.
def test_moving_average_cancellation_takes_the_batch_range_where_torch_inverts():
  torch, tobs = _torch()
  batches = [np.array([-1e30, 0], np.float32), np.array([-5, -1], np.float32)]
  t = tobs.MovingAverageMinMaxObserver(averaging_constant=1.0)
  for b in batches:
    t(torch.from_numpy(b))
  assert t.min_val.item() > t.max_val.item()  # torch: min 0 > max -1 ...
  with pytest.raises(AssertionError):
    t.calculate_qparams()  # ... and its calculate_qparams asserts
  obs = jo.MovingAverageMinMaxObserver(averaging_constant=1.0)
  state = _observe(obs, batches)
  assert (float(state.min_val), float(state.max_val)) == (-5.0, -1.0)
  scale, zero_point = obs.calculate_qparams(state)
  assert float(scale) == np.float32(5.0) / np.float32(255) and int(zero_point) == 255
  per_channel = jo.MovingAveragePerChannelMinMaxObserver(averaging_constant=1.0, ch_axis=1)
  state = _observe(per_channel, [np.stack([b, b / 2], axis=1) for b in batches])
  assert state.min_val.tolist() == [-5.0, -2.5] and state.max_val.tolist() == [-1.0, -0.5]


# Rows 2 and 9: one rule for a degenerate range in calculate_qparams (hand-built states).
@pytest.mark.parametrize("jit", [False, True])
def test_degenerate_ranges_get_the_default_qparams_never_eps(jit):
  obs = jo.PerChannelMinMaxObserver(ch_axis=0)
  state = jo.MinMaxState(
    min_val=jnp.array([-1.0, jnp.inf, 0.0, jnp.nan]), max_val=jnp.array([1.0, -jnp.inf, -1.0, 2.0])
  )
  if jit:
    scale, zero_point = jax.jit(obs.calculate_qparams)(state)
  else:
    with pytest.warns(UserWarning, match="degenerate range"):  # eager calls say so
      scale, zero_point = obs.calculate_qparams(state)
  assert scale.tolist()[1:] == [1.0, 1.0, 1.0] and zero_point.tolist()[1:] == [0, 0, 0]
  assert scale.tolist()[0] == float(np.float32(2.0) / np.float32(255))
  assert bool(obs.degenerate(state))
  assert not bool(obs.degenerate(obs.init(jnp.zeros((4, 2)))))  # never observed: not degenerate
  with pytest.warns(UserWarning, match="degenerate range"):
    obs.calculate_qparams(jax.tree.map(np.asarray, state))  # eager
  tensor = jo.MinMaxObserver()
  inverted = jo.MinMaxState(min_val=jnp.float32(0.0), max_val=jnp.float32(-1.0))
  with pytest.warns(UserWarning, match="degenerate range"):
    assert float(tensor.calculate_qparams(inverted).scale) == 1.0


# Row 9: averaging_constant=0 and an infinite batch value: no 0 * inf.
@pytest.mark.parametrize("c", [0.0, 0.5, 1.0])
def test_moving_average_never_turns_nan_for_any_constant(c):
  obs = jo.MovingAverageMinMaxObserver(averaging_constant=c)
  state = _observe(obs, [np.array([-2.0, 3.0]), np.array([np.inf, 1.0]), np.array([-np.inf])])
  assert not np.isnan(state.min_val) and not np.isnan(state.max_val)
  assert float(state.min_val) <= float(state.max_val)
  if c == 0.0:
    assert (float(state.min_val), float(state.max_val)) == (-2.0, 3.0)  # the limit c -> 0
  assert not np.isnan(obs.calculate_qparams(state).scale)


# Row 3: NaN ranges and bad counts in a histogram state dict.
def test_histogram_loader_refuses_nan_ranges_and_bad_counts():
  obs = jo.HistogramObserver(bins=8)
  d = jo.state_dict(obs, _observe(obs, [np.linspace(-1, 1, 50)]))
  with pytest.raises(ValueError, match=r"state_dict\['min_val'\].*NaN"):
    jo.load_state_dict(obs, {**d, "min_val": np.float32(np.nan)})
  fresh = jo.load_state_dict(obs, {**d, "min_val": np.float32(np.nan)}, strict=False)
  assert float(fresh.min_val) == np.inf and float(fresh.max_val) == -np.inf
  assert fresh.histogram.sum() == 0  # the poisoned entry's counts go with it
  for bad, reason in ((-1.0, ">= 0"), (np.inf, "finite"), (np.nan, "finite")):
    hist = d["histogram"].copy()
    hist[3] = bad
    with pytest.raises(ValueError, match=rf"state_dict\['histogram'\].*{reason}"):
      jo.load_state_dict(obs, {**d, "histogram": hist}, strict=False)
  fresh_d = jo.state_dict(obs, obs.init(jnp.zeros(2)))
  with pytest.raises(ValueError, match="observed nothing"):
    jo.load_state_dict(obs, {**fresh_d, "histogram": np.ones(8, np.float32)})


def test_pow2_counts_past_int32_saturate_instead_of_wrapping():
  obs = jo.HistogramObserver(bins=8, range_policy="pow2")
  d = jo.state_dict(obs, _observe(obs, [np.array([0.5, 0.5])]))
  hist = d["histogram"].astype(np.int64)
  hist[hist > 0] = 3 * 2**31
  loaded = jo.load_state_dict(obs, {**d, "histogram": hist})
  assert loaded.histogram.max() == 2**31 - 1


# Row 4: the caller's torch module is never changed by loading from it.
def test_loading_from_a_torch_module_leaves_its_buffers_resizable():
  torch, tobs = _torch()
  tp = tobs.PerChannelMinMaxObserver()
  obs = jo.PerChannelMinMaxObserver()
  d = tp.state_dict()
  state = jo.load_state_dict(obs, d)
  tp(torch.ones(3, 4))  # torch resizes its empty [0] buffers: must still work
  assert tp.min_val.shape == (3,) and state.min_val.shape == (0,)
  ours = {"eps": np.array([jo.FLOAT32_EPS], np.float32), "min_val": np.zeros(()), "max_val": 1.0}
  copy = {k: np.array(v) for k, v in ours.items()}
  loaded = jo.load_state_dict(jo.MinMaxObserver(), ours)
  loaded.min_val[...] = 7  # the loaded arrays are our own copies
  for k in ours:
    np.testing.assert_array_equal(ours[k], copy[k])


# Row 5: states of the other range policy.
def test_histogram_update_refuses_the_other_policys_state():
  x = jnp.linspace(-1.0, 1.0, 32)
  torch_obs = jo.HistogramObserver(bins=16)
  pow2_obs = jo.HistogramObserver(bins=16, range_policy="pow2")
  calibrator = jo.HistogramPercentileObserver(bins=16)  # pow2 by default
  with pytest.raises(ValueError, match=r"range_policy='torch'.*range_policy='pow2'"):
    torch_obs.update(calibrator.init(x), x)
  with pytest.raises(ValueError, match=r"range_policy='pow2'.*range_policy='torch'"):
    pow2_obs.update(torch_obs.init(x), x)
  with pytest.raises(ValueError, match="range_policy"):
    calibrator.update(torch_obs.init(x), x)  # the shared accumulate checks it too
  with pytest.raises(ValueError, match="range_policy"):
    jax.jit(torch_obs.calculate_qparams)(pow2_obs.init(x))


# Row 6: states from other observers.
def test_calculate_qparams_names_the_state_it_expects():
  x = jnp.linspace(-1.0, 1.0, 32)
  obs = jo.HistogramObserver(bins=64)
  with pytest.raises(ValueError, match=r"histogram must have shape \[64\]"):
    obs.calculate_qparams(jo.HistogramObserver(bins=32).init(x))
  with pytest.raises(ValueError, match="expects a HistogramState"):
    obs.calculate_qparams(jo.MinMaxObserver().init(x))
  with pytest.raises(ValueError, match="expects a MinMaxState"):
    jo.MinMaxObserver().calculate_qparams(obs.init(x))
  with pytest.raises(ValueError, match="expects a MinMaxState"):
    jo.MinMaxObserver().update(obs.init(x), x)
  with pytest.raises(ValueError, match=r"min_val must have shape \[\]"):
    jo.MinMaxObserver().calculate_qparams(jo.PerChannelMinMaxObserver().init(x[:, None]))
  with pytest.raises(ValueError, match="expects a FixedQParamsState"):
    jo.FixedQParamsObserver(scale=0.1, zero_point=0).calculate_qparams(obs.init(x))


# Row 7: x / upsample_rate is one division, as torch's.
@pytest.mark.parametrize("upsample_rate", [3, 7, 16])
def test_histogram_upsampling_by_any_rate_is_bit_exact(upsample_rate):
  torch, tobs = _torch()
  rng = np.random.default_rng(upsample_rate)
  batches = [(rng.standard_normal(700) * s).astype(np.float32) for s in (1, 2.5, 6, 13)]
  t = tobs.HistogramObserver(bins=128)
  t.upsample_rate = upsample_rate  # torch 2.13 fixes it at 16 in __init__; the attribute is used
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for b in batches:
      t(torch.from_numpy(b))
  obs = jo.HistogramObserver(bins=128, upsample_rate=upsample_rate)
  state = _observe(obs, batches)
  np.testing.assert_array_equal(np.asarray(state.histogram), t.histogram.numpy())


# Row 8: a histogram range wider than float32's max.
def test_histogram_range_past_float32_max_gives_torchs_inf_scale_not_nan():
  torch, tobs = _torch()
  batches = [np.array([-3e38, -1], np.float32), np.array([3e38, 1], np.float32)]
  t = tobs.HistogramObserver()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for b in batches:
      t(torch.from_numpy(b))
    t_scale, t_zp = t.calculate_qparams()
  obs = jo.HistogramObserver()
  scale, zero_point = obs.calculate_qparams(_observe(obs, batches))
  assert float(scale) == t_scale.item() == np.inf and int(zero_point) == t_zp.item()


# Row 10: NumPy scalars are config values as torch takes them.
def test_numpy_scalars_are_accepted_as_config_values():
  eps = np.finfo(np.float32).eps
  assert jo.MinMaxObserver(eps=eps) == jo.MinMaxObserver(eps=float(eps))
  obs = jo.MovingAverageMinMaxObserver(averaging_constant=np.float32(0.1), quant_min=np.int64(0))
  assert type(obs.averaging_constant) is float and obs.averaging_constant == float(np.float32(0.1))
  hist = jo.HistogramObserver(bins=np.int64(64), upsample_rate=np.int32(4))
  assert hist == jo.HistogramObserver(bins=64, upsample_rate=4) and type(hist.bins) is int
  per_channel = jo.PerChannelMinMaxObserver(ch_axis=np.int64(1))
  assert hash(per_channel) == hash(jo.PerChannelMinMaxObserver(ch_axis=1))
  fixed = jo.FixedQParamsObserver(scale=np.float32(1 / 256), zero_point=np.int64(0))
  assert fixed.scale == 1 / 256 and type(fixed.zero_point) is int
  assert jo.HistogramPercentileObserver(bins=np.int64(32)).bins == 32


# Row 11: bf16 torch buffers and empty arrays in state dicts.
def test_bfloat16_buffers_load_exactly_and_empty_values_name_their_key():
  torch, tobs = _torch()
  t = tobs.MinMaxObserver()
  t(torch.tensor([-1.3, 2.7]))
  t = t.to(torch.bfloat16)
  state = jo.load_state_dict(jo.MinMaxObserver(), t.state_dict(), strict=False)
  assert float(state.min_val) == t.min_val.float().item()  # exact: every bf16 is a float32
  assert float(state.max_val) == t.max_val.float().item()
  d = jo.state_dict(jo.MinMaxObserver(), state)
  with pytest.raises(ValueError, match=r"state_dict\['eps'\] = float32\[0\]"):
    jo.load_state_dict(jo.MinMaxObserver(), {**d, "eps": np.zeros(0, np.float32)})
  fq = jo.FakeQuantize()
  fd = jo.state_dict(fq, fq.init(jnp.zeros(3)))
  with pytest.raises(ValueError, match=r"state_dict\['fake_quant_enabled'\]"):
    jo.load_state_dict(fq, {**fd, "fake_quant_enabled": np.zeros(0, np.uint8)})


# Row 12: forward mode through every fake-quant op, equal to reverse mode.
def _ops():
  s1, z1 = jnp.array([0.1]), jnp.array([3.0])
  sc, zc = jnp.array([0.05, 0.2, 0.1]), jnp.array([-2.0, 0.0, 5.0])
  return {
    "per_tensor": lambda x: jo.fake_quantize_per_tensor_affine(x, 0.1, 3, -8, 7),
    "per_channel": lambda x: jo.fake_quantize_per_channel_affine(
      x, sc, zc.astype(jnp.int32), 1, -8, 7
    ),
    "learnable_per_tensor": lambda x, s=s1, z=z1: jo.fake_quantize_learnable_per_tensor_affine(
      x, s, z, -8, 7
    ),
    "learnable_per_channel": lambda x, s=sc, z=zc: jo.fake_quantize_learnable_per_channel_affine(
      x, s, z, 1, -8, 7
    ),
  }


@pytest.mark.parametrize("name", list(_ops()))
def test_forward_mode_works_and_equals_reverse_mode(name):
  f = _ops()[name]
  x = jnp.linspace(-1.5, 1.5, 12).reshape(4, 3)
  y, y_dot = jax.jvp(f, (x,), (jnp.ones_like(x),))
  np.testing.assert_array_equal(y, f(x))
  np.testing.assert_array_equal(jax.jacfwd(f)(x), jax.jacrev(f)(x))
  np.testing.assert_array_equal(y_dot, jax.grad(lambda x: f(x).sum())(x))
  if name.startswith("learnable"):
    s = jnp.array([0.1]) if name.endswith("tensor") else jnp.array([0.05, 0.2, 0.1])
    g = lambda s: f(x, s=s)
    np.testing.assert_allclose(jax.jacfwd(g)(s), jax.jacrev(g)(s), rtol=1e-6)


# Row 13: the flush-to-zero scope: subnormal *results* from normal inputs flush too.
def test_a_subnormal_scale_from_a_normal_range_flushes_to_zero_as_documented():
  torch, tobs = _torch()
  obs = jo.MinMaxObserver(dtype=jnp.int32, qscheme=jo.per_tensor_symmetric, eps=0.0)
  scale, _ = obs.calculate_qparams(_observe(obs, [np.array([-1e-29], np.float32)]))
  t = tobs.MinMaxObserver(dtype=torch.qint32, qscheme=torch.per_tensor_symmetric, eps=0.0)
  t(torch.tensor([-1e-29]))
  t_scale = t.calculate_qparams()[0].item()
  assert 0 < t_scale < np.finfo(np.float32).tiny  # torch: a subnormal scale
  assert float(scale) == 0.0  # XLA:CPU flushes the subnormal result (README deviation row)


# Done point 2/3: the shared helpers the calibrators' loader and checks can call as they are.
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("policy", ["pow2", "torch"])
def test_histogram_loader_and_state_check_serve_the_calibrators(per_channel, policy):
  from jax_observers._src.histogram import accumulate, grids
  from jax_observers._src.histogram import observer as histogram

  kw = {"ch_axis": 0, "qscheme": jo.per_channel_symmetric} if per_channel else {}
  obs = jo.HistogramPercentileObserver(bins=16, range_policy=policy, **kw)
  x = jnp.linspace(-1.0, 3.0, 50).reshape(5, 10)
  state = obs.update(obs.init(x), x)
  d = jo.state_dict(obs, state)
  loaded = histogram.histogram_from_dict(obs, d, strict=True, channels=per_channel, mode=obs.mode)
  np.testing.assert_array_equal(loaded.histogram, state.histogram)
  assert loaded.histogram.dtype == grids.policy(policy).count_dtype
  channels = (None,) if per_channel else ()
  accumulate.check_state(obs, state, "calculate_qparams", channels, grids.policy(policy))
  other = "torch" if policy == "pow2" else "pow2"
  with pytest.raises(ValueError, match=f"range_policy={other!r}"):
    accumulate.check_state(obs, state, "calculate_qparams", channels, grids.policy(other))
  negative = {**d, "histogram": -np.abs(d["histogram"]) - 1}
  with pytest.raises(ValueError, match=r"state_dict\['histogram'\].*>= 0"):
    histogram.histogram_from_dict(obs, negative, strict=True, channels=per_channel, mode=obs.mode)


def test_histogram_search_over_a_subnormal_range_is_silent_and_matches_torch():
  torch, tobs = _torch()
  x = np.array([1e-38, 1.2e-38, 2e-38, 1.1e-38], np.float32)
  t = tobs.HistogramObserver(bins=16)
  t(torch.from_numpy(x))
  obs = jo.HistogramObserver(bins=16)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # the host search used to warn (divide by zero) here
    scale, zero_point = obs.calculate_qparams(_observe(obs, [x]))
  t_scale, t_zp = t.calculate_qparams()
  assert float(scale) == t_scale.item() and int(zero_point) == t_zp.item()
