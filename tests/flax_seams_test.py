"""Flax seams: scanned and vmapped stacks, toggles on them, config forms, calibrate, quantize mode."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jax_observers as jo

LAYERS = 3
OBSERVER = jo.MinMaxObserver(dtype=jnp.int8, qscheme=jo.per_tensor_symmetric)
FAKE_QUANT = jo.FakeQuantize(observer=jo.MovingAveragePerChannelMinMaxObserver.with_args(ch_axis=1))
LSQ = jo.LearnableFakeQuantize(quant_min=0, quant_max=15)


def data(n=3, batch=8, width=6, seed=0):
  keys = jax.random.split(jax.random.key(seed), n)
  return [jax.random.normal(k, (batch, width)) * (i + 1) for i, k in enumerate(keys)]


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    h = nn.Dense(6)(x)
    h = jo.linen.Observe(OBSERVER, name="obs")(h)
    h = jo.linen.FakeQuant(FAKE_QUANT, name="fq")(h)
    h = jo.linen.FakeQuant(LSQ, name="lsq")(h)
    return x + nn.relu(h), None


class Scanned(nn.Module):
  @nn.compact
  def __call__(self, x):
    scan = nn.scan(
      Block,
      variable_axes={"params": 0, "observers": 0},
      split_rngs={"params": True},
      length=LAYERS,
    )
    x, _ = scan(name="blocks")(x, None)
    return x


def per_layer(tree, i):
  return jax.tree.map(lambda a: a[i], tree)


def linen_layer_inputs(variables, x):
  """What each scanned layer's Observe saw, recomputed layer by layer with unscanned modules."""
  out = []
  for i in range(LAYERS):
    layer = {
      "params": per_layer(variables["params"]["blocks"], i),
      "observers": per_layer(variables["observers"]["blocks"], i),
    }
    h = nn.Dense(6).apply({"params": layer["params"]["Dense_0"]}, x)
    out.append(h)
    (x, _), _ = Block().apply(layer, x, None, mutable=["observers"])  # as in calibration
  return out


def test_linen_scan_qparams_are_stacked_without_extra_variable_axes():
  model, xs = Scanned(), data()
  variables = model.init(jax.random.key(0), xs[0])
  variables = jo.linen.calibrate(model, variables, xs, mutable=["observers", "params"])
  qparams = jo.linen.calculate_qparams(model, variables, xs[0])
  assert set(qparams["blocks"]) == {"obs", "fq", "lsq"}
  assert qparams["blocks"]["obs"].scale.shape == (LAYERS,)
  assert qparams["blocks"]["fq"].scale.shape == (LAYERS, 6)
  for i in range(LAYERS):
    state = per_layer(variables["observers"]["blocks"]["obs"]["state"], i)
    chex.assert_trees_all_equal(
      per_layer(qparams["blocks"]["obs"], i), OBSERVER.calculate_qparams(state)
    )
    fq_state = per_layer(variables["observers"]["blocks"]["fq"]["state"], i)
    chex.assert_trees_all_equal(
      per_layer(qparams["blocks"]["fq"], i), FAKE_QUANT.calculate_qparams(fq_state)
    )
    lsq_state = per_layer(variables["observers"]["blocks"]["lsq"]["state"], i)
    lsq_params = per_layer(variables["params"]["blocks"]["lsq"], i)
    expected = LSQ.calculate_qparams(lsq_state.replace(**lsq_params))
    chex.assert_trees_all_equal(per_layer(qparams["blocks"]["lsq"], i), expected)


def test_linen_scan_layers_observe_their_own_inputs():
  model, xs = Scanned(), data()
  variables = model.init(jax.random.key(0), xs[0])
  calibrated = jo.linen.calibrate(model, variables, xs)
  ref = [OBSERVER.init(xs[0])] * LAYERS
  current = variables
  for x in xs:
    inputs = linen_layer_inputs(current, x)
    ref = [OBSERVER.update(r, h) for r, h in zip(ref, inputs, strict=True)]
    current = {**current, **model.apply(current, x, mutable=["observers"])[1]}
  for i in range(LAYERS):
    chex.assert_trees_all_equal(
      per_layer(calibrated["observers"]["blocks"]["obs"]["state"], i), ref[i]
    )


TOGGLES = [
  jo.enable_observer,
  jo.disable_observer,
  jo.enable_fake_quant,
  jo.disable_fake_quant,
  jo.enable_param_learning,
  jo.enable_static_estimate,
  jo.enable_static_observation,
]


