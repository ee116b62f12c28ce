"""Configs are pytrees with no leaves; eager public methods compile once; eager works on a mesh."""

import functools
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from registry import CASES, batches, mesh8, observe, qparams_or_none

import jax_observers as jo

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compiles = [0]


def _count(event, duration, **kwargs):
  if event == COMPILE_EVENT:
    _compiles[0] += 1


jax.monitoring.register_event_duration_secs_listener(_count)


class CountCompiles:
  def __enter__(self):
    self.start = _compiles[0]
    return self

  def __exit__(self, *exc):
    self.count = _compiles[0] - self.start


PARTIALS = [
  pytest.param(jo.MinMaxObserver.with_args(dtype=jnp.int8), id="partial"),
  pytest.param(
    jo.HistogramObserver.with_args(bins=64).with_callable_args(upsample_rate=lambda: 8),
    id="partial-callable",
  ),
]


@pytest.mark.parametrize("obs, shape", CASES)
def test_config_is_a_pytree_without_leaves(obs, shape):
  assert jax.tree_util.tree_leaves(obs) == []
  assert jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(obs), []) == obs
  assert hash(obs) == hash(jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(obs), []))
  xs = batches(shape)

  def f(config, state, x):
    return config.update(state, x)

  state = obs.init(xs[0])
  chex.assert_trees_all_equal(jax.jit(f)(obs, state, xs[0]), f(obs, state, xs[0]))
  # a config inside a container argument, as a Flax user passes it around
  g = jax.jit(lambda bundle, x: bundle["obs"].update(bundle["state"], x))
  chex.assert_trees_all_equal(g({"obs": obs, "state": state}, xs[1]), obs.update(state, xs[1]))


@pytest.mark.parametrize("partial", PARTIALS)
def test_partial_config_is_a_pytree_without_leaves(partial):
  assert jax.tree_util.tree_leaves(partial) == []
  x = jnp.array([-1.0, 3.0])
  out = jax.jit(lambda p, x: p().update(p().init(x), x))(partial, x)
  obs = partial()
  chex.assert_trees_all_equal(out, obs.update(obs.init(x), x))


def _eager_calls(obs, x):
  """Every public method of ``obs`` called eagerly once; returns the last state."""
  state = obs.init(x)
  if isinstance(obs, jo.FakeQuantizeBase):
    _, state = obs.apply(state, x)
  state = obs.update(state, x)
  qparams = qparams_or_none(obs, state)
  if isinstance(obs, jo.FakeQuantizeBase):
    jo.disable_fake_quant(jo.enable_observer(state))
    if isinstance(obs, jo.LearnableFakeQuantize):
      jo.enable_param_learning(state)
  elif qparams is not None:
    try:
      obs.fake_quantize(x, qparams)
    except jo.QParamsUnavailableError:
      pass
    if callable(getattr(obs, "quantize", None)):
      try:
        obs.dequantize(obs.quantize(x, qparams), qparams)
      except TypeError:  # Pow2ScaleObserver around an observer that has no quantize
        pass
  return state


@pytest.mark.parametrize("obs, shape", CASES)
def test_eager_calls_compile_once(obs, shape):
  xs = batches(shape, n=2)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # fresh-state qparams warn as torch does; tested below
    _eager_calls(obs, xs[0])
    with CountCompiles() as counted:
      _eager_calls(obs, xs[1])
  assert counted.count == 0


