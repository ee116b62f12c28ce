"""Every observer through the same checks: jit, recompiles, vmap, dtypes, serialization, sync.

The configs are ``registry.CASES``.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization
from registry import CASES, batches, observe, qparams_or_none, sharded

import jax_observers as jo


@pytest.mark.parametrize("obs, shape", CASES)
def test_jit_equals_eager_and_compiles_once(obs, shape):
  xs = batches(shape)
  update = jax.jit(obs.update)
  jitted = observe(obs, xs, update)
  chex.assert_trees_all_equal(jitted, observe(obs, xs))
  assert update._cache_size() == 1
  chex.assert_trees_all_equal(
    qparams_or_none(obs, jitted), jax.jit(functools.partial(qparams_or_none, obs))(jitted)
  )


@pytest.mark.parametrize("obs, shape", CASES)
def test_vmap_over_a_stack_of_states_equals_a_loop(obs, shape):
  stacks = [np.stack(b) for b in zip(*(batches(shape, seed=s) for s in range(4)), strict=True)]
  states = jax.vmap(obs.init)(stacks[0])
  for x in stacks:
    states = jax.jit(jax.vmap(obs.update))(states, x)
  qparams = jax.jit(jax.vmap(functools.partial(qparams_or_none, obs), axis_size=4))(states)
  for i in range(4):
    single = observe(obs, [x[i] for x in stacks])
    chex.assert_trees_all_equal(jax.tree.map(lambda leaf, i=i: leaf[i], states), single)
    # vmapped qparams keep exact division (XLA must not turn it into a reciprocal multiply)
    chex.assert_trees_all_equal(
      jax.tree.map(lambda leaf, i=i: leaf[i], qparams), qparams_or_none(obs, single)
    )


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("obs, shape", CASES)
def test_low_precision_inputs_keep_state_dtypes(obs, shape, dtype):
  x32 = batches(shape)[0]
  state = obs.init(x32)
  if isinstance(obs, jo.RecordingObserver):
    state = obs.init(x32.astype(dtype))
  updated = jax.jit(obs.update)(state, jnp.asarray(x32, dtype))
  chex.assert_trees_all_equal_dtypes(updated, state)
  chex.assert_trees_all_equal_shapes(updated, state)


@pytest.mark.parametrize("obs, shape", CASES)
def test_fresh_state_gives_finite_qparams(obs, shape):
  qp = qparams_or_none(obs, obs.init(np.zeros(shape, np.float32)))
  if qp is not None:
    assert np.isfinite(np.asarray(qp.scale)).all()
    assert np.isfinite(np.asarray(qp.zero_point)).all()


@pytest.mark.parametrize("obs, shape", CASES)
def test_flax_serialization_round_trip(obs, shape):
  state = observe(obs, batches(shape))
  restored = serialization.from_bytes(obs.init(batches(shape)[0]), serialization.to_bytes(state))
  chex.assert_trees_all_equal(restored, state)


@pytest.mark.parametrize("obs, shape", CASES)
def test_state_dict_round_trip(obs, shape):
  xs = batches(shape)
  state = observe(obs, xs)
  d = jo.state_dict(obs, state)
  assert all(isinstance(v, np.ndarray) for v in d.values())
  # torch's RecordingObserver keeps its records outside the state dict; so does ours
  expected = obs.init(xs[0]) if isinstance(obs, jo.RecordingObserver) else state
  chex.assert_trees_all_equal(jo.load_state_dict(obs, d, example=xs[0]), expected)


@pytest.mark.parametrize("obs, shape", CASES)
def test_axis_name_sync_over_8_devices_equals_one_observer_on_the_global_batch(obs, shape):
  xs = batches(shape, seed=3)
  single = observe(obs, xs)

  @sharded
  def step(state, x):
    return obs.update(state, x, axis_name="data")

  state = obs.init(xs[0])
  for x in xs:
    state = step(state, x)
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, state), jax.tree.map(np.asarray, single))

  # pmap: every replica holds the same state, equal to the single observer's.
  replicated = jax.tree.map(lambda a: jnp.stack([a] * 8), obs.init(xs[0]))
  pstep = jax.pmap(functools.partial(obs.update, axis_name="data"), axis_name="data")
  for x in xs:
    replicated = pstep(replicated, x.reshape(8, -1, *x.shape[1:]))
  for i in range(8):
    chex.assert_trees_all_equal(
      jax.tree.map(lambda a, i=i: np.asarray(a[i]), replicated), jax.tree.map(np.asarray, single)
    )


@pytest.mark.parametrize("obs, shape", CASES)
def test_states_print_concisely(obs, shape):
  text = repr(observe(obs, batches(shape)))
  assert "Array(" not in text and len(text) < 600, text
