"""Affine observers and torchao's choose/quantize/dequantize_affine against torch ops, bit for bit.

The oracle (tests/torchao_oracle.py) is torch 2.13's live granularities, ``get_block_size`` and
``AffineQuantizedObserverBase``, with torchao's formulas in torch float32 ops where torch lacks them.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torchao_oracle as ref
from torch_oracle import INPUT_KINDS, assert_same, random_batch

import jax_observers as jo

torch = pytest.importorskip("torch")
tobs = torch.ao.quantization.observer

MAPPINGS = list(jo.MappingType)
DTYPES = [jnp.int8, jnp.uint8, jnp.int4, jnp.uint4, jnp.int2, jnp.uint2, jnp.int16]


def random_granularity(rng, shape):
  n = len(shape)
  kind = rng.integers(6)
  if kind == 0:
    return jo.PerTensor()
  if kind == 1:
    return jo.PerAxis(int(rng.integers(-n, n)))
  if kind == 2:
    return jo.PerGroup(int(rng.choice([d for d in (1, 2, 4, 8, shape[-1]) if shape[-1] % d == 0])))
  if kind == 3:
    return jo.PerRow()
  if kind == 4:
    return jo.PerToken()
  k = int(rng.integers(1, n + 1))
  return jo.PerBlock(tuple(int(rng.choice([1, 2, s])) if s % 2 == 0 else 1 for s in shape[-k:]))


def random_config(rng, cls, shape, **fixed):
  mapping = MAPPINGS[rng.integers(3)]
  dtype = DTYPES[rng.integers(len(DTYPES))]
  kw = {
    "mapping_type": mapping,
    "target_dtype": dtype,
    "granularity": random_granularity(rng, shape),
    "eps": [None, 2.0**-12, 1e-3, 0.0][rng.integers(4)],
    "token_axes": 0,
  }
  lo, hi = int(jnp.iinfo(dtype).min), int(jnp.iinfo(dtype).max)
  if rng.random() < 0.3 and hi - lo > 2:
    qmin = int(rng.integers(lo, lo + (hi - lo) // 3 + 1))
    qmax = int(rng.integers(max(qmin + 1, 1), hi + 1))  # qmax 0 divides by 0 in NO_CLIPPING_ERR
    kw.update(quant_min=qmin, quant_max=qmax)
  if mapping == jo.MappingType.ASYMMETRIC:
    domain = list(jo.ZeroPointDomain)[rng.integers(3)]
    kw.update(zero_point_domain=domain, preserve_zero=bool(rng.random() < 0.7))
  elif rng.random() < 0.2:
    kw.update(zero_point_domain=jo.ZeroPointDomain.NONE)
  if issubclass(cls, jo.AffineQuantizedMovingAverageMinMaxObserver):
    kw["averaging_constant"] = float(rng.choice([0.01, 0.5, 1.0, float(rng.random())]))
  kw.update(fixed)
  return cls(**kw)


SHAPES = [(8,), (4, 8), (3, 4), (2, 4, 8), (1, 2)]  # a small pool: eager ops compile once per shape


def random_shape(rng):
  return SHAPES[rng.integers(len(SHAPES))]


def observe(obs, batches):
  """State and qparams after ``batches``, in one jit (one compile per trial)."""

  def run(batches):
    state = obs.init(batches[0])
    for b in batches:
      state = obs.update(state, b)
    return state, obs.calculate_qparams(state)

  return jax.jit(run)(batches)


def torch_twin(obs, shape):
  """torchao's observer; where the block is all ones, with our documented per-element fix."""
  quirk = not ref.all_ones_block(ref.block_size(shape, obs.granularity), shape)
  return ref.TorchaoMinMaxObserver(obs, getattr(obs, "averaging_constant", None), quirk)


def assert_qparams_match(qp, t_scale, t_zp, obs, what):
  assert_same(qp.scale, t_scale.numpy(), what)
  if t_zp is None:
    np.testing.assert_array_equal(qp.zero_point, 0, what)
  else:
    assert_same(qp.zero_point, t_zp.numpy().astype(np.asarray(qp.zero_point).dtype), what)
  float_zp = obs.zero_point_domain == jo.ZeroPointDomain.FLOAT
  assert qp.zero_point.dtype == (jnp.float32 if float_zp else jnp.int32)