def flags(tree):
  is_state = lambda n: isinstance(n, jo.FakeQuantizeState | jo.LearnableFakeQuantizeState)
  states = [s for s in jax.tree.leaves(tree, is_leaf=is_state) if is_state(s)]
  names = ("fake_quant_enabled", "observer_enabled", "static_enabled", "learning_enabled")
  return [getattr(s, n) for s in states for n in names if hasattr(s, n)]


@pytest.mark.parametrize("toggle", TOGGLES, ids=lambda f: f.__name__)
def test_linen_toggles_keep_stacked_flags_and_the_model_runs(toggle):
  model, xs = Scanned(), data()
  variables = jo.linen.calibrate(model, model.init(jax.random.key(0), xs[0]), xs[:1])
  toggled = toggle(variables)
  before, after = flags(variables), flags(toggled)
  assert [f.shape for f in after] == [f.shape for f in before] == [(LAYERS,)] * len(before)
  assert all(f.dtype == jnp.bool_ for f in after)
  jax.jit(model.apply)(toggled, xs[1])
  model.apply(toggled, xs[1], mutable=["observers"])


def test_linen_unreached_observer_raises_naming_its_path():
  class Branchy(nn.Module):
    @nn.compact
    def __call__(self, x, use_b=False):
      a = jo.linen.Observe(OBSERVER, name="a")(x)
      return jo.linen.Observe(OBSERVER, name="b")(a) if use_b else a

  x = data()[0]
  variables = Branchy().init(jax.random.key(0), x, use_b=True)
  with pytest.raises(ValueError, match="'b' was not reached"):
    jo.linen.calculate_qparams(Branchy(), variables, x)
  assert set(jo.linen.calculate_qparams(Branchy(), variables, x, use_b=True)) == {"a", "b"}


@pytest.mark.parametrize(
  "form",
  [OBSERVER, jo.MinMaxObserver.with_args(dtype=jnp.int8, qscheme=jo.per_tensor_symmetric)],
  ids=["config", "partial"],
)
def test_linen_and_nnx_accept_configs_partials_and_classes(form):
  x = data()[0]
  for observer, expected in ((form, OBSERVER), (jo.HistogramObserver, jo.HistogramObserver())):
    module = jo.linen.Observe(observer)
    assert module.observer == expected
    variables = module.init(jax.random.key(0), x)
    _, updated = module.apply(variables, x, mutable=["observers"])
    chex.assert_trees_all_equal(updated["observers"]["state"], expected.update(expected.init(x), x))
    assert jo.nnx.Observe(observer, x).observer == expected
  assert jo.linen.FakeQuant(jo.FakeQuantize).config == jo.FakeQuantize()
  assert jo.nnx.FakeQuant(jo.FakeQuantize.with_args(quant_min=0, quant_max=15), x).config == (
    jo.FakeQuantize(quant_min=0, quant_max=15)
  )
  with pytest.raises(TypeError, match="observer=3 is not a jax_observers config"):
    jo.linen.Observe(3)


def test_linen_calibrate_raises_when_nothing_changes_and_apply_computes_no_qparams():
  model, xs = Scanned(), data()
  variables = model.init(jax.random.key(0), xs[0])
  with pytest.raises(ValueError, match="no observer state changed"):
    jo.linen.calibrate(model, jo.disable_observer(variables), xs, mutable=["observer"])
  with pytest.raises(ValueError, match="no 'observers' collection"):
    jo.linen.calibrate(model, {"params": variables["params"]}, xs)
  # mutable=True returns the collections the model has, and no qparams collection
  _, updated = model.apply(variables, xs[0], mutable=True)
  assert set(updated) == {"observers", "params"}


class QuantMLP(nn.Module):
  observer: object = jo.MinMaxObserver(dtype=jnp.uint8)

  @nn.compact
  def __call__(self, x, quantize=None):
    x = jo.linen.Observe(self.observer, name="in")(x, quantize=quantize)
    x = nn.relu(nn.Dense(16)(x))
    x = jo.linen.Observe(self.observer, name="hidden")(x, quantize=quantize)
    return nn.Dense(4)(x)


def test_linen_quantize_mode_fake_quantizes_with_the_calibrated_qparams():
  model, xs = QuantMLP(), data()
  variables = jo.linen.calibrate(model, model.init(jax.random.key(0), xs[0]), xs)
  qparams = jo.linen.calculate_qparams(model, variables, xs[0])
  x = xs[1] * 2
  quant_min, quant_max = model.observer.quant_range
  by_hand = jo.fake_quantize_per_tensor_affine(x, *qparams["in"], quant_min, quant_max)
  h = nn.relu(nn.Dense(16).apply({"params": variables["params"]["Dense_0"]}, by_hand))
  h = jo.fake_quantize_per_tensor_affine(h, *qparams["hidden"], quant_min, quant_max)
  expected = nn.Dense(4).apply({"params": variables["params"]["Dense_1"]}, h)
  np.testing.assert_array_equal(model.apply(variables, x, quantize=True), expected)
  # the attribute form, and quantize mode never observes even when the collection is mutable
  attr = QuantMLP(observer=model.observer)
  quantized = lambda: jo.linen.Observe(model.observer, quantize=True)
  assert quantized().quantize
  _, same = attr.apply(variables, x, quantize=True, mutable=["observers"])
  chex.assert_trees_all_equal(same["observers"], variables["observers"])


