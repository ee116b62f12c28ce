"""Delayed scaling against flax's fp8_ops (live) and a NumPy reference of Transformer Engine's update.

TE JAX ``DelayedScaleQuantizer.update`` (published algorithm): put the batch amax in slot 0, take
``max(history)`` or ``history[0]``, ``scale = (fp8_max / amax) / 2**margin`` where amax is positive
and finite (else keep the scale), then roll the history by -1 and zero slot 0. TE's scale is a
multiplier; its dequantization scale is ``scale_inv = 1 / scale``, which our state holds.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_observers as jo

fp8_ops = pytest.importorskip("flax.linen.fp8_ops")

DTYPES = [jnp.float8_e4m3fn, jnp.float8_e5m2]


def te_reference(amaxes, fp8_max, history_len, algo, margin):
  """TE's delayed-scaling update in float32 NumPy; yields (scale_inv, window) after each step."""
  f32 = np.float32
  hist = np.zeros(history_len, f32)
  scale = f32(1.0)
  for a in amaxes:
    hist[0] = a
    amax = hist.max() if algo == "max" else hist[0]
    if amax > 0 and np.isfinite(amax):
      scale = f32(f32(f32(fp8_max) / amax) / f32(2.0**margin))
    window = hist.copy()
    hist = np.roll(hist, -1)
    hist[0] = 0
    yield f32(f32(1.0) / scale), window


def batches(rng, n, shape=(4, 6), zero_every=None, inf_at=()):
  out = []
  for i in range(n):
    x = rng.standard_normal(shape) * 10.0 ** rng.uniform(-4, 4)
    if zero_every and i % zero_every == zero_every - 1:
      x = np.zeros(shape)
    if i in inf_at:
      x.flat[0] = np.inf
    out.append(x.astype(np.float32))
  return out


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("history_len", [1, 6])
def test_matches_flax_fp8_ops_update_live(dtype, history_len):
  rng = np.random.default_rng(history_len)
  obs = jo.Float8DelayedScalingObserver(dtype=dtype, history_len=history_len)
  update = jax.jit(obs.update)
  flax_update = jax.jit(fp8_ops.update_fp8_meta, static_argnums=1)
  fp8_max = fp8_ops.get_fp8_max(dtype, jnp.float32)
  quantize = jax.jit(obs.quantize)
  state = obs.init()
  scale, hist = jnp.ones((), jnp.float32), jnp.zeros((history_len,), jnp.float32)
  for t, x in enumerate(batches(rng, 2 * history_len + 5)):
    state = update(state, x)
    scale, hist = flax_update(x, dtype, scale, hist)  # flax's scale for step t (before x)
    np.testing.assert_array_equal(state.amax_history, hist, err_msg=f"step {t}")
    # flax's scale for step t + 1 comes from the history that now includes x: ours after x
    flax_next = fp8_ops.compute_scale(jnp.max(hist), scale, fp8_max)
    np.testing.assert_array_equal(state.scale, flax_next, err_msg=f"step {t}")
    q = quantize(x, obs.calculate_qparams(state))
    flax_q = fp8_ops.quantize(x, dtype, flax_next, jnp.float32)
    np.testing.assert_array_equal(np.asarray(q).view(np.uint8), np.asarray(flax_q).view(np.uint8))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("algo", ["max", "most_recent"])
@pytest.mark.parametrize("margin", [0, 2])
def test_matches_transformer_engine_update_with_fallbacks(dtype, algo, margin):
  rng = np.random.default_rng(margin + 7 * (algo == "max"))
  history_len = 5
  obs = jo.Float8DelayedScalingObserver(
    dtype=dtype, history_len=history_len, amax_compute_algo=algo, margin=margin
  )
  xs = batches(rng, 23, zero_every=4, inf_at=(9,))
  amaxes = [np.max(np.abs(x)) for x in xs]
  expected = te_reference(amaxes, float(jnp.finfo(dtype).max), history_len, algo, margin)
  update = jax.jit(obs.update)
  state = obs.init()
  for t, (x, (scale_inv, window)) in enumerate(zip(xs, expected, strict=True)):
    state = update(state, x)
    np.testing.assert_array_equal(state.scale, scale_inv, err_msg=f"step {t}")
    np.testing.assert_array_equal(np.sort(state.amax_history), np.sort(window))
    assert int(obs.calculate_qparams(state).zero_point) == 0


def test_first_step_keeps_scale_one_and_nan_batches_change_nothing():
  obs = jo.Float8DelayedScalingObserver(history_len=3)
  state = obs.init()
  assert float(obs.calculate_qparams(state).scale) == 1.0
  state = obs.update(state, jnp.array([448.0, -896.0]))
  assert float(state.scale) == 2.0
  same = obs.update(state, jnp.array([np.nan, np.nan]))  # TE would record NaN and keep the scale
  np.testing.assert_array_equal(same.amax_history, state.amax_history)
  partial = obs.update(state, jnp.array([np.nan, 4.0]))
  assert float(partial.amax_history[0]) == 4.0


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"history_len": 0}, "history_len=0"),
    ({"amax_compute_algo": "mean"}, "amax_compute_algo='mean'"),
    ({"margin": 0.5}, "margin=0.5"),
    ({"dtype": jnp.bfloat16}, "dtype='bfloat16'"),
  ],
)
def test_invalid_configs_name_the_argument(kwargs, match):
  with pytest.raises(ValueError, match=match):
    jo.Float8DelayedScalingObserver(**kwargs)


def test_history_lives_in_the_observers_collection_of_linen_and_nnx():
  """Updated by calibration/training steps with a mutable 'observers' collection, not by grads."""
  import flax.linen as nn

  obs = jo.Float8DelayedScalingObserver(history_len=3)

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return jo.linen.Observe(obs, name="x")(x)

  x = jnp.array([[-896.0, 1.0]])
  variables = Net().init(jax.random.key(0), x)
  _, updated = Net().apply(variables, x, mutable=["observers"])
  state = updated["observers"]["x"]["state"]
  np.testing.assert_array_equal(state.amax_history, [896.0, 0.0, 0.0])
  assert float(obs.calculate_qparams(state).scale) == 2.0
  np.testing.assert_array_equal(variables["observers"]["x"]["state"].amax_history, 0.0)
  module = jo.nnx.Observe(obs, x)
  module(x)
  assert float(module.calculate_qparams().scale) == 2.0