CLASSES = [jo.AffineQuantizedMinMaxObserver, jo.AffineQuantizedMovingAverageMinMaxObserver]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_random_configs_and_inputs_match_torchao(cls):
  rng = np.random.default_rng(5 + CLASSES.index(cls))
  for trial in range(18 if cls is jo.AffineQuantizedMinMaxObserver else 10):
    shape = random_shape(rng)
    obs = random_config(rng, cls, shape)
    kinds = rng.choice(INPUT_KINDS, rng.integers(1, 4))
    batches = [random_batch(rng, k, shape) for k in kinds]
    state, qp = observe(obs, batches)
    twin = torch_twin(obs, shape)
    for b in batches:
      twin(torch.from_numpy(b))
    what = f"trial {trial}: {obs} shape {shape} on {list(kinds)}"
    assert_same(state.min_val, twin.min_val.numpy(), what)
    assert_same(state.max_val, twin.max_val.numpy(), what)
    assert_qparams_match(qp, *twin.calculate_qparams(), obs, what)


def test_jit_equals_torchao_on_group_wise_int4_weights():
  rng = np.random.default_rng(0)
  w = (rng.standard_normal((64, 256)) * np.exp(rng.uniform(-3, 3, (64, 1)))).astype(np.float32)
  for mapping in MAPPINGS:
    for dtype in (jnp.int4, jnp.uint4):
      qp = jax.jit(
        lambda w, m=mapping, d=dtype: jo.choose_qparams_affine(w, m, jo.PerGroup(32), d)
      )(w)
      mn, mx = ref.block_min_max(torch.from_numpy(w), (1, 32))
      lo, hi = int(jnp.iinfo(dtype).min), int(jnp.iinfo(dtype).max)
      t_scale, t_zp = ref.qparams_with_min_max(mn, mx, mapping.name, lo, hi, jo.FLOAT32_EPS)
      assert_same(qp.scale, t_scale.numpy(), f"{mapping} {dtype}")
      assert_same(qp.zero_point, t_zp.numpy().astype(np.int32), f"{mapping} {dtype}")


def test_choose_quantize_dequantize_affine_match_torchao():
  rng = np.random.default_rng(1)
  for trial in range(14):
    shape = random_shape(rng)
    obs = random_config(rng, jo.AffineQuantizedMinMaxObserver, shape)
    x = random_batch(rng, rng.choice(INPUT_KINDS), shape)
    block = ref.block_size(shape, obs.granularity)
    args = (obs.mapping_type, obs.granularity, obs.target_dtype, obs.quant_min, obs.quant_max)
    kw = {"zero_point_domain": obs.zero_point_domain}
    qp = jax.jit(
      lambda x, a=args, o=obs, k=kw: jo.choose_qparams_affine(x, *a, o.eps, o.preserve_zero, **k)
    )(x)
    qmin, qmax = obs.quant_range
    eps = jo.FLOAT32_EPS if obs.eps is None else obs.eps
    quirk = not ref.all_ones_block(block, shape)
    mn, mx = ref.block_min_max(torch.from_numpy(x), block, quirk)
    domain = obs.zero_point_domain.name
    t_scale, t_zp = ref.qparams_with_min_max(
      mn, mx, obs.mapping_type.name, qmin, qmax, eps, obs.preserve_zero, domain
    )
    what = f"trial {trial}: {obs} {shape}"
    assert_qparams_match(qp, t_scale, t_zp, obs, what)
    if not np.all((np.asarray(qp.scale) > 0) & np.isfinite(qp.scale)):
      continue  # eps=0 on zeros, or a NaN scale: torchao's codes are NaN before its cast
    quantize = jax.jit(jo.quantize_affine, static_argnums=(1, 4, 5, 6, 7))
    dequantize = jax.jit(jo.dequantize_affine, static_argnums=(1, 4, 5, 6, 7))
    domain_enum = obs.zero_point_domain
    q = quantize(x, obs.granularity, *qp, obs.target_dtype, qmin, qmax, domain_enum)
    tq = ref.quantize(torch.from_numpy(x), block, t_scale, t_zp, qmin, qmax, domain)
    assert q.dtype == obs.target_dtype
    assert_same(np.asarray(q, np.float32), tq.numpy(), what)
    deq = dequantize(q, obs.granularity, *qp, obs.target_dtype, qmin, qmax, domain_enum)
    tdeq = ref.dequantize(tq, block, t_scale, t_zp, qmin, qmax, domain)
    assert_same(deq, tdeq.numpy(), what)


def test_get_block_size_matches_torch_where_torch_has_it():
  rng = np.random.default_rng(2)
  for _ in range(100):
    shape = random_shape(rng)
    g = random_granularity(rng, shape)
    tg = ref.torch_granularity(g)
    if tg is None or (isinstance(g, jo.PerGroup) and len(shape) != 2):
      continue
    assert jo.get_block_size(shape, g) == tuple(tobs.get_block_size(shape, tg)), (shape, g)


