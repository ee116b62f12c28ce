"""numerics: exact float32 division and no FMA contraction, inside jit, vmap and grad."""

import jax
import jax.numpy as jnp
import numpy as np

from jax_observers._src import numerics

RNG = np.random.default_rng(0)
A = (RNG.standard_normal((64, 128)) * 3).astype(np.float32)
S = RNG.uniform(0.5, 2.0, 64).astype(np.float32)


def test_exact_div_is_true_division_under_jit_and_nested_vmap():
  want = A / np.float32(255.0)
  assert np.sum(np.asarray(jax.jit(lambda a: a / 255.0)(A)) != want) > 0  # the trap is real
  np.testing.assert_array_equal(jax.jit(lambda a: numerics.exact_div(a, 255.0))(A), want)
  per_row = jax.jit(jax.vmap(lambda r: numerics.exact_div(r, 255.0)))
  np.testing.assert_array_equal(per_row(A), want)
  nested = jax.jit(jax.vmap(jax.vmap(lambda r: numerics.exact_div(r, 255.0))))
  np.testing.assert_array_equal(nested(A.reshape(8, 8, 128)).reshape(A.shape), want)
  batched = jax.jit(jax.vmap(numerics.exact_div))(A, S)
  np.testing.assert_array_equal(batched, A / S[:, None])


def test_exact_div_has_the_quotient_rule_gradient():
  g_num, g_div = jax.grad(lambda a, b: numerics.exact_div(a, b).sum(), argnums=(0, 1))(
    jnp.float32(3.0), jnp.float32(2.0)
  )
  assert float(g_num) == 0.5 and float(g_div) == -0.75


def test_rounded_blocks_fma_contraction():
  m, x, c = A[0], A[1], np.float32(0.01)
  want = (m + (c * (x - m)).astype(np.float32)).astype(np.float32)
  kept = np.asarray(jax.jit(lambda m, x: m + numerics.rounded(c * (x - m)))(m, x))
  np.testing.assert_array_equal(kept, want)
  assert np.isnan(numerics.rounded(jnp.float32(np.nan)))


def test_x86_to_int32_matches_cvttss2si():
  v = jnp.array([np.nan, np.inf, -np.inf, 3e9, -3e9, 2.0**31, -(2.0**31), 5.0, -7.0], jnp.float32)
  want = [np.iinfo(np.int32).min] * 6 + [np.iinfo(np.int32).min, 5, -7]
  np.testing.assert_array_equal(numerics.x86_to_int32(v), want)
