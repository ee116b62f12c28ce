"""FakeQuantize / FixedQParamsFakeQuantize against torch 2.13: training-style sequences, presets, state dicts."""

import functools
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec
from registry import sharded

import jax_observers as jo

torch = pytest.importorskip("torch")
from torch.ao.quantization import fake_quantize as tfq  # noqa: E402
from torch.ao.quantization import observer as tobs  # noqa: E402
from torch_oracle import TORCH_DTYPE, TORCH_QSCHEME  # noqa: E402

OBSERVER_FIELDS = ("dtype", "qscheme", "reduce_range", "eps", "averaging_constant", "ch_axis")


def bits(a):
  if isinstance(a, torch.Tensor):
    a = a.detach().numpy()
  a = np.array(a, np.float32)
  a[np.isnan(a)] = np.nan
  return a.view(np.uint32)


def torch_twin(fq: jo.FakeQuantize):
  """torch's FakeQuantize with the same observer class, arguments and range."""
  obs = fq.activation_post_process
  kwargs = {}
  for name in OBSERVER_FIELDS:
    if hasattr(obs, name):
      value = getattr(obs, name)
      if name == "dtype":
        value = TORCH_DTYPE[value]
      elif name == "qscheme":
        value = TORCH_QSCHEME[value]
      kwargs[name] = value
  cls = getattr(tobs, type(obs).__name__)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return tfq.FakeQuantize(cls, fq.quant_min, fq.quant_max, fq.is_dynamic, **kwargs)


def torch_step(module, x, dy):
  xt = torch.from_numpy(x.copy()).requires_grad_()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    y = module(xt)
  y.backward(torch.from_numpy(dy))
  return y.detach().numpy(), xt.grad.numpy()


@functools.partial(jax.jit, static_argnums=0)
def jax_step(fq, state, x, dy):
  y, pullback, new_state = jax.vjp(lambda a: fq.apply(state, a), x, has_aux=True)
  return y, new_state, pullback(dy)[0]


TOGGLES = [
  (1, 1),
  (1, 1),
  (0, 1),
  (1, 0),
  (1, 1),
  (0, 0),
  (1, 1),
]  # (observer, fake quant) per step


def random_fake_quantize(rng):
  cls = [
    jo.MovingAverageMinMaxObserver,
    jo.MinMaxObserver,
    jo.MovingAveragePerChannelMinMaxObserver,
    jo.PerChannelMinMaxObserver,
  ][rng.integers(4)]
  per_channel = issubclass(cls, jo.PerChannelMinMaxObserver)
  qschemes = [q for q in jo.QScheme if q.is_per_channel == per_channel]
  dtype = [jnp.uint8, jnp.int8, jnp.int32][rng.choice(3, p=[0.45, 0.45, 0.1])]
  kw = {
    "dtype": dtype,
    "qscheme": qschemes[rng.integers(len(qschemes))],
    "eps": [jo.FLOAT32_EPS, 2.0**-12][rng.integers(2)],
  }
  if kw["qscheme"] == jo.per_channel_affine_float_qparams:
    kw["dtype"] = jnp.uint8
  if rng.random() < 0.3 and not kw["qscheme"].is_symmetric:
    kw["reduce_range"] = True
  if "averaging_constant" in cls.__dataclass_fields__:
    kw["averaging_constant"] = float(rng.choice([0.01, 0.5, 1.0]))
  if per_channel:
    kw["ch_axis"] = int(rng.integers(2))
  info = jnp.iinfo(kw["dtype"])
  quant_range = {}
  if rng.random() < 0.7 and kw["dtype"] != jnp.int32:
    lo = int(rng.integers(info.min, 1))
    quant_range = {"quant_min": lo, "quant_max": int(rng.integers(1, min(info.max, lo + 255) + 1))}
  return jo.FakeQuantize(observer=cls.with_args(**kw), **quant_range)


def test_fake_quantize_matches_torch_over_training_sequences():
  rng = np.random.default_rng(0)
  for _ in range(7):
    fq = random_fake_quantize(rng)
    module = torch_twin(fq)
    shape = (6, 5)
    state = fq.init(np.zeros(shape, np.float32))
    for observe, quant in TOGGLES:
      module.enable_observer(bool(observe))
      module.enable_fake_quant(bool(quant))
      state = state.enable_observer(observe).enable_fake_quant(quant)
      x = (rng.standard_normal(shape) * rng.uniform(0.1, 10) + rng.uniform(-2, 2)).astype(
        np.float32
      )
      x[0, :2] = (np.arange(2) + 0.5) * np.float32(module.scale.reshape(-1)[0].item())
      dy = rng.standard_normal(shape).astype(np.float32)
      y, state, dx = jax_step(fq, state, x, dy)
      ty, tdx = torch_step(module, x, dy)
      msg = f"{fq} at toggles {observe, quant}"
      np.testing.assert_array_equal(bits(y), bits(ty), err_msg=msg)
      np.testing.assert_array_equal(bits(dx), bits(tdx), err_msg=msg)
      np.testing.assert_array_equal(bits(state.scale).reshape(-1), bits(module.scale), err_msg=msg)
      np.testing.assert_array_equal(
        np.asarray(state.zero_point).reshape(-1), module.zero_point.numpy(), err_msg=msg
      )
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      ts, tz = module.calculate_qparams()
    s, z = fq.calculate_qparams(state)
    np.testing.assert_array_equal(bits(s).reshape(-1), bits(ts))
    np.testing.assert_array_equal(np.asarray(z).reshape(-1), tz.numpy().reshape(-1))


