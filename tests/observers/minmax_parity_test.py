"""MinMaxObserver and MovingAverageMinMaxObserver against torch 2.13, live, bit for bit."""

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from torch_oracle import INPUT_KINDS, assert_same, random_batch, random_config, torch, torch_run

import jax_observers as jo

CLASSES = [jo.MinMaxObserver, jo.MovingAverageMinMaxObserver]


def run(obs, batches, jit):
  update = jax.jit(obs.update) if jit else obs.update
  qparams = jax.jit(obs.calculate_qparams) if jit else obs.calculate_qparams
  state = obs.init(batches[0])
  for b in batches:
    state = update(state, b)
  return state, qparams(state)


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_random_configs_and_inputs_match_torch(cls, jit):
  rng = np.random.default_rng(1 + 2 * CLASSES.index(cls) + jit)
  for trial in range(40 if jit else 15):
    obs = random_config(rng, cls)
    shape = tuple(rng.integers(1, 6, rng.integers(0, 4)))
    kinds = rng.choice(INPUT_KINDS, rng.integers(1, 5))
    batches = [random_batch(rng, k, shape) for k in kinds]
    state, (scale, zero_point) = run(obs, batches, jit)
    t, t_scale, t_zp = torch_run(obs, batches)
    what = f"trial {trial}: {obs} on {list(kinds)}"
    assert_same(state.min_val, t.min_val.numpy(), what)
    assert_same(state.max_val, t.max_val.numpy(), what)
    assert_same(scale, t_scale, what)
    assert_same(zero_point, t_zp, what)


@pytest.mark.parametrize(
  "x, kw",
  [
    ([-126.5, 128.5], {}),  # E1: half-to-even zero point
    ([-127.5, 127.5], {}),
    ([-15.358901023864746, 14.424519538879395], {}),  # E2: float32 scale
    ([0.0, 0.0], {}),  # E5: scale = eps
    ([3.0, 3.0], {}),
    ([-3.0, -3.0], {}),
    ([-1.0, np.inf], {}),  # E7: inf propagates as in torch
    ([-np.inf, 1.0], {"dtype": jnp.int8}),
    ([-1.0, 2.0], {"qscheme": jo.per_tensor_symmetric}),  # E9 zero points
    ([-1.0, 2.0], {"qscheme": jo.per_tensor_symmetric, "quant_min": 0, "quant_max": 255}),
    ([-1.0, 2.0], {"qscheme": jo.per_tensor_symmetric, "dtype": jnp.uint16}),
    ([-1.0, 2.0], {"dtype": jnp.int32}),
    ([-1.0, 2.0], {"dtype": jnp.float8_e4m3fn}),  # E11: torch's (0, 15)
    ([-1.0, 2.0], {"dtype": jnp.int8, "quant_min": -127, "quant_max": 127, "reduce_range": True}),
    ([-1e-6, 1e-6], {"eps": 2.0**-12}),
    ([1e-30, 3e-30], {"eps": 0.0}),
  ],
)
def test_reference_edge_cases_match_torch(x, kw):
  obs = jo.MinMaxObserver(**kw)
  batch = np.array(x, np.float32)
  _state, (scale, zero_point) = run(obs, [batch], jit=True)
  _, t_scale, t_zp = torch_run(obs, [batch])
  assert_same(scale, t_scale)
  assert_same(zero_point, t_zp)


def test_reduce_range_custom_range_floors_both_ends():
  obs = jo.MinMaxObserver(dtype=jnp.int8, quant_min=-127, quant_max=127, reduce_range=True)
  t = torch.ao.quantization.MinMaxObserver(
    dtype=torch.qint8, quant_min=-127, quant_max=127, reduce_range=True
  )
  assert obs.quant_range == (t.quant_min, t.quant_max) == (-64, 63)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_nan_is_skipped_instead_of_poisoning_the_state(cls):
  """Deviation: torch's running min/max become NaN forever; ours equal torch on the NaN-free data."""
  rng = np.random.default_rng(7)
  batches = [random_batch(rng, "normal", (4, 5)) for _ in range(3)]
  dirty = [b.copy() for b in batches]
  dirty[1][0, 0] = np.nan
  dirty.append(np.full((4, 5), np.nan, np.float32))  # a batch of NaN only changes nothing
  obs = cls(dtype=jnp.int8)
  state, (scale, zero_point) = run(obs, dirty, jit=True)
  clean = [b[~np.isnan(b)] for b in dirty[:3]]
  t, t_scale, t_zp = torch_run(obs, clean)
  assert_same(state.min_val, t.min_val.numpy())
  assert_same(state.max_val, t.max_val.numpy())
  assert_same(scale, t_scale)
  assert_same(zero_point, t_zp)
  _, poisoned, _ = torch_run(obs, dirty[:2])
  assert np.isnan(poisoned).all()  # what torch does, for the record


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_ignore_nonfinite_drops_infinities_too(cls):
  rng = np.random.default_rng(8)
  batches = [random_batch(rng, "normal", (6,)) for _ in range(3)]
  batches[1][2], batches[2][0] = np.inf, -np.inf
  obs = cls(ignore_nonfinite=True)
  state, (scale, zero_point) = run(obs, batches, jit=True)
  _, t_scale, t_zp = torch_run(obs, [b[np.isfinite(b)] for b in batches])
  assert_same(scale, t_scale)
  assert_same(zero_point, t_zp)
  state, _ = run(cls(), batches, jit=True)
  assert state.max_val == np.inf and state.min_val == -np.inf if cls is jo.MinMaxObserver else True


