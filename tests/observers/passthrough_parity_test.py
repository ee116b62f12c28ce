"""Fixed, placeholder, noop, reuse-input and recording observers, and the default_* presets."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from torch_oracle import TORCH_DTYPE, TORCH_QSCHEME, torch

import jax_observers as jo

tobs = torch.ao.quantization.observer

PRESETS = [
  "default_observer",
  "default_weight_observer",
  "weight_observer_range_neg_127_to_127",
  "default_per_channel_weight_observer",
  "per_channel_weight_observer_range_neg_127_to_127",
  "default_float_qparams_observer",
  "default_float_qparams_observer_4bit",
  "default_fixed_qparams_range_neg1to1_observer",
  "default_fixed_qparams_range_0to1_observer",
  "default_symmetric_fixed_qparams_observer",
  "default_affine_fixed_qparams_observer",
  "default_dynamic_quant_observer",
]


@pytest.mark.parametrize("name", PRESETS)
def test_presets_build_torchs_configs_and_numbers(name):
  ours, theirs = getattr(jo, name)(), getattr(tobs, name)()
  assert type(ours).__name__ == type(theirs).__name__
  assert TORCH_DTYPE.get(ours.dtype, ours.dtype) == theirs.dtype or ours.dtype == np.uint8
  assert TORCH_QSCHEME[ours.qscheme] == theirs.qscheme
  assert ours.quant_range == (theirs.quant_min, theirs.quant_max)
  if isinstance(ours, jo.PlaceholderObserver):
    assert ours.is_dynamic == theirs.is_dynamic
    return
  x = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    theirs(torch.from_numpy(x))
    t_scale, t_zp = theirs.calculate_qparams()
  scale, zero_point = ours.calculate_qparams(ours.update(ours.init(x), x))
  np.testing.assert_array_equal(np.reshape(scale, -1), t_scale.numpy().reshape(-1))
  np.testing.assert_array_equal(np.reshape(zero_point, -1), t_zp.numpy().reshape(-1))


def test_class_presets_are_torchs_classes():
  assert jo.default_placeholder_observer is jo.PlaceholderObserver
  assert jo.default_debug_observer is jo.RecordingObserver
  assert jo.default_reuse_input_observer is jo.ReuseInputObserver


@pytest.mark.parametrize(
  "obs",
  [jo.PlaceholderObserver(), jo.NoopObserver(), jo.ReuseInputObserver(), jo.RecordingObserver()],
)
def test_passthrough_observers_raise_like_torch(obs):
  twin = getattr(tobs, type(obs).__name__)()
  with pytest.raises(Exception, match="calculate_qparams"):
    twin.calculate_qparams()
  with pytest.raises(jo.QParamsUnavailableError, match=type(obs).__name__):
    obs.calculate_qparams(obs.init(jnp.zeros(2)))


def test_placeholder_and_noop_defaults_match_torch():
  p, tp = jo.PlaceholderObserver(), tobs.PlaceholderObserver()
  assert p.dtype == np.float32 and tp.dtype == torch.float32
  assert TORCH_QSCHEME[p.qscheme] == tp.qscheme and p.eps == tp.eps
  assert jo.NoopObserver().dtype == np.float16 == np.dtype(str(tobs.NoopObserver().dtype)[6:])
  assert jo.ReuseInputObserver().dtype == np.uint8


def test_recording_ring_buffer_keeps_the_newest_in_order():
  obs = jo.RecordingObserver(capacity=3)
  update = jax.jit(obs.update)
  state = obs.init(jnp.zeros((2,)))
  t = tobs.RecordingObserver()
  for i in range(5):
    x = np.array([i, -i], np.float32)
    state = update(state, x)
    t(torch.from_numpy(x))
  recorded = obs.get_tensor_value(state)
  expected = [v.numpy() for v in t.get_tensor_value()][-3:]
  assert len(recorded) == 3
  for ours, theirs in zip(recorded, expected, strict=True):
    np.testing.assert_array_equal(ours, theirs)
  with pytest.raises(ValueError, match="shape"):
    update(state, jnp.zeros(3))


def test_fixed_qparams_observer_matches_torch_and_validates():
  obs = jo.FixedQParamsObserver(
    scale=0.1, zero_point=3, dtype=jnp.int8, quant_min=-128, quant_max=127
  )
  t = tobs.FixedQParamsObserver(
    scale=0.1, zero_point=3, dtype=torch.qint8, quant_min=-128, quant_max=127
  )
  scale, zero_point = obs.calculate_qparams(obs.update(obs.init(), jnp.ones(3) * 100))
  t(torch.ones(3) * 100)
  t_scale, t_zp = t.calculate_qparams()
  assert np.float32(scale) == t_scale.numpy()[0] and int(zero_point) == t_zp.item()
  with pytest.raises(ValueError, match="scale"):
    jo.FixedQParamsObserver(scale=float("inf"), zero_point=0)
  with pytest.raises(ValueError, match="zero_point"):
    jo.FixedQParamsObserver(scale=0.1, zero_point=0.5)
  with pytest.raises(NotImplementedError, match="is_dynamic"):
    jo.FixedQParamsObserver(scale=0.1, zero_point=0, is_dynamic=True)
