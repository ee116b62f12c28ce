"""HistogramObserver against torch 2.13 (live), the pow2 policy, non-finite values and device sync."""

import functools
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from registry import sharded

import jax_observers as jo
from jax_observers._src.histogram import arithmetic, search_host

torch = pytest.importorskip("torch")

N = 1024  # values per batch: one shape, so each config compiles once.


def _torch_observer(bins, dtype, qscheme, **kw):
  qdtype = {np.uint8: torch.quint8, np.int8: torch.qint8}[dtype]
  tq = torch.per_tensor_affine if qscheme == jo.per_tensor_affine else torch.per_tensor_symmetric
  return torch.ao.quantization.HistogramObserver(bins=bins, dtype=qdtype, qscheme=tq, **kw)


def _batch(rng, kind, scale):
  if kind == "normal":
    x = rng.standard_normal(N) * scale
  elif kind == "laplace":
    x = rng.laplace(rng.uniform(-3, 3), 1, N)
  elif kind == "constant":
    x = np.full(N, rng.uniform(-2, 2))
  elif kind == "cauchy":
    x = rng.standard_cauchy(N)
  elif kind == "spikes":
    x = rng.choice([0.0, 1.0], N)
  else:
    x = rng.uniform(-1, 1, N) * scale
  x = x.astype(np.float32)
  if rng.random() < 0.25:
    x[rng.integers(0, N, 3)] = rng.choice([np.inf, -np.inf], 3)
  return x


@functools.cache
def _jitted(obs):
  return jax.jit(obs.update), jax.jit(obs.calculate_qparams)


@pytest.mark.parametrize("bins", [100, 2048])
@pytest.mark.parametrize(
  "dtype,qscheme",
  [
    (np.uint8, jo.per_tensor_affine),
    (np.int8, jo.per_tensor_symmetric),
    (np.int8, jo.per_tensor_affine),
  ],
)
def test_matches_torch_bit_for_bit(bins, dtype, qscheme):
  """Random multi-batch streams whose range grows, shrinks or stays: state and qparams bit-exact."""
  rng = np.random.default_rng(bins * 7 + np.dtype(dtype).itemsize + len(qscheme.value))
  obs = jo.HistogramObserver(bins=bins, dtype=dtype, qscheme=qscheme)
  update, qparams = _jitted(obs)
  for _ in range(5):
    tobs = _torch_observer(bins, dtype, qscheme)
    state = obs.init(np.zeros(N, np.float32))
    scale = 1.0
    for _ in range(rng.integers(1, 5)):
      kind = rng.choice(["normal", "laplace", "constant", "cauchy", "spikes", "uniform"])
      scale *= float(rng.choice([0.5, 1.0, 1.0, 3.0]))  # shrink, stay or grow
      x = _batch(rng, kind, scale)
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tobs(torch.from_numpy(x))
      state = update(state, x)
    np.testing.assert_array_equal(np.asarray(state.histogram), tobs.histogram.numpy())
    assert float(state.min_val) == tobs.min_val.item()
    assert float(state.max_val) == tobs.max_val.item()
    t_scale, t_zp = tobs.calculate_qparams()
    scale_, zp = qparams(state)
    assert np.asarray(scale_) == np.float32(t_scale.item())
    assert int(zp) == int(t_zp.item())


def test_repeated_range_growth_matches_torch():
  """Eight growing 64k batches: each re-binning adds the old mass to the new counts as torch does.

  XLA once folded ``update + scatter(zeros, ...)`` into ``scatter(update, ...)``, which diverged
  from torch from the fifth batch on.
  """
  x = np.random.default_rng(11).standard_normal(1 << 16).astype(np.float32)
  obs = jo.HistogramObserver()
  update = jax.jit(obs.update)
  state, tobs = obs.init(x), torch.ao.quantization.HistogramObserver()
  for k in range(8):
    batch = x * np.float32(1 + 0.01 * k)
    state = update(state, batch)
    tobs(torch.from_numpy(batch))
    np.testing.assert_array_equal(np.asarray(state.histogram), tobs.histogram.numpy())


