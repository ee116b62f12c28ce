"""Every observer torch also has loads the real torch module's state dict, and gives its qparams."""

import dataclasses
import inspect
import warnings

import chex
import jax
import numpy as np
import pytest
from registry import CASES, batches, observe, qparams_or_none
from torch_oracle import TORCH_DTYPE, TORCH_QSCHEME, torch

import jax_observers as jo

_FLOAT_TORCH = {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16}


def torch_twin(obs):
  """The torch observer of the same class and config, or None where torch has none."""
  cls = getattr(torch.ao.quantization.observer, type(obs).__name__, None)
  if cls is None:
    return None
  params = inspect.signature(cls.__init__).parameters
  kwargs = {}
  for field in dataclasses.fields(obs):
    if field.name in params and field.init:
      value = getattr(obs, field.name)
      if isinstance(value, np.dtype):
        value = {**TORCH_DTYPE, **_FLOAT_TORCH}[value]
      elif isinstance(value, jo.QScheme):
        value = TORCH_QSCHEME[value]
      kwargs[field.name] = value
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return cls(**kwargs)


def _has_torch_twin(case) -> bool:
  obs = case.values[0]
  return getattr(torch.ao.quantization.observer, type(obs).__name__, None) is not None


@pytest.mark.parametrize("obs, shape", [c for c in CASES if _has_torch_twin(c)])
def test_loads_torchs_own_state_dict(obs, shape):
  """Observers torch also has (the others have no torch state dict to load)."""
  twin = torch_twin(obs)
  xs = batches(shape)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for x in xs:
      twin(torch.from_numpy(x))
    torch_qparams = (
      None if qparams_or_none(obs, obs.init(xs[0])) is None else twin.calculate_qparams()
    )
  loaded = jo.load_state_dict(obs, twin.state_dict(), example=xs[0])
  expected = obs.init(xs[0]) if isinstance(obs, jo.RecordingObserver) else observe(obs, xs)
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, loaded), jax.tree.map(np.asarray, expected))
  if torch_qparams is not None:
    scale, zero_point = obs.calculate_qparams(loaded)
    np.testing.assert_array_equal(np.reshape(scale, -1), torch_qparams[0].numpy().reshape(-1))
    np.testing.assert_array_equal(np.reshape(zero_point, -1), torch_qparams[1].numpy().reshape(-1))


@pytest.mark.parametrize("obs, shape", [c for c in CASES if _has_torch_twin(c)])
def test_torchs_strict_load_accepts_our_state_dict(obs, shape):
  xs = batches(shape)
  d = jo.state_dict(obs, observe(obs, xs))
  twin = torch_twin(obs)
  twin.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in d.items()}, strict=True)
  for key, value in twin.state_dict().items():
    np.testing.assert_array_equal(value.numpy(), d[key])
