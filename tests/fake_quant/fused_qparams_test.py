"""fbgemm's ChooseQuantizationParams on the device, bit for bit against the NumPy reference.

The reference is bit for bit with torch 2.13's fused CPU kernel (tests/fake_quant/fused_parity_test.py);
this suite is torch-free.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_observers._src.fake_quant import fused_qparams as fq

F32 = np.float32
TINY = F32(np.finfo(F32).smallest_subnormal)
NORMAL = F32(np.finfo(F32).tiny)  # 2**-126
BIG = F32(np.finfo(F32).max)
EPS = F32(np.finfo(F32).eps)
N = 480  # cases per config: 16 configs, 7680 cases in all

# (quant_min, quant_max): int8/uint8/int4/int16/uint16/int32 ranges, reduce_range halves, a range
# off zero, the one-step ranges (symmetric divisor 0) and a single level (span 0).
CONFIGS = [
  (0, 255, False),
  (-128, 127, True),
  (-127, 127, True),
  (0, 127, False),
  (-8, 7, True),
  (0, 15, False),
  (-32768, 32767, True),
  (0, 65535, False),
  (3, 200, False),
  (-1, 0, True),
  (0, 1, False),
  (0, 0, True),
  (-(2**31), 2**31 - 1, True),
  (-(2**31), 2**31 - 1, False),
  (-64, 63, False),
  (0, 255, True),
]


def bits(a):
  a = np.array(a, F32)
  a[np.isnan(a)] = np.nan  # one NaN: payloads are not part of the contract
  return a.view(np.uint32)


def _f32(x):
  with np.errstate(over="ignore", under="ignore"):
    return np.asarray(x, np.float64).astype(F32)


def _log_uniform(rng, n, lo, hi):
  return 2.0 ** rng.uniform(lo, hi, n)


def hard_cases(rng, quant_min, quant_max, n=N):
  """``(lo, hi)`` float32 arrays of ``n`` cases, a mix of generators (one block each)."""
  span = max(quant_max - quant_min, 1)
  k = n // 12
  blocks = []
  # Anything: magnitudes from subnormal to max, random signs, unordered pairs included.
  mag = _log_uniform(rng, 2 * k, -149, 128)
  v = _f32(mag * rng.choice([-1, 1], 2 * k))
  blocks.append((v[:k], v[k:]))
  # Zero-crossing, all-negative, all-positive ranges at every scale.
  c = _log_uniform(rng, k, -140, 127)
  a, b = _f32(-c * rng.uniform(0, 1, k)), _f32(c * rng.uniform(0, 1, k))
  blocks.append((a, b))
  blocks.append((_f32(-c), _f32(-c * rng.uniform(0, 1, k))))
  blocks.append((_f32(c * rng.uniform(0, 1, k)), _f32(c)))
  # Below the 6.1e-5 scale floor, around eps: amplified ranges, one side at zero sometimes.
  c = _log_uniform(rng, k, -60, -10) * span
  lo, hi = _f32(-c * rng.uniform(0, 1, k)), _f32(c * rng.uniform(0, 1, k))
  lo[: k // 4], hi[k // 4 : k // 2] = 0, 0
  lo[k // 2 : 3 * k // 4] = _f32(EPS * rng.integers(-8, 0, k // 4))
  blocks.append((lo, hi))
  # Near the float32 normal limit: subnormal inputs, and a scale around 2**-128 .. 2**-126
  # (the reference's subnormal scales: reset to 0.1 at or below 2**-128, amplified above).
  c = span * 2.0 ** rng.uniform(-130, -124, k)
  lo, hi = _f32(-c * rng.uniform(0, 1, k)), _f32(c * rng.uniform(0, 1, k))
  m = k // 3
  lo[:m] = _f32(-rng.integers(0, 2**23, m) * TINY.astype(np.float64))
  hi[m : 2 * m] = _f32(rng.integers(0, 2**23, m) * TINY.astype(np.float64))
  blocks.append((lo, hi))
  # Near float32 max: the symmetric range and the scale can overflow.
  c = BIG.astype(np.float64) * rng.uniform(0.25, 1, k)
  lo, hi = _f32(-c * rng.uniform(0.5, 1, k)), _f32(c)
  hi[: k // 2] = _f32(c[: k // 2] * rng.uniform(0, 1, k // 2))
  blocks.append((lo, hi))
  # min == max: zero, either sign, any scale.
  c = _f32(_log_uniform(rng, k, -149, 128) * rng.choice([-1, 1, 0], k))
  blocks.append((c, c.copy()))
  # Zero points on .5 ties (and one ulp off): lo = -(i + 1/2) s, hi = lo + span s, s a short
  # float so that the scale and lo / s are exact; also lo = -i s, hi = j s with i + j = span
  # (equal |q| + |r / s| errors on both sides for symmetric ranges, ties between the sides).
  s = _f32(rng.integers(1, 64, k) * 2.0 ** rng.integers(-24, 20, k))
  i = rng.integers(0, span + 1, k) + np.where(rng.random(k) < 0.5, 0.5, 0.0)
  lo, hi = _f32(-i * s), _f32((span - i) * s)
  nudge = np.where(rng.random(k) < 0.5, 0, rng.choice([-1, 1], k))
  lo = np.where(nudge == 1, np.nextafter(lo, F32(0)), lo)
  lo = np.where(nudge == -1, np.nextafter(lo, F32(-np.inf)), lo)
  blocks.append((lo.astype(F32), hi))
  # Symmetric data (lo = -hi) and one ulp apart.
  c = _f32(_log_uniform(rng, k, -100, 100))
  blocks.append((-c, np.where(rng.random(k) < 0.5, c, np.nextafter(c, F32(np.inf))).astype(F32)))
  # NaN and infinities with anything, including a fresh state (inf, -inf).
  specials = np.array([np.nan, np.inf, -np.inf, 0, -0.0, 1, -1, TINY, -TINY, NORMAL, BIG], F32)
  lo, hi = rng.choice(specials, k), rng.choice(specials, k)
  lo[:4], hi[:4] = np.inf, -np.inf
  blocks.append((lo, hi))
  lo = np.concatenate([b[0] for b in blocks]).astype(F32)
  hi = np.concatenate([b[1] for b in blocks]).astype(F32)
  extra = n - lo.size  # fill up with the first generator
  v = _f32(_log_uniform(rng, 2 * extra, -149, 128) * rng.choice([-1, 1], 2 * extra))
  return np.concatenate([lo, v[:extra]]), np.concatenate([hi, v[extra:]])


@functools.cache
def _device(quant_min, quant_max, symmetric):
  return jax.jit(
    lambda lo, hi: fq.choose_quantization_params(lo, hi, quant_min, quant_max, symmetric)
  )


@pytest.mark.parametrize("quant_min, quant_max, symmetric", CONFIGS)
def test_sweep_bit_for_bit_with_the_numpy_reference(quant_min, quant_max, symmetric):
  rng = np.random.default_rng([quant_min & 0xFFFFFFFF, quant_max, symmetric])
  lo, hi = hard_cases(rng, quant_min, quant_max)
  assert lo.size == N
  want_scale, want_zp = fq.choose_quantization_params_numpy(lo, hi, quant_min, quant_max, symmetric)
  got = _device(quant_min, quant_max, symmetric)(lo, hi)
  bad = (bits(got.scale) != bits(want_scale)) | (np.asarray(got.zero_point) != want_zp)
  assert not bad.any(), [
    (lo[i], hi[i], got.scale[i], got.zero_point[i], want_scale[i], want_zp[i])
    for i in np.flatnonzero(bad)[:5]
  ]
  # The sweep reaches the regimes it is meant to: amplified (when there is a span), reset, NaN/inf.
  assert (want_scale == fq.SMALL_SCALE_THRESHOLD).any() or quant_max == quant_min
  assert (want_scale == F32(0.1)).any() or quant_max == quant_min  # 0 / 0 is NaN there
  assert not np.isfinite(want_scale).all()


def test_sweep_covers_ties_subnormal_scales_and_overflow():
  lo, hi = hard_cases(np.random.default_rng(7), -128, 127)
  with np.errstate(all="ignore"):
    scale = ((np.maximum(hi, 0).astype(np.float64) - np.minimum(lo, 0)) / 255).astype(F32)
    initial = -128 - np.minimum(lo, 0).astype(np.float64) / scale
    tie = np.abs(initial - np.floor(initial) - 0.5) == 0
  assert ((scale > 0) & (scale < NORMAL) & (scale > F32(2.0**-128))).sum() >= 10
  assert (tie & (scale >= fq.SMALL_SCALE_THRESHOLD)).sum() >= 10
  lo, hi = hard_cases(np.random.default_rng(8), 0, 1)
  scale, _ = fq.choose_quantization_params_numpy(lo, hi, 0, 1, False)
  assert (np.isinf(scale) & np.isfinite(lo) & np.isfinite(hi)).sum() >= 10  # float32 overflow


def test_scalar_per_channel_jit_vmap_and_eager_agree():
  rng = np.random.default_rng(1)
  lo, hi = hard_cases(rng, -128, 127, n=96)
  want = fq.choose_quantization_params_numpy(lo, hi, -128, 127, True)
  eager = fq.choose_quantization_params(lo.reshape(8, 12), hi.reshape(8, 12), -128, 127, True)
  np.testing.assert_array_equal(bits(eager.scale).ravel(), bits(want[0]))
  np.testing.assert_array_equal(np.asarray(eager.zero_point).ravel(), want[1])
  one = jax.jit(lambda a, b: fq.choose_quantization_params(a, b, -128, 127, True))
  scalar = one(lo[3], hi[3])
  assert scalar.scale.shape == () and scalar.zero_point.dtype == jnp.int32
  assert bits(scalar.scale) == bits(want[0][3]) and int(scalar.zero_point) == want[1][3]
  mapped = jax.jit(jax.vmap(jax.vmap(one)))(lo.reshape(8, 12), hi.reshape(8, 12))
  chex.assert_trees_all_equal(mapped, eager)
  broadcast = fq.choose_quantization_params(lo[:12], F32(2.0), -128, 127, True)
  assert broadcast.scale.shape == (12,)


def test_runs_on_the_device_without_callbacks_or_float64():
  f = jax.jit(lambda lo, hi: fq.choose_quantization_params(lo, hi, -128, 127, True))
  text = f.lower(jnp.zeros(3), jnp.zeros(3)).as_text()
  assert "custom_call" not in text  # host callbacks are custom calls
  assert "f64" not in text


@pytest.mark.parametrize("bad", [(1, 0), (-(2**31) - 1, 0), (0, 2**31)])
def test_rejects_ranges_outside_int32(bad):
  with pytest.raises(ValueError, match=f"quant_min={bad[0]}, quant_max={bad[1]}"):
    fq.choose_quantization_params(0.0, 1.0, *bad, False)