class NnxBlock(nnx.Module):
  def __init__(self, rngs):
    example = jnp.zeros((8, 6))
    self.lin = nnx.Linear(6, 6, rngs=rngs)
    self.obs = jo.nnx.Observe(OBSERVER, example)
    self.fq = jo.nnx.FakeQuant(FAKE_QUANT, example)
    self.lsq = jo.nnx.FakeQuant(LSQ, example)

  def __call__(self, x):
    return x + nnx.relu(self.lsq(self.fq(self.obs(self.lin(x)))))


class NnxStack(nnx.Module):
  def __init__(self):
    @nnx.split_rngs(splits=LAYERS)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
      return NnxBlock(rngs)

    self.blocks = create(nnx.Rngs(0))

  def __call__(self, x):
    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def run(block, x):
      return block(x)

    return run(self.blocks, x)


def test_nnx_scan_and_vmap_stacks_give_stacked_qparams():
  model, xs = NnxStack(), data()
  jo.nnx.calibrate(model, xs)
  qparams = jo.nnx.calculate_qparams(model)
  assert set(qparams) == {"blocks/obs", "blocks/fq", "blocks/lsq"}
  assert qparams["blocks/fq"].scale.shape == (LAYERS, 6)
  for i in range(LAYERS):
    state = per_layer(model.blocks.obs.state.get_value(), i)
    chex.assert_trees_all_equal(
      per_layer(qparams["blocks/obs"], i), OBSERVER.calculate_qparams(state)
    )

  # nnx.vmap over a stack of observers, each fed its own batch
  @nnx.vmap(in_axes=(0, 0))
  def observe(block, x):
    return block(x)

  observe(model.blocks, jnp.stack(xs))
  stacked = jo.nnx.calculate_qparams(model)["blocks/obs"]
  for i in range(LAYERS):
    state = per_layer(model.blocks.obs.state.get_value(), i)
    chex.assert_trees_all_equal(per_layer(stacked, i), OBSERVER.calculate_qparams(state))


NNX_TOGGLES = [
  lambda m: jo.nnx.enable_observer(m),
  jo.nnx.disable_observer,
  lambda m: jo.nnx.enable_fake_quant(m),
  jo.nnx.disable_fake_quant,
  jo.nnx.enable_param_learning,
  jo.nnx.enable_static_estimate,
  jo.nnx.enable_static_observation,
]


@pytest.mark.parametrize("toggle", NNX_TOGGLES, ids=[str(i) for i in range(len(NNX_TOGGLES))])
def test_nnx_toggles_keep_stacked_flags_and_the_model_runs(toggle):
  model, xs = NnxStack(), data()
  jo.nnx.calibrate(model, xs[:1])
  toggle(model)
  for module in (model.blocks.fq, model.blocks.lsq):
    assert all(f.shape == (LAYERS,) for f in flags(module.state.get_value()))
  model(xs[1])
  nnx.jit(lambda m, x: m(x))(model, xs[2])


def test_nnx_quantize_mode_and_calibrate_errors():
  x = data()[0]
  obs = jo.nnx.Observe(jo.MinMaxObserver(), x)
  with pytest.raises(ValueError, match="no observer state changed"):
    jo.nnx.calibrate(obs, [jnp.full_like(x, jnp.nan)])
  jo.nnx.calibrate(obs, [x])
  obs.set_attributes(quantize=True)
  qp = obs.calculate_qparams()
  np.testing.assert_array_equal(obs(x * 3), jo.fake_quantize_per_tensor_affine(x * 3, *qp, 0, 255))
  chex.assert_trees_all_equal(obs.calculate_qparams(), qp)  # quantize mode observes nothing


def test_a_state_that_does_not_fit_its_observer_is_named():
  from jax_observers._src import stacked

  spec = jax.ShapeDtypeStruct((3,), jnp.float32)
  state = jo.MinMaxObserver().init(jnp.zeros(3))
  with pytest.raises(ValueError, match="the state at 'a/b' does not fit its observer"):
    stacked.leading_axes(jo.HistogramObserver(), state, spec, "a/b")