def test_moving_average_recovers_after_an_inf_batch():
  """Deviation (E8): torch's running max turns NaN after an inf batch; ours takes the next batch."""
  obs = jo.MovingAverageMinMaxObserver(averaging_constant=0.5)
  batches = [np.array(b, np.float32) for b in ([-1.0, 2.0], [0.0, np.inf], [0.0, 1.0])]
  state, _ = run(obs, batches, jit=True)
  t, _, _ = torch_run(obs, batches)
  assert np.isnan(t.max_val.item())
  assert float(state.max_val) == 1.0  # what torch's fused kernel does (reference section 3.5)
  assert_same(state.min_val, t.min_val.numpy())


def test_moving_average_is_not_the_one_minus_c_form():
  """m + c(x - m), three roundings: differs from (1-c)m + cx in the last bits over many steps."""
  rng = np.random.default_rng(3)
  obs = jo.MovingAverageMinMaxObserver(averaging_constant=0.013)
  batches = [random_batch(rng, "normal", (3,)) for _ in range(200)]
  state, _ = run(obs, batches, jit=True)
  t, _, _ = torch_run(obs, batches)
  assert_same(state.min_val, t.min_val.numpy())
  assert_same(state.max_val, t.max_val.numpy())


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_empty_input_and_fresh_state(cls):
  obs = cls()
  state = obs.init(jnp.zeros(3))
  chex.assert_trees_all_equal(jax.jit(obs.update)(state, jnp.zeros((0, 4))), state)
  scale, zero_point = obs.calculate_qparams(state)
  assert float(scale) == 1.0 and int(zero_point) == 0
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    t_scale, t_zp = torch.ao.quantization.MinMaxObserver().calculate_qparams()
  assert float(scale) == t_scale.item() and int(zero_point) == t_zp.item()


def test_low_precision_inputs_keep_float32_state():
  obs = jo.MinMaxObserver()
  for dtype in (jnp.bfloat16, jnp.float16):
    x = jnp.array([-1.5, 3.25, 0.1], dtype)
    state = jax.jit(obs.update)(obs.init(x), x)
    assert state.min_val.dtype == state.max_val.dtype == jnp.float32
    assert float(state.max_val) == float(x.astype(jnp.float32).max())


@pytest.mark.parametrize(
  "kwargs, error, match",
  [
    ({"qscheme": jo.per_channel_affine}, NotImplementedError, "qscheme"),
    ({"qscheme": "per_tensor_affine"}, ValueError, "qscheme"),
    ({"dtype": jnp.float32}, ValueError, "dtype"),
    ({"dtype": jnp.int64}, ValueError, "dtype"),
    ({"quant_min": 1, "quant_max": 5}, ValueError, "include 0"),
    ({"quant_min": 0, "quant_max": 0}, ValueError, "less than"),
    ({"dtype": jnp.int8, "quant_min": -300, "quant_max": 300}, ValueError, "int8"),
    ({"eps": float("nan")}, ValueError, "eps"),
    ({"averaging_constant": 1.5}, ValueError, "averaging_constant"),
    ({"averaging_constant": 0.5, "is_dynamic": True}, NotImplementedError, "is_dynamic"),
  ],
)
def test_bad_configs_are_refused_naming_the_argument(kwargs, error, match):
  with pytest.raises(error, match=match):
    jo.MovingAverageMinMaxObserver(**kwargs)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.complex64, jnp.bool_])
def test_non_float_inputs_fail_at_trace_time(dtype):
  obs = jo.MinMaxObserver()
  state = obs.init(jnp.zeros(3))
  with pytest.raises(TypeError, match="floating-point"):
    jax.jit(obs.update)(state, jnp.zeros(3, dtype))


def test_uint8_symmetric_reduce_range_keeps_zero_point_in_range():
  """Deviation: torch.quint8 refuses this config, torch.uint8 returns zero_point 128 outside [0, 127]."""
  obs = jo.MinMaxObserver(dtype=jnp.uint8, qscheme=jo.per_tensor_symmetric, reduce_range=True)
  x = jnp.array([-1.0, 2.0])
  scale, zero_point = obs.calculate_qparams(obs.update(obs.init(x), x))
  t = torch.ao.quantization.MinMaxObserver(
    dtype=torch.uint8, qscheme=torch.per_tensor_symmetric, reduce_range=True
  )
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    t(torch.tensor([-1.0, 2.0]))
    t_scale, t_zp = t.calculate_qparams()
  assert t_zp.item() == 128 and not 0 <= t_zp.item() <= 127  # torch's bug
  assert int(zero_point) == 64 and obs.quant_range == (0, 127)
  assert_same(scale, t_scale.numpy())
  with pytest.raises(NotImplementedError):
    torch.ao.quantization.MinMaxObserver(qscheme=torch.per_tensor_symmetric, reduce_range=True)
