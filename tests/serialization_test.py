"""The one serialization registry: every config's state dict goes through the same checks."""

import copy

import chex
import numpy as np
import pytest
from registry import CASES, batches, observe

import jax_observers as jo


def _state_dict(obs, shape):
  xs = batches(shape)
  return jo.state_dict(obs, observe(obs, xs)), xs[0]


@pytest.mark.parametrize("obs, shape", CASES)
def test_loading_never_mutates_its_input(obs, shape):
  d, example = _state_dict(obs, shape)
  before = copy.deepcopy(d)
  loaded = jo.load_state_dict(obs, d, example=example)
  chex.assert_trees_all_equal(d, before)
  # what was loaded shares no memory with the dict: changing the dict leaves the state alone
  for value in d.values():
    if value.size:
      value.reshape(-1)[0] = 7
  chex.assert_trees_all_equal(jo.load_state_dict(obs, before, example=example), loaded)


def _eps_keys(d) -> list[str]:
  return [k for k in d if k == "eps" or k.endswith(".eps")]


# The configs whose torch state dict holds an eps (torch's layouts decide which do).
EPS_CASES = [case for case in CASES if _eps_keys(_state_dict(*case.values)[0])]


def test_the_eps_cases_cover_every_family_with_an_eps():
  names = {type(case.values[0]).__name__ for case in EPS_CASES}
  assert {"MinMaxObserver", "HistogramObserver", "HistogramPercentileObserver"} <= names, names
  assert {"FakeQuantize", "LearnableFakeQuantize"} <= names, names


@pytest.mark.parametrize("obs, shape", EPS_CASES)
def test_every_eps_key_is_checked_against_the_config(obs, shape):
  """An ``eps`` that is not the config's is refused under strict loading, for every family alike
  (the percentile calibrator once accepted 0.5 where HistogramObserver refused it)."""
  d, example = _state_dict(obs, shape)
  for key in _eps_keys(d):
    wrong = {**d, key: np.array([0.5], np.float32)}
    with pytest.raises(ValueError, match=r"state_dict\['eps'\] = float32\[1\] \[0.5\]"):
      jo.load_state_dict(obs, wrong, example=example)
    jo.load_state_dict(obs, wrong, strict=False, example=example)  # torch's non-strict load


@pytest.mark.parametrize("obs, shape", CASES)
def test_unknown_and_missing_keys_get_the_same_errors(obs, shape):
  d, example = _state_dict(obs, shape)
  with pytest.raises(ValueError, match=r"\w+ state_dict has unexpected keys \['bogus'\]"):
    jo.load_state_dict(obs, {**d, "bogus": np.zeros(1)}, example=example)
  if d:
    key = sorted(d)[-1]
    with pytest.raises(KeyError, match=rf"missing \['{key.split('.')[-1]}'\]"):
      jo.load_state_dict(obs, {k: v for k, v in d.items() if k != key}, example=example)


def test_the_percentile_calibrator_refuses_eps_as_histogram_observer_does():
  """The drift the issue showed: both histogram families now load through one eps check."""
  for obs in (jo.HistogramObserver(bins=16), jo.HistogramPercentileObserver(bins=16)):
    d = jo.state_dict(obs, obs.update(obs.init(np.ones(4, np.float32)), np.arange(4.0)))
    with pytest.raises(ValueError, match=r"differs from the observer's eps"):
      jo.load_state_dict(obs, {**d, "eps": np.array([0.5], np.float32)})
