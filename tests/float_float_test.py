"""float_float: float64 steps from float32 expansions, against NumPy float64 and exact fractions."""

import itertools
import re
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_observers._src import float_float as ff
from jax_observers._src.histogram.search_device import round_to_f64

F32, F64 = np.float32, np.float64
RNG = np.random.default_rng(0)
SUB = np.array([2.0**-149, -(2.0**-149), 3e-39, -1e-40, 2.0**-127], F32)  # subnormals


def exact(terms):
  """Elementwise exact sums of float32 arrays, as Fractions."""
  return [sum(Fraction(float(t[i])) for t in terms) for i in range(np.size(terms[0]))]


def split64(v):
  """float64 values as three float32 terms (smallest first) with an exact sum."""
  v = np.asarray(v, F64)
  t1 = v.astype(F32)
  t2 = (v - t1).astype(F32)
  t3 = (v - t1 - t2).astype(F32)
  assert ((t1.astype(F64) + t2) + t3 == v).all()
  return [t3, t2, t1]


def f64(terms):
  """An exact float64 expansion's value (the float64 sum is exact for these)."""
  return sum(np.asarray(t, F64) for t in terms[::-1])


def ulp(x):
  x = np.abs(np.asarray(x, F32))
  return np.nextafter(x, F32(np.inf)) - x


def test_bit_helpers_see_subnormals_and_signs_under_jit():
  x = np.concatenate([SUB, np.array([0, -0.0, 1, -2, np.inf, -np.inf, np.nan], F32)])
  got = jax.jit(
    lambda v: (ff.is_negative(v), ff.is_positive(v), ff.is_subnormal(v), ff.flush_subnormal(v))
  )(x)
  with np.errstate(invalid="ignore"):
    np.testing.assert_array_equal(got[0], x < 0)
    np.testing.assert_array_equal(got[1], x > 0)
  np.testing.assert_array_equal(got[2], (x != 0) & (np.abs(x) < 2.0**-126))
  flushed = np.where(np.abs(x) < 2.0**-126, np.copysign(F32(0), x), x)
  np.testing.assert_array_equal(np.asarray(got[3]).view(np.uint32), flushed.view(np.uint32))
  assert jax.jit(lambda v: v < 0)(SUB).sum() == 0  # the trap: XLA:CPU compares them as zero
  np.testing.assert_array_equal(ff.abs_bits(x), np.abs(x).view(np.int32))


def test_upscale_is_exact_on_subnormals():
  x = np.concatenate([SUB, (RNG.standard_normal(64) * 2.0**-70).astype(F32)])
  got = jax.jit(lambda v: ff.upscale(v, 100))(x)
  np.testing.assert_array_equal(got, np.ldexp(x.astype(F64), 100).astype(F32))
  with pytest.raises(ValueError, match="k=200"):
    ff.upscale(x, 200)


def test_pow2_exponent_and_ldexp():
  k = np.arange(-126, 128, dtype=np.int32)
  np.testing.assert_array_equal(jax.jit(ff.pow2)(k), np.ldexp(F64(1), k).astype(F32))
  x = (RNG.standard_normal(512) * 2.0 ** RNG.uniform(-120, 120, 512)).astype(F32)
  np.testing.assert_array_equal(jax.jit(ff.exponent)(x), np.frexp(x)[1] - 1)
  shift = RNG.integers(-200, 200, 512).astype(np.int32)
  want = np.ldexp(x.astype(F64), shift)
  normal = (np.abs(want) >= 2.0**-126) & (np.abs(want) < 2.0**128)
  got = np.asarray(jax.jit(ff.ldexp)(x, shift))
  np.testing.assert_array_equal(got[normal], want[normal].astype(F32))
  np.testing.assert_array_equal(np.isinf(got), np.abs(want) >= 2.0**128)  # overflow is inf


def _expansions(n, k):
  """``k``-term float32 expansions with heavy cancellation, some cancelling exactly."""
  terms = [(RNG.standard_normal(n) * 2.0 ** RNG.integers(-60, 60, n)).astype(F32) for _ in range(k)]
  terms[-1] = np.where(RNG.random(n) < 0.3, -terms[0], terms[-1]).astype(F32)  # exact zeros
  if k > 2:
    terms[-2] = np.where(RNG.random(n) < 0.3, -terms[1], terms[-2]).astype(F32)
  return terms


@pytest.mark.parametrize("k", [2, 3, 5, 7])
def test_renormalize_is_error_free_faithful_and_signs_are_exact(k):
  terms = _expansions(400, k)
  out = jax.jit(lambda *t: ff.renormalize(list(t)))(*terms)
  want = exact(terms)
  assert exact([np.asarray(t) for t in out]) == want  # error-free
  top = np.asarray(out[-1], F64)
  err = np.array([abs(Fraction(float(t)) - w) for t, w in zip(top, want, strict=True)], F64)
  assert (err < ulp(out[-1])).all() and (top[np.array(want) == 0] == 0).all()
  signs = np.asarray(jax.jit(lambda *t: ff.sign(list(t)))(*terms))
  np.testing.assert_array_equal(signs, np.sign(np.array(want, F64)))


