"""Affine observers and choose/quantize/dequantize_affine: the torch-free core checks.

Parity with torchao 0.18 itself (live calls, random configs) is tests/torchao_parity_test.py.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_observers as jo

MAPPINGS = list(jo.MappingType)


def assert_same(ours, expected, what=""):
  """Bit-exact equality of float arrays (NaN == NaN), value equality for integers."""
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(expected), err_msg=what)


def random_batch(rng, kind, shape):
  assert kind == "normal"
  return (rng.standard_normal(shape) * 10.0 ** rng.uniform(-3, 3)).astype(np.float32)


CLASSES = [jo.AffineQuantizedMinMaxObserver, jo.AffineQuantizedMovingAverageMinMaxObserver]


def test_granularities_are_hashable_values():
  assert jo.PerRow() == jo.PerRow() and hash(jo.PerToken()) == hash(jo.PerToken())
  assert jo.PerBlock([1, 128]) == jo.PerBlock((1, 128))
  assert jo.get_block_size((2, 3, 256), jo.PerBlock((128, 128))) == (1, 128, 128)
  assert jo.get_block_size((4, 6, 8), jo.PerGroup(4)) == (1, 1, 4)


def test_default_eps_follows_each_torchao_counterpart():
  """torchao 0.18: finfo(dtype).smallest_normal; its pt2e moving-average observer: finfo.eps."""
  zeros = np.zeros((2, 4), np.float32)
  sym = jo.MappingType.SYMMETRIC
  assert float(jo.choose_qparams_affine(zeros, sym, jo.PerTensor(), jnp.int8).scale) == float(
    np.finfo(np.float32).smallest_normal
  )
  half = jo.choose_qparams_affine(jnp.zeros((2, 4), jnp.float16), sym, jo.PerTensor(), jnp.int8)
  assert float(half.scale) == float(np.finfo(np.float16).smallest_normal)
  defaults = (np.finfo(np.float32).smallest_normal, np.finfo(np.float32).eps)
  for cls, eps in zip(CLASSES, defaults, strict=True):
    obs = cls(mapping_type=sym, target_dtype=jnp.int8, granularity=jo.PerTensor())
    assert float(obs.calculate_qparams(obs.update(obs.init(zeros), zeros)).scale) == float(eps)


def test_degenerate_range_is_allowed_and_one_bit_codes_name_the_fix():
  x = np.array([-1.0, 2.0], np.float32)
  qp = jo.choose_qparams_affine(x, jo.MappingType.ASYMMETRIC, jo.PerTensor(), jnp.int8, 3, 3)
  assert np.isinf(float(qp.scale)) and int(qp.zero_point) == 3  # 3 / 0 = inf, as torchao
  with pytest.raises(ValueError, match="quant_min=3, quant_max=2"):
    jo.choose_qparams_affine(x, jo.MappingType.ASYMMETRIC, jo.PerTensor(), jnp.int8, 3, 2)
  with pytest.raises(ValueError, match="int2 with quant_min=-1, quant_max=0"):
    jo.quantize_affine(x, jo.PerTensor(), np.float32(1), np.int32(0), jnp.int1)


def test_dequantize_int32_codes_subtract_in_float_not_int32():
  q = np.array([2147483000, -2147483000], np.int32)
  z = np.array([-1000, 1000], np.int32)
  out = np.asarray(jo.dequantize_affine(q, (1,), np.ones(2, np.float32), z, jnp.int32))
  expected = q.astype(np.float32) - z.astype(np.float32)  # torchao: float32 q - float32 z
  assert_same(out, expected)
  assert out[0] > 2**31 and out[1] < -(2**31)  # an int32 subtraction would wrap the sign


def test_bf16_dequantize_rounds_each_step():
  """FLOAT domain to bfloat16: q - c, then the product, then the sum, each rounded (torchao)."""
  q = jnp.array([[7, 0, 15, 6]], jnp.uint4)
  scale, zp = np.array([[0.3]], np.float32), np.array([[0.1]], np.float32)
  out = jo.dequantize_affine(
    q, (1, 4), scale, zp, jnp.uint4, zero_point_domain=jo.ZeroPointDomain.FLOAT,
    output_dtype=jnp.bfloat16,
  )  # fmt: skip
  bf = lambda v: np.asarray(jnp.asarray(np.float32(v)).astype(jnp.bfloat16), np.float32)
  codes = np.array([7, 0, 15, 6], np.float32) - np.float32(8)
  expected = bf(bf(bf(codes) * scale[0, 0]) + zp[0, 0])
  assert out.dtype == jnp.bfloat16
  assert_same(np.asarray(out, np.float32)[0], expected)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_token_axes_reduce_tokens_so_batch_and_sequence_length_do_not_matter(cls):
  rng = np.random.default_rng(3)
  average = cls is jo.AffineQuantizedMovingAverageMinMaxObserver
  obs = cls(
    mapping_type=jo.MappingType.ASYMMETRIC,
    target_dtype=jnp.uint4,
    granularity=jo.PerGroup(16),
    token_axes=2,
    **({"averaging_constant": 0.5} if average else {}),
  )
  batches = [random_batch(rng, "normal", (b, t, 64)) for b, t in ((2, 5), (3, 7), (1, 1))]
  state = obs.init(batches[0])
  assert state.min_val.shape == (4,)
  update = jax.jit(obs.update)
  expected_lo = expected_hi = None
  for x in batches:
    state = update(state, x)
    assert state.min_val.shape == (4,)
    groups = x.reshape(-1, 4, 16)  # tokens, groups, group elements
    lo, hi = groups.min(axis=(0, 2)), groups.max(axis=(0, 2))
    if expected_lo is None or not average:
      expected_lo = lo if expected_lo is None else np.minimum(expected_lo, lo)
      expected_hi = hi if expected_hi is None else np.maximum(expected_hi, hi)
    else:
      c = np.float32(0.5)
      expected_lo = expected_lo + c * (lo - expected_lo)
      expected_hi = expected_hi + c * (hi - expected_hi)
  assert_same(state.min_val, expected_lo)
  assert_same(state.max_val, expected_hi)
  # qparams from the reduced state broadcast over any token count
  qp = obs.calculate_qparams(state)
  x = batches[1]
  q = obs.quantize(x, qp)
  assert q.shape == x.shape and q.dtype == jnp.uint4
  s = np.repeat(np.asarray(qp.scale), 16)
  z = np.repeat(np.asarray(qp.zero_point), 16)
  inside = (x >= (0 - z) * s) & (x <= (15 - z) * s)
  err = np.abs(np.asarray(obs.dequantize(q, qp)) - x)
  assert np.all(err[inside] <= (s / 2 + 2.0**-20 * (np.abs(x) + s))[inside])


def test_per_token_default_state_is_one_range_per_tensor():
  obs = jo.AffineQuantizedMinMaxObserver(
    mapping_type=jo.MappingType.SYMMETRIC, target_dtype=jnp.int8, granularity=jo.PerToken()
  )
  x = np.arange(24, dtype=np.float32).reshape(2, 3, 4) - 5
  state = obs.update(obs.init(x), x)
  assert state.min_val.shape == ()
  assert float(state.min_val) == -5 and float(state.max_val) == 18
  # token_axes=0 is torchao's per-token state, one range per token
  per_token = obs.replace(token_axes=0)
  state = per_token.update(per_token.init(x), x)
  assert_same(state.min_val, x.min(axis=-1))


def test_nan_is_skipped_and_ignore_nonfinite_skips_inf():
  obs = jo.AffineQuantizedMinMaxObserver(
    mapping_type=jo.MappingType.ASYMMETRIC, target_dtype=jnp.uint8, granularity=jo.PerAxis(0)
  )
  x = np.array([[np.nan, 1.0, -2.0], [np.nan] * 3, [np.inf, 0.5, 1.0]], np.float32)
  state = jax.jit(obs.update)(obs.init(x), x)
  assert_same(state.min_val, np.array([-2.0, np.inf, 0.5], np.float32))
  assert_same(state.max_val, np.array([1.0, -np.inf, np.inf], np.float32))
  qp = obs.calculate_qparams(state)
  assert float(qp.scale[1]) == 1.0 and int(qp.zero_point[1]) == 0  # a block that saw nothing
  state = obs.replace(ignore_nonfinite=True).update(obs.init(x), x)
  assert float(state.max_val[2]) == 1.0


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"mapping_type": "SYMMETRIC"}, "mapping_type='SYMMETRIC'"),
    ({"target_dtype": jnp.float32}, "target_dtype='float32'"),
    ({"granularity": "per_tensor"}, "granularity='per_tensor'"),
    ({"quant_min": -9}, "quant_min=-9"),
    ({"quant_min": 3, "quant_max": 2}, "quant_min=3, quant_max=2"),
    ({"preserve_zero": False}, "preserve_zero=False"),
    ({"zero_point_domain": jo.ZeroPointDomain.FLOAT}, "zero_point_domain=FLOAT"),
    ({"zero_point_domain": None}, "use NONE"),
    ({"eps": float("nan")}, "eps=nan"),
    ({"token_axes": -1}, "token_axes=-1"),
  ],
)
def test_invalid_configs_name_the_argument(kwargs, match):
  base = {
    "mapping_type": jo.MappingType.SYMMETRIC,
    "target_dtype": jnp.int4,
    "granularity": jo.PerTensor(),
  }
  with pytest.raises(ValueError, match=match):
    jo.AffineQuantizedMinMaxObserver(**{**base, **kwargs})


def test_shape_errors_are_raised_at_trace_time_and_name_the_shapes():
  obs = jo.AffineQuantizedMinMaxObserver(
    mapping_type=jo.MappingType.SYMMETRIC, target_dtype=jnp.int8, granularity=jo.PerAxis(0)
  )
  with pytest.raises(ValueError, match=r"shape \(3,\).*\(5, 2\)"):
    jax.jit(obs.update)(obs.init(jnp.ones((3, 2))), jnp.ones((5, 2)))
  with pytest.raises(ValueError, match="token_axes=1 reduces it"):
    obs.replace(token_axes=1).init(jnp.ones((3, 2)))
  with pytest.raises(TypeError, match="floating-point"):
    obs.init(jnp.ones(3, jnp.int32))


def test_state_dict_round_trip_and_example_shape_check():
  obs = jo.AffineQuantizedMinMaxObserver(
    mapping_type=jo.MappingType.SYMMETRIC, target_dtype=jnp.int4, granularity=jo.PerGroup(4)
  )
  x = np.arange(16, dtype=np.float32).reshape(2, 8)
  state = obs.update(obs.init(x), x)
  d = jo.state_dict(obs, state)
  assert sorted(d) == ["max_val", "min_val"] and d["min_val"].shape == (2, 2)
  chex.assert_trees_all_equal(jo.load_state_dict(obs, d, example=x), state)
  with pytest.raises(ValueError, match="shape"):
    jo.load_state_dict(obs, d, example=np.zeros((2, 16), np.float32))
  with pytest.raises(ValueError, match="unexpected keys"):
    jo.load_state_dict(obs, {**d, "eps": np.ones(1)})


@pytest.mark.parametrize(
  "shape, axes",
  [
    ((3, 4096), (0, 1)),
    ((5, 1000), (1,)),
    ((7, 331), (0, 1)),
    ((6, 3, 384), (0, 2)),
    ((9, 130), (0,)),
  ],
)
def test_block_min_max_schedule_is_exact_with_nan_and_inf(shape, axes):
  """The chunked (min, max) schedule against NumPy, masked pass included."""
  from jax_observers._src import stats

  rng = np.random.default_rng(sum(shape))
  x = rng.standard_normal(shape).astype(np.float32) * 100
  x.flat[rng.integers(x.size, size=5)] = np.nan
  x.flat[rng.integers(x.size, size=2)] = np.inf
  for ignore in (False, True):
    lo, hi = jax.jit(lambda x, i=ignore: stats.batch_min_max(x, axes, ignore_nonfinite=i))(x)
    kept = np.where(np.isfinite(x) if ignore else ~np.isnan(x), x, np.nan)
    assert_same(lo, np.nanmin(kept, axis=axes))
    assert_same(hi, np.nanmax(kept, axis=axes))
