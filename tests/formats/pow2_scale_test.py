"""Power-of-two scales: exact rounding against a frexp reference, and the observer wrapper vs torch."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from torch_oracle import assert_same, torch_run

import jax_observers as jo

MODES = ["floor", "ceil", "round"]


def reference_pow2(v: float, mode: str) -> np.float32:
  """``v`` rounded to a power of two with exact float64 arithmetic (v = m 2**e, m in [0.5, 1))."""
  if v == 0 or not math.isfinite(v):
    return np.float32(v)
  m, e = math.frexp(abs(v))
  k = e - 1  # floor(log2 |v|)
  if mode == "ceil":
    k += m != 0.5
  elif mode == "round":
    k += (2 * m) ** 2 > 2  # 2m has 24 bits: its square is exact in float64
  out = math.inf if k >= 128 else 2.0**k
  return np.float32(math.copysign(out, v))


def float32_values(rng):
  bits = rng.integers(0, 2**32, 3000, dtype=np.uint64).astype(np.uint32)  # every float32 class
  special = np.array(
    [
      0.0,
      -0.0,
      1.0,
      1.5,
      0.75,
      np.sqrt(2),
      3.4028235e38,
      1e-45,
      1.1754942e-38,
      np.inf,
      -np.inf,
      np.nan,
    ],
    np.float32,
  )
  powers = np.float32(2.0) ** rng.integers(-149, 128, 200).astype(np.float32)
  near = np.concatenate(
    [np.nextafter(powers, np.float32(0)), np.nextafter(powers, np.float32(np.inf))]
  )
  return np.concatenate([bits.view(np.float32), special, powers, near])


@pytest.mark.parametrize("mode", MODES)
def test_pow2_round_is_exact_for_every_float32_class(mode):
  x = float32_values(np.random.default_rng(MODES.index(mode)))
  ours = np.asarray(jax.jit(jo.pow2_round, static_argnums=1)(x, mode))
  expected = np.array([reference_pow2(float(v), mode) for v in x], np.float32)
  np.testing.assert_array_equal(
    ours.view(np.uint32)[~np.isnan(x)], expected.view(np.uint32)[~np.isnan(x)]
  )
  assert np.isnan(ours[np.isnan(x)]).all()


OBSERVERS = [
  jo.MinMaxObserver(dtype=jnp.int8, qscheme=jo.per_tensor_symmetric),
  jo.MovingAveragePerChannelMinMaxObserver(ch_axis=0),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("inner", OBSERVERS, ids=lambda o: type(o).__name__)
def test_wrapper_gives_torchs_scale_rounded_and_its_zero_point(inner, mode):
  rng = np.random.default_rng(7)
  batches = [(rng.standard_normal((6, 5)) * 3 + 1).astype(np.float32) for _ in range(3)]
  obs = jo.Pow2ScaleObserver(observer=inner, mode=mode)
  state, (scale, zero_point) = jax.jit(lambda bs: _run(obs, bs))(batches)
  chex.assert_trees_all_equal(state, _run(inner, batches)[0])
  _, t_scale, t_zp = torch_run(inner, batches)
  assert_same(scale, np.array([reference_pow2(float(s), mode) for s in t_scale.reshape(-1)]))
  assert_same(zero_point, t_zp)
  if mode == "ceil":  # the wider grid still covers the observed range (to half a step)
    qmin, qmax = inner.quant_range
    s, z = np.asarray(scale, np.float64), np.asarray(zero_point, np.float64)
    lo, hi = np.minimum(state.min_val, 0), np.maximum(state.max_val, 0)
    assert np.all(lo >= (qmin - z - 0.5) * s) and np.all(hi <= (qmax - z + 0.5) * s)


def _run(obs, batches):
  state = obs.init(batches[0])
  for b in batches:
    state = obs.update(state, b)
  return state, obs.calculate_qparams(state)


def test_wrapper_works_on_new_observers_and_state_dicts_delegate():
  x = np.random.default_rng(8).standard_normal((4, 64)).astype(np.float32)
  inner = jo.AffineQuantizedMinMaxObserver(
    mapping_type=jo.MappingType.SYMMETRIC, target_dtype=jnp.int4, granularity=jo.PerGroup(32)
  )
  for wrapped in (inner, jo.Float8Observer(granularity=jo.PerRow())):
    obs = jo.Pow2ScaleObserver(observer=wrapped, mode="floor")

    @jax.jit
    def run(x, obs=obs, wrapped=wrapped):
      state, qp = _run(obs, [x])
      expected = jo.pow2_scale(wrapped.calculate_qparams(state), "floor")
      round_trip = obs.dequantize(obs.quantize(x, qp), qp)
      return state, qp, expected, round_trip, wrapped.dequantize(wrapped.quantize(x, qp), qp)

    state, qp, expected, ours, theirs = run(x)
    chex.assert_trees_all_equal(qp, expected)
    assert_same(ours, theirs)
    assert jo.state_dict(obs, state).keys() == jo.state_dict(wrapped, state).keys()
  torch = pytest.importorskip("torch")
  t = torch.ao.quantization.MinMaxObserver()
  t(torch.from_numpy(x))
  obs = jo.Pow2ScaleObserver(observer=jo.MinMaxObserver())
  state = jo.load_state_dict(obs, t.state_dict())
  assert float(state.min_val) == float(x.min())


def test_invalid_configs_name_the_argument():
  with pytest.raises(ValueError, match="mode='nearest'"):
    jo.Pow2ScaleObserver(observer=jo.MinMaxObserver(), mode="nearest")
  with pytest.raises(ValueError, match="observer=3"):
    jo.Pow2ScaleObserver(observer=3)
  with pytest.raises(ValueError, match="mode='up'"):
    jo.pow2_round(jnp.ones(2), "up")
  with pytest.raises(ValueError, match=r"observer=PlaceholderObserver\(...\) has no quantization"):
    jo.Pow2ScaleObserver(observer=jo.PlaceholderObserver())