def test_all_ones_blocks_stay_per_element_where_torchao_collapses_the_tensor():
  """Deviation: torchao reduces over an empty dim list, and torch.amin(v, dim=[]) reduces all."""
  x = np.array([[1.0, -4.0], [2.0, 8.0]], np.float32)
  for g in (jo.PerGroup(1), jo.PerBlock((1, 1))):
    obs = jo.AffineQuantizedMinMaxObserver(
      mapping_type=jo.MappingType.SYMMETRIC, target_dtype=jnp.int8, granularity=g
    )
    state = obs.update(obs.init(x), x)
    assert_same(state.min_val, x)
    twin = ref.TorchaoMinMaxObserver(obs)
    twin(torch.from_numpy(x))
    assert twin.min_val.shape == () and float(twin.min_val) == -4.0


def test_granularities_have_torchs_values_and_equality():
  assert jo.PerRow() == jo.PerRow() and hash(jo.PerToken()) == hash(jo.PerToken())
  assert jo.PerBlock([1, 128]) == jo.PerBlock((1, 128))
  assert [m.value for m in jo.MappingType] == [m.value for m in tobs.MappingType]
  assert [d.name for d in jo.ZeroPointDomain] == [d.name for d in tobs.ZeroPointDomain]
  assert jo.get_block_size((2, 3, 256), jo.PerBlock((128, 128))) == (1, 128, 128)
  assert jo.get_block_size((4, 6, 8), jo.PerGroup(4)) == (1, 1, 4)  # torch 2.13: 2-D only
  with pytest.raises(AssertionError):
    tobs.get_block_size((4, 6, 8), tobs.PerGroup(4))


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


def test_padding_gives_modelopt_ort_qparams_and_keeps_partial_blocks_exact():
  rng = np.random.default_rng(4)
  w = random_batch(rng, "normal", (6, 200))
  padded = np.pad(w, ((0, 0), (0, 56)))  # ONNX Runtime / ModelOpt: zeros to a multiple of 128
  for mapping in MAPPINGS:
    obs = jo.AffineQuantizedMinMaxObserver(
      mapping_type=mapping,
      target_dtype=jnp.int4,
      granularity=jo.PerGroup(128),
      pad_partial_blocks=True,
    )
    qp = obs.calculate_qparams(obs.update(obs.init(w), w))
    mn, mx = ref.block_min_max(torch.from_numpy(padded), (1, 128))
    t_scale, t_zp = ref.qparams_with_min_max(mn, mx, mapping.name, -8, 7, jo.FLOAT32_EPS)
    assert_qparams_match(qp, t_scale, t_zp, obs, str(mapping))
    q = obs.quantize(w, qp)
    assert q.shape == w.shape
    tq = ref.quantize(torch.from_numpy(padded), (1, 128), t_scale, t_zp, -8, 7)
    assert_same(np.asarray(q, np.float32), tq.numpy()[:, :200])
  # without preserve_zero, the padding must not enter the statistics: edge values, not zeros
  obs = jo.AffineQuantizedMinMaxObserver(
    mapping_type=jo.MappingType.ASYMMETRIC,
    target_dtype=jnp.uint8,
    granularity=jo.PerGroup(128),
    preserve_zero=False,
    zero_point_domain=jo.ZeroPointDomain.FLOAT,
    pad_partial_blocks=True,
  )
  shifted = w + 100
  state = obs.update(obs.init(shifted), shifted)
  assert_same(state.min_val[:, 1], shifted[:, 128:].min(axis=1))
  with pytest.raises(ValueError, match="pad_partial_blocks=True"):
    obs.replace(pad_partial_blocks=False).init(w)


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
  from jax_observers._src import reduce

  rng = np.random.default_rng(sum(shape))
  x = rng.standard_normal(shape).astype(np.float32) * 100
  x.flat[rng.integers(x.size, size=5)] = np.nan
  x.flat[rng.integers(x.size, size=2)] = np.inf
  for ignore in (False, True):
    lo, hi = jax.jit(lambda x, i=ignore: reduce.batch_min_max(x, axes, ignore_nonfinite=i))(x)
    kept = np.where(np.isfinite(x) if ignore else ~np.isnan(x), x, np.nan)
    assert_same(lo, np.nanmin(kept, axis=axes))
    assert_same(hi, np.nanmax(kept, axis=axes))
