"""jo.linen.FakeQuant and jo.nnx.FakeQuant: same numbers and gradients as the functional configs."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec
from registry import sharded

import jax_observers as jo

CONFIGS = [
  pytest.param(jo.default_fake_quant(), id="fake-quant"),
  pytest.param(jo.default_per_channel_weight_fake_quant(), id="per-channel"),
  pytest.param(jo.default_fused_act_fake_quant(), id="fused"),
  pytest.param(jo.default_fixed_qparams_range_neg1to1_fake_quant(), id="fixed"),
]


def data(n=3, shape=(8, 6)):
  return [jax.random.normal(jax.random.key(i), shape) * (i + 1) for i in range(n)]


def functional(config, xs):
  """The config driven by hand: the outputs and final state the modules must reproduce."""
  state, ys = config.init(xs[0]), []
  for x in xs:
    y, state = config.apply(state, x)
    ys.append(y)
  return ys, state


class Wrap(nn.Module):
  config: object
  axis_name: object = None

  @nn.compact
  def __call__(self, x):
    return jo.linen.FakeQuant(self.config, axis_name=self.axis_name, name="fq")(x)


@pytest.mark.parametrize("config", CONFIGS)
def test_linen_calibration_inference_and_toggles(config):
  xs, model = data(), Wrap(config)
  variables = model.init(jax.random.key(0), xs[0])
  step = jax.jit(lambda v, x: model.apply(v, x, mutable=["observers"]))
  ys = []
  for x in xs:
    y, updated = step(variables, x)
    variables = {**variables, **updated}
    ys.append(y)
  want_ys, want_state = functional(config, xs)
  chex.assert_trees_all_equal(ys, want_ys)
  chex.assert_trees_all_equal(variables["observers"]["fq"]["state"], want_state)
  # inference: stored qparams, state untouched
  y = model.apply(variables, xs[0] * 50)
  want = config.apply(jo.disable_observer(want_state), xs[0] * 50)[0]
  chex.assert_trees_all_equal(y, want)
  # whole-model toggles on the variables tree
  off = jo.linen.disable_fake_quant(variables)
  chex.assert_trees_all_equal(model.apply(off, xs[1]), xs[1])
  frozen = jo.linen.disable_observer(variables)
  _, after = model.apply(frozen, xs[2] * 100, mutable=["observers"])
  chex.assert_trees_all_equal(
    after["observers"]["fq"]["state"].scale, variables["observers"]["fq"]["state"].scale
  )


def test_linen_straight_through_gradient():
  config, xs = jo.default_fake_quant(), data()
  model = Wrap(config)
  variables = model.init(jax.random.key(0), xs[0])
  grad = jax.grad(lambda x: model.apply(variables, x, mutable=["observers"])[0].sum())(xs[1])
  want = jax.grad(lambda x: config.apply(config.init(x), x)[0].sum())(xs[1])
  chex.assert_trees_all_equal(grad, want)
  assert set(np.unique(np.asarray(grad))) <= {0.0, 1.0}


def lsq():
  return jo.LearnableFakeQuantize(
    observer=jo.MovingAverageMinMaxObserver, quant_min=0, quant_max=255, use_grad_scaling=True
  )


def test_linen_lsq_scale_and_zero_point_are_trained_params():
  config, xs = lsq(), data()
  model = Wrap(config)
  variables = model.init(jax.random.key(0), xs[0])
  assert set(variables["params"]["fq"]) == {"scale", "zero_point"}
  # calibration (static estimate) writes the observed qparams into the params
  _, calibrated = model.apply(variables, xs[0], mutable=["observers", "params"])
  _, want_state = config.apply(config.init(xs[0]), xs[0])
  chex.assert_trees_all_equal(calibrated["params"]["fq"]["scale"], want_state.scale)
  variables = {**variables, **calibrated}
  # learning: gradients for scale/zero_point equal the functional ones
  obs = variables["observers"]["fq"]["state"].enable_param_learning()
  variables = {**variables, "observers": {"fq": {"state": obs}}}

  def loss(params, x):
    return (model.apply({**variables, "params": params}, x) ** 2).sum()

  grads = jax.grad(loss)(variables["params"], xs[1])

  def functional_loss(scale, zero_point, x):
    state = obs.replace(scale=scale, zero_point=zero_point)
    return (config.apply(state, x)[0] ** 2).sum()

  p = variables["params"]["fq"]
  g_scale, g_zp = jax.grad(functional_loss, argnums=(0, 1))(p["scale"], p["zero_point"], xs[1])
  chex.assert_trees_all_equal(grads["fq"]["scale"], g_scale)
  chex.assert_trees_all_equal(grads["fq"]["zero_point"], g_zp)
  assert float(jnp.abs(g_scale)) > 0


def test_linen_fake_quant_syncs_across_8_devices():
  config, xs = jo.default_fake_quant(), data(shape=(32, 6))
  single, synced = Wrap(config), Wrap(config, axis_name="data")
  variables = single.init(jax.random.key(0), xs[0])

  @functools.partial(sharded, out_specs=(PartitionSpec("data"), PartitionSpec()))
  def step(v, x):
    return synced.apply(v, x, mutable=["observers"])

  v1, v2 = variables, variables
  for x in xs:
    y1, u1 = single.apply(v1, x, mutable=["observers"])
    y2, u2 = step(v2, x)
    v1, v2 = {**v1, **u1}, {**v2, **u2}
    chex.assert_trees_all_equal(y1, y2)
  chex.assert_trees_all_equal(v1["observers"], v2["observers"])


class NnxNet(nnx.Module):
  def __init__(self, config, example):
    self.fq = jo.nnx.FakeQuant(config, example)
    self.obs = jo.nnx.Observe(jo.MinMaxObserver(), example)

  def __call__(self, x):
    return self.obs(self.fq(x))


@pytest.mark.parametrize("config", CONFIGS)
def test_nnx_matches_the_functional_config_and_toggles(config):
  xs = data()
  model = NnxNet(config, xs[0])
  step = nnx.jit(lambda m, x: m(x))
  ys = [step(model, x) for x in xs]
  want_ys, want_state = functional(config, xs)
  chex.assert_trees_all_equal(ys, want_ys)
  chex.assert_trees_all_equal(model.fq.state.get_value(), want_state)
  assert set(jo.nnx.calculate_qparams(model)) == {"fq", "obs"}
  jo.nnx.disable_fake_quant(model)
  chex.assert_trees_all_equal(step(model, xs[0]), xs[0])
  jo.nnx.disable_observer(model)
  frozen = model.fq.state.get_value()
  step(model, xs[0] * 100)
  chex.assert_trees_all_equal(model.fq.state.get_value(), frozen)
  assert not model.obs.observing


def test_nnx_lsq_trains_params():
  config, xs = lsq(), data()
  model = NnxNet(config, xs[0])
  model(xs[0])  # static estimate: scale/zero_point params take the observed qparams
  _, want_state = config.apply(config.init(xs[0]), xs[0])
  chex.assert_trees_all_equal(model.fq.scale.get_value(), want_state.scale)
  model.fq.state.set_value(model.fq.state.get_value().enable_param_learning())
  grads = nnx.grad(lambda m, x: (m(x) ** 2).sum())(model, xs[1])
  assert float(jnp.abs(grads.fq.scale.get_value())) > 0
  params = nnx.state(model, nnx.Param)
  assert set(params["fq"]) == {"scale", "zero_point"}


def test_whole_model_lsq_toggles():
  config, xs = lsq(), data()
  model = NnxNet(config, xs[0])
  jo.nnx.enable_param_learning(model)
  state = model.fq.state.get_value()
  assert bool(state.learning_enabled) and not bool(state.static_enabled)
  jo.nnx.enable_static_observation(model)
  state = model.fq.state.get_value()
  assert not bool(state.fake_quant_enabled) and bool(state.static_enabled)
  chex.assert_trees_all_equal(model(xs[0]), xs[0])  # observing only: the output is the input
  jo.nnx.enable_static_estimate(model)
  assert bool(model.fq.state.get_value().fake_quant_enabled)
  linen_model = Wrap(config)
  variables = jo.enable_param_learning(linen_model.init(jax.random.key(0), xs[0]))
  assert bool(variables["observers"]["fq"]["state"].learning_enabled)


def test_linen_init_returns_the_input_without_tracing_the_fake_quant():
  model, (x,) = Wrap(jo.default_fake_quant()), data(1)
  out, variables = model.init_with_output(jax.random.key(0), x)
  chex.assert_trees_all_equal(out, x)
  assert not bool(
    jnp.any(variables["observers"]["fq"]["state"].activation_post_process.max_val > -jnp.inf)
  )