def test_linspace_and_upscale_match_torch():
  rng = np.random.default_rng(1)
  for _ in range(20):
    a, b = np.sort(rng.standard_normal(2).astype(np.float32) * np.float32(10 ** rng.uniform(-3, 3)))
    n = int(rng.choice([2, 101, 2049, 32769]))
    ref = torch.linspace(torch.tensor(a), torch.tensor(b), n).numpy()
    np.testing.assert_array_equal(np.asarray(arithmetic.linspace(a, b, n)), ref)
  tobs = torch.ao.quantization.HistogramObserver(bins=256)
  upscale = jax.jit(arithmetic.upscale)
  for _ in range(10):
    hist = (rng.integers(0, 1000, 256) / 16.0 ** rng.integers(0, 3)).astype(np.float32)
    lo = np.float32(rng.standard_normal())
    hi = np.float32(lo + rng.uniform(0.01, 3))
    new_lo, new_hi = np.float32(lo - rng.uniform(0, 5)), np.float32(hi + rng.uniform(0, 5))
    args = [torch.tensor(v) for v in (lo, hi, new_lo, new_hi)]
    ref = tobs._upscale_histogram(torch.tensor(hist), *args).numpy()
    np.testing.assert_array_equal(np.asarray(upscale(hist, lo, hi, new_lo, new_hi)), ref)


def test_search_skips_idle_steps_like_torch():
  """'Two spikes' makes torch's loop run ~1e5 idle iterations; the skip must end in the same place."""
  hist = np.zeros(2048, np.float32)
  hist[0], hist[-1] = 5000.0, 3000.0
  tobs = torch.ao.quantization.HistogramObserver()
  tobs.histogram.copy_(torch.from_numpy(hist))
  tobs.min_val.fill_(0.0)
  tobs.max_val.fill_(1.0)
  expected = [v.item() for v in tobs._non_linear_param_search()]
  got = search_host.l2_search(hist, 0.0, 1.0, 256)
  assert [float(v) for v in got] == expected


def test_never_observed_gives_torch_default():
  obs = jo.HistogramObserver()
  scale, zp = jax.jit(obs.calculate_qparams)(obs.init(jnp.zeros(3)))
  assert float(scale) == 1.0 and int(zp) == 0


def test_nonfinite_values_are_dropped():
  """NaN (torch: RuntimeError) and ±inf (torch: dropped) never enter the state."""
  obs = jo.HistogramObserver(bins=64)
  x = np.random.default_rng(2).standard_normal(N).astype(np.float32)
  dirty = x.copy()
  dirty[:5] = [np.nan, np.inf, -np.inf, np.nan, np.inf]
  clean = obs.update(obs.init(x), x[5:])
  got = obs.update(obs.init(x), dirty)
  np.testing.assert_array_equal(np.asarray(got.histogram), np.asarray(clean.histogram))
  assert float(got.min_val) == float(clean.min_val) and float(got.max_val) == float(clean.max_val)
  unchanged = obs.update(got, np.full(N, np.nan, np.float32))
  np.testing.assert_array_equal(np.asarray(unchanged.histogram), np.asarray(got.histogram))
  assert np.isfinite(np.asarray(obs.calculate_qparams(unchanged).scale))


@pytest.mark.parametrize(
  "kwargs,error",
  [
    ({"dtype": jnp.float8_e4m3fn}, ValueError),
    ({"qscheme": jo.per_channel_affine}, NotImplementedError),
    ({"is_dynamic": True}, NotImplementedError),
    ({"bins": 0}, ValueError),
    ({"range_policy": "pow2", "bins": 100}, ValueError),
    ({"ignore_nonfinite": False}, ValueError),
  ],
)
def test_config_errors(kwargs, error):
  with pytest.raises(error, match=next(iter(kwargs))):
    jo.HistogramObserver(**kwargs)


def test_dst_nbins_ignores_quant_range():
  assert jo.default_histogram_observer().dst_nbins == 256
  assert jo.HistogramObserver(dtype=jnp.int16).dst_nbins == 65536


def test_state_dict_round_trip_with_torch():
  rng = np.random.default_rng(3)
  obs = jo.default_histogram_observer()
  tobs = torch.ao.quantization.default_histogram_observer()
  state = obs.init(np.zeros(N, np.float32))
  for _ in range(3):
    x = _batch(rng, "laplace", 1.0)
    state = obs.update(state, x)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      tobs(torch.from_numpy(x))
  ours = jo.state_dict(obs, state)
  assert sorted(ours) == sorted(tobs.state_dict())
  fresh = torch.ao.quantization.default_histogram_observer()
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in ours.items()})
  assert fresh.calculate_qparams()[0].item() == tobs.calculate_qparams()[0].item()
  loaded = jo.load_state_dict(obs, tobs.state_dict())
  np.testing.assert_array_equal(np.asarray(loaded.histogram), np.asarray(state.histogram))
  assert obs.calculate_qparams(loaded).scale == obs.calculate_qparams(state).scale


