"""state_dict / load_state_dict: torch's keys and shapes, both directions, and the strict checks."""

import warnings

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from torch_oracle import torch, torch_observer

import jax_observers as jo


def torch_load(t, d):
  t.load_state_dict({k: torch.from_numpy(v) for k, v in d.items()})
  return t


@pytest.mark.parametrize(
  "obs",
  [
    jo.MinMaxObserver(dtype=jnp.int8),
    jo.MovingAverageMinMaxObserver(qscheme=jo.per_tensor_symmetric),
    jo.PerChannelMinMaxObserver(ch_axis=1),
    jo.MovingAveragePerChannelMinMaxObserver(ch_axis=0, averaging_constant=0.5),
  ],
  ids=lambda o: type(o).__name__,
)
def test_our_state_moves_into_torch_and_continues_identically(obs):
  rng = np.random.default_rng(0)
  xs = [rng.standard_normal((4, 3)).astype(np.float32) * (i + 1) for i in range(4)]
  state = obs.init(xs[0])
  for x in xs[:2]:
    state = obs.update(state, x)
  d = jo.state_dict(obs, state)
  t = torch_observer(obs)
  assert [k for k in d] == list(t.state_dict())  # same keys, same order
  torch_load(t, d)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for x in xs[2:]:
      t(torch.from_numpy(x))
      state = obs.update(state, x)
    t_scale, t_zp = t.calculate_qparams()
  scale, zero_point = obs.calculate_qparams(state)
  np.testing.assert_array_equal(np.reshape(scale, -1), t_scale.numpy().reshape(-1))
  np.testing.assert_array_equal(np.reshape(zero_point, -1), t_zp.numpy().reshape(-1))


def test_fresh_per_channel_state_exports_torchs_empty_buffers_and_loads_back():
  obs = jo.MovingAveragePerChannelMinMaxObserver()
  d = jo.state_dict(obs, obs.init(jnp.zeros((3, 2))))
  t = torch_observer(obs)
  for k, v in t.state_dict().items():
    assert d[k].shape == tuple(v.shape), k
  state = jo.load_state_dict(obs, t.state_dict())
  assert state.min_val.shape == (0,)
  scale, zero_point = obs.calculate_qparams(state)  # torch's default for no data
  assert scale.tolist() == [1.0] and zero_point.tolist() == [0]
  x = jnp.arange(6.0).reshape(3, 2)
  chex.assert_trees_all_equal(obs.update(state, x), obs.update(obs.init(x), x))


def test_strict_loading_names_the_problem():
  obs = jo.MinMaxObserver(eps=2.0**-12)
  d = jo.state_dict(obs, obs.init(jnp.zeros(2)))
  with pytest.raises(ValueError, match="eps"):
    jo.load_state_dict(jo.MinMaxObserver(), d)
  jo.load_state_dict(jo.MinMaxObserver(), d, strict=False)
  with pytest.raises(ValueError, match="unexpected keys"):
    jo.load_state_dict(obs, {**d, "histogram": np.zeros(3)})
  with pytest.raises(KeyError, match="missing"):
    jo.load_state_dict(obs, {"eps": d["eps"]})
  with pytest.raises(ValueError, match=r"min_val.*expected shape \[\] or \[1\]"):
    jo.load_state_dict(obs, {**d, "min_val": np.zeros(3, np.float32)})
  with pytest.raises(ValueError, match="RecordingObserver"):
    jo.load_state_dict(jo.RecordingObserver(), {})


def test_fixed_qparams_state_dict_matches_torch():
  obs = jo.default_fixed_qparams_range_neg1to1_observer()
  t = torch.ao.quantization.observer.default_fixed_qparams_range_neg1to1_observer()
  d = jo.state_dict(obs, obs.init())
  for k, v in t.state_dict().items():
    np.testing.assert_array_equal(d[k], v.numpy())
    assert d[k].dtype == v.numpy().dtype


def test_a_nan_poisoned_torch_state_is_refused_or_loaded_as_unobserved():
  t = torch.ao.quantization.PerChannelMinMaxObserver(ch_axis=0)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    t(torch.tensor([[1.0, float("nan")], [-2.0, 3.0]]))
  assert np.isnan(t.min_val.numpy()[0])  # torch's channel 0 is NaN for good
  obs = jo.PerChannelMinMaxObserver(ch_axis=0)
  with pytest.raises(ValueError, match="NaN"):
    jo.load_state_dict(obs, t.state_dict())
  state = jo.load_state_dict(obs, t.state_dict(), strict=False)
  assert state.min_val.tolist() == [np.inf, -2.0] and state.max_val.tolist() == [-np.inf, 3.0]
  with pytest.warns(UserWarning, match="a channel that saw no value"):
    scale, _ = obs.calculate_qparams(state)
  assert float(scale[0]) == 1.0  # channel 0 reads as never observed
