"""Float8Observer against torchao's float8 scale formula (torch ops) and torch's live fp8 casts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torchao_oracle as ref
from torch_oracle import INPUT_KINDS, assert_same, random_batch

import jax_observers as jo

torch = pytest.importorskip("torch")

FP8 = {
  np.dtype(jnp.float8_e4m3fn): torch.float8_e4m3fn,
  np.dtype(jnp.float8_e5m2): torch.float8_e5m2,
}
SHAPES = [(8,), (4, 8), (2, 4, 8)]
GRANULARITIES = [
  jo.PerTensor(),
  jo.PerRow(),
  jo.PerAxis(0),
  jo.PerBlock((1, 4)),
  jo.PerBlock((2, 4)),
  jo.PerToken(),
]


def observe(obs, batches):
  def run(batches):
    state = obs.init(batches[0])
    for b in batches:
      state = obs.update(state, b)
    qp = obs.calculate_qparams(state)
    return state, qp, obs.quantize(batches[-1], qp)

  return jax.jit(run)(batches)


def test_random_granularities_and_inputs_match_torchao_and_torch_casts():
  rng = np.random.default_rng(0)
  for trial in range(12):
    shape = SHAPES[rng.integers(len(SHAPES))]
    g = GRANULARITIES[rng.integers(len(GRANULARITIES))]
    if isinstance(g, jo.PerBlock) and len(g.block_size) > len(shape):
      g = jo.PerRow()
    dtype = list(FP8)[rng.integers(2)]
    ub = [None, 100.0][rng.integers(2)]
    obs = jo.Float8Observer(dtype=dtype, granularity=g, token_axes=0, hp_value_ub=ub)
    kinds = rng.choice([k for k in INPUT_KINDS if k != "zeros"], rng.integers(1, 4))
    batches = [random_batch(rng, k, shape) for k in kinds]
    state, qp, q = observe(obs, batches)
    block = ref.block_size(shape, g)
    amax = None
    for b in batches:
      a = ref.float8_block_amax(torch.from_numpy(b), block, torchao_quirk=False)
      amax = a if amax is None else torch.max(amax, a)
    what = f"trial {trial}: {obs} {shape} {list(kinds)}"
    assert_same(state.amax, amax.numpy(), what)
    t_scale = ref.float8_scale(amax, FP8[dtype], hp_value_lb=obs.eps, hp_value_ub=ub)
    assert_same(qp.scale, t_scale.numpy(), what)
    if ub is None:  # above the floor, torchao's default (no clamp) gives the same scale
      plain = ref.float8_scale(amax, FP8[dtype]).numpy()
      above = amax.numpy() >= obs.eps
      assert_same(np.asarray(qp.scale).reshape(plain.shape)[above], plain[above], what)
    # torchao's _quantize_affine_float8: x / scale, clamp to +-max, torch's cast
    view, dims = ref.reduction_params(block, shape)
    after = [1 if i in dims else n for i, n in enumerate(view)]
    x = torch.from_numpy(batches[-1]).reshape(view) / t_scale.reshape(after)
    fmax = torch.finfo(FP8[dtype]).max
    tq = x.clamp(-fmax, fmax).to(FP8[dtype]).reshape(shape)
    assert q.dtype == dtype
    np.testing.assert_array_equal(
      np.asarray(q).view(np.uint8), tq.view(torch.uint8).numpy(), err_msg=what
    )


def test_an_all_zero_block_has_a_finite_scale_where_torchao_gives_nan():
  w = np.array([[0.0, 0.0, 0.0, 0.0], [1.0, -2.0, 0.5, 0.0]], np.float32)
  obs = jo.Float8Observer(granularity=jo.PerRow())
  qp = obs.calculate_qparams(obs.update(obs.init(w), w))
  q = obs.quantize(w, qp)
  assert np.isfinite(qp.scale).all() and (np.asarray(qp.scale) > 0).all()
  np.testing.assert_array_equal(np.asarray(obs.dequantize(q, qp))[0], 0.0)
  # torchao (hp_value_lb=None): scale 0, and 0 / 0 = NaN after quantization
  t_scale = ref.float8_scale(
    ref.float8_block_amax(torch.from_numpy(w), (1, 4)), torch.float8_e4m3fn
  )
  assert float(t_scale[0]) == 0.0
  assert torch.isnan((torch.from_numpy(w[0]) / t_scale[0]).to(torch.float8_e4m3fn).float()).all()


def test_scale_from_amax_function_and_saturating_quantize():
  amax = np.array([448.0, 57344.0, 1e-20, 3.0], np.float32)
  for dtype, tdtype in FP8.items():
    ours = jo.float8_scale_from_amax(amax, dtype)
    assert_same(ours, ref.float8_scale(torch.from_numpy(amax), tdtype, hp_value_lb=1e-12).numpy())
  obs = jo.Float8Observer()
  qp = jo.QParams(scale=jnp.float32(1.0), zero_point=jnp.int32(0))
  q = obs.quantize(jnp.array([1000.0, -1e6, 464.0]), qp)  # JAX's plain cast would give NaN
  np.testing.assert_array_equal(np.asarray(q, np.float32), [448.0, -448.0, 448.0])


def test_token_axes_reduce_tokens_into_the_state():
  obs = jo.Float8Observer(granularity=jo.PerBlock((1, 4)), token_axes=2)
  rng = np.random.default_rng(1)
  update = jax.jit(obs.update)
  xs = [random_batch(rng, "normal", s) for s in ((2, 3, 8), (1, 5, 8))]
  state = obs.init(xs[0])
  for x in xs:
    state = update(state, x)
  expected = np.max([np.abs(x).reshape(-1, 2, 4).max(axis=(0, 2)) for x in xs], axis=0)
  assert_same(state.amax, expected)
  assert obs.quantize(xs[1], obs.calculate_qparams(state)).shape == (1, 5, 8)


def test_nan_is_skipped_and_inf_enters_unless_ignored():
  obs = jo.Float8Observer(granularity=jo.PerAxis(0))
  x = np.array([[np.nan, 2.0], [np.inf, 1.0], [np.nan, np.nan]], np.float32)
  state = jax.jit(obs.update)(obs.init(x), x)
  np.testing.assert_array_equal(state.amax, [2.0, np.inf, 0.0])
  state = obs.replace(ignore_nonfinite=True).update(obs.init(x), x)
  np.testing.assert_array_equal(state.amax, [2.0, 1.0, 0.0])


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"dtype": jnp.int8}, "dtype='int8'"),
    ({"eps": 0.0}, "eps=0.0"),
    ({"hp_value_ub": 1e-20}, "hp_value_ub=1e-20"),
    ({"granularity": None}, "granularity=None"),
  ],
)
def test_invalid_configs_name_the_argument(kwargs, match):
  with pytest.raises(ValueError, match=match):
    jo.Float8Observer(**kwargs)