def test_round2_to_f64_matches_float64_addition_ties_included():
  a = (RNG.standard_normal(2000) * 2.0 ** RNG.integers(-50, 50, 2000)).astype(F32)
  b = (a * 2.0 ** -RNG.integers(20, 40, 2000) * RNG.standard_normal(2000)).astype(F32)
  b[:200] = (a[:200].astype(F64) * 2.0**-53).astype(F32)  # float64 ties, up and down
  b[200:400] = (-a[200:400].astype(F64) * 2.0**-54).astype(F32)
  a[400:500] = F32(1.0)  # a power of two: the spacing below is finer
  b[400:500] = -(2.0 ** -RNG.integers(40, 60, 100)).astype(F32)

  def pair(x, y):
    s = x + y
    bb = s - x
    return ff.round2_to_f64(s, (x - (s - bb)) + (y - bb))

  got = jax.jit(pair)(a, b)
  np.testing.assert_array_equal(f64(got), a.astype(F64) + b.astype(F64))


def test_div_f32_rounds_like_float64_division():
  x = RNG.uniform(1, 2, 4000).astype(F32) * RNG.choice([-1, 1], 4000).astype(F32)
  d = RNG.uniform(1, 2, 4000).astype(F32)
  d[:100] = F32(3.0)
  terms = jax.jit(lambda a, b: ff.div_f32(a, b, 4))(x, d)
  assert all(np.all(np.abs(lo) <= ulp(hi) / 2) for lo, hi in itertools.pairwise(terms))  # sorted
  got = jax.jit(lambda *t: round_to_f64(list(t)))(*terms)
  np.testing.assert_array_equal(f64(got), x.astype(F64) / d.astype(F64))


@pytest.mark.parametrize("divisor", [255, 2**32 - 1, 3 * 2**25 + 1])
def test_div_expansion_rounds_like_float64_division(divisor):
  v = RNG.uniform(1, 4, 3000) * RNG.choice([-1, 1], 3000)
  hi, lo = ff.split_int(divisor)
  terms = jax.jit(lambda *t: round_to_f64(ff.div_expansion(list(t), (hi, lo), 5)))(*split64(v))
  np.testing.assert_array_equal(f64(terms), v / F64(divisor))


def test_rint_and_rint_small_match_np_rint():
  v = RNG.uniform(-(2.0**34), 2.0**34, 3000)
  v[:600] = np.floor(v[:600]) + 0.5  # ties
  v[600:900] = np.nextafter(v[:300], np.inf)  # one float64 ulp past a tie
  v[900:1200] = RNG.integers(-(2**22), 2**22, 300) + 0.5
  got = jax.jit(lambda *t: ff.rint(list(t)))(*split64(v))
  np.testing.assert_array_equal(np.asarray(got[0], F64) + np.asarray(got[1], F64), np.rint(v))
  small = np.concatenate([v[900:1200], RNG.uniform(-(2.0**23), 2.0**23, 600)])
  small = np.concatenate([small, np.nextafter(small[:300], -np.inf)])
  faithful = jax.jit(lambda *t: round_to_f64(list(t)))(*split64(small))
  np.testing.assert_array_equal(
    jax.jit(lambda *t: ff.rint_small(list(t)))(*faithful), np.rint(small)
  )


def test_less_is_exact_equal_values_with_different_terms_included():
  a = RNG.uniform(0, 2.0**33, 2000)
  b = np.where(RNG.random(2000) < 0.4, a, a + RNG.integers(-3, 4, 2000) * np.spacing(a))
  ta = jax.jit(lambda *t: round_to_f64(list(t)))(*split64(a))
  # the same float64 values, reached from sums that differ below float64's precision
  tb = jax.jit(lambda *t: round_to_f64(list(t)))(*split64(b), (b * 2.0**-60).astype(F32))
  assert (f64(tb) == b).all()
  less = jax.jit(lambda x, y: ff.less(x, y))
  np.testing.assert_array_equal(less(list(ta), list(tb)), a < b)
  np.testing.assert_array_equal(less(list(tb), list(ta)), b < a)


def test_fusion_barrier_keeps_bits_and_is_not_optimized_away():
  payload = np.array([0x7FC00001, 0xFFC12345, 0x80000000, 1, 0x7F800000], np.uint32).view(F32)
  x = np.concatenate([payload, SUB[:3]])  # arrays of one shape (they are stacked)
  flags = np.array([True, False, True, True, False, False, True, False])
  ints = np.arange(-4, 4, dtype=np.int32) * 2**29
  got = jax.jit(ff.fusion_barrier)(x, flags, ints)
  np.testing.assert_array_equal(np.asarray(got[0]).view(np.uint32), x.view(np.uint32))
  np.testing.assert_array_equal(got[1], flags)
  np.testing.assert_array_equal(got[2], ints)

  def chain(v):
    for _ in range(6):
      (v,) = ff.fusion_barrier(v * F32(1.5) + F32(1))
    return v

  text = jax.jit(chain).lower(jnp.zeros(8)).compile().as_text()
  assert len(re.findall(r" reduce\(", text)) >= 6  # each barrier is still a kernel of its own


def test_split_int():
  for v in (0, 255, -(2**31), 2**31 - 1, 2**32 - 1, -(2**47) + 3):
    hi, lo = ff.split_int(v)
    assert hi.dtype == lo.dtype == F32 and int(hi) + int(lo) == v
  with pytest.raises(ValueError, match="2\\*\\*48"):
    ff.split_int(2**48)