def test_symmetric_quint8_custom_range_zero_point_is_127():  # torch E26
  fq = jo.FakeQuantize(
    observer=jo.MovingAverageMinMaxObserver.with_args(qscheme=jo.per_tensor_symmetric),
    quant_min=0,
    quant_max=255,
  )
  x = jnp.array([-1.0, 2.0])
  assert int(fq.apply(fq.init(x), x)[1].zero_point) == 127


FAKE_QUANT_PRESETS = [
  "default_fake_quant",
  "default_weight_fake_quant",
  "default_dynamic_fake_quant",
  "default_per_channel_weight_fake_quant",
  "default_embedding_fake_quant",
  "default_embedding_fake_quant_4bit",
  "default_fixed_qparams_range_neg1to1_fake_quant",
  "default_fixed_qparams_range_0to1_fake_quant",
  "default_symmetric_fixed_qparams_fake_quant",
  "default_affine_fixed_qparams_fake_quant",
  "default_histogram_fake_quant",
  "default_fused_act_fake_quant",
  "default_fused_wt_fake_quant",
  "default_fused_per_channel_wt_fake_quant",
  "fused_wt_fake_quant_range_neg_127_to_127",
  "fused_per_channel_wt_fake_quant_range_neg_127_to_127",
]


NUMERIC_PRESETS = (
  "default_fake_quant",
  "default_dynamic_fake_quant",
  "default_per_channel_weight_fake_quant",
  "default_embedding_fake_quant_4bit",
  "default_fixed_qparams_range_neg1to1_fake_quant",
  "default_histogram_fake_quant",
)


@pytest.mark.parametrize("name", FAKE_QUANT_PRESETS)
def test_presets_match_torch(name):
  fq = getattr(jo, name)()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    module = getattr(tfq, name)()
  obs, tob = fq.activation_post_process, module.activation_post_process
  assert fq.quant_range == (tob.quant_min, tob.quant_max)
  assert fq.activation_post_process.qscheme.value == str(tob.qscheme).removeprefix("torch.")
  for attr in ("averaging_constant", "ch_axis", "eps", "reduce_range", "is_dynamic"):
    if hasattr(tob, attr):
      want = getattr(tob, attr)
      want = want.item() if hasattr(want, "item") else want
      assert getattr(obs, attr) == pytest.approx(want), attr
  rng = np.random.default_rng(1)
  shape = (4, 16)
  state = fq.init(np.zeros(shape, np.float32))
  if name not in NUMERIC_PRESETS:  # the others share their code paths with these
    ours, theirs = jo.state_dict(fq, state), module.state_dict()
    assert sorted(ours) == sorted(theirs)
    assert all(ours[k].dtype == v.numpy().dtype for k, v in theirs.items())
    return
  for _ in range(2):
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    y, state = jax.jit(fq.apply)(state, x)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      ty = module(torch.from_numpy(x))
    np.testing.assert_array_equal(bits(y), bits(ty.numpy()))
    np.testing.assert_array_equal(bits(state.scale).reshape(-1), bits(module.scale))
  ours = jo.state_dict(fq, state)
  theirs = module.state_dict()
  assert sorted(ours) == sorted(theirs)
  for key, value in theirs.items():
    assert ours[key].dtype == value.numpy().dtype, key
    assert ours[key].shape == tuple(value.shape), key


def test_fixed_qparams_fake_quantize_values_and_errors():
  fq = jo.default_fixed_qparams_range_neg1to1_fake_quant()
  x = jnp.array([-1.0, 0.0, 0.99, 1.0])
  assert fq.apply(fq.init(), x)[0].tolist() == [-1.0, 0.0, 0.9921875, 0.9921875]
  qp = fq.calculate_qparams(fq.init())
  assert (float(qp.scale), int(qp.zero_point)) == (2.0 / 256.0, 128)
  with pytest.raises(TypeError, match="FixedQParamsObserver"):
    jo.FixedQParamsFakeQuantize(observer=jo.MinMaxObserver)