def test_eager_ops_compile_once():
  x = jnp.asarray(batches((64, 8))[0])
  scale, zero_point = jnp.float32(0.05), jnp.int32(3)
  calls = [
    lambda: jo.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, 255),
    lambda: jo.fake_quantize_per_channel_affine(
      x, jnp.full(8, 0.05), jnp.zeros(8, jnp.int32), 1, -128, 127
    ),
    lambda: jo.fake_quantize_learnable_per_tensor_affine(x, scale, jnp.float32(3), 0, 255, 1.0),
    lambda: jo.quantize(x, scale, zero_point, dtype=jnp.uint8),
    lambda: jo.to_mx(jnp.tile(x, (1, 4))),
    lambda: jo.choose_qparams_affine(x, jo.MappingType.SYMMETRIC, [1, 8], jnp.int8),
    lambda: jo.quantize_affine(
      x, (1, 8), jnp.full((64, 1), 0.1), jnp.zeros((64, 1), jnp.int32), jnp.int8
    ),
    lambda: jo.dequantize_affine(
      jnp.ones((64, 8), jnp.int8),
      (1, 8),
      jnp.full((64, 1), 0.1),
      jnp.zeros((64, 1), jnp.int32),
      jnp.int8,
    ),
  ]
  for call in calls:
    jax.block_until_ready(call())
  with CountCompiles() as counted:
    for call in calls:
      jax.block_until_ready(call())
  assert counted.count == 0


def test_eager_equals_jit_on_every_method():
  obs = jo.HistogramObserver(bins=64)
  xs = batches((16, 4))
  eager = observe(obs, xs)
  jitted = observe(obs, xs, jax.jit(obs.update))
  chex.assert_trees_all_equal(eager, jitted)
  chex.assert_trees_all_equal(obs.calculate_qparams(eager), jax.jit(obs.calculate_qparams)(eager))


@pytest.mark.parametrize(
  "obs",
  [jo.MinMaxObserver(), jo.PerChannelMinMaxObserver(ch_axis=1), jo.HistogramObserver(bins=32)],
  ids=["minmax", "per-channel", "histogram"],
)
def test_unobserved_state_warns_like_torch_and_gives_its_default(obs):
  x = jnp.zeros((4, 3))
  with pytest.warns(UserWarning, match="must run observer before calling calculate_qparams"):
    scale, zero_point = obs.calculate_qparams(obs.init(x))
  np.testing.assert_array_equal(scale, 1.0)
  np.testing.assert_array_equal(zero_point, 0)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    obs.calculate_qparams(obs.update(obs.init(x), x + 1))  # observed: no warning
    jax.jit(obs.calculate_qparams)(obs.init(x))  # traced: nothing to warn about at trace time


def _mesh_cases():
  keep = {"minmax", "ema", "per-channel", "histogram", "hist-mse", "fused-kernel", "fake-quant-pc"}
  return [c for c in CASES if c.id in keep]


@pytest.mark.parametrize("obs, shape", _mesh_cases())
@pytest.mark.parametrize("spec", ["replicated", "sharded"])
def test_eager_and_jitted_qparams_on_a_mesh(obs, shape, spec):
  mesh = mesh8()
  xs = batches(shape)
  state = observe(obs, xs)
  expected = obs.calculate_qparams(state)

  def place(leaf):
    leaf = np.asarray(leaf)
    axis = "data" if spec == "sharded" and leaf.ndim and leaf.shape[0] % 8 == 0 else None
    pspec = PartitionSpec(axis, *([None] * max(leaf.ndim - 1, 0))) if leaf.ndim else PartitionSpec()
    return jax.device_put(leaf, NamedSharding(mesh, pspec))

  placed = jax.tree.map(place, state)
  chex.assert_trees_all_equal(obs.calculate_qparams(placed), expected)
  chex.assert_trees_all_equal(jax.jit(obs.calculate_qparams)(placed), expected)
  x = jax.device_put(xs[0], NamedSharding(mesh, PartitionSpec("data")))
  chex.assert_trees_all_equal(obs.update(placed, x), obs.update(state, xs[0]))


def test_equal_configs_share_one_compile():
  x = jnp.ones(5)
  update = functools.partial(jo.MinMaxObserver(dtype=jnp.int8).update)
  update(jo.MinMaxObserver().init(x), x)
  with CountCompiles() as counted:
    jo.MinMaxObserver(dtype=jnp.int8).update(jo.MinMaxObserver().init(x), x)
  assert counted.count == 0
