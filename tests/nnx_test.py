"""jo.nnx: ObserverVariable selection, observing switches, nnx.jit, and qparams collection."""

import chex
import jax
import jax.numpy as jnp
from flax import nnx

import jax_observers as jo


class Net(nnx.Module):
  def __init__(self, rngs):
    self.dense = nnx.Linear(5, 8, rngs=rngs)
    self.act = jo.nnx.Observe(jo.MinMaxObserver(dtype=jnp.int8), jnp.zeros((1, 8)))
    self.out = jo.nnx.Observe(
      jo.PerChannelMinMaxObserver(ch_axis=-1), jnp.zeros((1, 8)), observing=True
    )

  def __call__(self, x):
    return self.out(nnx.relu(self.act(self.dense(x))))


def data(n=3):
  return [jax.random.normal(jax.random.key(i), (16, 5)) * (i + 1) for i in range(n)]


def reference(model, xs):
  obs, pc = jo.MinMaxObserver(dtype=jnp.int8), jo.PerChannelMinMaxObserver(ch_axis=-1)
  s, p = obs.init(jnp.zeros((1, 8))), pc.init(jnp.zeros((1, 8)))
  for x in xs:
    h = model.dense(x)
    s, p = obs.update(s, h), pc.update(p, jax.nn.relu(h))
  return s, p


def test_state_is_selected_by_the_variable_type_and_the_registered_name():
  model = Net(nnx.Rngs(0))
  states = nnx.state(model, jo.nnx.ObserverVariable)
  assert set(states) == {"act", "out"}
  assert nnx.variable_type_from_name("observers") is jo.nnx.ObserverVariable
  params = nnx.state(model, nnx.Param)
  assert "act" not in params  # observers stay out of the optimizer's parameters


def test_nnx_jit_calibration_matches_plain_observers_and_can_be_frozen():
  model, xs = Net(nnx.Rngs(0)), data()

  @nnx.jit
  def step(m, x):
    return m(x)

  for x in xs:
    step(model, x)
  want_act, want_out = reference(model, xs)
  chex.assert_trees_all_equal(model.act.state.get_value(), want_act)
  chex.assert_trees_all_equal(model.out.state.get_value(), want_out)
  qparams = jo.nnx.calculate_qparams(model)
  chex.assert_trees_all_equal(
    qparams["act"], jo.MinMaxObserver(dtype=jnp.int8).calculate_qparams(want_act)
  )
  jo.nnx.disable_observer(model)
  step(model, xs[0] * 1000)
  chex.assert_trees_all_equal(model.act.state.get_value(), want_act)
  jo.nnx.enable_observer(model)
  step(model, xs[0] * 1000)
  assert float(model.act.state.get_value().max_val) > float(want_act.max_val)


def test_no_gradient_flows_into_observer_state():
  model, (x,) = Net(nnx.Rngs(0)), data(1)

  def loss(m, x):
    return m(x).sum()

  grads = nnx.grad(loss)(model, x)
  assert not jax.tree.leaves(nnx.state(grads, jo.nnx.ObserverVariable))  # params only
  plain = jax.grad(lambda k, b: jax.nn.relu(x @ k + b[None]).sum(), argnums=(0, 1))(
    model.dense.kernel.get_value(), model.dense.bias.get_value()
  )
  chex.assert_trees_all_close(grads.dense.kernel.get_value(), plain[0])