def test_pow2_policy_is_batch_split_invariant():
  rng = np.random.default_rng(4)
  data = np.concatenate([rng.standard_normal(3000), 50 * rng.standard_cauchy(72)])
  data = rng.permutation(data).astype(np.float32)

  def run(obs, parts):
    update = jax.jit(obs.update)
    state = obs.init(data)
    for part in np.split(data, parts):
      state = update(state, part)
    return state

  obs = jo.HistogramObserver(bins=256, range_policy="pow2")
  a, b, whole = run(obs, 2), run(obs, 3), run(obs, 1)
  for field in ("histogram", "min_val", "max_val"):
    np.testing.assert_array_equal(np.asarray(getattr(a, field)), np.asarray(getattr(b, field)))
    np.testing.assert_array_equal(np.asarray(getattr(a, field)), np.asarray(getattr(whole, field)))
  assert int(np.asarray(a.histogram).sum()) == data.size
  assert obs.calculate_qparams(a) == obs.calculate_qparams(b)
  # the torch policy depends on the split: that is why pow2 exists.
  torch_obs = jo.HistogramObserver(bins=256)
  assert not np.array_equal(
    np.asarray(run(torch_obs, 2).histogram), np.asarray(run(torch_obs, 3).histogram)
  )


def test_vmap_equals_loop():
  obs = jo.HistogramObserver(bins=64)
  xs = np.random.default_rng(5).standard_normal((3, N)).astype(np.float32) * np.float32(
    [[1], [2], [5]]
  )
  init = jax.vmap(obs.init)(xs)
  batched = jax.jit(jax.vmap(obs.update))(init, xs)
  lo, hi = jax.jit(jax.vmap(obs.search_range))(batched)
  for i in range(3):
    one = obs.update(obs.init(xs[i]), xs[i])
    np.testing.assert_array_equal(np.asarray(batched.histogram[i]), np.asarray(one.histogram))
    assert (lo[i], hi[i]) == obs.search_range(one)


def test_vmap_qparams_equal_loop():
  obs = jo.HistogramObserver(bins=64)
  xs = np.random.default_rng(5).standard_normal((3, N)).astype(np.float32) * np.float32(
    [[1], [2], [5]]
  )
  batched = jax.vmap(obs.update)(jax.vmap(obs.init)(xs), xs)
  qp = jax.jit(jax.vmap(obs.calculate_qparams))(batched)
  for i in range(3):
    one = obs.update(obs.init(xs[i]), xs[i])
    assert qp.scale[i] == obs.calculate_qparams(one).scale


@pytest.mark.parametrize("policy", ["torch", "pow2"])
def test_axis_name_sync_equals_global_batch(policy):
  """shard_map over 8 host devices: every device ends with the state of the global batch."""
  obs = jo.HistogramObserver(bins=128, range_policy=policy)
  rng = np.random.default_rng(6)
  batches = [rng.standard_normal(8 * 64).astype(np.float32) * s for s in (1.0, 3.0)]

  @sharded
  def synced(state, x):
    return obs.update(state, x, axis_name="data")

  state = global_state = obs.init(batches[0])
  for x in batches:
    state = synced(state, x)
    global_state = obs.update(global_state, x)
  for field in ("histogram", "min_val", "max_val"):
    np.testing.assert_array_equal(
      np.asarray(getattr(state, field)), np.asarray(getattr(global_state, field))
    )


def test_search_option_is_validated_and_both_searches_agree():
  with pytest.raises(ValueError, match="search='gpu'"):
    jo.HistogramObserver(search="gpu")
  rng = np.random.default_rng(5)
  for bins in (64, 2048):
    x = jnp.asarray(rng.standard_normal(4096).astype(np.float32) ** 3)
    device, host = jo.HistogramObserver(bins=bins), jo.HistogramObserver(bins=bins, search="host")
    state = device.update(device.init(x), x)
    chex.assert_trees_all_equal(device.calculate_qparams(state), host.calculate_qparams(state))