@pytest.mark.parametrize(
  "make, error, match",
  [
    (lambda: jo.FakeQuantize(quant_min=5, quant_max=4), ValueError, "quant_min=5"),
    (lambda: jo.FakeQuantize(quant_min=-1, quant_max=255), ValueError, "out of bounds"),
    (
      lambda: jo.FakeQuantize(
        observer=jo.MinMaxObserver.with_args(dtype=jnp.float8_e4m3fn), quant_min=0, quant_max=15
      ),
      TypeError,
      "integer observer dtype",
    ),
    (lambda: jo.FakeQuantize(observer=jo.PlaceholderObserver), TypeError, "quantized range"),
    (lambda: jo.FakeQuantize(observer=int), TypeError, "Observer class"),
    (lambda: jo.FakeQuantize.with_args(dtype=jnp.int8), TypeError, "dtype"),
  ],
)
def test_bad_configs_raise(make, error, match):
  with pytest.raises(error, match=match):
    make()


def test_config_is_hashable_and_equal_however_the_observer_is_given():
  by_partial = jo.FakeQuantize(observer=jo.MinMaxObserver.with_args(dtype=jnp.int8))
  by_instance = jo.FakeQuantize(observer=jo.MinMaxObserver(dtype=jnp.int8))
  assert by_partial == by_instance and hash(by_partial) == hash(by_instance)
  assert by_partial.replace(quant_min=-8, quant_max=7).quant_range == (-8, 7)


def test_toggles_work_on_trees_and_never_recompile():
  fq = jo.default_fake_quant()
  x = jnp.linspace(-1.0, 3.0, 7)
  tree = {"a": fq.init(x), "b": [fq.init(x)], "other": jnp.ones(2)}
  off = jo.disable_fake_quant(jo.disable_observer(tree))
  assert not bool(off["b"][0].observer_enabled) and not bool(off["a"].fake_quant_enabled)
  chex.assert_trees_all_equal(off["other"], tree["other"])
  step = jax.jit(fq.apply)
  y_off, state_off = step(off["a"], x)
  np.testing.assert_array_equal(y_off, x)  # identity
  chex.assert_trees_all_equal(state_off, off["a"])  # nothing observed
  y_on, _ = step(jo.enable_fake_quant(jo.enable_observer(off))["a"], x)
  assert not np.array_equal(y_on, x)
  assert step._cache_size() == 1


def test_axis_name_over_8_devices_equals_one_replica_on_the_global_batch():
  rng = np.random.default_rng(2)
  per_channel = jo.FakeQuantize(
    observer=jo.MovingAveragePerChannelMinMaxObserver.with_args(
      ch_axis=1, dtype=jnp.int8, qscheme=jo.per_channel_symmetric
    ),
    quant_min=-128,
    quant_max=127,
  )
  for fq in (jo.default_fake_quant(), per_channel):

    @functools.partial(sharded, out_specs=(PartitionSpec("data"), PartitionSpec()))
    def sharded_apply(state, x, fq=fq):
      return fq.apply(state, x, axis_name="data")

    state = single = fq.init(np.zeros((32, 3), np.float32))
    for _ in range(3):
      x = (rng.standard_normal((32, 3)) * 4).astype(np.float32)
      y, state = sharded_apply(state, x)
      y_single, single = jax.jit(fq.apply)(single, x)
      np.testing.assert_array_equal(bits(y), bits(y_single))
      chex.assert_trees_all_equal(jax.tree.map(np.asarray, state), jax.tree.map(np.asarray, single))


@pytest.mark.parametrize(
  "name",
  [
    "default_fake_quant",
    "default_per_channel_weight_fake_quant",
    "default_embedding_fake_quant",
    "default_fixed_qparams_range_0to1_fake_quant",
  ],
)
def test_state_dict_round_trips_through_torch(name):
  rng = np.random.default_rng(3)
  fq = getattr(jo, name)()
  x = (rng.standard_normal((4, 6)) * 2).astype(np.float32)
  _, state = fq.apply(fq.init(x), x)
  state = state.disable_fake_quant()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    module = getattr(tfq, name)()
    module.load_state_dict({k: torch.from_numpy(v) for k, v in jo.state_dict(fq, state).items()})
    module(torch.from_numpy(x))  # observes once more, fake quant off
  _, state = fq.apply(state, x)
  back = jo.load_state_dict(fq, module.state_dict())
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, back), jax.tree.map(np.asarray, state))


def test_loading_a_never_observed_per_channel_torch_module_needs_an_example():
  fresh = tfq.default_per_channel_weight_fake_quant().state_dict()
  fq = jo.default_per_channel_weight_fake_quant()
  with pytest.raises(ValueError, match="example="):
    jo.load_state_dict(fq, fresh)
  example = np.zeros((5, 2), np.float32)
  chex.assert_trees_all_equal(jo.load_state_dict(fq, fresh, example=example), fq.init(example))
