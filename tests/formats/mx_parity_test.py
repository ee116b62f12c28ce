"""MX scales and elements against the OCP / torchao rules restated with exact Python arithmetic.

The reference derives each E8M0 exponent from ``math.frexp`` (``a = m 2**e``, ``m`` in [0.5, 1)), an
independent formulation of the bit tricks in ``to_mx``; elements are checked against torch's live
fp8 casts and ml_dtypes' fp6/fp4 casts. Subnormal amaxes are left out: XLA:CPU flushes them to 0.
"""

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from torch_oracle import assert_same

import jax_observers as jo

torch = pytest.importorskip("torch")

MODES = list(jo.ScaleCalculationMode)
ELEMS = {  # dtype: (e_max, mantissa bits, largest value)
  np.dtype(jnp.float8_e4m3fn): (8, 3, 448.0),
  np.dtype(jnp.float8_e5m2): (15, 2, 57344.0),
  np.dtype(jnp.float6_e2m3fn): (2, 3, 7.5),
  np.dtype(jnp.float6_e3m2fn): (4, 2, 28.0),
  np.dtype(jnp.float4_e2m1fn): (2, 1, 6.0),
}
TORCH_FP8 = {
  np.dtype(jnp.float8_e4m3fn): torch.float8_e4m3fn,
  np.dtype(jnp.float8_e5m2): torch.float8_e5m2,
}


def reference_exponent(a: float, mode, elem, xla_flush=True) -> int:
  """The biased E8M0 byte for block amax ``a`` (a float32 value), by the spec's formulas.

  ``xla_flush``: our documented deviation. RCEIL's ``a * fl(1/F)`` is a float32 product; when it is
  subnormal XLA:CPU flushes it to 0 (byte 0) where torch on x86 keeps it (byte 1 above 2**-127).
  """
  emax, mbits, fmax = ELEMS[np.dtype(elem)]
  if not math.isfinite(a):
    return 255
  if mode == jo.ScaleCalculationMode.RCEIL:
    d = float(np.float32(a) * np.float32(1.0 / fmax))
    if not math.isfinite(d):
      return 255
    if d < 2.0**-126:  # E8M0 byte 0 is 2**-127; anything above it rounds up to byte 1
      return 0 if xla_flush or d <= 2.0**-127 else 1
    m, e = math.frexp(d)
    return (e - 1 + (m != 0.5)) + 127  # ceil(log2 d), biased; 255 if it reaches 2**128
  if a == 0:
    k = -127
  else:
    m, e = math.frexp(a)
    p = e - 1  # floor(log2 a)
    if mode == jo.ScaleCalculationMode.CEIL:
      p += m != 0.5
    elif mode == jo.ScaleCalculationMode.EVEN:  # significand rounded half up to mbits bits
      p += math.floor(2 * m * 2**mbits + 0.5) >= 2 ** (mbits + 1)
      if p >= 128:
        return 255  # rounded past float32's largest exponent: inf
    k = min(max(p - emax, -127), 128)
  return k + 127


def amax_values(rng, n=400):
  a = np.concatenate(
    [
      10.0 ** rng.uniform(-35, 38, n),
      2.0 ** rng.integers(-120, 127, 50),
      np.nextafter(np.float32(2.0 ** rng.integers(-100, 120, 50)), np.float32(0)),
      np.array([0.0, 448.0, 447.9, 448.1, 57344.0, 6.0, 7.5, 28.0, 3.4e38, np.inf, np.nan]),
      448.0 * 2.0 ** rng.integers(-100, 100, 30) * (1 + rng.integers(-2, 3, 30) * 2.0**-23),
    ]
  )
  return np.asarray(a, np.float32)


@pytest.mark.parametrize("elem", list(ELEMS), ids=lambda d: d.name)
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
def test_exponents_match_the_spec_formulas(mode, elem):
  a = amax_values(np.random.default_rng(MODES.index(mode)))
  ours = np.asarray(jax.jit(jo.mx_exponent_from_amax, static_argnums=(1, 2))(a, elem, mode))
  expected = np.array([reference_exponent(float(v), mode, elem) for v in a], np.uint8)
  np.testing.assert_array_equal(ours, expected, err_msg=f"amax {a[ours != expected]}")


def test_rceil_subnormal_descale_is_flushed_by_xla():
  """Deviation: amax just above 2**-127 * F gives byte 0 here, 1 in torchao (x86 keeps subnormals)."""
  elem, mode = jnp.float8_e5m2, jo.ScaleCalculationMode.RCEIL
  a = np.float32(3.7139037e-34)
  assert reference_exponent(float(a), mode, elem, xla_flush=False) == 1
  assert int(jo.mx_exponent_from_amax(a, elem, mode)) == 0


def reference_elements(x, exponents, elem, block):
  """x * 2**-k (exact), clipped to the format's range, cast by torch (fp8) or ml_dtypes."""
  inv = np.array(
    [np.float32(2.0 ** (127 - int(b))) if b != 255 else np.nan for b in exponents.flat]
  )
  inv = np.asarray(inv, np.float32).reshape(exponents.shape)
  scaled = x.reshape(*exponents.shape, block) * inv[..., None]
  fmax = np.float32(ELEMS[np.dtype(elem)][2])
  clipped = np.clip(scaled, -fmax, fmax).reshape(x.shape)
  if np.dtype(elem) in TORCH_FP8:
    return torch.from_numpy(clipped).to(TORCH_FP8[np.dtype(elem)]).view(torch.uint8).numpy()
  return clipped.astype(getattr(ml_dtypes, np.dtype(elem).name)).view(np.uint8)


