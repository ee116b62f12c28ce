"""jo.linen: the 'observers' collection, mutability rules, transforms and cross-device sync."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from registry import sharded

import jax_observers as jo


class Net(nn.Module):
  observer: object = jo.MinMaxObserver()
  axis_name: object = None

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(8, name="dense")(x)
    x = jo.linen.Observe(self.observer, axis_name=self.axis_name, name="act")(x)
    return nn.relu(x).sum(-1)


def data(n=4, batch=16, seed=0):
  return [jax.random.normal(jax.random.key(seed + i), (batch, 5)) * (i + 1) for i in range(n)]


def calibrate(model, variables, xs, step=None):
  step = step or jax.jit(lambda v, x: model.apply(v, x, mutable=["observers"])[1])
  for x in xs:
    variables = {**variables, **step(variables, x)}
  return variables


def reference_state(model, variables, xs):
  """One plain observer fed the same activations (the Dense output)."""
  obs = model.observer
  dense = nn.Dense(8)
  state = obs.init(xs[0] @ jnp.zeros((5, 8)))
  for x in xs:
    state = obs.update(state, dense.apply({"params": variables["params"]["dense"]}, x))
  return state


def test_updates_only_when_mutable_and_not_during_init():
  model, xs = Net(), data()
  variables = model.init(jax.random.key(0), xs[0])
  fresh = jo.MinMaxObserver().init(jnp.zeros(8))
  chex.assert_trees_all_equal(variables["observers"]["act"]["state"], fresh)
  model.apply(variables, xs[0])  # inference: immutable collection, nothing to update
  calibrated = calibrate(model, variables, xs)
  chex.assert_trees_all_equal(
    calibrated["observers"]["act"]["state"], reference_state(model, variables, xs)
  )


def test_no_gradient_reaches_the_observer_and_the_output_is_the_input():
  model, xs = Net(), data()
  variables = calibrate(model, model.init(jax.random.key(0), xs[0]), xs)
  plain = nn.Dense(8)

  def with_obs(params, x):
    return model.apply({**variables, "params": params}, x, mutable=["observers"])[0].sum()

  def without(params, x):
    return nn.relu(plain.apply({"params": params["dense"]}, x)).sum()

  g1 = jax.grad(with_obs)(variables["params"], xs[0])
  g2 = jax.grad(without)(variables["params"], xs[0])
  chex.assert_trees_all_close(g1, g2)


def test_calculate_qparams_collects_every_observer():
  model, xs = Net(observer=jo.MinMaxObserver(dtype=jnp.int8)), data()
  variables = calibrate(model, model.init(jax.random.key(0), xs[0]), xs)
  qparams = jo.linen.calculate_qparams(model, variables, xs[0])
  expected = model.observer.calculate_qparams(reference_state(model, variables, xs))
  chex.assert_trees_all_equal(qparams["act"], expected)
  # computing qparams did not change the statistics
  again = jo.linen.calculate_qparams(model, variables, xs[1] * 100)
  chex.assert_trees_all_equal(again["act"], expected)


class Cell(nn.Module):
  @nn.compact
  def __call__(self, carry, _):
    carry = jo.linen.Observe(jo.MovingAverageMinMaxObserver(averaging_constant=0.5), name="obs")(
      carry
    )
    return nn.tanh(nn.Dense(5)(carry)), None


class Stack(nn.Module):
  """Three observed layers under nn.scan (stacked states), then nn.remat and nn.vmap."""

  @nn.compact
  def __call__(self, x):
    scan = nn.scan(
      Cell,
      variable_axes={"params": 0, "observers": 0},
      split_rngs={"params": True},
      length=3,
    )
    x, _ = scan(name="scan")(x, None)
    x = nn.remat(jo.linen.Observe)(jo.MinMaxObserver(), name="remat")(x)
    vmapped = nn.vmap(
      jo.linen.Observe,
      variable_axes={"observers": 0},
      split_rngs={"params": False},
      in_axes=0,
    )
    return vmapped(jo.MinMaxObserver(), name="per_example")(x)


def test_scan_remat_and_vmap():
  model, xs = Stack(), data(n=2)
  variables = model.init(jax.random.key(1), xs[0])
  states = variables["observers"]
  assert states["scan"]["obs"]["state"].min_val.shape == (3,)  # one per scan step
  assert states["per_example"]["state"].min_val.shape == (16,)  # one per vmapped example
  calibrated = calibrate(model, variables, xs)
  scan_state = calibrated["observers"]["scan"]["obs"]["state"]
  assert np.isfinite(np.asarray(scan_state.min_val)).all()
  # the first scan step observes the input itself
  obs = jo.MovingAverageMinMaxObserver(averaging_constant=0.5)
  ref = obs.init(xs[0])
  for x in xs:
    ref = obs.update(ref, x)
  chex.assert_trees_all_equal(jax.tree.map(lambda a: a[0], scan_state), ref)
  # the model's output is what the remat and vmapped observers saw
  outputs = [model.apply(variables, x) for x in xs]
  per_example = calibrated["observers"]["per_example"]["state"]
  chex.assert_trees_all_equal(per_example.max_val, jnp.max(jnp.stack(outputs), axis=(0, 2)))
  chex.assert_trees_all_equal(per_example.min_val, jnp.min(jnp.stack(outputs), axis=(0, 2)))
  remat = calibrated["observers"]["remat"]["state"]
  chex.assert_trees_all_equal(remat.max_val, jnp.max(jnp.stack(outputs)))


class Elementwise(nn.Module):
  """Row-independent layers, so sharded and whole-batch activations are bitwise equal."""

  observer: object
  axis_name: object = None

  @nn.compact
  def __call__(self, x):
    x = x * self.param("w", nn.initializers.normal(), (1, 5)) + 0.5
    return jo.linen.Observe(self.observer, axis_name=self.axis_name, name="act")(jnp.tanh(x))


@pytest.mark.parametrize(
  "observer", [jo.MinMaxObserver(), jo.MovingAveragePerChannelMinMaxObserver(ch_axis=-1)]
)
def test_shard_map_calibration_equals_one_replica_on_the_global_batch(observer):
  model, xs = Elementwise(observer=observer, axis_name="data"), data(batch=32)
  variables = model.init(jax.random.key(0), xs[0])
  single = calibrate(Elementwise(observer=observer), variables, xs)

  @sharded
  def step(v, x):
    return model.apply(v, x, mutable=["observers"])[1]

  synced = calibrate(model, variables, xs, step)
  chex.assert_trees_all_equal(synced["observers"], single["observers"])

  @functools.partial(jax.pmap, axis_name="data")
  def pstep(v, x):
    return model.apply(v, x, mutable=["observers"])[1]

  replicated = jax.tree.map(lambda a: jnp.stack([a] * 8), variables)
  for x in xs:
    replicated = {**replicated, **pstep(replicated, x.reshape(8, 4, 5))}
  for i in range(8):  # every replica holds the same, global state
    chex.assert_trees_all_equal(
      jax.tree.map(lambda a, i=i: a[i], replicated["observers"]), single["observers"]
    )