CASTABLE = [d for d in ELEMS if not d.name.startswith("float6")]  # XLA has no float6 arrays


@pytest.mark.parametrize("elem", CASTABLE, ids=lambda d: d.name)
def test_to_mx_matches_reference_scales_and_element_casts(elem):
  rng = np.random.default_rng(3)
  for mode in MODES:
    x = rng.standard_normal((3, 4, 64)) * np.exp(rng.uniform(-15, 15, (3, 4, 2, 1))).repeat(
      32, -1
    ).reshape(3, 4, 64)
    x = x.astype(np.float32)
    x[0, 0, :32] = 0.0  # an all-zero block
    x[0, 1, 5] = np.nan  # a NaN block: scale byte 255, as torchao
    exponents, elements = jax.jit(jo.to_mx, static_argnums=(1, 2, 3))(x, elem, 32, mode)
    amax = np.abs(x.reshape(3, 4, 2, 32)).max(-1)
    expected = np.array([reference_exponent(float(a), mode, elem) for a in amax.flat], np.uint8)
    np.testing.assert_array_equal(exponents, expected.reshape(3, 4, 2), err_msg=mode.name)
    assert elements.dtype == elem and elements.shape == x.shape
    got = np.asarray(elements).view(np.uint8)
    want = reference_elements(x, np.asarray(exponents), elem, 32)
    ok = ~np.isnan(x.reshape(3, 4, 2, 32)).any(-1, keepdims=True).repeat(32, -1).reshape(x.shape)
    np.testing.assert_array_equal(got[ok], want[ok], err_msg=mode.name)
    assert np.isnan(np.asarray(elements[0, 1, :32], np.float32)).all() or np.dtype(
      elem
    ).name.startswith("float4")


def test_observer_state_tokens_padding_and_nan():
  obs = jo.MXObserver(
    elem_dtype=jnp.float4_e2m1fn, block_size=32, token_axes=1, pad_partial_blocks=True
  )
  rng = np.random.default_rng(4)
  x = (rng.standard_normal((5, 80)) * 3).astype(np.float32)
  x[1, 3] = np.nan
  state = jax.jit(obs.update)(obs.init(x), x)
  padded = np.pad(np.abs(np.where(np.isnan(x), 0, x)), ((0, 0), (0, 16)))
  assert_same(state.amax, padded.reshape(5, 3, 32).max(axis=(0, 2)))
  for mode in MODES:
    o = obs.replace(scaling_mode=mode)
    expected = [reference_exponent(float(a), mode, jnp.float4_e2m1fn) for a in state.amax]
    np.testing.assert_array_equal(o.exponents(state), expected)
    qp = o.calculate_qparams(state)
    assert_same(qp.scale, np.float32(2.0) ** (np.array(expected, np.float32) - 127))
  q = obs.quantize(x, obs.calculate_qparams(state))
  assert q.shape == x.shape and q.dtype == jnp.float4_e2m1fn


def test_observer_on_one_batch_gives_to_mx_exponents_and_elements():
  x = (np.random.default_rng(5).standard_normal((4, 64)) * 100).astype(np.float32)
  for mode in MODES:
    obs = jo.MXObserver(scaling_mode=mode)

    @jax.jit
    def run(x, obs=obs, mode=mode):
      state = obs.update(obs.init(x), x)
      q = obs.quantize(x, obs.calculate_qparams(state))
      return obs.exponents(state), q, *jo.to_mx(x, jnp.float8_e4m3fn, 32, mode)

    ours_exponents, q, exponents, elements = run(x)
    np.testing.assert_array_equal(ours_exponents, exponents)
    np.testing.assert_array_equal(np.asarray(q).view(np.uint8), np.asarray(elements).view(np.uint8))


def test_axis_blocks_a_flax_kernel_along_its_input_axis():
  w = (np.random.default_rng(6).standard_normal((64, 3)) * 10).astype(np.float32)  # (in, out)
  obs = jo.MXObserver(axis=0)
  state = obs.update(obs.init(w), w)
  assert state.amax.shape == (2, 3)
  assert_same(state.amax, np.abs(w).reshape(2, 32, 3).max(axis=1))
  exponents, _ = jo.to_mx(w.T, jnp.float8_e4m3fn, 32)  # torchao's layout: blocks on the last axis
  np.testing.assert_array_equal(obs.exponents(state), np.asarray(exponents).T)
  with pytest.raises(ValueError, match="axis=2"):
    obs.replace(axis=2).init(w)


def test_e8m0_bytes_and_errors():
  assert_same(
    jo.e8m0_to_float32(jnp.array([0, 127, 128, 254, 255], jnp.uint8)),
    np.array([2.0**-127, 1.0, 2.0, 2.0**127, np.nan], np.float32),
  )
  with pytest.raises(ValueError, match="elem_dtype='int8'"):
    jo.MXObserver(elem_dtype=jnp.int8)
  with pytest.raises(ValueError, match="scaling_mode='floor'"):
    jo.MXObserver(scaling_mode="floor")
  with pytest.raises(ValueError, match="multiple of 32"):
    jo.to_mx(jnp.ones((2, 40)))
  obs = jo.MXObserver(elem_dtype=jnp.float6_e2m3fn)  # scales yes, elements no
  state = obs.update(obs.init(jnp.ones((1, 32))), jnp.full((1, 32), 7.5))
  assert int(obs.exponents(state)[0]) == 127
  with pytest.raises(NotImplementedError, match="no float6 arrays"):
    obs.quantize(jnp.ones((1, 32)), obs.calculate_qparams(state))
